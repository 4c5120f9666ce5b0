"""Live == offline on the real pipeline: `vigil up` (NATS, BentoML server, worker, gateway on SQLite,
ingest) with a quick model in a temporary BentoML store; `replay` writes each stay's Patient and
Encounters over FHIR and streams its readings over gRPC; every stay's final RiskAssessments, read back
over FHIR, equal the offline predictions (same features module, same model) to 1e-6."""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xgboost as xgb
from vigil_inference import features as F
from vigil_inference.evaluate import read_live_scores

from vigil import devservers, physionet, timecontract

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not physionet.default_dataset().exists(), reason="PhysioNet data set not present")]
N_STAYS = 5


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    home = tmp_path_factory.mktemp("live")
    env = {**os.environ, "BENTOML_HOME": str(home / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    code = ("import json; from vigil_inference.train import train; r = train(limit=300, quick=True, n_boot=2); "
            "print('RESULT', json.dumps({'path': r.path, 'threshold': r.threshold, 'tag': r.tag}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    http_port, grpc_port = devservers.free_port(), devservers.free_port()
    log = open(home / "up.log", "ab")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "vigil.cli", "up", "--data-dir", str(home / "data"),
                             "--http-port", str(http_port), "--grpc-listen", f"127.0.0.1:{grpc_port}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import httpx

        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (home / "up.log").read_text()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=2).status_code == 200:
                    devservers.wait_for_port(grpc_port, 60, proc)
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (home / "up.log").read_text()[-4000:]
            time.sleep(0.5)
        booster = xgb.Booster()
        booster.load_model(pathlib.Path(result["path"]) / "model.json")
        yield {"fhir": f"http://127.0.0.1:{http_port}/fhir", "grpc": f"127.0.0.1:{grpc_port}",
               "booster": booster, "home": home, **result}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_live_probabilities_equal_offline(pipeline):
    from vigil_ingest.replay import replay

    data = physionet.default_dataset()
    stays = list(physionet.iter_stays(data, limit=N_STAYS))
    asyncio.run(replay(data, target=pipeline["grpc"], limit=N_STAYS, fhir_base=pipeline["fhir"]))
    t0 = timecontract.DEFAULT_T0.timestamp()
    expected: dict[str, dict[int, float]] = {}
    for stay in stays:
        x, _, dropped = F.stay_features(stay)
        p = pipeline["booster"].predict(xgb.DMatrix(x, missing=np.nan, feature_names=F.feature_names()))
        raw = stay.data[dropped:, :F.N_KEYS]
        expected[stay.stem] = {int(timecontract.row_effective_epoch(t0, int(k))): float(pi)
                               for k, pi, row in zip(stay.iculos[dropped:], p, raw, strict=True)
                               if not np.isnan(row).all()}  # intervals with data get an assessment
    deadline = time.monotonic() + 180
    while True:
        live = read_live_scores(pipeline["fhir"], list(expected))
        bad = {stem: [s for s in exp if s not in live[stem] or abs(live[stem][s] - exp[s]) > 1e-6]
               for stem, exp in expected.items()}
        bad = {k: v for k, v in bad.items() if v}
        if not bad:
            break
        if time.monotonic() > deadline:
            sample = {k: [(s, live[k].get(s), expected[k][s]) for s in v[:3]] for k, v in bad.items()}
            pytest.fail(f"live != offline for {len(bad)} stays, e.g. {sample}; logs in {pipeline['home']}")
        time.sleep(2.0)
    for stem, exp in expected.items():
        assert set(live[stem]) == set(exp), stem  # no assessment for intervals without data
    news2 = read_live_scores(pipeline["fhir"], list(expected), model_name="vigil-news2")
    assert all(set(news2[s]) == set(expected[s]) for s in expected)
    assert all(0.0 <= v <= 1.0 for s in news2.values() for v in s.values())
