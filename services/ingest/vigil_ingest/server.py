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

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from vigil.catalogue import Catalogue, load_catalogue
from vigil.device.v1 import ingest_pb2, ingest_pb2_grpc
from vigil.observation import Violation
from vigil_ingest.handler import BatchRejected, PreparedBatch, prepare_batch, publish_prepared
from vigil_ingest.publisher import Publisher, PublishUnavailable

log = logging.getLogger("vigil.ingest")

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
_END = object()


def bad_request_status(err: BatchRejected, *, acked: int | None = None) -> status_pb2.Status:
    """INVALID_ARGUMENT with google.rpc.BadRequest details, one field violation per problem."""
    prefix = "" if err.batch_index is None else f"batches[{err.batch_index}]."  # one batch of an upload
    detail = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=prefix + v.field, description=v.description)
        for v in err.violations])
    msg = f"batch refused: {err}"
    if acked is not None:
        msg += f" ({acked} earlier batch(es) on this stream were acknowledged and stay durable)"
    st = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=msg)
    st.details.add().Pack(detail)
    return st


class ByteBudget:
    """At most `limit` bytes of encoded batches held at once, server-wide (a batch larger than the
    whole budget waits until it is alone)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = asyncio.Condition()

    async def acquire(self, n: int) -> int:
        n = min(n, self.limit)
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        return n

    async def release(self, n: int) -> None:
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, publisher: Publisher, *, catalogue: Catalogue | None = None,
                 stream_window: int = 64, max_inflight: int = 4096, max_inflight_bytes: int = 256 << 20,
                 publish_timeout: float = 5.0):
        self.publisher = publisher
        self.catalogue = catalogue or load_catalogue()
        self.stream_window = stream_window
        self.publish_timeout = publish_timeout
        self._inflight = asyncio.Semaphore(max_inflight)
        self._bytes = ByteBudget(max_inflight_bytes)

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

    async def _publish(self, prepared: PreparedBatch, reserved: int, context) -> ingest_pb2.BatchAck:
        try:
            return await publish_prepared(prepared, self.publisher, timeout=self._timeout(context))
        finally:
            self._inflight.release()
            await self._bytes.release(reserved)

    async def _abort_unavailable(self, context, err: Exception):
        msg = f"batch not acknowledged, retry it: {err}"
        log.warning("ingest unavailable: %s", err)
        await context.abort(grpc.StatusCode.UNAVAILABLE, msg)

    async def StreamReadings(self, request_iterator, context):
        queue: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self.stream_window)

        async def reader():
            try:
                async for req in request_iterator:
                    try:
                        prepared = prepare_batch(req.batch, self.catalogue)
                    except BatchRejected as e:
                        await queue.put(e)
                        return
                    await window.acquire()
                    reserved = await self._reserve(prepared)
                    await queue.put(asyncio.ensure_future(self._publish(prepared, reserved, context)))
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
                if isinstance(item, BatchRejected):
                    await context.abort_with_status(rpc_status.to_status(bad_request_status(item, acked=acked)))
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
        prepared, violations = [], []
        for i, batch in enumerate(request.batches):  # validate every batch before publishing any
            try:
                prepared.append(prepare_batch(batch, self.catalogue, batch_index=i))
            except BatchRejected as e:
                violations += [Violation(f"batches[{i}].{v.field}", v.description) for v in e.violations]
        if not request.batches:
            violations.append(Violation("batches", "at least one batch is required"))
        if violations:
            err = BatchRejected(violations)
            await context.abort_with_status(rpc_status.to_status(bad_request_status(err)))

        async def one(p):
            return await self._publish(p, await self._reserve(p), context)

        results = await asyncio.gather(*(one(p) for p in prepared), return_exceptions=True)
        for r in results:
            if isinstance(r, PublishUnavailable):
                await self._abort_unavailable(context, r)
            if isinstance(r, BaseException):
                raise r
        return ingest_pb2.UploadReadingsResponse(acks=results)


def build_server(servicer: IngestServicer, *, max_concurrent_rpcs: int | None = 1024,
                 options: list | None = None) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with IngestService, grpc.health.v1.Health and server reflection (not started)."""
    server = grpc.aio.server(maximum_concurrent_rpcs=max_concurrent_rpcs, options=options or [
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
    ])
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    return server, health_servicer
