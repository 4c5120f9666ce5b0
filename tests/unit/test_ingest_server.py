"""The real grpc.aio IngestService server and IngestClient against the in-memory publisher twin."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from vigil_ingest import bootstrap
from vigil_ingest.client import IngestClient, make_reading
from vigil_ingest.publisher import MemoryPublisher, PublishUnavailable
from vigil_ingest.registry import MemoryStore, Registry

from vigil import bus
from vigil.device.v1 import ingest_pb2, ingest_pb2_grpc
from vigil.settings import Settings
from vigil.timecontract import DEFAULT_T0

T = DEFAULT_T0.timestamp()


def batch(first_seq: int, n: int = 3, device="monitor-1", patient="p000001", unit="/min"):
    return ingest_pb2.ReadingBatch(device_id=device, patient_id=patient, readings=[
        make_reading(first_seq + i, "8867-4", 70 + i, unit, T + 60 * i) for i in range(n)])


BINDINGS = {"monitor-1": "p000001", "monitor-2": "p000002", "monitor-3": "p000001", "monitor-4": "p000004",
            **{f"flight-{k}": "p000001" for k in range(4)}}


async def bound_registry(bindings: dict[str, str] = BINDINGS) -> Registry:
    """A registry (in-memory store) where each device is registered and bound from a day before T."""
    reg = Registry(MemoryStore())
    for device, patient in bindings.items():
        await reg.register(device, "")
        await reg.bind(device, None, patient, T - 86400, None)
    return reg


@pytest.fixture
async def served():
    pub = MemoryPublisher()
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0"), publisher=pub, registry=await bound_registry())
    channel = grpc.aio.insecure_channel(srv.target)
    yield srv, pub, channel
    await channel.close()
    await srv.stop(0)


def bad_request(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    st = rpc_status.from_call(err)
    assert st is not None, "no google.rpc.Status in the trailers"
    out = []
    for d in st.details:
        br = error_details_pb2.BadRequest()
        if d.Is(br.DESCRIPTOR):
            assert d.Unpack(br)
            out += [(v.field, v.description) for v in br.field_violations]
    assert [d for d in st.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)], "no BadRequest detail"
    return out


def preconditions(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    out = []
    for d in rpc_status.from_call(err).details:
        pf = error_details_pb2.PreconditionFailure()
        if d.Unpack(pf):
            out += [(v.type, v.subject) for v in pf.violations]
    return out


async def test_port_zero_binds_a_real_port(served):
    srv, _, _ = served
    assert srv.port > 0


async def test_stream_acks_each_batch_in_order(served):
    _, pub, ch = served
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    reqs = [ingest_pb2.StreamReadingsRequest(batch=batch(10 * i)) for i in range(5)]
    acks = [r.ack async for r in stub.StreamReadings(iter(reqs))]
    assert [(a.first_sequence, a.last_sequence, a.reading_count, a.duplicate) for a in acks] == [
        (10 * i, 10 * i + 2, 3, False) for i in range(5)]
    assert [m.msg_id for m in pub.messages] == [
        bus.batch_msg_id("monitor-1", [10 * i, 10 * i + 1, 10 * i + 2]) for i in range(5)]
    assert {m.subject for m in pub.messages} == {"vigil.v1.observation.p000001"}


async def test_resent_batch_is_acked_as_duplicate(served):
    _, pub, ch = served
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    req = ingest_pb2.StreamReadingsRequest(batch=batch(1))
    acks = [r.ack async for r in stub.StreamReadings(iter([req, req]))]
    assert [a.duplicate for a in acks] == [False, True]
    assert len(pub.messages) == 1


async def test_invalid_batch_aborts_with_bad_request_after_earlier_acks(served):
    _, pub, ch = served
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    bad = batch(100)
    bad.readings[1].unit = "kg"
    bad.readings[2].code = "0000-0"
    reqs = [ingest_pb2.StreamReadingsRequest(batch=b) for b in (batch(1), batch(10), bad, batch(200))]
    call = stub.StreamReadings(iter(reqs))
    acks = []
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for r in call:
            acks.append(r.ack)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [a.first_sequence for a in acks] == [1, 10]
    fields = [f for f, _ in bad_request(e.value)]
    assert fields == ["readings[1].unit", "readings[2].code"]
    assert [m.msg_id for m in pub.messages] == [
        bus.batch_msg_id("monitor-1", [1, 2, 3]), bus.batch_msg_id("monitor-1", [10, 11, 12])]


async def test_bus_unavailable_is_retryable_unavailable(served):
    _, pub, ch = served
    pub.fail_with = PublishUnavailable("NATS JetStream did not acknowledge x within 5s")
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[batch(1)]))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "did not acknowledge" in e.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in stub.StreamReadings(iter([ingest_pb2.StreamReadingsRequest(batch=batch(1))])):
            pass
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_upload_validates_all_before_publishing_any(served):
    _, pub, ch = served
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    bad = batch(50, unit="mmHg")
    bad2 = batch(60, device="no spaces allowed")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[batch(1), bad, batch(5), bad2]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(e.value)] == [
        "batches[1].readings[0].unit", "batches[1].readings[1].unit", "batches[1].readings[2].unit",
        "batches[3].device_id"]
    assert pub.messages == []
    resp = await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[batch(1), batch(10)]))
    assert [a.first_sequence for a in resp.acks] == [1, 10]
    assert len(pub.messages) == 2


async def test_health_and_reflection(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, _, ch = served
    h = health_pb2_grpc.HealthStub(ch)
    for service in ("", "vigil.device.v1.IngestService"):
        resp = await h.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    r = reflection_pb2_grpc.ServerReflectionStub(ch)
    names = set()
    async for resp in r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names |= {s.name for s in resp.list_services_response.service}
    assert {"vigil.device.v1.IngestService", "grpc.health.v1.Health"} <= names


async def test_deadline_shorter_than_a_slow_bus(served):
    _, pub, ch = served
    pub.delay = 2.0
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[batch(1)]), timeout=0.3)
    assert e.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)


async def test_graceful_stop_drains_in_flight_batches():
    pub = MemoryPublisher(delay=0.5)
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0"), publisher=pub, registry=await bound_registry())
    async with grpc.aio.insecure_channel(srv.target) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        call = asyncio.ensure_future(stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[batch(1)])))
        await asyncio.sleep(0.2)
        await srv.stop(grace=5)
        resp = await call
    assert resp.acks[0].reading_count == 3
    assert len(pub.messages) == 1


async def test_client_send_upload_and_token(served):
    srv, pub, _ = served
    async with IngestClient(srv.target, token="abc", max_batch=2) as client:
        acks = await client.send("monitor-2", "p000002", [(i, "8867-4", "", 60.0 + i, "/min", T) for i in range(5)])
        assert [(a.first_sequence, a.last_sequence) for a in acks] == [(0, 1), (2, 3), (4, 4)]
        up = await client.upload([batch(100, device="monitor-3")])
        assert up[0].device_id == "monitor-3"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.send("monitor-2", "p000002", [(9, "8867-4", "", 60.0, "furlongs", T)])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # the stream is re-opened after a refused batch
        acks = await client.send("monitor-2", "p000002", [(10, "8867-4", "", 61.0, "/min", T)])
        assert acks[0].first_sequence == 10
    assert len(pub.messages) == 5


async def test_client_resends_unacked_batches_after_server_restart():
    pub = MemoryPublisher()
    reg = await bound_registry()
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0"), publisher=pub, registry=reg)
    port = srv.port
    client = IngestClient(f"127.0.0.1:{port}", retries=8, backoff=0.05)
    try:
        assert (await client.send("monitor-4", "p000004", [(1, "8867-4", "", 60.0, "/min", T)]))[0].duplicate is False
        await srv.stop(0)
        pending = asyncio.ensure_future(client.send("monitor-4", "p000004", [(2, "8867-4", "", 61.0, "/min", T)]))
        await asyncio.sleep(0.3)
        assert not pending.done()
        srv = await bootstrap.start(Settings(grpc_listen=f"127.0.0.1:{port}"), publisher=pub,
                                    registry=Registry(reg.store))
        acks = await asyncio.wait_for(pending, 10)
        assert acks[0].first_sequence == 2
        assert client.reconnects >= 1
        assert [m.msg_id for m in pub.messages] == [
            bus.batch_msg_id("monitor-4", [1]), bus.batch_msg_id("monitor-4", [2])]
    finally:
        await client.close()
        await srv.stop(0)


async def test_in_flight_publishes_are_bounded():
    class Counting(MemoryPublisher):
        now = peak = 0

        async def publish_batch(self, subject, body, msg_id, *, timeout=None):
            Counting.now += 1
            Counting.peak = max(Counting.peak, Counting.now)
            try:
                await asyncio.sleep(0.02)
                return await super().publish_batch(subject, body, msg_id, timeout=timeout)
            finally:
                Counting.now -= 1

    pub = Counting()
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0"), publisher=pub, max_inflight=3,
                                registry=await bound_registry())
    try:
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)

            async def stream(dev):
                reqs = [ingest_pb2.StreamReadingsRequest(batch=batch(10 * i, device=dev)) for i in range(10)]
                return [r.ack async for r in stub.StreamReadings(iter(reqs))]

            results = await asyncio.gather(*(stream(f"flight-{k}") for k in range(4)))
        assert [len(r) for r in results] == [10] * 4
        assert all([a.first_sequence for a in r] == [10 * i for i in range(10)] for r in results)
        assert 1 < Counting.peak <= 3
        assert len(pub.messages) == 40
    finally:
        await srv.stop(0)


async def test_blood_pressure_panel_over_grpc(served):
    import orjson

    _, pub, ch = served
    r = make_reading(500, "150020", 0, "", T, system="urn:iso:std:iso:11073:10101")
    r.components.add(code="8480-6", value=120, unit="mm[Hg]")
    r.components.add(code="8462-4", value=80, unit="mm[Hg]")
    r.components.add(code="150023", system="urn:iso:std:iso:11073:10101", value=93, unit="mm[Hg]")
    b = ingest_pb2.ReadingBatch(device_id="monitor-1", readings=[r])
    acks = [x.ack async for x in ingest_pb2_grpc.IngestServiceStub(ch).StreamReadings(
        iter([ingest_pb2.StreamReadingsRequest(batch=b)]))]
    assert acks[0].reading_count == 1
    [obs] = [e["resource"] for e in orjson.loads(pub.messages[-1].body)["entry"]]
    assert obs["code"]["coding"][0]["code"] == "85354-9"
    assert obs["subject"] == {"reference": "Patient/p000001"}  # from the binding: patient_id was not sent
    assert [c["code"]["coding"][0]["code"] for c in obs["component"]] == ["8480-6", "8462-4", "8478-0"]


async def test_unbound_device_is_refused_with_precondition_failure(served):
    _, pub, ch = served
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await ingest_pb2_grpc.IngestServiceStub(ch).UploadReadings(
            ingest_pb2.UploadReadingsRequest(batches=[batch(1, device="never-registered")]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    st = rpc_status.from_call(e.value)
    pf = error_details_pb2.PreconditionFailure()
    assert st.details[0].Unpack(pf)
    assert [(v.type, v.subject) for v in pf.violations] == [("REGISTRATION", "devices/never-registered")]
    assert pub.messages == []


async def test_binding_problems_and_field_errors_are_reported_together(served):
    """A batch with field errors is INVALID_ARGUMENT even when its device is unbound or unregistered,
    and the status lists both: the BadRequest violations and the PreconditionFailure."""
    _, pub, ch = served
    stub = ingest_pb2_grpc.IngestServiceStub(ch)

    def readings(device, times, unit="/min"):
        return ingest_pb2.ReadingBatch(device_id=device, readings=[
            make_reading(1 + i, "8867-4", 70, unit if i == 1 else "/min", t) for i, t in enumerate(times)])

    early = T - 2 * 86400  # before monitor-1's binding starts
    cases = [
        (readings("never-registered", [T, T + 60], unit="kg"), [("REGISTRATION", "devices/never-registered")]),
        (readings("monitor-1", [early, T + 60], unit="kg"), [("BINDING", "readings[0]")]),
    ]
    for b, want_pf in cases:
        for call in ("upload", "stream"):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                if call == "upload":
                    await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[b]))
                else:
                    [x async for x in stub.StreamReadings(iter([ingest_pb2.StreamReadingsRequest(batch=b)]))]
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (call, e.value.details())
            prefix = "batches[0]." if call == "upload" else ""
            assert [f for f, _ in bad_request(e.value)] == [prefix + "readings[1].unit"]
            assert preconditions(e.value) == [(t, (prefix + s) if s.startswith("readings") else s)
                                              for t, s in want_pf]
            assert "readings[1].unit" in e.value.details() and want_pf[0][1] in e.value.details()
    # an upload: batch 0 is only unbound, batch 1 only malformed; one answer names both
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[
            readings("monitor-1", [early, early + 60]), readings("monitor-2", [T, T + 60], unit="kg")]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(e.value)] == ["batches[1].readings[1].unit"]
    assert preconditions(e.value) == [("BINDING", "batches[0].readings[0]"), ("BINDING", "batches[0].readings[1]")]
    # readings of two patients plus a bad unit: both violations
    mixed = readings("monitor-1", [T, T + 60], unit="kg")
    mixed.patient_id = "p000002"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[mixed]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(e.value)] == ["batches[0].patient_id", "batches[0].readings[1].unit"]
    # without field errors a binding problem stays FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[readings("monitor-1", [early, T])]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert preconditions(e.value) == [("BINDING", "batches[0].readings[0]")]
    assert pub.messages == []


class CountingMapper:
    """Wraps the native mapper and counts the batches it took (prepare returned a result)."""

    def __init__(self, inner):
        self.inner, self.taken = inner, 0

    def scan(self, data, wrapped=False):
        return self.inner.scan(data, wrapped)

    def prepare(self, data, patient_id, wrapped=False):
        out = self.inner.prepare(data, patient_id, wrapped)
        self.taken += out is not None
        return out


async def test_native_and_python_paths_publish_the_same_messages():
    """The same streams through two real servers, one with the native mapper and one on the Python
    reference path: identical acks, subjects, msg ids and Observations; refusals identical too."""
    import os

    import orjson
    from vigil_ingest import native

    mapper = native.load()
    if mapper is None:
        if os.environ.get("VIGIL_REQUIRE_NATIVE") == "1":
            pytest.fail("the native mapper is not built (scripts/build-native.sh)")
        pytest.skip("native mapper not built")
    # monitor-5 is bound to p000005 until T + 1 h, then to p000006: batches across the change go the
    # Python way (and are refused whole), batches inside either binding take the native path.
    reg_bindings = {"monitor-1": "p000001", "monitor-2": "p000002"}

    def stream_batches():
        out = [batch(10 * i) for i in range(4)]
        out.append(ingest_pb2.ReadingBatch(device_id="monitor-2", readings=[
            make_reading(1, "8310-5", 100.4, "[degF]", T + 0.0005),  # converted unit, fractional time
            make_reading(2, "59408-5", 0.97, "1", T + 1.5),  # fraction -> %
            make_reading(3, "8867-4", 400, "/min", T + 2),  # implausible: flagged, kept
            make_reading(2**63, "2524-7", 2.5, "mmol/L", T + 3)]))  # a lab, a huge sequence
        out.append(ingest_pb2.ReadingBatch(device_id="monitor-5", readings=[
            make_reading(1, "8867-4", 80, "/min", T + 600)]))
        out.append(ingest_pb2.ReadingBatch(device_id="monitor-5", readings=[
            make_reading(2, "8867-4", 81, "/min", T + 4000)]))
        out.append(ingest_pb2.ReadingBatch(device_id="monitor-5", readings=[  # spans both bindings
            make_reading(3, "8867-4", 82, "/min", T + 3000), make_reading(4, "8867-4", 83, "/min", T + 4200)]))
        return out

    async def run(native_on: bool):
        reg = await bound_registry(reg_bindings)
        await reg.register("monitor-5", "")
        await reg.bind("monitor-5", None, "p000005", T - 86400, T + 3600)
        await reg.bind("monitor-5", None, "p000006", T + 3600, None)
        pub = MemoryPublisher()
        srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0"), publisher=pub, registry=reg)
        srv.servicer.fast = CountingMapper(mapper) if native_on else None
        acks, errors = [], []
        async with grpc.aio.insecure_channel(srv.target) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            for b in stream_batches():
                try:
                    acks += [r.ack async for r in stub.StreamReadings(iter([ingest_pb2.StreamReadingsRequest(batch=b)]))]
                except grpc.aio.AioRpcError as e:
                    errors.append((e.code(), e.details()))
            up = await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[batch(100), batch(200)]))
        await srv.stop(0)
        msgs = [(m.subject, m.msg_id, orjson.loads(m.body)) for m in pub.messages]
        return acks, list(up.acks), errors, msgs, srv.servicer.fast

    n_acks, n_up, n_err, n_msgs, counting = await run(True)
    p_acks, p_up, p_err, p_msgs, _ = await run(False)
    assert n_acks == p_acks and n_up == p_up
    assert n_err == p_err and len(n_err) == 1 and n_err[0][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert n_msgs == p_msgs
    assert [s for s, _, _ in n_msgs][-4:-2] == ["vigil.v1.observation.p000005", "vigil.v1.observation.p000006"]
    assert counting.taken == 9  # 4 + monitor-2 + 2 x monitor-5 + 2 uploaded; the straddling batch went the Python way


async def test_edge_values_are_invalid_argument_naming_each_field(served):
    """Out-of-range times, nanos, a value overflowing in the catalogue unit and a bad device_status are
    refused with their field paths (they used to be published as invalid FHIR or end in UNKNOWN)."""
    _, pub, ch = served
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    b = batch(1, n=6)
    b.readings[1].effective_time.seconds = 253_402_300_800  # 10000-01-01
    b.readings[2].effective_time.seconds = 2**62            # gmtime overflow (was UNKNOWN)
    b.readings[3].effective_time.nanos = -5
    b.readings[4].CopyFrom(make_reading(5, "8480-6", 1e308, "kPa", T))  # inf mm[Hg] (was published as null)
    b.device_status.battery_percent = float("nan")
    b.device_status.signal_quality = 101
    for call in ("upload", "stream"):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            if call == "upload":
                await stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[b]))
            else:
                async for _ in stub.StreamReadings(iter([ingest_pb2.StreamReadingsRequest(batch=b)])):
                    pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        prefix = "batches[0]." if call == "upload" else ""
        assert [f for f, _ in bad_request(e.value)] == [prefix + f for f in (
            "device_status.battery_percent", "device_status.signal_quality", "readings[1].effective_time",
            "readings[2].effective_time", "readings[3].effective_time", "readings[4].value")]
    assert pub.messages == []


async def test_readings_without_time_are_named_not_the_optional_patient_id(served):
    _, pub, ch = served
    b = ingest_pb2.ReadingBatch(device_id="monitor-1", readings=[
        ingest_pb2.Reading(sequence=1, code="8867-4", value=70, unit="/min"),
        make_reading(2, "8867-4", 70, "/min", T)])
    b.readings[1].effective_time.seconds = -60
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await ingest_pb2_grpc.IngestServiceStub(ch).UploadReadings(ingest_pb2.UploadReadingsRequest(batches=[b]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request(e.value)] == [
        "batches[0].readings[0].effective_time", "batches[0].readings[1].effective_time"]
    assert pub.messages == []
