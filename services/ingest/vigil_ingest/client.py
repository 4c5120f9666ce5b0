"""A small vendor client for vigil.device.v1.IngestService (grpc.aio).

    client = IngestClient("127.0.0.1:50051", token=None)
    acks = await client.send("monitor-7", "p000001", [make_reading(1, "8867-4", 72, "/min", t)])
    await client.close()

`send` uses one long-lived StreamReadings stream. Batches are pipelined: up to `window` batches may
wait for their ack at once (`submit` returns a future per batch; `send` awaits them). Acks arrive
one per batch, in order. When the stream fails with UNAVAILABLE (or the connection drops), the
client reconnects with exponential backoff and resends every batch not yet acknowledged, in order;
this is safe because batch ids are idempotent (the server answers duplicate=True for a batch it
already stored). A batch the server refuses (INVALID_ARGUMENT) fails with that grpc error, and the
batches queued after it are resent on a new stream.

What it does not do yet: unacknowledged batches live only in memory, so they are lost if the
process exits; there is no on-disk buffer that survives a restart, and no token refresh (the token
is sent as-is as `authorization: Bearer <token>` on every call).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import math
import random
from collections.abc import Iterable, Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from vigil.device.v1 import ingest_pb2, ingest_pb2_grpc

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}


def make_reading(sequence: int, code: str, value: float, unit: str, effective, system: str = ""
                 ) -> ingest_pb2.Reading:
    """A Reading; `effective` is epoch seconds or an aware datetime."""
    ts = Timestamp()
    if isinstance(effective, dt.datetime):
        ts.FromDatetime(effective)
    else:
        secs = math.floor(effective)
        ts.seconds, ts.nanos = secs, round((effective - secs) * 1e9)
    return ingest_pb2.Reading(sequence=sequence, code=code, system=system, value=value, unit=unit,
                              effective_time=ts)


def _as_reading(r) -> ingest_pb2.Reading:
    if isinstance(r, ingest_pb2.Reading):
        return r
    seq, code, system, value, unit, effective = r
    return make_reading(seq, code, value, unit, effective, system)


class IngestClient:
    def __init__(self, target: str, *, token: str | None = None, max_batch: int = 500, retries: int = 5,
                 window: int = 64, credentials: grpc.ChannelCredentials | None = None,
                 backoff: float = 0.2, max_backoff: float = 5.0):
        self.target = target
        self.max_batch = max_batch
        self.retries = retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        opts = [("grpc.keepalive_time_ms", 30_000), ("grpc.max_send_message_length", 16 * 1024 * 1024)]
        self._channel = (grpc.aio.secure_channel(target, credentials, options=opts) if credentials
                         else grpc.aio.insecure_channel(target, options=opts))
        self._stub = ingest_pb2_grpc.IngestServiceStub(self._channel)
        self._window = asyncio.Semaphore(window)
        self._pending: collections.deque = collections.deque()  # (request, future), in send order
        self._lock = asyncio.Lock()
        self._call = None
        self._work = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._closed = False
        self.reconnects = 0

    # -- public API ----------------------------------------------------------------------------

    def batches(self, device_id: str, patient_id: str, readings: Iterable) -> list[ingest_pb2.ReadingBatch]:
        rs = [_as_reading(r) for r in readings]
        chunks = [rs[i:i + self.max_batch] for i in range(0, len(rs), self.max_batch)] or [[]]
        return [ingest_pb2.ReadingBatch(device_id=device_id, patient_id=patient_id, readings=c) for c in chunks]

    async def submit(self, batch: ingest_pb2.ReadingBatch) -> asyncio.Future:
        """Queue one batch on the stream; returns a future for its BatchAck (waits while the window is full)."""
        if self._closed:
            raise RuntimeError("IngestClient is closed")
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._run())
        await self._window.acquire()
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _f: self._window.release())
        req = ingest_pb2.StreamReadingsRequest(batch=batch)
        async with self._lock:
            self._pending.append((req, fut))
            self._work.set()
            if self._call is not None:
                # A failed write is not an error here: the runner sees the broken stream and resends.
                with contextlib.suppress(Exception):
                    await self._call.write(req)
        return fut

    async def send(self, device_id: str, patient_id: str, readings: Sequence) -> list[ingest_pb2.BatchAck]:
        """Send readings (split into batches of at most max_batch); returns one BatchAck per batch."""
        futs = [await self.submit(b) for b in self.batches(device_id, patient_id, readings)]
        return list(await asyncio.gather(*futs))

    async def upload(self, batches: Sequence[ingest_pb2.ReadingBatch], *, timeout: float | None = 30.0
                     ) -> list[ingest_pb2.BatchAck]:
        """UploadReadings (unary, all or none), retried with backoff on UNAVAILABLE."""
        req = ingest_pb2.UploadReadingsRequest(batches=list(batches))
        attempt = 0
        while True:
            try:
                resp = await self._stub.UploadReadings(req, metadata=self._metadata, timeout=timeout,
                                                       wait_for_ready=attempt > 0)
                return list(resp.acks)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
                    raise
                attempt += 1
                await asyncio.sleep(self._delay(attempt))

    async def flush(self) -> None:
        """Wait until every submitted batch is acknowledged (or failed)."""
        futs = [f for _r, f in list(self._pending)]
        if futs:
            await asyncio.gather(*futs, return_exceptions=True)

    async def close(self) -> None:
        """Wait for outstanding acks, end the stream and close the channel."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        if self._runner is not None:
            async with self._lock:
                call, self._call = self._call, None
            if call is not None:
                with contextlib.suppress(Exception):
                    await call.done_writing()
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # -- stream management ---------------------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        d = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return d * (0.5 + random.random() / 2)

    def _fail_all(self, err: BaseException) -> None:
        while self._pending:
            _req, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(err)

    async def _run(self) -> None:
        attempt = 0
        while True:
            if not self._pending:
                self._work.clear()
                await self._work.wait()
            call = self._stub.StreamReadings(metadata=self._metadata)
            error: BaseException | None = None
            try:
                async with self._lock:
                    for req, _fut in list(self._pending):
                        await call.write(req)
                    self._call = call
                while True:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        break
                    attempt = 0
                    if not self._pending:  # should not happen: more acks than batches
                        raise RuntimeError("server sent an ack for no outstanding batch")
                    _req, fut = self._pending.popleft()
                    if not fut.done():
                        fut.set_result(resp.ack)
                if not self._pending and self._closed:
                    return
                error = ConnectionError("stream ended by the server with batches unacknowledged")
            except grpc.aio.AioRpcError as e:
                error = e
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - write on a dead stream etc.
                error = e
            async with self._lock:
                self._call = None
            call.cancel()
            if not self._pending:  # nothing lost: reopen lazily when there is work again
                attempt = 0
                continue
            code = error.code() if isinstance(error, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
            if code == grpc.StatusCode.INVALID_ARGUMENT and self._pending:
                _req, fut = self._pending.popleft()  # the server refuses the first unacked batch
                if not fut.done():
                    fut.set_exception(error)
                attempt = 0
                continue
            if code in RETRYABLE and attempt < self.retries:
                attempt += 1
                self.reconnects += 1
                await asyncio.sleep(self._delay(attempt))
                continue
            self._fail_all(error)
            attempt = 0
