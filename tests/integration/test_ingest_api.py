"""Device API v1 against a real NATS JetStream: registry and bindings, refusals, device health, FHIR Device,
retries over a dropped connection, SIGKILL mid-stream, the client's local buffer, replay --fhir-base.

The error-table tests (docs/device-api.md, "Errors") are the `test_error_*` functions here and in
test_ingest_auth.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid

import grpc
import nats
import pytest
from fhir.resources.R4B.device import Device as FhirDevice
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from vigil_ingest import bootstrap
from vigil_ingest.client import IngestClient, make_reading

from vigil import bus, devservers
from vigil.device.v1 import device_pb2, device_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from vigil.settings import Settings
from vigil.timecontract import DEFAULT_T0

pytestmark = pytest.mark.integration
T = DEFAULT_T0.timestamp()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def batch(device: str, first_seq: int, n: int = 3, patient: str = "", t: float = T, step: float = 60):
    return ingest_pb2.ReadingBatch(device_id=device, patient_id=patient, readings=[
        make_reading(first_seq + i, "8867-4", 70 + i, "/min", t + step * i) for i in range(n)])


def details(err: grpc.aio.AioRpcError, kind):
    st = rpc_status.from_call(err)
    assert st is not None, f"no google.rpc.Status: {err}"
    out = []
    for d in st.details:
        msg = kind()
        if d.Unpack(msg):
            out.append(msg)
    assert out, f"no {kind.__name__} in {st}"
    return out


async def stream(ch, *batches, timeout: float = 10):
    stub = ingest_pb2_grpc.IngestServiceStub(ch)
    reqs = [ingest_pb2.StreamReadingsRequest(batch=b) for b in batches]
    return [r.ack async for r in stub.StreamReadings(iter(reqs), timeout=timeout)]


async def count(js, subject: str) -> int:
    info = await js.stream_info(bus.OBSERVATIONS_STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def all_msgs(js, subject: str, n: int) -> list:
    sub = await js.subscribe(subject, ordered_consumer=True)
    out = []
    try:
        for _ in range(n):
            out.append(await sub.next_msg(timeout=5))
    finally:
        await sub.unsubscribe()
    return out


@pytest.fixture
async def ingest(nats_url):
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url))
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    client = IngestClient(srv.target, retries=3, backoff=0.05)
    channel = grpc.aio.insecure_channel(srv.target)
    yield srv, js, channel, client
    await client.close()
    await channel.close()
    await nc.close()
    await srv.stop(1)


# -- registry and bindings ---------------------------------------------------------------------

async def test_registry_is_in_jetstream_and_shared_by_replicas(ingest, nats_url):
    _srv, js, _ch, client = ingest
    device, patient = uid("mon"), uid("pt")
    reg = await client.register_device(device, manufacturer="Acme", model="M1", serial_number="SN1",
                                       display_name="Bed 1")
    assert reg.device_id == device and reg.create_time.seconds > 0
    await client.bind_patient(device, patient, T - 3600)
    other = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url))  # a second replica
    try:
        async with IngestClient(other.target) as c2:
            got = await c2.get_device(device)
            assert (got.manufacturer, got.model, got.serial_number, got.display_name) == ("Acme", "M1", "SN1", "Bed 1")
            assert [(b.patient_id, b.start_time.seconds, b.HasField("end_time")) for b in got.bindings] == [
                (patient, int(T - 3600), False)]
            acks = await c2.send(device, "", [make_reading(1, "8867-4", 70, "/min", T)])
            assert acks[0].reading_count == 1
    finally:
        await other.stop(1)
    kv = await js.key_value("VIGIL_DEVICES")
    assert (await kv.get(f"d.{device}")).value
    # registering again is idempotent; binding again with the same values too
    await client.register_device(device, manufacturer="Acme", model="M1", serial_number="SN1", display_name="Bed 1")
    d = await client.bind_patient(device, patient, T - 3600)
    assert len(d.bindings) == 1


async def test_subject_comes_from_the_binding_valid_at_each_reading(ingest):
    _srv, js, ch, client = ingest
    device, p1, p2 = uid("mon"), uid("pt"), uid("pt")
    await client.register_device(device)
    await client.bind_patient(device, p1, T - 3600, T + 3600)
    await client.bind_patient(device, p2, T + 3600)
    acks = await stream(ch, batch(device, 1, t=T), batch(device, 10, t=T + 3600), batch(device, 20, t=T + 7200,
                                                                                       patient=p2))
    assert len(acks) == 3
    assert await count(js, bus.observation_subject(p1)) == 1
    assert await count(js, bus.observation_subject(p2)) == 2
    for m in await all_msgs(js, bus.observation_subject(p2), 2):
        obs = bus.decode_bundle(m.data)
        assert {o["subject"]["reference"] for o in obs} == {f"Patient/{p2}"}
        assert {o["device"]["reference"] for o in obs} == {f"Device/{device}"}
    # closing the open binding: readings after its end are refused
    d = await client.unbind_patient(device, T + 10800)
    assert d.bindings[-1].end_time.seconds == int(T + 10800)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stream(ch, batch(device, 30, t=T + 10800))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_device_resource_is_published_to_the_ehr_stream(ingest):
    _srv, js, _ch, client = ingest
    device, patient = uid("mon"), uid("pt")
    await client.register_device(device, manufacturer="Acme", model="M1", serial_number="SN9", display_name="Bed 9")
    await client.bind_patient(device, patient, T)
    msg = await js.get_last_msg(bus.EHR_STREAM, bus.ehr_subject("Device", device))
    [dev] = bus.decode_bundle(msg.data)
    FhirDevice.model_validate(dev)
    assert dev["id"] == device and dev["manufacturer"] == "Acme" and dev["serialNumber"] == "SN9"
    assert dev["patient"] == {"reference": f"Patient/{patient}"}
    assert {"name": "Bed 9", "type": "user-friendly-name"} in dev["deviceName"]


async def test_device_health_last_seen_gaps_battery_signal(ingest):
    _srv, _js, ch, client = ingest
    device, patient = uid("mon"), uid("pt")
    await client.register_device(device)
    await client.bind_patient(device, patient, T - 60)
    b1 = batch(device, 1, n=3)
    b1.device_status.battery_percent = 81
    b2 = batch(device, 10, n=2, t=T + 600)  # sequences 4..9 never arrive: one gap of 6
    b2.device_status.battery_percent = 80
    b2.device_status.signal_quality = 95
    await stream(ch, b1, b2)
    await stream(ch, b2)  # a duplicate does not count
    h = await client.device_health(device)
    assert (h.batch_count, h.reading_count, h.sequence_gap_count, h.missing_sequence_count) == (2, 5, 1, 6)
    assert h.battery_percent == 80 and h.signal_quality == 95
    assert h.last_seen_time.seconds > 0 and h.last_effective_time.seconds == int(T + 660)


# -- error table ---------------------------------------------------------------------------------

async def test_error_unregistered_device_is_failed_precondition(ingest):
    _srv, _js, ch, _client = ingest
    device = uid("ghost")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stream(ch, batch(device, 1))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    [pf] = details(e.value, error_details_pb2.PreconditionFailure)
    assert [(v.type, v.subject) for v in pf.violations] == [("REGISTRATION", f"devices/{device}")]


async def test_error_unbound_readings_are_failed_precondition_per_reading(ingest):
    _srv, js, ch, client = ingest
    device, patient = uid("mon"), uid("pt")
    await client.register_device(device)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.upload([batch(device, 1)])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    [pf] = details(e.value, error_details_pb2.PreconditionFailure)
    assert [(v.type, v.subject) for v in pf.violations] == [
        ("BINDING", "batches[0].readings[0]"), ("BINDING", "batches[0].readings[1]"),
        ("BINDING", "batches[0].readings[2]")]
    await client.bind_patient(device, patient, T + 60)  # readings[0] (at T) is before the binding
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stream(ch, batch(device, 1))
    [pf] = details(e.value, error_details_pb2.PreconditionFailure)
    assert [v.subject for v in pf.violations] == ["readings[0]"]
    assert await count(js, bus.observation_subject(patient)) == 0


async def test_error_patient_id_disagreeing_with_binding_is_invalid_argument(ingest):
    _srv, _js, ch, client = ingest
    device, patient = uid("mon"), uid("pt")
    await client.register_device(device)
    await client.bind_patient(device, patient, T - 60)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stream(ch, batch(device, 1, patient="someone-else"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [br] = details(e.value, error_details_pb2.BadRequest)
    assert [v.field for v in br.field_violations] == ["patient_id"]


async def test_error_bad_readings_are_invalid_argument_naming_each(ingest):
    _srv, _js, ch, client = ingest
    device, patient = uid("mon"), uid("pt")
    await client.register_device(device)
    await client.bind_patient(device, patient, T - 60)
    bad = batch(device, 1, n=4)
    bad.readings[0].unit = "kg"
    bad.readings[1].code = "0000-0"
    bad.readings[2].value = float("inf")
    bad.readings[3].sequence = 1
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stream(ch, bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [br] = details(e.value, error_details_pb2.BadRequest)
    assert [v.field for v in br.field_violations] == [
        "readings[0].unit", "readings[1].code", "readings[2].value", "readings[3].sequence"]


async def test_error_overlapping_binding_is_failed_precondition(ingest):
    _srv, _js, _ch, client = ingest
    device = uid("mon")
    await client.register_device(device)
    await client.bind_patient(device, uid("pt"), T)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.bind_patient(device, uid("pt"), T + 60)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    [pf] = details(e.value, error_details_pb2.PreconditionFailure)
    assert pf.violations[0].type == "BINDING"


async def test_error_bad_registry_requests_are_invalid_argument(ingest):
    _srv, _js, _ch, client = ingest
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.register_device("no spaces allowed")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(e.value, error_details_pb2.BadRequest)[0].field_violations[0].field == "device.device_id"
    device = uid("mon")
    await client.register_device(device)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.bind_patient(device, uid("pt"), T, T - 1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(e.value, error_details_pb2.BadRequest)[0].field_violations[0].field == "binding.end_time"


async def test_error_unknown_device_is_not_found(ingest):
    _srv, _js, _ch, client = ingest
    for call in (client.get_device, client.device_health, lambda d: client.bind_patient(d, "p1", T)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(uid("ghost"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert details(e.value, error_details_pb2.ResourceInfo)[0].resource_type == "vigil.device.v1.Device"


async def test_error_deadline_exceeded(nats_url):
    """A deadline shorter than the bus needs: DEADLINE_EXCEEDED (and nothing acked)."""
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_url))
    try:
        async with IngestClient(srv.target) as client:
            device = uid("mon")
            await client.register_device(device)
            await client.bind_patient(device, uid("pt"), T - 60)
            big = [batch(device, 10 * i, n=5) for i in range(200)]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client._stub.UploadReadings(ingest_pb2.UploadReadingsRequest(batches=big), timeout=0.001)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await srv.stop(1)


async def test_error_bus_down_is_unavailable_with_retry_info():
    store = devservers.free_port()
    nats_srv = devservers.start_nats(port=store)
    srv = await bootstrap.start(Settings(grpc_listen="127.0.0.1:0", nats_url=nats_srv.url), publish_timeout=0.5)
    try:
        async with IngestClient(srv.target, retries=0) as client:
            device = uid("mon")
            await client.register_device(device)
            await client.bind_patient(device, uid("pt"), T - 60)
            nats_srv.kill()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.upload([batch(device, 1)], timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert details(e.value, error_details_pb2.RetryInfo)[0].retry_delay.ToMilliseconds() > 0
    finally:
        await srv.stop(0.5)
        nats_srv.stop()


# -- idempotency across a dropped connection ---------------------------------------------------

class Proxy:
    """A TCP proxy whose connections can be cut (a dropped link between device and ingest)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.writers: set = set()
        self.server = None
        self.port = 0

    async def start(self, port: int = 0):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer):
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, uw}

        async def pipe(r, w):
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(Exception):
                w.close()
        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))

    def cut(self):
        for w in list(self.writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self.writers.clear()

    async def close(self):
        self.cut()
        self.server.close()


async def test_batches_retried_after_a_dropped_connection_make_no_duplicates(ingest):
    srv, js, _ch, admin = ingest
    device, patient = uid("mon"), uid("pt")
    await admin.register_device(device)
    await admin.bind_patient(device, patient, T - 60)
    proxy = await Proxy(srv.port).start()
    client = IngestClient(f"127.0.0.1:{proxy.port}", retries=50, backoff=0.05, max_backoff=0.2, window=32)
    try:
        n = 300
        futs = []
        for i in range(n):
            futs.append(await client.submit(batch(device, 10 * i, n=3)))
            if i in (60, 150, 240):
                proxy.cut()  # acks in flight are lost; the client resends what is unacked
        acks = await asyncio.wait_for(asyncio.gather(*futs), 60)
    finally:
        await client.close()
        await proxy.close()
    assert client.reconnects >= 1
    assert [a.first_sequence for a in acks] == [10 * i for i in range(n)]
    subject = bus.observation_subject(patient)
    assert await count(js, subject) == n  # each batch stored exactly once
    ids = [o["id"] for m in await all_msgs(js, subject, n) for o in bus.decode_bundle(m.data)]
    assert len(ids) == len(set(ids)) == 3 * n


# -- SIGKILL mid-stream ------------------------------------------------------------------------

async def test_sigkill_mid_stream_loses_no_acked_batch(nats_url, tmp_path):
    port = devservers.free_port()
    env = {**os.environ, "VIGIL_NATS_URL": nats_url, "VIGIL_GRPC_LISTEN": f"127.0.0.1:{port}",
           "VIGIL_OIDC_ISSUER": ""}
    log = open(tmp_path / "ingest.log", "wb")  # noqa: SIM115, ASYNC230 - the child process writes it
    proc = subprocess.Popen([sys.executable, "-m", "vigil.cli", "ingest"],  # noqa: ASYNC220
                            env=env, stdout=log, stderr=log)
    device, patient = uid("mon"), uid("pt")
    acked: list[ingest_pb2.BatchAck] = []
    sent = 0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await asyncio.wait_for(ch.channel_ready(), 30)
            dev = device_pb2_grpc.DeviceServiceStub(ch)
            await dev.RegisterDevice(device_pb2.RegisterDeviceRequest(device=device_pb2.Device(device_id=device)),
                                     wait_for_ready=True, timeout=30)
            b = device_pb2.Binding(patient_id=patient)
            b.start_time.seconds = int(T - 60)
            await dev.BindPatient(device_pb2.BindPatientRequest(device_id=device, binding=b), timeout=10)
            call = ingest_pb2_grpc.IngestServiceStub(ch).StreamReadings()

            async def writer():
                nonlocal sent
                for i in range(100_000):
                    await call.write(ingest_pb2.StreamReadingsRequest(batch=batch(device, 100 * i, n=100, step=1)))
                    sent += 1

            w = asyncio.ensure_future(writer())
            with pytest.raises(grpc.aio.AioRpcError):
                while True:
                    resp = await call.read()
                    assert resp is not grpc.aio.EOF
                    acked.append(resp.ack)
                    if len(acked) == 200:
                        os.kill(proc.pid, signal.SIGKILL)  # batches are in flight right now
            w.cancel()
            with contextlib.suppress(BaseException):
                await w
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    assert len(acked) >= 200 and sent > len(acked)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        stored = await count(js, bus.observation_subject(patient))
        ids = {m.headers[bus.MSG_ID] for m in await all_msgs(js, bus.observation_subject(patient), stored)}
    finally:
        await nc.close()
    for a in acked:
        assert bus.batch_msg_id(device, list(range(a.first_sequence, a.last_sequence + 1))) in ids
    assert stored >= len(acked)


# -- the client's local buffer -----------------------------------------------------------------

async def test_client_buffer_survives_a_restart_and_resends(ingest, tmp_path):
    srv, js, _ch, admin = ingest
    device, patient = uid("mon"), uid("pt")
    await admin.register_device(device)
    await admin.bind_patient(device, patient, T - 60)
    dead = f"127.0.0.1:{devservers.free_port()}"  # nothing listens: the device is offline
    first = IngestClient(dead, buffer_dir=tmp_path / "buf", retries=1, backoff=0.01)
    for i in range(5):
        await first.submit(batch(device, 10 * i))
    assert len(first.buffer.pending()) == 5
    first._closed = True  # the process "dies": no flush, nothing acknowledged
    first._runner.cancel()
    first.buffer.close()
    await first._channel.close()

    second = IngestClient(srv.target, buffer_dir=tmp_path / "buf")
    try:
        futs = await second.resend_buffered()
        acks = await asyncio.gather(*futs)
        assert [a.first_sequence for a in acks] == [0, 10, 20, 30, 40]
        assert second.buffer.pending() == []
        bad = batch(device, 99)
        bad.readings[0].unit = "kg"
        with pytest.raises(grpc.aio.AioRpcError):
            await (await second.submit(bad))
        assert second.buffer.pending() == [] and len(second.buffer.rejected()) == 1
    finally:
        await second.close()
    assert await count(js, bus.observation_subject(patient)) == 5


# -- replay as a device gateway, with the EHR side through the FHIR API -----------------------

async def test_replay_registers_binds_and_writes_patient_and_encounters(ingest, tmp_path):
    import httpx
    import uvicorn
    from vigil_gateway.app import create_app
    from vigil_gateway.bootstrap import build_store
    from vigil_ingest.replay import replay

    from vigil import physionet

    path = physionet.default_dataset()
    if not path.exists():
        pytest.skip(f"data set not found at {path}")
    srv, _js, _ch, client = ingest
    store = build_store(f"sqlite:///{tmp_path}/gw.db")
    store.migrate()
    http_port = devservers.free_port()
    settings = Settings(http_port=http_port)
    app = create_app(settings, store, None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=http_port, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    try:
        for _ in range(100):
            if server.started:
                break
            await asyncio.sleep(0.05)
        prefix = uuid.uuid4().hex[:8] + "-"
        base = f"http://127.0.0.1:{http_port}/fhir"
        stats = await replay(path, target=srv.target, limit=2, id_prefix=prefix, fhir_base=base)
        assert stats.stays == 2
        stems = [s.stem for s in physionet.iter_stays(path, limit=2)]
        async with httpx.AsyncClient() as http:
            for stem in stems:
                pid = prefix + stem
                assert (await http.get(f"{base}/Patient/{pid}")).status_code == 200
                assert (await http.get(f"{base}/Encounter/{pid}-hospital")).status_code == 200
                icu = (await http.get(f"{base}/Encounter/{pid}-icu")).json()
                assert icu["partOf"] == {"reference": f"Encounter/{pid}-hospital"}
                d = await client.get_device(f"{prefix}bedside-{stem}")
                assert [(b.patient_id, b.start_time.seconds) for b in d.bindings] == [(pid, int(T))]
    finally:
        server.should_exit = True
        await task
        store.close()


async def test_error_malformed_ids_are_invalid_argument_not_unavailable(ingest):
    """Ids the KV bucket or a NATS subject cannot take are INVALID_ARGUMENT (they were UNAVAILABLE, which
    clients retry forever, or UNKNOWN), including a trailing newline, which vigil.ids' `$` lets through."""
    _srv, _js, ch, client = ingest
    dstub = device_pb2_grpc.DeviceServiceStub(ch)
    for device in ("", "bad id", "a*b", "mon-1\n"):
        for call, field in (
            (dstub.BindPatient(device_pb2.BindPatientRequest(device_id=device, binding=device_pb2.Binding(
                patient_id="p1", start_time=make_reading(1, "8867-4", 1, "/min", T).effective_time))), "device_id"),
            (dstub.UnbindPatient(device_pb2.UnbindPatientRequest(
                device_id=device, end_time=make_reading(1, "8867-4", 1, "/min", T).effective_time)), "device_id"),
            (dstub.RegisterDevice(device_pb2.RegisterDeviceRequest(device=device_pb2.Device(device_id=device))),
             "device.device_id"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (device, e.value)
            assert details(e.value, error_details_pb2.BadRequest)[0].field_violations[0].field == field
    device = uid("mon")
    await client.register_device(device)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.bind_patient(device, "p1\n", T - 60)  # was accepted: then every batch failed UNKNOWN
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(e.value, error_details_pb2.BadRequest)[0].field_violations[0].field == "binding.patient_id"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stream(ch, batch(device + "\n", 1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(e.value, error_details_pb2.BadRequest)[0].field_violations] == ["device_id"]
