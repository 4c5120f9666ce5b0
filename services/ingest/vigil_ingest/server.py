"""grpc.aio implementation of vigil.device.v1.IngestService, plus health and reflection.

StreamReadings is pipelined: the server keeps reading requests and publishing while earlier batches
wait for their JetStream acknowledgement (up to `stream_window` per stream, and `max_inflight`
batches / `max_inflight_bytes` encoded bytes server-wide, so memory stays bounded when NATS is slow:
a full budget stops the server reading more requests, and HTTP/2 flow control pushes back on clients). Responses are still sent one per
batch, in request order, each only after its batch is durable.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry import context as otel_context
from opentelemetry import trace

from vigil import bus, telemetry, tracing
from vigil.catalogue import Catalogue, load_catalogue
from vigil.device.v1 import device_pb2, device_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from vigil.ids import is_fhir_id
from vigil.observation import Violation
from vigil_ingest import auth, native
from vigil_ingest.handler import (
    BatchRejected,
    BindingRefused,
    PreparedBatch,
    prepare_batch,
    publish_prepared,
    resolve_patient,
    with_field_violations,
)
from vigil_ingest.publisher import Publisher, PublishUnavailable
from vigil_ingest.registry import (
    DeviceRecord,
    MemoryStore,
    NotOwner,
    Registry,
    RegistryError,
    RegistryUnavailable,
)

log = logging.getLogger("vigil.ingest")

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
DEVICE_SERVICE_NAME = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name
_END = object()
_DEFAULT = object()


def _precondition_failure(violations: list[tuple[str, str, str]], batch_index: int | None
                          ) -> error_details_pb2.PreconditionFailure:
    prefix = "" if batch_index is None else f"batches[{batch_index}]."
    return error_details_pb2.PreconditionFailure(violations=[
        error_details_pb2.PreconditionFailure.Violation(
            type=t, subject=(prefix + s) if s.startswith("readings") else s, description=d)
        for t, s, d in violations])


def _refusal_message(err: Exception, acked: int | None) -> str:
    msg = f"batch refused: {err}"
    if acked is not None:
        msg += f" ({acked} earlier batch(es) on this stream were acknowledged and stay durable)"
    return msg


def bad_request_status(err: BatchRejected, *, acked: int | None = None) -> status_pb2.Status:
    """INVALID_ARGUMENT with google.rpc.BadRequest details, one field violation per problem, and a
    google.rpc.PreconditionFailure too when the same batch also has binding problems."""
    prefix = "" if err.batch_index is None else f"batches[{err.batch_index}]."  # one batch of an upload
    detail = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=prefix + v.field, description=v.description)
        for v in err.violations])
    st = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=_refusal_message(err, acked))
    st.details.add().Pack(detail)
    if err.preconditions:
        st.details.add().Pack(_precondition_failure(err.preconditions, err.batch_index))
    return st


def precondition_status(err: BindingRefused, *, acked: int | None = None) -> status_pb2.Status:
    """FAILED_PRECONDITION with google.rpc.PreconditionFailure (REGISTRATION or BINDING per reading)."""
    st = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=_refusal_message(err, acked))
    st.details.add().Pack(_precondition_failure(err.violations, err.batch_index))
    return st


def unavailable_status(message: str, retry_seconds: float = 1.0) -> status_pb2.Status:
    st = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message)
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromMilliseconds(int(retry_seconds * 1000))
    st.details.add().Pack(info)
    return st


def registry_error_status(err: RegistryError) -> status_pb2.Status:
    if err.kind == "invalid":
        st = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(err))
        st.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=err.field, description=str(err))]))
    elif err.kind == "not_found":
        st = status_pb2.Status(code=code_pb2.NOT_FOUND, message=str(err))
        st.details.add().Pack(error_details_pb2.ResourceInfo(resource_type="vigil.device.v1.Device",
                                                             resource_name=err.subject, description=str(err)))
    elif err.kind == "permission":
        st = status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=str(err))
        st.details.add().Pack(error_details_pb2.ErrorInfo(reason="DEVICE_OF_OTHER_VENDOR", domain=auth.ERROR_DOMAIN,
                                                          metadata={"device": err.subject}))
    elif err.kind == "conflict":
        st = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=str(err))
        st.details.add().Pack(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type="BINDING", subject=err.subject,
                                                             description=str(err))]))
    else:
        return unavailable_status(str(err))
    return st


class ByteBudget:
    """At most `limit` bytes of encoded batches held at once, server-wide (a batch larger than the
    whole budget waits until it is alone). Taking budget that is free does not suspend."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = asyncio.Condition()
        self._waiting = 0

    async def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        if not self._waiting and self.used + n <= self.limit:
            self.used += n  # no await between the check and the update: atomic on the event loop
            return n
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: self.used + n <= self.limit)
            finally:
                self._waiting -= 1
            self.used += n
        return n

    async def release(self, n: int) -> None:
        self.used -= n
        if self._waiting:
            async with self._cond:
                self._cond.notify_all()


@dataclass(frozen=True, slots=True)
class RawRequest:
    """A StreamReadingsRequest as received: the wire bytes (for the native mapper) and the parsed message."""

    raw: bytes
    message: ingest_pb2.StreamReadingsRequest

    @classmethod
    def parse(cls, data: bytes) -> RawRequest:
        return cls(data, ingest_pb2.StreamReadingsRequest.FromString(data))


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, publisher: Publisher, *, catalogue: Catalogue | None = None,
                 stream_window: int = 64, max_inflight: int = 4096, max_inflight_bytes: int = 256 << 20,
                 publish_timeout: float = 5.0, registry: Registry | None = None, fast_mapper=_DEFAULT):
        self.publisher = publisher
        self.registry = registry if registry is not None else Registry(MemoryStore())
        self.catalogue = catalogue or load_catalogue()
        # The native mapper (vigil_ingest.native) takes the common all-valid batch; anything else, and
        # every refusal with its precise violations, goes through the Python reference path.
        self.fast = native.load(self.catalogue) if fast_mapper is _DEFAULT else fast_mapper
        self.stream_window = stream_window
        self.publish_timeout = publish_timeout
        self._inflight = asyncio.Semaphore(max_inflight)
        self._bytes = ByteBudget(max_inflight_bytes)
        meter = telemetry.meter()
        self._m_readings = meter.create_counter(
            "vigil.ingest.readings", unit="{reading}", description="Readings acknowledged (durable on the bus)")
        self._m_batches = meter.create_histogram(
            "vigil.ingest.batch.size", unit="{reading}", description="Readings per acknowledged batch")

    async def _reserve(self, prepared: PreparedBatch) -> int:
        await self._inflight.acquire()
        try:
            return await self._bytes.acquire(len(prepared.body))
        except BaseException:
            self._inflight.release()
            raise

    def _timeout(self, context) -> float:
        remaining = context.time_remaining()
        if remaining is None:
            return self.publish_timeout
        return max(0.001, min(self.publish_timeout, remaining))

    @staticmethod
    def _batch_span(prepared: PreparedBatch, streamed: bool):
        """One span per batch. A StreamReadings stream may live for hours: each of its batches starts
        its own trace (a SERVER span linked to the stream's RPC span) so a trace is one batch's journey;
        an UploadReadings batch is a child of its RPC span."""
        if not telemetry.tracing_enabled():
            return contextlib.nullcontext(None)
        attrs = {"vigil.device.id": prepared.device_id, "vigil.batch.readings": prepared.count,
                 "vigil.batch.first_sequence": prepared.first_sequence}
        if not streamed:
            return tracing.tracer().start_as_current_span("ingest batch", attributes=attrs)
        rpc = trace.get_current_span().get_span_context()
        return tracing.tracer().start_as_current_span(
            "ingest batch", context=otel_context.Context(), kind=trace.SpanKind.SERVER,
            links=[trace.Link(rpc)] if rpc.is_valid else None, attributes=attrs)

    async def _publish(self, prepared: PreparedBatch, reserved: int, context,
                       status: ingest_pb2.DeviceStatus | None = None, *, streamed: bool = False
                       ) -> ingest_pb2.BatchAck:
        try:
            with self._batch_span(prepared, streamed) as span:
                ack = await publish_prepared(prepared, self.publisher, timeout=self._timeout(context))
                if span is not None:
                    span.set_attribute("vigil.batch.duplicate", ack.duplicate)
        finally:
            self._inflight.release()
            await self._bytes.release(reserved)
        self._m_readings.add(prepared.count, {"duplicate": ack.duplicate})
        self._m_batches.record(prepared.count)
        if not ack.duplicate:
            self.registry.observe(
                prepared.device_id, prepared.first_sequence, prepared.last_sequence, prepared.count,
                prepared.last_effective,
                status.battery_percent if status is not None and status.HasField("battery_percent") else None,
                status.signal_quality if status is not None and status.HasField("signal_quality") else None)
        return ack

    async def _record(self, batch: ingest_pb2.ReadingBatch, vendor: str | None, *, refresh: bool = False
                      ) -> DeviceRecord | None:
        rec = await self.registry.lookup(batch.device_id, refresh=refresh) if batch.device_id else None
        if rec is not None and vendor is not None and rec.vendor != vendor:
            raise NotOwner(f"device {batch.device_id} belongs to another vendor", subject=f"devices/{batch.device_id}")
        return rec

    async def _prepare(self, batch: ingest_pb2.ReadingBatch, vendor: str | None,
                       batch_index: int | None = None, *, raw: bytes | None = None,
                       wrapped: bool = False) -> PreparedBatch:
        """Resolve the patient from the device's binding, then validate and map. Raises BatchRejected,
        BindingRefused, NotOwner or RegistryUnavailable.

        `raw` (the batch's wire bytes; with `wrapped`, a StreamReadingsRequest's) lets the native
        mapper take the batch when it is valid and one binding covers all its readings.
        """
        if not is_fhir_id(batch.device_id):
            raise BatchRejected([Violation("device_id", "must match [A-Za-z0-9-.]{1,64}")], batch_index=batch_index)
        rec = await self._record(batch, vendor)
        if raw is not None and self.fast is not None and rec is not None:
            prepared = self._prepare_native(raw, wrapped, rec, batch.patient_id)
            if prepared is not None:
                return prepared
        try:
            try:
                patient = resolve_patient(batch, rec, batch_index=batch_index)
            except BindingRefused:
                # The cache may lag a binding made a moment ago on another replica: read the bucket once.
                rec = await self._record(batch, vendor, refresh=True)
                patient = resolve_patient(batch, rec, batch_index=batch_index)
        except BindingRefused as refused:  # with the batch's own field errors, if it has any
            fields = with_field_violations(batch, [], self.catalogue)
            if fields:
                raise BatchRejected(fields, batch_index=batch_index, preconditions=refused.violations) from None
            raise
        except BatchRejected as mixed:  # readings of two patients (or patient_id not the bound one)
            merged = with_field_violations(batch, mixed.violations, self.catalogue)
            if len(merged) > len(mixed.violations):
                raise BatchRejected(merged, batch_index=batch_index) from None
            raise
        return prepare_batch(batch, self.catalogue, batch_index=batch_index, patient_id=patient)

    def _prepare_native(self, raw: bytes, wrapped: bool, rec: DeviceRecord, batch_patient: str
                        ) -> PreparedBatch | None:
        """The native fast path, or None (then the Python path decides, with its precise errors)."""
        scanned = self.fast.scan(raw, wrapped)
        if scanned is None:
            return None
        device_id, _patient_field, _count, t_min, t_max = scanned
        patient = covering_patient(rec, t_min, t_max)
        if patient is None or (batch_patient and batch_patient != patient):
            return None
        out = self.fast.prepare(raw, patient, wrapped)
        if out is None:
            return None
        body, msg_id, first, last, count, last_effective = out
        return PreparedBatch(subject=bus.observation_subject(patient), body=body, msg_id=msg_id,
                             device_id=device_id, first_sequence=first, last_sequence=last, count=count,
                             patient_id=patient, last_effective=last_effective)

    @staticmethod
    async def _abort_refusal(context, err: Exception, acked: int | None = None):
        if isinstance(err, BatchRejected):
            await context.abort_with_status(rpc_status.to_status(bad_request_status(err, acked=acked)))
        if isinstance(err, BindingRefused):
            await context.abort_with_status(rpc_status.to_status(precondition_status(err, acked=acked)))
        if isinstance(err, RegistryError):
            await context.abort_with_status(rpc_status.to_status(registry_error_status(err)))
        raise err

    async def _abort_unavailable(self, context, err: Exception):
        msg = f"batch not acknowledged, retry it: {err}"
        log.warning("ingest unavailable: %s", err)
        await context.abort_with_status(rpc_status.to_status(unavailable_status(msg)))

    async def StreamReadings(self, request_iterator, context):
        denied = auth.require_scope()
        if denied is not None:
            await context.abort_with_status(denied)
        vendor = auth.current_vendor()
        queue: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self.stream_window)

        async def reader():
            try:
                async for req in request_iterator:
                    raw = None
                    if isinstance(req, RawRequest):  # as build_server registers the method
                        raw, req = req.raw, req.message
                    try:
                        prepared = await self._prepare(req.batch, vendor, raw=raw, wrapped=True)
                    except (BatchRejected, BindingRefused, RegistryError) as e:
                        await queue.put(e)
                        return
                    await window.acquire()
                    reserved = await self._reserve(prepared)
                    status = req.batch.device_status if req.batch.HasField("device_status") else None
                    await queue.put(asyncio.ensure_future(self._publish(prepared, reserved, context, status,
                                                                        streamed=True)))
            except Exception as e:  # noqa: BLE001 - a broken request stream ends this RPC
                await queue.put(e)
                return
            await queue.put(_END)

        read_task = asyncio.ensure_future(reader())
        acked = 0
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, RegistryUnavailable):
                    await self._abort_unavailable(context, item)
                if isinstance(item, (BatchRejected, BindingRefused, RegistryError)):
                    await self._abort_refusal(context, item, acked)
                if isinstance(item, BaseException):
                    raise item
                try:
                    ack = await item
                except PublishUnavailable as e:
                    await self._abort_unavailable(context, e)
                finally:
                    window.release()
                acked += 1
                yield ingest_pb2.StreamReadingsResponse(ack=ack)
        finally:
            read_task.cancel()
            # Drain publishes already started so their PubAcks (and the semaphores) are settled.
            while not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, asyncio.Future):
                    with contextlib.suppress(Exception):  # the RPC is over; only settle the publishes
                        await item

    async def UploadReadings(self, request, context):
        denied = auth.require_scope()
        if denied is not None:
            await context.abort_with_status(denied)
        vendor = auth.current_vendor()
        prepared, violations, preconditions = [], [], []
        for i, batch in enumerate(request.batches):  # validate every batch before publishing any
            try:
                prepared.append(await self._prepare(batch, vendor, batch_index=i,
                                                    raw=batch.SerializeToString() if self.fast else None))
            except BatchRejected as e:
                violations += [Violation(f"batches[{i}].{v.field}", v.description) for v in e.violations]
                preconditions += [(t, f"batches[{i}].{s}" if s.startswith("readings") else s, d)
                                  for t, s, d in e.preconditions]
            except BindingRefused as e:
                preconditions += [(t, f"batches[{i}].{s}" if s.startswith("readings") else s, d)
                                  for t, s, d in e.violations]
            except RegistryUnavailable as e:
                await self._abort_unavailable(context, e)
            except RegistryError as e:
                await self._abort_refusal(context, e)
        if not request.batches:
            violations.append(Violation("batches", "at least one batch is required"))
        if violations:  # INVALID_ARGUMENT, listing the binding problems of the upload too
            await self._abort_refusal(context, BatchRejected(violations, preconditions=preconditions))
        if preconditions:
            await self._abort_refusal(context, BindingRefused(preconditions))

        async def one(p, b):
            st = b.device_status if b.HasField("device_status") else None
            return await self._publish(p, await self._reserve(p), context, st)

        results = await asyncio.gather(*(one(p, b) for p, b in zip(prepared, request.batches)),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, PublishUnavailable):
                await self._abort_unavailable(context, r)
            if isinstance(r, BaseException):
                raise r
        return ingest_pb2.UploadReadingsResponse(acks=results)


def covering_patient(rec: DeviceRecord, t_min: float, t_max: float) -> str | None:
    """The patient of the one binding that covers [t_min, t_max], or None (bindings never overlap)."""
    for patient, start, end in rec.bindings:
        if start <= t_min and (end is None or t_max < end):
            return patient
    return None


def _ts(epoch: float | None) -> Timestamp | None:
    if epoch is None:
        return None
    t = Timestamp()
    secs = int(epoch // 1)
    t.seconds, t.nanos = secs, round((epoch - secs) * 1e9)
    return t


def _epoch(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def device_message(rec: DeviceRecord) -> device_pb2.Device:
    return device_pb2.Device(
        device_id=rec.device_id, manufacturer=rec.manufacturer, model=rec.model, serial_number=rec.serial_number,
        display_name=rec.display_name, vendor=rec.vendor, create_time=_ts(rec.created),
        bindings=[device_pb2.Binding(patient_id=p, start_time=_ts(s), end_time=_ts(e)) for p, s, e in rec.bindings])


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, registry: Registry):
        self.registry = registry

    async def _run(self, context, coro, *, write: bool):
        if write:
            denied = auth.require_scope()
            if denied is not None:
                coro.close()
                await context.abort_with_status(denied)
        try:
            return await coro
        except RegistryError as e:
            await context.abort_with_status(rpc_status.to_status(registry_error_status(e)))

    async def RegisterDevice(self, request, context):
        d = request.device
        rec = await self._run(context, self.registry.register(
            d.device_id, auth.current_vendor() or "", manufacturer=d.manufacturer, model=d.model,
            serial_number=d.serial_number, display_name=d.display_name), write=True)
        return device_pb2.RegisterDeviceResponse(device=device_message(rec))

    async def GetDevice(self, request, context):
        rec = await self._run(context, self.registry.get(request.device_id, auth.current_vendor()), write=False)
        return device_pb2.GetDeviceResponse(device=device_message(rec))

    async def BindPatient(self, request, context):
        b = request.binding
        rec = await self._run(context, self.registry.bind(
            request.device_id, auth.current_vendor(), b.patient_id,
            _epoch(b.start_time) if b.HasField("start_time") else 0.0,
            _epoch(b.end_time) if b.HasField("end_time") else None), write=True)
        return device_pb2.BindPatientResponse(device=device_message(rec))

    async def UnbindPatient(self, request, context):
        if not request.HasField("end_time"):
            await context.abort_with_status(rpc_status.to_status(registry_error_status(
                RegistryError("end_time is required", field="end_time"))))
        rec = await self._run(context, self.registry.unbind(request.device_id, auth.current_vendor(),
                                                            _epoch(request.end_time)), write=True)
        return device_pb2.UnbindPatientResponse(device=device_message(rec))

    async def GetDeviceHealth(self, request, context):
        await self._run(context, self.registry.get(request.device_id, auth.current_vendor()), write=False)
        h = await self.registry.health_of(request.device_id)
        msg = device_pb2.DeviceHealth(device_id=request.device_id)
        if h.get("last_seen"):
            msg.last_seen_time.CopyFrom(_ts(h["last_seen"]))
        if h.get("last_effective"):
            msg.last_effective_time.CopyFrom(_ts(h["last_effective"]))
        msg.batch_count = int(h.get("batches", 0))
        msg.reading_count = int(h.get("readings", 0))
        msg.sequence_gap_count = int(h.get("gaps", 0))
        msg.missing_sequence_count = int(h.get("missing", 0))
        msg.longest_silence_seconds = float(h.get("longest_silence", 0.0))
        if h.get("battery_percent") is not None:
            msg.battery_percent = h["battery_percent"]
        if h.get("signal_quality") is not None:
            msg.signal_quality = h["signal_quality"]
        return device_pb2.GetDeviceHealthResponse(health=msg)


def build_server(servicer: IngestServicer, *, max_concurrent_rpcs: int | None = 1024,
                 options: list | None = None, interceptors: list | None = None, reuse_port: bool = False
                 ) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with IngestService, DeviceService, grpc.health.v1.Health and server reflection
    (not started). `reuse_port`: SO_REUSEPORT on the listen socket (several worker processes)."""
    server = grpc.aio.server(maximum_concurrent_rpcs=max_concurrent_rpcs, interceptors=interceptors or None,
                             options=(options or [
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]) + [("grpc.so_reuseport", 1 if reuse_port else 0)])
    handlers = {  # as the generated add_IngestServiceServicer_to_server, but StreamReadings keeps the wire bytes
        "StreamReadings": grpc.stream_stream_rpc_method_handler(
            servicer.StreamReadings, request_deserializer=RawRequest.parse,
            response_serializer=ingest_pb2.StreamReadingsResponse.SerializeToString),
        "UploadReadings": grpc.unary_unary_rpc_method_handler(
            servicer.UploadReadings, request_deserializer=ingest_pb2.UploadReadingsRequest.FromString,
            response_serializer=ingest_pb2.UploadReadingsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    device_pb2_grpc.add_DeviceServiceServicer_to_server(DeviceServicer(servicer.registry), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, DEVICE_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    return server, health_servicer
