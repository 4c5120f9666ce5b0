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

Refusals that a retry cannot fix (INVALID_ARGUMENT, FAILED_PRECONDITION, PERMISSION_DENIED) fail
only the refused batch; the stream is reopened for the rest.

Local buffer (`buffer_dir=`): every submitted batch is first written to an SQLite file in that
folder (WAL; survives a crash or kill of the process, `durable=True` also survives power loss), and
deleted once acknowledged. On start, `resend_buffered()` sends every batch still there, in order
(idempotent: the server answers duplicate=True for what it already stored). Batches the server
refuses are moved to the `rejected` table with the error, for the vendor to inspect.

Tokens: `token=` a fixed bearer token, or `token_provider=` a callable (sync or async) returning a
fresh one per call, e.g. `ClientCredentials(token_url, client_id, secret)` which caches the
Keycloak client-credentials token until shortly before it expires.

Device registry: `register_device`, `bind_patient`, `unbind_patient`, `get_device`, `device_health`.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import inspect
import math
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from vigil.device.v1 import device_pb2, device_pb2_grpc, ingest_pb2, ingest_pb2_grpc

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.DEADLINE_EXCEEDED}
# The server refused this one batch; the batches after it are unaffected.
BATCH_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                  grpc.StatusCode.PERMISSION_DENIED}


def _ts(value) -> Timestamp:
    ts = Timestamp()
    if isinstance(value, dt.datetime):
        ts.FromDatetime(value)
    else:
        secs = math.floor(value)
        ts.seconds, ts.nanos = secs, round((value - secs) * 1e9)
    return ts


class ClientCredentials:
    """OAuth2 client-credentials token source (Keycloak), cached until 30 s before expiry."""

    def __init__(self, token_url: str, client_id: str, client_secret: str, *, scope: str | None = None):
        self.token_url, self.client_id, self.client_secret, self.scope = token_url, client_id, client_secret, scope
        self._token: str | None = None
        self._expires = 0.0

    @classmethod
    def for_issuer(cls, issuer: str, client_id: str, client_secret: str, **kw) -> ClientCredentials:
        return cls(f"{issuer.rstrip('/')}/protocol/openid-connect/token", client_id, client_secret, **kw)

    async def __call__(self) -> str:
        if self._token and time.time() < self._expires - 30:
            return self._token
        import httpx

        data = {"grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self.client_secret}
        if self.scope:
            data["scope"] = self.scope
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(self.token_url, data=data)
            r.raise_for_status()
            doc = r.json()
        self._token = doc["access_token"]
        self._expires = time.time() + float(doc.get("expires_in", 60))
        return self._token


class LocalBuffer:
    """Unacknowledged batches in an SQLite file: survives a restart of the vendor's process."""

    def __init__(self, directory: str | os.PathLike, *, durable: bool = False):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "vigil-ingest-buffer.sqlite3")
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self.db.execute("CREATE TABLE IF NOT EXISTS pending (id INTEGER PRIMARY KEY AUTOINCREMENT, batch BLOB NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS rejected (id INTEGER PRIMARY KEY, batch BLOB NOT NULL, "
                        "error TEXT NOT NULL, at REAL NOT NULL)")

    def add(self, batch: ingest_pb2.ReadingBatch) -> int:
        return self.db.execute("INSERT INTO pending (batch) VALUES (?)", (batch.SerializeToString(),)).lastrowid

    def done(self, row: int) -> None:
        self.db.execute("DELETE FROM pending WHERE id = ?", (row,))

    def reject(self, row: int, error: str) -> None:
        self.db.execute("BEGIN")
        self.db.execute("INSERT OR REPLACE INTO rejected SELECT id, batch, ?, ? FROM pending WHERE id = ?",
                        (error, time.time(), row))
        self.db.execute("DELETE FROM pending WHERE id = ?", (row,))
        self.db.execute("COMMIT")

    def pending(self) -> list[tuple[int, ingest_pb2.ReadingBatch]]:
        return [(row, ingest_pb2.ReadingBatch.FromString(blob))
                for row, blob in self.db.execute("SELECT id, batch FROM pending ORDER BY id")]

    def rejected(self) -> list[tuple[ingest_pb2.ReadingBatch, str]]:
        return [(ingest_pb2.ReadingBatch.FromString(b), e)
                for b, e in self.db.execute("SELECT batch, error FROM rejected ORDER BY id")]

    def close(self) -> None:
        self.db.close()


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
                 backoff: float = 0.2, max_backoff: float = 5.0,
                 token_provider: Callable[[], object] | None = None,
                 buffer_dir: str | os.PathLike | None = None, durable_buffer: bool = False):
        self.target = target
        self.max_batch = max_batch
        self.retries = retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self._static_metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._token_provider = token_provider
        self.buffer = LocalBuffer(buffer_dir, durable=durable_buffer) if buffer_dir is not None else None
        opts = [("grpc.keepalive_time_ms", 30_000), ("grpc.max_send_message_length", 16 * 1024 * 1024)]
        self._channel = (grpc.aio.secure_channel(target, credentials, options=opts) if credentials
                         else grpc.aio.insecure_channel(target, options=opts))
        self._stub = ingest_pb2_grpc.IngestServiceStub(self._channel)
        self._devices = device_pb2_grpc.DeviceServiceStub(self._channel)
        self._window = asyncio.Semaphore(window)
        self._pending: collections.deque = collections.deque()  # (request, future), in send order
        self._lock = asyncio.Lock()
        self._call = None
        self._work = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._closed = False
        self.reconnects = 0

    async def _md(self) -> tuple:
        if self._token_provider is None:
            return self._static_metadata
        tok = self._token_provider()
        if inspect.isawaitable(tok):
            tok = await tok
        return (("authorization", f"Bearer {tok}"),)

    # -- device registry -----------------------------------------------------------------------

    async def register_device(self, device_id: str, *, manufacturer: str = "", model: str = "",
                              serial_number: str = "", display_name: str = "", timeout: float = 10.0
                              ) -> device_pb2.Device:
        req = device_pb2.RegisterDeviceRequest(device=device_pb2.Device(
            device_id=device_id, manufacturer=manufacturer, model=model, serial_number=serial_number,
            display_name=display_name))
        return (await self._unary(self._devices.RegisterDevice, req, timeout)).device

    async def bind_patient(self, device_id: str, patient_id: str, start, end=None, *, timeout: float = 10.0
                           ) -> device_pb2.Device:
        """Bind from `start` (epoch seconds or aware datetime) to `end` (None: open-ended)."""
        b = device_pb2.Binding(patient_id=patient_id, start_time=_ts(start))
        if end is not None:
            b.end_time.CopyFrom(_ts(end))
        req = device_pb2.BindPatientRequest(device_id=device_id, binding=b)
        return (await self._unary(self._devices.BindPatient, req, timeout)).device

    async def unbind_patient(self, device_id: str, end, *, timeout: float = 10.0) -> device_pb2.Device:
        req = device_pb2.UnbindPatientRequest(device_id=device_id, end_time=_ts(end))
        return (await self._unary(self._devices.UnbindPatient, req, timeout)).device

    async def get_device(self, device_id: str, *, timeout: float = 10.0) -> device_pb2.Device:
        return (await self._unary(self._devices.GetDevice, device_pb2.GetDeviceRequest(device_id=device_id),
                                  timeout)).device

    async def device_health(self, device_id: str, *, timeout: float = 10.0) -> device_pb2.DeviceHealth:
        return (await self._unary(self._devices.GetDeviceHealth,
                                  device_pb2.GetDeviceHealthRequest(device_id=device_id), timeout)).health

    async def _unary(self, method, req, timeout: float):
        attempt = 0
        while True:
            try:
                return await method(req, metadata=await self._md(), timeout=timeout, wait_for_ready=attempt > 0)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
                    raise
                attempt += 1
                await asyncio.sleep(self._delay(attempt))

    # -- public API ----------------------------------------------------------------------------

    def batches(self, device_id: str, patient_id: str, readings: Iterable) -> list[ingest_pb2.ReadingBatch]:
        rs = [_as_reading(r) for r in readings]
        chunks = [rs[i:i + self.max_batch] for i in range(0, len(rs), self.max_batch)] or [[]]
        return [ingest_pb2.ReadingBatch(device_id=device_id, patient_id=patient_id, readings=c) for c in chunks]

    async def resend_buffered(self) -> list[asyncio.Future]:
        """Submit every batch left unacknowledged in the local buffer (e.g. by a previous run)."""
        if self.buffer is None:
            return []
        return [await self.submit(b, _row=row) for row, b in self.buffer.pending()]

    async def submit(self, batch: ingest_pb2.ReadingBatch, *, _row: int | None = None) -> asyncio.Future:
        """Queue one batch on the stream; returns a future for its BatchAck (waits while the window is full).

        With a local buffer the batch is stored on disk before this returns, and removed once acked."""
        if self._closed:
            raise RuntimeError("IngestClient is closed")
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._run())
        await self._window.acquire()
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _f: self._window.release())
        if self.buffer is not None:
            row = self.buffer.add(batch) if _row is None else _row
            buf = self.buffer

            def settle(f: asyncio.Future, row=row) -> None:
                if f.cancelled():
                    return
                err = f.exception()
                if err is None:
                    buf.done(row)
                elif isinstance(err, grpc.aio.AioRpcError) and err.code() in BATCH_REFUSALS:
                    buf.reject(row, f"{err.code().name}: {err.details()}")
            fut.add_done_callback(settle)
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
                resp = await self._stub.UploadReadings(req, metadata=await self._md(), timeout=timeout,
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
        if self.buffer is not None:
            self.buffer.close()

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
            error: BaseException | None = None
            try:
                call = self._stub.StreamReadings(metadata=await self._md())
            except Exception as e:  # noqa: BLE001 - token source failed: retry like a broken stream
                call, error = None, e
            try:
                if call is None:
                    raise error
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
                if call is not None:
                    call.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - write on a dead stream etc.
                error = e
            async with self._lock:
                self._call = None
            if call is not None:
                call.cancel()
            if not self._pending:  # nothing lost: reopen lazily when there is work again
                attempt = 0
                continue
            code = error.code() if isinstance(error, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
            if code in BATCH_REFUSALS and self._pending:
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
