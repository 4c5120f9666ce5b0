"""The worker's /healthz and /readyz (vigil_inference.health) over a real socket."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from vigil_inference.health import WorkerHealth, serve


@pytest.fixture
async def probe():
    state = WorkerHealth(stall_seconds=5)
    server = await serve(state, "127.0.0.1:0")
    port = server.sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        yield state, http
    server.close()
    await server.wait_closed()


async def test_live_while_the_loop_makes_progress_ready_only_once_started(probe):
    state, http = probe
    r = await http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = await http.get("/readyz")
    assert r.status_code == 503 and r.json()["reason"].startswith("starting")
    state.started = True
    assert (await http.get("/readyz")).status_code == 200
    state.connected = False
    r = await http.get("/readyz")
    assert r.status_code == 503 and r.json()["reason"] == "NATS disconnected"
    assert (await http.get("/healthz")).status_code == 200  # a NATS outage is not a reason to restart
    state.connected = True
    state.progress(error="RuntimeError('model service returned 500')")
    r = await http.get("/readyz")
    assert r.status_code == 503 and "model service returned 500" in r.json()["reason"]
    state.progress()
    assert (await http.get("/readyz")).status_code == 200


async def test_stalled_loop_fails_both(probe):
    state, http = probe
    state.started = True
    state.last_progress = time.monotonic() - 6
    for path in ("/healthz", "/readyz"):
        r = await http.get(path)
        assert r.status_code == 503 and r.json()["status"] == "stalled", path
    state.progress()
    assert (await http.get("/healthz")).status_code == 200


async def test_other_requests(probe):
    _, http = probe
    assert (await http.get("/metrics")).status_code == 404
    assert (await http.post("/healthz")).status_code == 405
    r = await http.head("/healthz")
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
    assert (await http.get("/healthz?verbose=1")).status_code == 200


async def test_garbage_and_silent_clients_do_not_hurt_the_listener(probe):
    _, http = probe
    port = int(str(http.base_url).rsplit(":", 1)[1].rstrip("/"))
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x00\x01garbage without an end of headers")
    await writer.drain()
    writer.close()
    _, silent = await asyncio.open_connection("127.0.0.1", port)  # says nothing
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"X" * 10000)  # longer than any probe's request
    await writer.drain()
    assert await reader.read() == b""  # dropped
    writer.close()
    assert (await http.get("/healthz")).status_code == 200
    silent.close()
