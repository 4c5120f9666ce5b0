"""Bus consumer: durable JetStream pull consumers on VIGIL_OBSERVATIONS, VIGIL_RISK and VIGIL_EHR -> Store.

VIGIL_EHR carries Device (from ingest) and Patient/Encounter (published by this or another gateway
replica after a REST write); those are stored with the stale guard: a message whose meta.versionId
is not above the stored version is an echo of a write already stored, so it never adds a version.

Each fetch (up to `batch` messages) is decoded off the event loop (bodies are FHIR Bundles of type
collection, see vigil.bus), then stored in transactions of whole messages holding at most
`max_tx_resources` resources (one `upsert_many(..., bulk=True)` call each); a transaction's messages
are acknowledged as soon as it commits, so a message is never acked before its resources are
committed. Redelivery after a crash is harmless: unchanged content creates no new version. A
malformed message is logged and terminated (`term`) so it cannot poison-loop; if a transaction fails
in the store, its messages are retried one by one so a single unstorable message is terminated and
the rest stored, while a database outage naks for redelivery.

Fairness: while the consumer catches up a backlog (a fetch can hold 500 messages of 100 readings),
REST writes must not wait for it. Short transactions plus the store's WriteGate (bus batches are
`bulk`: they start only when no REST/outbox/audit write is waiting) bound a REST write's wait to one
short bus transaction; decoding in a worker thread keeps the event loop (HTTP) responsive.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from vigil import bus, telemetry, tracing
from vigil_gateway.store import InvalidResource, Prepared, Store, prepare_resources

log = logging.getLogger("vigil.gateway.consumer")

SUBSCRIPTIONS = (  # (stream, subjects, durable-name suffix)
    (bus.OBSERVATIONS_STREAM, bus.OBSERVATIONS_SUBJECTS, "observations"),
    (bus.RISK_STREAM, bus.RISK_SUBJECTS, "risk"),
    (bus.EHR_STREAM, bus.EHR_SUBJECTS, "ehr"),
)


@dataclass
class ConsumerStats:
    messages_acked: int = 0
    messages_terminated: int = 0
    messages_nakked: int = 0
    resources_new: int = 0
    resources_updated: int = 0
    resources_unchanged: int = 0
    last_error: str | None = None
    per_stream: dict = field(default_factory=dict)


def is_permanent(exc: BaseException) -> bool:
    """A store error that retrying cannot fix (bad data), as opposed to an outage."""
    if isinstance(exc, (InvalidResource, ValueError, TypeError)):
        return True
    with contextlib.suppress(ImportError):
        import psycopg
        if isinstance(exc, (psycopg.errors.DataError, psycopg.errors.IntegrityError)):
            return True
    import sqlite3
    return isinstance(exc, (sqlite3.DataError, sqlite3.IntegrityError))


class BusConsumer:
    """Runs one pull loop per stream until `stop()`; `running` is true while every loop is alive."""

    def __init__(self, js, store: Store, consumer_name: str, *, batch: int = 500, fetch_timeout: float = 1.0,
                 ack_wait: float = 60.0, retry_delay: float = 2.0, stream_replicas: int = 1,
                 max_tx_resources: int = 1000):
        self.js, self.store, self.name = js, store, consumer_name
        self.max_tx_resources = max_tx_resources
        self.stream_replicas = stream_replicas
        self.batch, self.fetch_timeout, self.ack_wait, self.retry_delay = batch, fetch_timeout, ack_wait, retry_delay
        self.stats = ConsumerStats()
        self._tasks: list[asyncio.Task] = []
        self._stopping = asyncio.Event()
        self._subs: list = []
        self._lag: dict[str, int] = {}
        meter = telemetry.meter()
        self._m_stored = meter.create_counter(
            "vigil.gateway.stored", unit="{resource}",
            description="Resources consumed from the bus and upserted (outcome new|updated|unchanged)")
        self._m_batch = meter.create_histogram(
            "vigil.gateway.consumer.batch.size", unit="{message}", description="Bus messages per fetch")
        self._m_upsert = meter.create_histogram(
            "vigil.gateway.store.latency", unit="s", description="One upsert_many transaction (consumer)")
        meter.create_observable_gauge(
            "vigil.gateway.consumer.lag", callbacks=[self._observe_lag], unit="{message}",
            description="Messages pending on the gateway's durable consumers (num_pending at the last fetch)")

    def _observe_lag(self, _options):
        from opentelemetry.metrics import Observation

        return [Observation(v, {"stream": k}) for k, v in self._lag.items()]

    @property
    def running(self) -> bool:
        return bool(self._tasks) and all(not t.done() for t in self._tasks)

    def durable_name(self, suffix: str) -> str:
        return f"{self.name}-{suffix}"

    async def start(self) -> None:
        """Ensure the streams, create/bind the durable consumers and start the fetch loops."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        await bus.ensure_streams(self.js, replicas=self.stream_replicas)
        for stream, subjects, suffix in SUBSCRIPTIONS:
            durable = self.durable_name(suffix)
            config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                    deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait,
                                    max_ack_pending=max(10 * self.batch, 1000))
            sub = await self.js.pull_subscribe(subjects, durable=durable, stream=stream, config=config)
            self._subs.append(sub)
            self._tasks.append(asyncio.create_task(self._loop(stream, sub), name=f"gateway-consume-{suffix}"))
        log.info("bus consumer started: %s", ", ".join(self.durable_name(s) for _, _, s in SUBSCRIPTIONS))

    async def stop(self) -> None:
        """Finish the in-flight batch (store + ack), then stop the loops and unsubscribe."""
        self._stopping.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._tasks, self._subs = [], []

    async def _loop(self, stream: str, sub) -> None:
        """While catching up a backlog, fetch, decode and prepare the next batch while the current one
        is stored (one batch ahead, in stream order: a batch is stored only after the one before it
        is settled)."""
        ahead: asyncio.Task | None = None
        try:
            while not self._stopping.is_set():
                got = await (ahead if ahead is not None else self._next_batch(stream, sub))
                ahead = None
                if got is None:
                    continue
                msgs, decoded, pending = got
                # more is waiting behind this fetch (a full batch, or messages pending): fetch the next
                # one now, while this one is stored; otherwise the next fetch waits until this batch is
                # settled and then takes everything that arrived meanwhile (fewer, bigger transactions)
                if not self._stopping.is_set() and (len(msgs) >= self.batch or pending):
                    ahead = asyncio.create_task(self._next_batch(stream, sub))
                try:
                    # shielded: a cancellation must not interrupt between commit and ack
                    await asyncio.shield(self.handle_batch(stream, msgs, decoded))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. connection lost while acking
                    # unacked messages are redelivered after ack_wait: harmless (idempotent upsert)
                    self.stats.last_error = f"batch {stream}: {exc!r}"
                    log.warning("batch from %s not fully settled: %r", stream, exc)
                    await asyncio.sleep(self.retry_delay)
        finally:
            if ahead is not None:  # stopping: a batch fetched ahead goes back to the server now
                got = None
                with contextlib.suppress(BaseException):
                    got = await ahead
                for msg in (got[0] if got else ()):
                    with contextlib.suppress(Exception):
                        await msg.nak()
                    self.stats.messages_nakked += 1

    async def _next_batch(self, stream: str, sub):
        """(messages, their decoded resources, whether more is pending on the server) of the next fetch,
        or None (nothing came, or it failed)."""
        import nats.errors

        try:
            msgs = await sub.fetch(self.batch, timeout=self.fetch_timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            self._lag[stream] = 0
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection trouble: nats-py reconnects; retry
            if not self._stopping.is_set():
                self.stats.last_error = f"fetch {stream}: {exc!r}"
                log.warning("fetch from %s failed: %r", stream, exc)
                await asyncio.sleep(self.retry_delay)
            return None
        if not msgs:
            self._lag[stream] = 0
            return None
        pending = False
        with contextlib.suppress(Exception):
            self._lag[stream] = msgs[-1].metadata.num_pending
            pending = self._lag[stream] > 0
        self._m_batch.record(len(msgs), {"stream": stream})
        return msgs, await asyncio.to_thread(_decode_all, msgs), pending

    async def handle_batch(self, stream: str, msgs: list, decoded: list | None = None) -> None:
        """Decode, store in one transaction, then ack (or term malformed / nak on store outage).
        `decoded`: _decode_all(msgs), when done already (the fetch loop decodes one batch ahead).

        Traced as one CONSUMER span per fetch (parent = the first message's trace context, links to
        every message) with a `store upsert` child span per transaction."""
        with tracing.process_span(stream, [getattr(m, "headers", None) for m in msgs]):
            await self._handle_batch(stream, msgs, decoded)

    async def _upsert_traced(self, stream: str, resources: list[dict], prepared: list[Prepared] | None = None):
        t0 = telemetry.now()
        with tracing.tracer().start_as_current_span("store upsert", attributes={
                "db.system": str(getattr(self.store, "dialect", "")), "db.operation.name": "upsert_many",
                "vigil.resources": len(resources), "messaging.destination.name": stream}):
            counts = await asyncio.to_thread(self._upsert, stream, resources, prepared)
        self._m_upsert.record(telemetry.now() - t0, {"stream": stream})
        return counts

    async def _handle_batch(self, stream: str, msgs: list, decoded: list | None = None) -> None:
        good: list[tuple[object, list[dict], list[Prepared]]] = []
        if decoded is None:
            decoded = await asyncio.to_thread(_decode_all, msgs)
        for msg, resources, prepared, exc in decoded:
            if exc is not None:  # malformed: never storable, do not redeliver
                log.error("terminating malformed message %s seq=%s on %s: %s", msg.subject,
                          _seq(msg), stream, exc)
                self.stats.messages_terminated += 1
                await msg.term()
                continue
            good.append((msg, resources, prepared))
        parts = list(_transactions(good, self.max_tx_resources))
        for i, part in enumerate(parts):
            if self._stopping.is_set():
                # stopping: the rest goes back to the server now (redelivered to the next consumer)
                for msg, *_ in (m for rest in parts[i:] for m in rest):
                    with contextlib.suppress(Exception):
                        await msg.nak()
                    self.stats.messages_nakked += 1
                return
            await self._store_and_ack(stream, part)

    async def _store_and_ack(self, stream: str, good: list[tuple[object, list[dict], list[Prepared]]]) -> None:
        """One transaction for these messages, then their acks (or one by one if it fails)."""
        try:
            counts = await self._upsert_traced(stream, [r for _, rs, _ in good for r in rs],
                                               [p for _, _, ps in good for p in ps])
        except Exception as exc:  # noqa: BLE001
            self.stats.last_error = f"store {stream}: {exc!r}"
            if len(good) == 1:
                await self._settle_failure(stream, *good[0][:2], exc)
                return
            log.warning("batch of %d from %s failed (%r); retrying message by message", len(good), stream, exc)
            for msg, resources, prepared in good:
                try:
                    counts = await self._upsert_traced(stream, resources, prepared)
                except Exception as exc_one:  # noqa: BLE001
                    await self._settle_failure(stream, msg, resources, exc_one)
                    continue
                self._count(counts, stream)
                await msg.ack()
                self.stats.messages_acked += 1
            return
        self._count(counts, stream)
        for msg, *_ in good:
            await msg.ack()
        self.stats.messages_acked += len(good)

    def _upsert(self, stream: str, resources: list[dict], prepared: list[Prepared] | None = None):
        return self.store.upsert_many(resources, stale_guard=stream == bus.EHR_STREAM, bulk=True, prepared=prepared)

    async def _settle_failure(self, stream: str, msg, resources: list[dict], exc: BaseException) -> None:
        if is_permanent(exc):
            log.error("terminating unstorable message %s seq=%s on %s: %r", msg.subject, _seq(msg), stream, exc)
            self.stats.messages_terminated += 1
            await msg.term()
        else:
            log.warning("store unavailable for message seq=%s on %s (%r); redelivering", _seq(msg), stream, exc)
            self.stats.messages_nakked += 1
            await msg.nak(delay=self.retry_delay)
            await asyncio.sleep(self.retry_delay)

    def _count(self, counts, stream: str = "") -> None:
        if counts.new:
            self._m_stored.add(counts.new, {"outcome": "new", "stream": stream})
        if counts.updated:
            self._m_stored.add(counts.updated, {"outcome": "updated", "stream": stream})
        if counts.unchanged:
            self._m_stored.add(counts.unchanged, {"outcome": "unchanged", "stream": stream})
        self.stats.resources_new += counts.new
        self.stats.resources_updated += counts.updated
        self.stats.resources_unchanged += counts.unchanged


def _decode_all(msgs: list) -> list[tuple[object, list[dict] | None, list[Prepared] | None, Exception | None]]:
    """(msg, resources, their store.Prepared, None) or (msg, None, None, why it is malformed), for every
    message, in order. Runs in a worker thread, one batch ahead of the store (see BusConsumer._loop)."""
    out = []
    for msg in msgs:
        try:
            resources = bus.decode_bundle(msg.data)
            prepared = prepare_resources(resources)  # check_resource of each, its hash and index rows
        except Exception as exc:  # noqa: BLE001
            out.append((msg, None, None, exc))
            continue
        out.append((msg, resources, prepared, None))
    return out


def _transactions(good: list[tuple], limit: int):
    """Consecutive runs of whole messages ((msg, resources, ...) tuples) with at most `limit` resources
    (a bigger message alone)."""
    part: list = []
    size = 0
    for item in good:
        if part and size + len(item[1]) > limit:
            yield part
            part, size = [], 0
        part.append(item)
        size += len(item[1])
    if part:
        yield part


def _seq(msg) -> object:
    try:
        return msg.metadata.sequence.stream
    except Exception:  # noqa: BLE001
        return "?"
