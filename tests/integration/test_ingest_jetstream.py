"""Ingest against a real NATS JetStream: durability before ack, de-duplication, refusals, replay."""
from __future__ import annotations

import uuid

import grpc
import nats
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from vigil_ingest import bootstrap
from vigil_ingest.client import make_reading
from vigil_ingest.replay import replay

from vigil import bus, physionet
from vigil.device.v1 import device_pb2, device_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from vigil.settings import Settings
from vigil.timecontract import DEFAULT_T0

pytestmark = pytest.mark.integration
T = DEFAULT_T0.timestamp()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def batch(device: str, patient: str, first_seq: int, n: int = 3, unit: str = "/min"):
    return ingest_pb2.ReadingBatch(device_id=device, patient_id=patient, readings=[
        make_reading(first_seq + i, "8867-4", 70 + i, unit, T + 60 * i) for i in range(n)])


async def bind(ch, device: str, patient: str, start: float = T - 86400) -> None:
    """Register `device` and bind it to `patient` from `start` (readings need a binding)."""
    stub = device_pb2_grpc.DeviceServiceStub(ch)
    await stub.RegisterDevice(device_pb2.RegisterDeviceRequest(device=device_pb2.Device(device_id=device)))
    b = device_pb2.Binding(patient_id=patient)
    b.start_time.seconds = int(start)
    await stub.BindPatient(device_pb2.BindPatientRequest(device_id=device, binding=b))


@pytest.fixture
async def ingest(nats_url):
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url))
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    channel = grpc.aio.insecure_channel(srv.target)
    yield srv, js, channel
    await channel.close()
    await nc.close()
    await srv.stop(1)


async def count(js, subject: str) -> int:
    info = await js.stream_info(bus.OBSERVATIONS_STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_each_ack_comes_after_the_message_is_in_the_stream(ingest):
    _srv, js, ch = ingest
    device, patient = uid("mon"), uid("pt")
    await bind(ch, device, patient)
    subject = bus.observation_subject(patient)
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    call = stub.StreamReadings()
    n = 0
    for i in range(4):
        await call.write(ingest_pb2.StreamReadingsRequest(batch=batch(device, patient, 10 * i)))
        resp = await call.read()
        n += 1
        # at the moment the ack is received, its message is already stored
        msg = await js.get_last_msg(bus.OBSERVATIONS_STREAM, subject)
        sent = [r.sequence for r in batch(device, patient, 10 * i).readings]
        assert msg.headers[bus.MSG_ID] == bus.batch_msg_id(device, sent)
        assert resp.ack.first_sequence == 10 * i
        assert await count(js, subject) == n
        obs = bus.decode_bundle(msg.data)
        assert [o["subject"]["reference"] for o in obs] == [f"Patient/{patient}"] * 3
        assert resp.ack.duplicate is False
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert n == 4


async def test_resent_batch_is_a_duplicate_and_stored_once(ingest):
    _srv, js, ch = ingest
    device, patient = uid("mon"), uid("pt")
    await bind(ch, device, patient)
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    req = ingest_pb2.StreamReadingsRequest(batch=batch(device, patient, 1))
    first = [r.ack async for r in stub.StreamReadings(iter([req]))]
    again = [r.ack async for r in stub.StreamReadings(iter([req]))]
    up = await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[req.batch]))
    assert [a.duplicate for a in first + again + list(up.acks)] == [False, True, True]
    assert await count(js, bus.observation_subject(patient)) == 1


async def test_invalid_batch_is_refused_with_bad_request_and_earlier_batches_stay(ingest):
    _srv, js, ch = ingest
    device, patient = uid("mon"), uid("pt")
    await bind(ch, device, patient)
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    bad = batch(device, patient, 100, n=4)
    bad.readings[0].unit = "kg"
    bad.readings[2].code = "0000-0"
    bad.readings[3].value = float("nan")
    reqs = [ingest_pb2.StreamReadingsRequest(batch=b)
            for b in (batch(device, patient, 1), batch(device, patient, 10), bad, batch(device, patient, 200))]
    acks = []
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for r in stub.StreamReadings(iter(reqs)):
            acks.append(r.ack)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    st = rpc_status.from_call(e.value)
    br = error_details_pb2.BadRequest()
    assert st.details[0].Unpack(br)
    assert [v.field for v in br.field_violations] == ["readings[0].unit", "readings[2].code", "readings[3].value"]
    assert [a.first_sequence for a in acks] == [1, 10]
    assert await count(js, bus.observation_subject(patient)) == 2


async def test_health_serving_and_reflection(ingest):
    _srv, _js, ch = ingest
    resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    names = set()
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    async for r in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names |= {s.name for s in r.list_services_response.service}
    assert {"vigil.device.v1.IngestService", "grpc.health.v1.Health"} <= names


async def test_replay_three_stays_from_the_dataset(ingest):
    srv, js, _ch = ingest
    path = physionet.default_dataset()
    if not path.exists():
        pytest.skip(f"data set not found at {path}")
    stays = list(physionet.iter_stays(path, limit=3))
    prefix = uuid.uuid4().hex[:8] + "-"
    expected = {}
    for s in stays:
        present = ~np.isnan(s.data[:, :len(physionet.MEASUREMENT_COLUMNS)])
        expected[s.stem] = (int((present.sum(axis=1) > 0).sum()), int(present.sum()))
    stats = await replay(path, target=srv.target, limit=3, id_prefix=prefix)
    assert stats.stays == 3
    assert stats.batches == sum(b for b, _ in expected.values())
    assert stats.readings == sum(r for _, r in expected.values())
    assert stats.duplicates == 0
    for stem, (batches, readings) in expected.items():
        subject = bus.observation_subject(prefix + stem)
        assert await count(js, subject) == batches
        sub = await js.subscribe(subject, ordered_consumer=True)
        n_obs, times = 0, []
        for _ in range(batches):
            msg = await sub.next_msg(timeout=5)
            obs = bus.decode_bundle(msg.data)
            n_obs += len(obs)
            times.append(obs[0]["effectiveDateTime"])
        await sub.unsubscribe()
        assert n_obs == readings
        assert times == sorted(times)  # rows arrive in time order per patient
    again = await replay(path, target=srv.target, limit=3, id_prefix=prefix)
    assert again.duplicates == again.batches  # a replay is idempotent
    for stem, (batches, _) in expected.items():
        assert await count(js, bus.observation_subject(prefix + stem)) == batches


@pytest.mark.parametrize("compression", ["zstd", "none"])
async def test_large_batches_are_stored_as_zstd_frames_unless_turned_off(nats_url, compression):
    """VIGIL_BUS_COMPRESSION: a 100-reading Bundle is stored as one zstd frame (about 18x smaller)
    or as plain JSON; bus.decode_bundle reads both to the same Observations."""
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url, bus_compression=compression))
    nc = await nats.connect(nats_url)
    try:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            device, patient = uid("mon"), uid("pt")
            await bind(ch, device, patient)
            b = batch(device, patient, 1, n=100)
            acks = [r.ack async for r in ingest_pb2_grpc.IngestServiceStub(ch).StreamReadings(
                iter([ingest_pb2.StreamReadingsRequest(batch=b)]))]
            assert acks[0].reading_count == 100
            msg = await nc.jetstream().get_last_msg(bus.OBSERVATIONS_STREAM, bus.observation_subject(patient))
            obs = bus.decode_bundle(msg.data)
            assert [o["identifier"][0]["value"] for o in obs] == [f"{device}/{i}" for i in range(1, 101)]
            plain = bus.plain_body(msg.data)
            if compression == "zstd":
                assert msg.data[:4] == bus.ZSTD_MAGIC and len(msg.data) * 8 < len(plain)
            else:
                assert msg.data == plain and msg.data.startswith(b"{")
    finally:
        await nc.close()
        await srv.stop(0)


async def test_unknown_bus_compression_stops_the_start(nats_url):
    with pytest.raises(ValueError, match="VIGIL_BUS_COMPRESSION"):
        await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url, bus_compression="gzip"))


async def test_publisher_acks_duplicates_and_reports_what_jetstream_refuses(nats_url):
    """The JetStream publisher on its own: PubAck per message, duplicates recognised, a subject no stream
    holds and a stream mismatch reported as PublishUnavailable with the reason (never as stored)."""
    from vigil_ingest.publisher import JetStreamPublisher, PublishUnavailable

    nc = await nats.connect(nats_url)
    try:
        await bus.ensure_streams(nc.jetstream())
        pub = JetStreamPublisher(nc, timeout=5)
        await pub.start()
        subject = bus.observation_subject(uid("pub"))
        msg_id = uid("msg")
        assert await pub.publish_batch(subject, b'{"resourceType":"Bundle"}', msg_id) == (True, False)
        assert await pub.publish_batch(subject, b'{"resourceType":"Bundle"}', msg_id) == (True, True)
        assert await count(nc.jetstream(), subject) == 1
        with pytest.raises(PublishUnavailable, match="no stream answers"):
            await pub.publish_batch(f"not-a-vigil-subject.{uid('x')}", b"{}", uid("msg"))
        wrong = JetStreamPublisher(nc, timeout=5, stream="NOT_THE_STREAM")
        with pytest.raises(PublishUnavailable, match="refused the message: expected stream"):
            await wrong.publish_batch(subject, b"{}", uid("msg"))
        assert await count(nc.jetstream(), subject) == 1
        assert not pub._pending and not wrong._pending  # nothing left waiting
    finally:
        await nc.close()
