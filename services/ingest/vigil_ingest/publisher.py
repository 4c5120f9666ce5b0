"""The ingest service's port to the bus: publish one batch message, learn whether it is durable.

`JetStreamPublisher` is the real adapter (NATS JetStream, `Nats-Msg-Id` de-duplication);
`MemoryPublisher` is an in-memory twin with the same de-duplication rule, for unit tests.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import orjson

from vigil import bus, telemetry, tracing


class PublishUnavailable(Exception):
    """The bus did not confirm the message (not connected, no stream, timeout). Safe to retry."""


@runtime_checkable
class Publisher(Protocol):
    async def publish_batch(self, subject: str, body: bytes, msg_id: str,
                            *, timeout: float | None = None) -> tuple[bool, bool]:
        """Publish and wait until the bus has stored it; returns (stored, duplicate).

        `stored` is True once the message is durable (including when it was already stored:
        then `duplicate` is True). Raises PublishUnavailable when durability is not confirmed.
        """
        ...


class JetStreamPublisher:
    """Publishes to JetStream with many batches in flight on one connection, each reported durable only
    after its own PubAck (JetStream stored it, file storage, or recognised it as a duplicate of a stored
    one), bounded by `timeout`.

    This is JetStream's asynchronous publish (https://docs.nats.io/using-nats/developer/develop_jetstream/model_deep_dive#acknowledgement-models)
    done on the core connection: each message goes out with `Nats-Msg-Id` and `Nats-Expected-Stream`
    headers and a reply subject under one wildcard inbox this publisher subscribes to once (`start`); the
    stream's PubAck arrives there and resolves the batch's future. nats-py's own `publish_async` does the
    same with a Task and a random token per message and a json + dataclass decode per PubAck; this path
    keeps a counter, a dict of futures and one orjson decode, about half the CPU per batch (the ingest
    hot path). Bounded by `max_pending` messages awaiting a PubAck (the server's in-flight budget is
    below it, so it only guards against misuse).
    """

    def __init__(self, nc, *, timeout: float = 5.0, stream: str = bus.OBSERVATIONS_STREAM,
                 max_pending: int = 65536, compression: str = "zstd"):
        self._nc = nc
        self.compression = bus.check_compression(compression)
        self.timeout = timeout
        self._stream = stream
        self._max_pending = max_pending
        self._prefix = ""
        self._pending: dict[str, asyncio.Future] = {}
        self._next = 0

    async def start(self) -> None:
        """Subscribe to the PubAck inbox (once; nats-py re-subscribes after a reconnect)."""
        if self._prefix:
            return
        prefix = self._nc.new_inbox() + "."
        await self._nc.subscribe(prefix + "*", cb=self._on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1)
        self._prefix = prefix

    async def _on_ack(self, msg) -> None:
        fut = self._pending.pop(msg.subject[len(self._prefix):], None)
        if fut is None or fut.done():
            return  # timed out already (the device retries; the dedupe id makes that safe)
        if not msg.data:  # a status message: 503 = no responders (no stream has the subject)
            status = (msg.headers or {}).get("Status", "")
            fut.set_exception(PublishUnavailable(
                f"NATS JetStream: no stream answers for this subject (is {self._stream} created?)"
                if status == "503" else f"NATS JetStream answered status {status or 'without data'}"))
            return
        try:
            ack = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            fut.set_exception(PublishUnavailable("NATS JetStream sent an unreadable PubAck"))
            return
        err = ack.get("error")
        if err is not None:
            fut.set_exception(PublishUnavailable(
                f"NATS JetStream refused the message: {err.get('description', err)} "
                f"(code {err.get('code')}, error code {err.get('err_code')})"))
        else:
            fut.set_result(bool(ack.get("duplicate")))

    def _connection_state(self) -> str:
        nc = self._nc
        if nc.is_connected:
            return ""
        if nc.is_reconnecting:
            return " (the NATS connection is down; reconnecting)"
        return " (the NATS connection is closed)"

    async def publish_batch(self, subject: str, body: bytes, msg_id: str,
                            *, timeout: float | None = None) -> tuple[bool, bool]:
        timeout = self.timeout if timeout is None else max(0.001, min(timeout, self.timeout))
        body = bus.wire_body(body, self.compression)
        headers = {bus.MSG_ID: msg_id, bus.EXPECTED_STREAM: self._stream}
        if not telemetry.tracing_enabled():
            return await self._publish(subject, body, msg_id, timeout, headers)
        # PRODUCER span (messaging conventions) around publish + PubAck; its W3C context travels in
        # the message headers next to Nats-Msg-Id.
        with tracing.publish_span(subject):
            return await self._publish(subject, body, msg_id, timeout, tracing.inject(headers))

    async def _publish(self, subject: str, body: bytes, msg_id: str, timeout: float,
                       headers: dict[str, str]) -> tuple[bool, bool]:
        import nats.errors

        if not self._prefix:
            await self.start()
        if len(self._pending) >= self._max_pending:
            raise PublishUnavailable(f"NATS JetStream: {len(self._pending)} publishes await acknowledgement")
        self._next += 1
        token = str(self._next)
        fut = asyncio.get_running_loop().create_future()
        self._pending[token] = fut
        try:
            await self._nc.publish(subject, body, reply=self._prefix + token, headers=headers)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
                nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
                nats.errors.StaleConnectionError) as e:
            self._pending.pop(token, None)
            raise PublishUnavailable(f"NATS connection unavailable ({type(e).__name__}) "
                                     f"while publishing to {subject}") from e
        except BaseException:
            self._pending.pop(token, None)
            raise
        if fut.done():
            return True, fut.result()
        timed_out = False

        def expire():
            nonlocal timed_out
            if not fut.done():
                timed_out = True
                fut.cancel()

        timer = asyncio.get_running_loop().call_later(timeout, expire)  # cheaper than wait_for per batch
        try:
            duplicate = await fut
        except asyncio.CancelledError as e:
            if not timed_out:
                raise
            raise PublishUnavailable(
                f"NATS JetStream did not acknowledge {msg_id} on {subject} within {timeout:g}s"
                f"{self._connection_state()}") from e
        finally:
            timer.cancel()
            self._pending.pop(token, None)
        return True, duplicate


@dataclass
class StoredMessage:
    subject: str
    body: bytes
    msg_id: str


@dataclass
class MemoryPublisher:
    """In-memory twin: stores each msg id once (like JetStream's duplicate window, without expiry)."""

    messages: list[StoredMessage] = field(default_factory=list)
    fail_with: Exception | None = None  # set to make the next publishes fail (e.g. PublishUnavailable)
    delay: float = 0.0
    _ids: set[str] = field(default_factory=set)

    async def publish_batch(self, subject: str, body: bytes, msg_id: str,
                            *, timeout: float | None = None) -> tuple[bool, bool]:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        if msg_id in self._ids:
            return True, True
        self._ids.add(msg_id)
        self.messages.append(StoredMessage(subject, body, msg_id))
        return True, False
