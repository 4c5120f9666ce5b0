"""Inference end to end on real processes: quick training into a temporary BentoML store, a real
`bentoml serve` subprocess, and the worker on the session's real NATS JetStream."""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import types
import uuid

import numpy as np
import pytest
import xgboost as xgb
from vigil_inference import features as F
from vigil_inference.client import ModelClient, encode_features
from vigil_inference.worker import Worker

from vigil import bus, devservers, physionet, timecontract
from vigil.ids import risk_assessment_id
from vigil.settings import Settings

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not physionet.default_dataset().exists(), reason="PhysioNet data set not present")]
BIN = pathlib.Path(sys.executable).parent


@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    """Train quick on 300 stays into a fresh BENTOML_HOME (a subprocess: BentoML reads it at import)."""
    home = tmp_path_factory.mktemp("bentoml")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    code = ("import json; from vigil_inference.train import train; r = train(limit=300, quick=True); "
            "print('RESULT', json.dumps(r.__dict__))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    path = pathlib.Path(result["path"])
    assert (path / "model.json").exists() and path.is_relative_to(home)
    booster = xgb.Booster()
    booster.load_model(path / "model.json")
    return types.SimpleNamespace(home=home, env=env, result=result, booster=booster)


@contextlib.contextmanager
def _model_process(args: list[str], env: dict, home: pathlib.Path, log_path: pathlib.Path):
    """A model server process (its own session) on a free port, until the block ends: yields the port."""
    port = devservers.free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*args, "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=str(home),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        devservers.wait_for_port(port, 90, proc)
        yield port
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.fixture(scope="module")
def model_server(model_store):
    home = model_store.home
    with _model_process([str(BIN / "bentoml"), "serve", "vigil_inference.service:SepsisRisk"], model_store.env,
                        home, home / "serve.log") as port:
        yield f"http://127.0.0.1:{port}"


def test_training_result_is_stored_with_metadata(model_store):
    env = model_store.env
    result = model_store.result
    assert result["tag"].startswith("vigil-sepsis:") and result["n_stays"] == 300
    assert 0 < result["threshold"] < 1 and result["n_folds"] == 3 and 0 < result["auroc"] <= 1
    lo, hi = result["auroc_ci"]
    assert lo <= hi and "NEWS2" in result["evaluation"]
    code = ("from vigil_inference.model import load_model; m = load_model(); "
            "print(m.version, m.threshold, len(m.feature_names))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    version, threshold, n = out.stdout.split()
    assert result["tag"] == f"vigil-sepsis:{version}" and float(threshold) == result["threshold"]
    assert int(n) == len(F.feature_names())


async def test_bentoml_predict_equals_booster(model_store, model_server):
    result = model_store.result
    booster = model_store.booster
    import httpx

    async with httpx.AsyncClient(base_url=model_server, timeout=30) as http:
        for _ in range(100):
            if (await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.3)
        assert (await http.get("/readyz")).status_code == 200
        stays = list(physionet.iter_stays(physionet.default_dataset(), limit=3))
        x = np.vstack([F.stay_features(s)[0] for s in stays])
        assert np.isnan(x).any()  # missing values travel as null
        expected = booster.predict(xgb.DMatrix(x, missing=np.nan, feature_names=F.feature_names()))
        r = await http.post("/predict", content=encode_features(x), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()), expected, rtol=0, atol=1e-6)
        # concurrent single-row requests go through the adaptive batcher
        client = ModelClient(model_server)
        rows = await asyncio.gather(*(client.predict(x[i:i + 1]) for i in range(20)))
        np.testing.assert_allclose(np.concatenate(rows), expected[:20], rtol=0, atol=1e-6)
        explained = await client.predict_explain(x[:7])
        np.testing.assert_allclose(explained[:, 0], expected[:7], rtol=0, atol=1e-6)
        assert explained.shape == (7, 11)
        meta = await client.metadata()
        assert meta["name"] == "vigil-sepsis" and meta["threshold"] == result["threshold"]
        assert meta["feature_names"] == F.feature_names() and result["tag"].endswith(meta["version"])
        await client.aclose()


@pytest.fixture
def https_model_server(model_store, tmp_path):
    """`vigil serve-model` with VIGIL_MODEL_TLS_CERT/KEY: (its https URL, the CA file)."""
    from tests.integration.pki import Pki

    pki = Pki(tmp_path)
    cert, key = pki.leaf("model", server=True)
    env = {**model_store.env, "VIGIL_MODEL_TLS_CERT": cert, "VIGIL_MODEL_TLS_KEY": key}
    with _model_process([sys.executable, "-m", "vigil.cli", "serve-model"], env, model_store.home,
                        tmp_path / "serve.log") as port:
        yield f"https://127.0.0.1:{port}", str(pki.ca_path)


async def test_model_server_over_https(model_store, https_model_server):
    """HTTPS only on the model server's port; the worker's client checks the certificate against
    VIGIL_MODEL_TLS_CA and scores as over HTTP."""
    import httpx

    url, ca = https_model_server
    async with httpx.AsyncClient(verify=ca, timeout=10) as http:
        for _ in range(100):
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(f"{url}/readyz")).status_code == 200:
                    break
            await asyncio.sleep(0.3)
    stays = list(physionet.iter_stays(physionet.default_dataset(), limit=2))
    x = np.vstack([F.stay_features(s)[0] for s in stays])
    expected = model_store.booster.predict(xgb.DMatrix(x, missing=np.nan, feature_names=F.feature_names()))
    client = ModelClient(url, ca=ca)
    try:
        np.testing.assert_allclose(await client.predict(x), expected, rtol=0, atol=1e-6)
        assert (await client.metadata())["threshold"] == model_store.result["threshold"]
    finally:
        await client.aclose()
    plain = ModelClient(url.replace("https://", "http://"))  # no plaintext on the TLS port
    with pytest.raises(httpx.TransportError):
        await plain.predict(x[:1])
    await plain.aclose()
    untrusting = ModelClient(url)  # the system trust store lacks the test CA
    with pytest.raises(httpx.ConnectError):
        await untrusting.predict(x[:1])
    await untrusting.aclose()


async def _drain(worker: Worker, expect_messages: int) -> list:
    """Step the worker until it has consumed `expect_messages` or is idle."""
    out = []
    for _ in range(60):
        got = await worker.step()
        out += got
        info = await worker._sub.consumer_info()
        if info.num_pending == 0 and info.num_ack_pending == 0 and not got:
            break
    return out


async def _risk_messages(js, prefix: str) -> list:
    sub = await js.pull_subscribe(f"vigil.v1.riskassessment.{prefix}.>", stream=bus.RISK_STREAM)
    msgs = []
    with contextlib.suppress(asyncio.TimeoutError):  # no more messages (nats-py raises either kind)
        while True:
            batch = await sub.fetch(500, timeout=1.0)
            msgs += batch
            for m in batch:
                await m.ack()
    await sub.unsubscribe()
    return msgs


async def test_worker_publishes_risk_assessments_and_dedupes_redelivery(model_store, model_server, nats_url):
    import nats

    result = model_store.result
    booster = model_store.booster
    prefix = "it" + uuid.uuid4().hex[:10]
    stays = list(physionet.iter_stays(physionet.default_dataset(), limit=2))
    patients = {f"{prefix}.{i}": s for i, s in enumerate(stays)}
    hours = 6
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    expected: dict[str, dict[int, float]] = {}
    n_msgs = 0
    for pid, stay in patients.items():
        per_hour = F.stay_observations(stay, pid)
        grid, _ = F.grid_from_stay(stay)
        offline = booster.predict(xgb.DMatrix(F.features_for_grid(grid), missing=np.nan,
                                              feature_names=F.feature_names()))
        dropped = len(stay.data) - len(grid)
        first = timecontract.interval_index(timecontract.DEFAULT_T0.timestamp()) + int(stay.iculos[dropped]) - 1
        expected[pid] = {}
        for h, obs in enumerate(per_hour[dropped:dropped + hours]):
            if not obs:
                continue
            expected[pid][first + h] = float(offline[h])
            await js.publish(bus.observation_subject(pid), bus.encode_bundle(obs),
                             headers={bus.MSG_ID: f"{prefix}/{pid}/{h}"})
            n_msgs += 1
    assert sum(len(v) for v in expected.values()) >= 8

    settings = Settings(nats_url=nats_url, bentoml_url=model_server, worker_name=f"w-{prefix}")
    client = ModelClient(model_server)
    worker = Worker(js, client, settings, batch_size=4, filter_subject=f"vigil.v1.observation.{prefix}.>",
                    ehr_filter_subject=f"vigil.v1.ehr.*.{prefix}.>", news2=False, anomaly=False)
    await worker.start()
    published = await _drain(worker, n_msgs)
    assert {(p.patient_id, p.interval_index) for p in published} == {
        (pid, i) for pid, ivs in expected.items() for i in ivs}

    msgs = await _risk_messages(js, prefix)
    latest: dict[str, dict] = {}
    for m in msgs:
        (ra,) = bus.decode_bundle(m.data)
        latest[m.headers[bus.MSG_ID]] = ra
    assert len(msgs) == len(latest)  # no duplicate messages
    by_key = {}
    for ra in latest.values():
        pid = ra["subject"]["reference"].removeprefix("Patient/")
        start = timecontract.interval_index(
            __import__("datetime").datetime.fromisoformat(ra["occurrencePeriod"]["start"].replace("Z", "+00:00"))
            .timestamp())
        by_key[(pid, start)] = ra
    for pid, ivs in expected.items():
        for interval, p in ivs.items():
            ra = by_key[(pid, interval)]
            start, end = timecontract.interval_bounds(interval)
            assert ra["id"] == risk_assessment_id(pid, "vigil-sepsis", start)
            assert ra["occurrencePeriod"] == {"start": F_instant(start), "end": F_instant(end)}
            pred = ra["prediction"][0]
            # online (bus -> state -> HTTP model) == offline (stay -> grid -> booster)
            assert pred["probabilityDecimal"] == pytest.approx(p, abs=1e-6)
            assert pred["qualitativeRisk"]["coding"][0]["code"] == ("high" if p >= result["threshold"] else "low")
            assert ra["basis"] and all(b["reference"].startswith("Observation/") for b in ra["basis"])
    assert len(by_key) == len(latest)

    # Redelivery: a fresh durable replays the whole stream -> identical results, deduplicated.
    worker2 = Worker(js, client, Settings(nats_url=nats_url, bentoml_url=model_server,
                                          worker_name=f"w2-{prefix}"),
                     batch_size=3, filter_subject=f"vigil.v1.observation.{prefix}.>",
                     ehr_filter_subject=f"vigil.v1.ehr.*.{prefix}.>", news2=False, anomaly=False)
    await worker2.start()
    republished = await _drain(worker2, n_msgs)
    assert {p.msg_id for p in republished} <= set(latest)
    assert len(await _risk_messages(js, prefix)) == len(msgs)

    # New data for an already scored interval: same RiskAssessment id, a new message (new version).
    pid = next(iter(expected))
    interval = max(expected[pid])
    from vigil.catalogue import load_catalogue
    from vigil.observation import build_observation

    extra = build_observation(load_catalogue().by_key["Lactate"], device_id=f"lab-{prefix}", patient_id=pid,
                              sequence=1, value=4.2, effective=timecontract.interval_bounds(interval)[0] + 1800)
    await js.publish(bus.observation_subject(pid), bus.encode_bundle([extra]))
    again = await _drain(worker, 1)
    assert [(p.patient_id, p.interval_index) for p in again] == [(pid, interval)]
    assert again[0].risk_assessment["id"] == by_key[(pid, interval)]["id"]
    assert {"reference": f"Observation/{extra['id']}"} in again[0].risk_assessment["basis"]
    assert len(await _risk_messages(js, prefix)) == len(msgs) + 1

    for w in (worker, worker2):
        await js.delete_consumer(bus.OBSERVATIONS_STREAM, w.durable)
        await js.delete_consumer(bus.EHR_STREAM, f"{w.durable}-ehr")
        await w.stop()
    await client.aclose()
    await nc.drain()


def F_instant(epoch):
    from vigil.observation import format_instant

    return format_instant(epoch)


async def test_run_entry_point_with_local_model_starts_and_shuts_down(model_store, nats_url):
    """`run` connects, binds its durable, scores with the in-process LocalModel twin and stops cleanly."""
    import nats
    from vigil_inference.client import LocalModel
    from vigil_inference.model import LoadedModel
    from vigil_inference.worker import run

    result = model_store.result
    booster = model_store.booster
    local = LocalModel(LoadedModel(booster=booster, threshold=result["threshold"],
                                   feature_names=F.feature_names(), version=result["tag"].split(":")[1]))
    prefix = "it" + uuid.uuid4().hex[:10]
    name = f"run-{prefix}"
    health_port = devservers.free_port()
    settings = Settings(nats_url=nats_url, bentoml_url="http://127.0.0.1:9", worker_name=name,
                        worker_health_listen=f"127.0.0.1:{health_port}")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js)
    ready = asyncio.Event()
    task = asyncio.create_task(run(settings, ready=ready, model_client=local,
                                   filter_subject=f"vigil.v1.observation.{prefix}.>",
                                   ehr_filter_subject=f"vigil.v1.ehr.*.{prefix}.>"))
    await asyncio.wait_for(ready.wait(), 20)
    stay = next(physionet.iter_stays(physionet.default_dataset(), limit=1))
    pid = f"{prefix}.0"
    obs = next(o for o in F.stay_observations(stay, pid) if o)
    risk = await js.subscribe(bus.risk_subject(pid))  # core subscription sees the JetStream publish
    await js.publish(bus.observation_subject(pid), bus.encode_bundle(obs))
    msg = await risk.next_msg(timeout=20)
    (ra,) = bus.decode_bundle(msg.data)
    assert ra["subject"]["reference"] == f"Patient/{pid}" and ra["method"]["text"].endswith(local.model.version)
    import httpx  # the kubelet's view: live and ready (bound, model answered, NATS connected)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{health_port}", timeout=5) as http:
        assert (await http.get("/healthz")).json()["status"] == "ok"
        r = await http.get("/readyz")
        assert r.status_code == 200, r.text
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(httpx.ConnectError):  # the health listener closes with the worker
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{health_port}/healthz")
    await js.delete_consumer(bus.OBSERVATIONS_STREAM, name)
    await js.delete_consumer(bus.EHR_STREAM, f"{name}-ehr")
    await risk.unsubscribe()
    await nc.drain()


def test_vigil_train_without_limit_stores_a_model(tmp_path):
    """`vigil train` with no --limit (what `vigil up` runs on first start), on a folder of 300 stays."""
    folder = tmp_path / "stays"
    folder.mkdir()
    for stay in physionet.iter_stays(physionet.default_dataset(), limit=300):
        rows = "\n".join("|".join("NaN" if math.isnan(v) else f"{v:g}" for v in row) for row in stay.data)
        (folder / f"{stay.stem}.psv").write_text("|".join(physionet.COLUMNS) + "\n" + rows + "\n")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run([sys.executable, "-m", "vigil.cli", "train", "--data", str(folder), "--card-dir",
                    str(tmp_path / "card")], env=env, check=True, timeout=300, capture_output=True)
    card = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert "AUROC" in card and "NEWS2" in card and "Limitations" in card
    assert re.search(r"and 0\.\d{3} on average\s+within one septic stay", card), card
    assert "| model |" in card.split("Where the AUROC comes from")[1]
    assert (tmp_path / "card" / "roc.png").stat().st_size > 1000 and (tmp_path / "card" / "calibration.png").exists()
    code = "from vigil_inference.model import load_model; m = load_model(); print(m.metadata['limit'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.split()[-1] == "all"


def test_bentoml_refuses_a_matrix_of_the_wrong_width(model_server):
    """Both predict endpoints answer 400, naming the expected width, instead of scoring garbage."""
    import httpx

    n = len(F.feature_names())
    for endpoint in ("predict", "predict_explain"):
        r = httpx.post(f"{model_server}/{endpoint}", json={"features": [[0.0] * (n - 1)]}, timeout=30)
        assert r.status_code == 400, (endpoint, r.status_code, r.text)
        assert f"rows x {n}" in r.text
