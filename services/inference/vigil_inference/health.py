"""The worker's health over HTTP (VIGIL_WORKER_HEALTH_LISTEN, e.g. 0.0.0.0:8081), for the kubelet.

    GET /healthz  200 while the consume loop makes progress: a fetch or a start attempt finished within
                  `stall_seconds` (an idle worker's fetch times out every second, so it counts);
                  503 when the loop is stuck (a hung call, a blocked event loop answers no probe at all)
    GET /readyz   200 once the durable consumers are bound and the model answered, while NATS is
                  connected and the last batch did not fail; 503 with the reason otherwise

Bodies are small JSON objects ({"status": ..., "reason": ...}). The worker serves no traffic, so
readiness only shows state (`kubectl get pods`); liveness restarts a stuck worker. Served from the
worker's own event loop with asyncio streams (no web framework): a probe costs a few microseconds.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import orjson

MAX_REQUEST_BYTES = 8192


@dataclass
class WorkerHealth:
    """What the loop reports; the HTTP handler only reads it."""

    stall_seconds: float = 120.0
    started: bool = False  # consumers bound, model metadata read
    connected: bool = True  # NATS
    last_progress: float = field(default_factory=time.monotonic)
    last_error: str | None = None  # the last batch's failure, None after a good one

    def progress(self, error: str | None = None) -> None:
        self.last_progress, self.last_error = time.monotonic(), error

    def live(self) -> tuple[bool, dict]:
        idle = time.monotonic() - self.last_progress
        if idle > self.stall_seconds:
            return False, {"status": "stalled", "reason": f"no fetch finished for {idle:.0f} s "
                                                          f"(limit {self.stall_seconds:g} s)"}
        return True, {"status": "ok", "seconds_since_progress": round(idle, 3)}

    def ready(self) -> tuple[bool, dict]:
        ok, body = self.live()
        if not ok:
            return ok, body
        for bad, reason in ((not self.started, "starting: consumers not bound or model not answering yet"),
                            (not self.connected, "NATS disconnected"),
                            (self.last_error is not None, f"last batch failed: {self.last_error}")):
            if bad:
                return False, {"status": "not ready", "reason": reason}
        return True, {"status": "ok"}


async def serve(health: WorkerHealth, listen: str) -> asyncio.Server:
    """Start the health listener on `listen` (host:port; port 0 picks one: `server.sockets[0]`)."""
    host, _, port = listen.rpartition(":")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + ["", ""]
            path = path.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, body = 405, {"status": "error", "reason": "GET or HEAD only"}
            elif path == "/healthz":
                ok, body = health.live()
                status = 200 if ok else 503
            elif path == "/readyz":
                ok, body = health.ready()
                status = 200 if ok else 503
            else:
                status, body = 404, {"status": "error", "reason": "only /healthz and /readyz"}
            data = orjson.dumps(body)
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                         + (data if method != "HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host or "0.0.0.0", int(port), limit=MAX_REQUEST_BYTES)
