"""Fairness between the bus consumer catching up a backlog and REST writes (SQLite and PostgreSQL stores).

A real gateway process (`python -m vigil.cli gateway`) on its OWN NATS server (not the session's, which
holds other tests' backlog) starts with tens of thousands of Observations waiting on VIGIL_OBSERVATIONS.
Once it has begun storing them, a REST create (POST Patient) must complete while the backlog is still
being consumed: it waits for at most one short bus transaction, not for the catch-up. No wall-clock
threshold is asserted (the machine may be loaded); the check is by progress: when the 201 arrives, not
every backlog Observation is stored yet, and the catch-up then still completes.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid

import httpx
import nats
import pytest

from vigil import bus
from vigil.devservers import free_port, start_nats, wait_http_ok

pytestmark = pytest.mark.integration

MESSAGES, PER_MESSAGE = 400, 100  # 40k Observations: several seconds of catch-up, even on a fast machine


def observation(oid: str, patient: str, i: int) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
            "subject": {"reference": f"Patient/{patient}"},
            "effectiveDateTime": f"2026-01-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z",
            "valueQuantity": {"value": 60 + i % 40, "unit": "/min", "system": "http://unitsofmeasure.org",
                              "code": "/min"}}


async def publish_backlog(url: str, nonce: str) -> int:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js)
        acks = []
        for m in range(MESSAGES):
            patient = f"{nonce}-p{m % 50}"
            body = bus.encode_bundle([observation(f"{nonce}-{m}-{k}", patient, m * PER_MESSAGE + k)
                                      for k in range(PER_MESSAGE)])
            acks.append(await js.publish_async(bus.observation_subject(patient), body,
                                               headers={bus.MSG_ID: f"{nonce}-{m}"}))
        await asyncio.gather(*acks)
    finally:
        await nc.drain()
    return MESSAGES * PER_MESSAGE


async def stored(http: httpx.AsyncClient) -> int:
    r = await http.get("/Observation", params={"_count": "0"})
    r.raise_for_status()
    return r.json()["total"]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/gw.db"
    return request.getfixturevalue("fresh_postgres_url")


async def test_rest_create_is_not_starved_by_bus_catch_up(tmp_path, database_url):
    nonce = "fair-" + uuid.uuid4().hex[:8]
    with start_nats() as own_nats:
        total = await publish_backlog(own_nats.url, nonce)
        port = free_port()
        env = {**os.environ, "VIGIL_NATS_URL": own_nats.url, "VIGIL_DATABASE_URL": database_url,
               "VIGIL_HTTP_HOST": "127.0.0.1", "VIGIL_HTTP_PORT": str(port), "VIGIL_OIDC_ISSUER": ""}
        log_path = tmp_path / "gateway.log"
        with gateway_process(env, log_path) as proc:

            def alive() -> None:
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway exited: {log_path.read_text()[-2000:]}")

            await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{port}/healthz", 60, alive)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/fhir", timeout=120) as http:
                # the catch-up has begun: some, not all, of the backlog is stored
                before = 0
                for _ in range(1200):
                    alive()
                    before = await stored(http)
                    if before > 0:
                        break
                    await asyncio.sleep(0.05)
                assert 0 < before < total, f"catch-up not observed in progress ({before} of {total} stored)"

                t0 = time.perf_counter()
                r = await http.post("/Patient", json={"resourceType": "Patient", "name": [{"family": nonce}]},
                                    headers={"Content-Type": "application/fhir+json"})
                waited = time.perf_counter() - t0
                after = await stored(http)
                print(f"create took {waited:.3f} s; stored before {before}, after {after} of {total}")
                assert r.status_code == 201, r.text
                # ordering: the create finished while the bus backlog was still being consumed
                assert after < total, f"the REST create waited for the whole catch-up ({after} of {total} stored)"
                created = (await http.get(f"/Patient/{r.json()['id']}")).json()
                assert created["name"][0]["family"] == nonce

                # and the catch-up still completes (the REST write did not stop the consumer)
                for _ in range(2400):
                    alive()
                    if await stored(http) == total:
                        break
                    await asyncio.sleep(0.1)
                assert await stored(http) == total


@contextlib.contextmanager
def gateway_process(env: dict, log_path):
    """`vigil gateway` in its own process, stopped (SIGTERM, then SIGKILL) on exit."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vigil.cli", "gateway"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
