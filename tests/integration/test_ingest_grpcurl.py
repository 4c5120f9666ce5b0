"""`grpcurl` works against ingest without the .proto files (server reflection), including the health check."""
from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest
from vigil_ingest import bootstrap

from vigil.settings import Settings

pytestmark = pytest.mark.integration


def _grpcurl() -> str | None:
    found = shutil.which("grpcurl")
    gobin = os.path.join(os.environ.get("GOPATH", os.path.expanduser("~/go")), "bin", "grpcurl")
    return found or (gobin if os.access(gobin, os.X_OK) else None)


async def run(*args: str) -> tuple[int, str]:
    p = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await p.communicate()
    return p.returncode, out.decode()


async def test_grpcurl_lists_describes_and_calls(nats_url):
    g = _grpcurl()
    if g is None:
        pytest.skip("grpcurl not installed (go install github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.3)")
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url))
    try:
        rc, out = await run(g, "-plaintext", srv.target, "list")
        assert rc == 0, out
        assert {"vigil.device.v1.IngestService", "vigil.device.v1.DeviceService", "grpc.health.v1.Health"} <= set(
            out.split())
        rc, out = await run(g, "-plaintext", srv.target, "describe", "vigil.device.v1.ReadingBatch")
        assert rc == 0 and "repeated .vigil.device.v1.Reading readings" in out, out
        rc, out = await run(g, "-plaintext", srv.target, "grpc.health.v1.Health/Check")
        assert rc == 0 and json.loads(out)["status"] == "SERVING", out
        rc, out = await run(g, "-plaintext", "-d", '{"device": {"deviceId": "grpcurl-mon-1"}}', srv.target,
                            "vigil.device.v1.DeviceService/RegisterDevice")
        assert rc == 0 and json.loads(out)["device"].get("deviceId", json.loads(out)["device"].get("device_id")) == "grpcurl-mon-1", out
        rc, out = await run(g, "-plaintext", "-d", '{"batches": [{"deviceId": "grpcurl-unbound-x", "readings": '
                            '[{"sequence": 1, "code": "8867-4", "value": 70, "unit": "/min", '
                            '"effectiveTime": "2026-01-01T00:00:00Z"}]}]}', srv.target,
                            "vigil.device.v1.IngestService/UploadReadings")
        assert rc != 0 and "FailedPrecondition" in out, out
    finally:
        await srv.stop(1)
