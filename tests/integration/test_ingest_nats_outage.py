"""Ingest while its own NATS server goes away and comes back (a private nats-server, killed on purpose)."""
from __future__ import annotations

import asyncio
import shutil
import tempfile

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vigil_ingest import bootstrap
from vigil_ingest.client import IngestClient, make_reading

from vigil import devservers
from vigil.device.v1 import ingest_pb2, ingest_pb2_grpc
from vigil.settings import Settings
from vigil.timecontract import DEFAULT_T0

pytestmark = pytest.mark.integration
T = DEFAULT_T0.timestamp()


def batch(seq: int):
    return ingest_pb2.ReadingBatch(device_id="outage-mon", patient_id="outage-p1",
                                   readings=[make_reading(seq, "8867-4", 70, "/min", T)])


async def health(ch) -> int:
    resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
    return resp.status


async def test_nats_outage_gives_unavailable_and_client_resends_after_recovery():
    store = tempfile.mkdtemp(prefix="vigil-nats-outage-")
    port = devservers.free_port()
    nats_srv = devservers.start_nats(store_dir=store, port=port)
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_srv.url), publish_timeout=1.0)
    client = IngestClient(srv.target, retries=30, backoff=0.2, max_backoff=1.0)
    try:
        await client.register_device("outage-mon")
        await client.bind_patient("outage-mon", "outage-p1", T - 86400)
        async with grpc.aio.insecure_channel(srv.target) as ch:
            assert (await client.send("outage-mon", "outage-p1", [batch(1).readings[0]]))[0].duplicate is False
            nats_srv.kill()
            for _ in range(50):
                if await health(ch) == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert await health(ch) == health_pb2.HealthCheckResponse.NOT_SERVING

            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[batch(2)]), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "did not acknowledge" in e.value.details() and "NATS" in e.value.details()

            pending = asyncio.ensure_future(client.send("outage-mon", "outage-p1", [batch(3).readings[0]]))
            await asyncio.sleep(1.5)
            assert not pending.done()
            nats_srv = devservers.start_nats(store_dir=store, port=port)  # same store: stream survives
            acks = await asyncio.wait_for(pending, 30)
            assert acks[0].first_sequence == 3
            assert client.reconnects >= 1
            assert await health(ch) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await client.close()
        await srv.stop(1)
        nats_srv.stop()
        shutil.rmtree(store, ignore_errors=True)
