"""Unmodified third-party FHIR clients against a running gateway (bootstrap.run on a free port, real
NATS, SQLite store, auth off): fhirclient and fhirpy (PyPI) and fhir-kit-client (npm) read, search and
page. Also checks that a REST write is published on VIGIL_EHR (the outbox) with its Nats-Msg-Id."""
from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import subprocess
import threading
import time
import uuid

import httpx
import pytest
from vigil_gateway import bootstrap
from vigil_gateway.bootstrap import build_store

from vigil import bus
from vigil.devservers import free_port
from vigil.settings import Settings

pytestmark = pytest.mark.integration

LOINC = "http://loinc.org"
HR = "8867-4"
NODE_DIR = pathlib.Path(__file__).resolve().parents[1] / "clients" / "node"
N_OBS = 7


def _obs(i: int, patient: str) -> dict:
    return {"resourceType": "Observation", "id": f"{patient}-hr-{i}", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": HR, "display": "Heart rate"}]},
            "subject": {"reference": f"Patient/{patient}"},
            "effectiveDateTime": f"2026-01-01T10:{i:02d}:00Z",
            "valueQuantity": {"value": 80 + i, "unit": "/min", "system": "http://unitsofmeasure.org",
                              "code": "/min"}}


@pytest.fixture(scope="module")
def gateway(nats_url, tmp_path_factory):
    """(fhir base URL, patient id) of a gateway running in a background thread."""
    db = tmp_path_factory.mktemp("clients") / "gw.db"
    patient = "p" + uuid.uuid4().hex[:8]
    store = build_store(f"sqlite:///{db}")
    store.migrate()
    store.upsert_many([{"resourceType": "Patient", "id": patient, "gender": "female", "birthDate": "1950-01-02",
                        "identifier": [{"system": "https://physionet.org/content/challenge-2019/", "value": patient}]},
                       *[_obs(i, patient) for i in range(N_OBS)]])
    store.close()
    port = free_port()
    settings = Settings(nats_url=nats_url, database_url=f"sqlite:///{db}", http_port=port,
                        gateway_consumer_name="test-clients-" + uuid.uuid4().hex[:8])
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        ev = asyncio.Event()

        async def main():
            task = asyncio.ensure_future(bootstrap.run(settings, ready=ev))
            state["task"] = task
            await ev.wait()
            ready.set()
            await task
        try:
            loop.run_until_complete(main())
        except (asyncio.CancelledError, Exception) as exc:  # noqa: BLE001
            state["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(60) and "error" not in state, state.get("error")
    yield f"http://127.0.0.1:{port}/fhir", patient
    loop.call_soon_threadsafe(state["task"].cancel)
    thread.join(30)


def test_fhirclient_reads_searches_pages(gateway):
    from fhirclient import client
    from fhirclient.models.observation import Observation
    from fhirclient.models.patient import Patient

    base, patient = gateway
    smart = client.FHIRClient(settings={"app_id": "vigil-test", "api_base": base})
    p = Patient.read(patient, smart.server)
    assert p.id == patient and p.gender == "female" and p.birthDate.isostring == "1950-01-02"
    search = Observation.where(struct={"subject": f"Patient/{patient}", "code": f"{LOINC}|{HR}", "_count": "3"})
    got = list(search.perform_resources_iter(smart.server))  # follows the next links
    assert [o.id for o in got] == [f"{patient}-hr-{i}" for i in range(N_OBS - 1, -1, -1)]
    assert got[0].valueQuantity.value == 80 + N_OBS - 1


def test_fhirpy_reads_searches_pages(gateway):
    from fhirpy import SyncFHIRClient

    base, patient = gateway
    fc = SyncFHIRClient(base)
    p = fc.reference("Patient", patient).to_resource()
    assert p["gender"] == "female"
    search = fc.resources("Observation").search(subject=f"Patient/{patient}", code=f"{LOINC}|{HR}").limit(3)
    assert search.count() == N_OBS
    first = search.fetch()
    assert len(first) == 3
    everything = search.fetch_all()  # follows the next links
    assert [o["id"] for o in everything] == [f"{patient}-hr-{i}" for i in range(N_OBS - 1, -1, -1)]
    assert fc.resources("Patient").search(identifier=f"https://physionet.org/content/challenge-2019/|{patient}") \
        .first()["id"] == patient


@pytest.mark.skipif(shutil.which("npm") is None or shutil.which("node") is None, reason="needs node 20 + npm")
def test_fhir_kit_client_reads_searches_pages(gateway):
    base, patient = gateway
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True,
                   timeout=300)
    out = subprocess.run(["node", "check.mjs", base, patient, f"{LOINC}|{HR}"], cwd=NODE_DIR, check=True,
                         capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fhirVersion"] == "4.0.1"
    assert result["patient"] == {"id": patient, "gender": "female", "versionId": "1"}
    assert result["total"] == N_OBS and result["pages"] == 3
    assert result["ids"] == [f"{patient}-hr-{i}" for i in range(N_OBS - 1, -1, -1)]
    assert result["previousCount"] == 3


async def test_rest_write_is_published_on_the_ehr_stream(gateway, nats_url):
    import nats

    base, _ = gateway
    pid = "w" + uuid.uuid4().hex[:8]
    body = {"resourceType": "Patient", "id": pid, "gender": "male"}
    async with httpx.AsyncClient() as http:
        r = await http.put(f"{base}/Patient/{pid}", json=body)
        assert r.status_code == 201
        r = await http.put(f"{base}/Patient/{pid}", json={**body, "gender": "female"})
        assert r.status_code == 200 and r.headers["etag"] == 'W/"2"'
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(bus.ehr_subject("Patient", pid), ordered_consumer=True)
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=1)
            except Exception:  # noqa: BLE001, S112 - nothing yet
                continue
            got.append((msg.headers.get(bus.MSG_ID), bus.decode_bundle(msg.data)[0]))
        assert [m for m, _ in got] == [f"Patient/{pid}/1", f"Patient/{pid}/2"]
        assert [r["gender"] for _, r in got] == ["male", "female"]
    finally:
        await nc.drain()
    # our own echo came back through the EHR consumer and added no version
    await asyncio.sleep(1.5)
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{base}/Patient/{pid}")).headers["etag"] == 'W/"2"'
