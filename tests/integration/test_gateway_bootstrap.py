"""The whole gateway process wiring (bootstrap.run): real NATS, SQLite, uvicorn on a real port."""
from __future__ import annotations

import asyncio
import uuid

import httpx
import nats
import pytest
from fhir.resources.R4B.bundle import Bundle
from vigil_gateway import bootstrap

from vigil import bus
from vigil.devservers import free_port
from vigil.settings import Settings

pytestmark = pytest.mark.integration


async def test_run_serves_consumed_resources_and_shuts_down(nats_url, tmp_path):
    port = free_port()
    settings = Settings(nats_url=nats_url, database_url=f"sqlite:///{tmp_path}/data/gw.db", http_port=port,
                        gateway_consumer_name="test-boot-" + uuid.uuid4().hex[:8])
    ready = asyncio.Event()
    task = asyncio.create_task(bootstrap.run(settings, ready=ready))
    await asyncio.wait_for(ready.wait(), 30)
    patient = "p-" + uuid.uuid4().hex[:8]
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        ra = {"resourceType": "RiskAssessment", "id": f"{patient}-ra", "status": "final",
              "subject": {"reference": f"Patient/{patient}"}, "occurrenceDateTime": "2026-01-01T11:00:00Z",
              "prediction": [{"outcome": {"text": "sepsis"}, "probabilityDecimal": 0.42}]}
        await js.publish(bus.risk_subject(patient), bus.encode_bundle([ra]))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).status_code == 200
            for _ in range(200):
                r = await http.get("/fhir/RiskAssessment", params={"subject": f"Patient/{patient}"})
                if r.json()["total"]:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
            bundle = r.json()
            Bundle.model_validate(bundle)
            assert bundle["entry"][0]["fullUrl"] == f"http://127.0.0.1:{port}/fhir/RiskAssessment/{patient}-ra"
            assert bundle["entry"][0]["resource"]["prediction"][0]["probabilityDecimal"] == 0.42
            r = await http.get(f"/fhir/RiskAssessment/{patient}-ra")
            assert r.status_code == 200 and r.headers["etag"] == 'W/"1"'
            # HEAD through the real HTTP server: the GET's headers (its Content-Length), no body
            for path in ("/fhir/metadata", f"/fhir/RiskAssessment/{patient}-ra"):
                full, head = await http.get(path), await http.head(path)
                assert head.status_code == 200 and head.content == b"", path
                assert head.headers["content-length"] == str(len(full.content)), path
            head = await http.head("/fhir/RiskAssessment", params={"subject": f"Patient/{patient}"})
            assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
    finally:
        await nc.drain()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # the port is released and the database is closed cleanly
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{port}/healthz")
    store = bootstrap.build_store(settings.database_url)
    assert store.read("RiskAssessment", f"{patient}-ra")["meta"]["versionId"] == "1"
    store.close()


async def test_run_fails_fast_on_bad_database_url(nats_url):
    with pytest.raises(ValueError):
        await bootstrap.run(Settings(nats_url=nats_url, database_url="mysql://nope"))


async def test_port_in_use_is_an_error_not_an_exit(nats_url, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        settings = Settings(nats_url=nats_url, database_url=f"sqlite:///{tmp_path}/gw.db", http_port=port,
                            gateway_consumer_name="test-boot-" + uuid.uuid4().hex[:8])
        with pytest.raises(RuntimeError, match="port in use"):
            await asyncio.wait_for(bootstrap.run(settings), 30)


CLI = ("from vigil_gateway.cli import add_commands; import argparse, sys;"
       "p = argparse.ArgumentParser(); add_commands(p.add_subparsers());"
       "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


def test_cli_gateway_stops_cleanly_on_sigterm(nats_url, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    env["VIGIL_GATEWAY_CONSUMER_NAME"] = "test-cli-" + uuid.uuid4().hex[:8]
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI,
             "gateway", "--http-port", str(port), "--nats-url", nats_url,
             "--database-url", f"sqlite:///{tmp_path}/gw.db"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        assert "stop requested" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
