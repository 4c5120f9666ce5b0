"""The ingest service's port to the bus: publish one batch message, learn whether it is durable.

`JetStreamPublisher` is the real adapter (NATS JetStream, `Nats-Msg-Id` de-duplication);
`MemoryPublisher` is an in-memory twin with the same de-duplication rule, for unit tests.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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
    """Publishes with `js.publish_async` so many batches can be in flight on one connection.

    Each call waits for its own PubAck (bounded by `timeout`), so a batch is reported durable only
    after JetStream has stored it (file storage) or recognised it as a duplicate of a stored one.
    """

    def __init__(self, js, *, timeout: float = 5.0, stream: str = bus.OBSERVATIONS_STREAM,
                 max_pending: float = 2.0, compression: str = "zstd"):
        self._js = js
        self.compression = bus.check_compression(compression)
        self.timeout = timeout
        self._stream = stream
        self._max_stall = max_pending  # seconds to wait for a free publish_async slot

    def _connection_state(self) -> str:
        nc = getattr(self._js, "_nc", None)
        if nc is None or nc.is_connected:
            return ""
        if nc.is_reconnecting:
            return " (the NATS connection is down; reconnecting)"
        return " (the NATS connection is closed)"

    async def publish_batch(self, subject: str, body: bytes, msg_id: str,
                            *, timeout: float | None = None) -> tuple[bool, bool]:
        timeout = self.timeout if timeout is None else max(0.001, min(timeout, self.timeout))
        body = bus.wire_body(body, self.compression)
        if not telemetry.tracing_enabled():
            return await self._publish(subject, body, msg_id, timeout, {bus.MSG_ID: msg_id})
        # PRODUCER span (messaging conventions) around publish + PubAck; its W3C context travels in
        # the message headers next to Nats-Msg-Id.
        with tracing.publish_span(subject):
            return await self._publish(subject, body, msg_id, timeout, tracing.inject({bus.MSG_ID: msg_id}))

    async def _publish(self, subject: str, body: bytes, msg_id: str, timeout: float,
                       headers: dict[str, str]) -> tuple[bool, bool]:
        import nats.errors
        import nats.js.errors

        try:
            # publish_async only waits for a free pending slot (bounded by wait_stall) and the socket
            # write buffer; the PubAck wait below is the one bounded by `timeout`.
            fut = await self._js.publish_async(subject, body, headers=headers,
                                               stream=self._stream, wait_stall=min(self._max_stall, timeout))
        except nats.js.errors.TooManyStalledMsgsError as e:
            raise PublishUnavailable(f"NATS JetStream: too many publishes awaiting acknowledgement "
                                     f"(none freed within {min(self._max_stall, timeout):g}s)") from e
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
                nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
                nats.errors.StaleConnectionError) as e:
            raise PublishUnavailable(f"NATS connection unavailable ({type(e).__name__}) "
                                     f"while publishing to {subject}") from e
        timed_out = False

        def expire():
            nonlocal timed_out
            if not fut.done():
                timed_out = True
                fut.cancel()

        timer = asyncio.get_running_loop().call_later(timeout, expire)  # cheaper than wait_for per batch
        try:
            ack = await fut
        except asyncio.CancelledError as e:
            if not timed_out:
                raise
            raise PublishUnavailable(
                f"NATS JetStream did not acknowledge {msg_id} on {subject} within {timeout:g}s"
                f"{self._connection_state()}") from e
        except nats.js.errors.NoStreamResponseError as e:
            raise PublishUnavailable(f"NATS JetStream: no stream answers for {subject} "
                                     f"(is {self._stream} created?)") from e
        except nats.js.errors.APIError as e:
            raise PublishUnavailable(f"NATS JetStream refused {msg_id} on {subject}: {e}") from e
        finally:
            timer.cancel()
        return True, bool(ack.duplicate)


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
