"""Publishing REST writes to the bus: the transactional outbox.

Order: a create/update of a Patient or Encounter commits the new version *and* an outbox row in one
transaction; only then does the HTTP response go out. This task drains the outbox: it publishes each
row as a single-resource Bundle (vigil.bus.encode_bundle) to vigil.bus.ehr_subject(type, id) on the
VIGIL_EHR stream with Nats-Msg-Id "{type}/{id}/{versionId}", waits for the JetStream ack, then deletes
the row. If NATS is down or the process dies between publish and delete, the row stays and is
published again later; the Msg-Id makes JetStream drop the duplicate within its window, and the
consumers' idempotent upsert (stale guard) makes a later duplicate harmless. So nothing accepted is
lost and nothing is applied twice.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from vigil import bus
from vigil_gateway.store import Store

log = logging.getLogger("vigil.gateway.outbox")


class OutboxPublisher:
    def __init__(self, js, store: Store, *, interval: float = 1.0, batch: int = 100, retry_delay: float = 2.0):
        self.js, self.store = js, store
        self.interval, self.batch, self.retry_delay = interval, batch, retry_delay
        self.event = asyncio.Event()
        self.published = 0
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="gateway-outbox")

    async def stop(self) -> None:
        self._stopping = True
        self.event.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout=10)

    async def drain_once(self) -> int:
        rows = await asyncio.to_thread(self.store.outbox_pending, self.batch)
        done = []
        try:
            for seq, rtype, rid, version, body in rows:
                await self.js.publish(bus.ehr_subject(rtype, rid), bus.encode_bundle([body]),
                                      stream=bus.EHR_STREAM, headers={bus.MSG_ID: f"{rtype}/{rid}/{version}"})
                done.append(seq)
        finally:
            await asyncio.to_thread(self.store.outbox_done, done)
            self.published += len(done)
        return len(rows)

    async def _loop(self) -> None:
        while True:
            try:
                n = await self.drain_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS or store trouble: rows stay, retry later
                log.warning("outbox publish failed (will retry): %r", exc)
                n = 0
                await asyncio.sleep(self.retry_delay)
            if self._stopping:
                return
            if n >= self.batch:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), timeout=self.interval)
            self.event.clear()
