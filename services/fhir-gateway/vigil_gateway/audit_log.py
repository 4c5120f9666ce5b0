"""The gateway's AuditEvent trail: one AuditEvent (vigil/audit.py) per FHIR interaction, written in the
background, searchable by administrators only.

Writing must not slow requests down: `record` turns the event into its table row at once (on the event
loop, a few microseconds per request) and appends it to an in-memory queue (no I/O), and a background
task flushes the queue to the store every `interval` seconds (100 ms) in one transaction, in a worker
thread that only runs the INSERT/COPY. Building the rows of a whole flush in that thread held the GIL
for milliseconds at a time while requests were served, and every GIL hand-over of the event loop then
waited for it: p99 of a read by id rose to ~50 ms at a few thousand requests/s (0.6 ms without the
trail). On shutdown
(`close`) the queue is flushed. If the store is unreachable, events stay queued (up to `max_queue`,
then the oldest are dropped and counted in `dropped`) and are retried on the next flush.

AuditEvents live in their own table `vigil_audit_event` (created on first use, in the gateway's SQLite or
PostgreSQL database), with the search columns extracted: recorded, agent (client id), patient, entity,
action, outcome. They are never written to logs (they carry patient ids and queries).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging

import orjson

log = logging.getLogger("vigil.gateway.audit")

DDL = """CREATE TABLE IF NOT EXISTS vigil_audit_event (
    id TEXT PRIMARY KEY,
    recorded TEXT NOT NULL,
    agent TEXT,
    patient TEXT,
    entity TEXT,
    action TEXT,
    outcome TEXT,
    body TEXT NOT NULL
)"""
INDEXES = (
    "CREATE INDEX IF NOT EXISTS vigil_audit_event_recorded ON vigil_audit_event (recorded)",
    "CREATE INDEX IF NOT EXISTS vigil_audit_event_patient ON vigil_audit_event (patient, recorded)",
    "CREATE INDEX IF NOT EXISTS vigil_audit_event_agent ON vigil_audit_event (agent, recorded)",
)


_OPS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_COLUMNS = ("id", "recorded", "agent", "patient", "entity", "action", "outcome", "body")


def _columns(event: dict) -> tuple:
    agent = (((event.get("agent") or [{}])[0].get("who") or {}).get("identifier") or {}).get("value")
    patient = entity = None
    for e in event.get("entity") or ():
        ref = (e.get("what") or {}).get("reference")
        if not ref:
            continue
        if (e.get("role") or {}).get("code") == "1":
            patient = ref
        elif entity is None:
            entity = ref
    return (event["id"], event["recorded"], agent, patient, entity, event.get("action"), event.get("outcome"),
            orjson.dumps(event).decode())


class AuditLog:
    def __init__(self, store, *, interval: float = 0.1, max_queue: int = 100_000):
        self.store = store
        self.interval = interval
        self.max_queue = max_queue
        self._queue: collections.deque[tuple] = collections.deque()  # rows of vigil_audit_event
        self._task: asyncio.Task | None = None
        self._ready = False
        self._wake: asyncio.Event | None = None
        self.dropped = 0
        self.written = 0

    # --- writing ----------------------------------------------------------------------------------

    def record(self, event: dict) -> None:
        """Queue an AuditEvent as its table row (no I/O); starts the flusher on first use."""
        row = _columns(event)
        if len(self._queue) >= self.max_queue:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(row)
        if self._task is None or self._task.done():
            with contextlib.suppress(RuntimeError):  # no running loop: flushed by flush()/close()
                self._task = asyncio.get_running_loop().create_task(self._run(), name="audit-flush")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - keep the events queued, retry next time
                log.warning("cannot write audit events yet (%d queued); will retry", len(self._queue))

    def _ensure_schema(self) -> None:
        if self._ready:
            return
        with self.store._write_tx() as tx:
            tx.q(DDL)
            for sql in INDEXES:
                tx.q(sql)
        self._ready = True

    def _write(self, rows: list[tuple]) -> None:
        self._ensure_schema()
        with self.store._write_tx() as tx:
            # the store's plain-append primitive: COPY on PostgreSQL (one round trip, no per-row statement
            # for the server to run: a search's audit row cost the server about as much as a tenth of
            # the search), executemany on SQLite; event ids are fresh time-ordered UUIDs
            # (ids.time_ordered_id), so there is never a conflict and the primary key grows at its end
            self.store._append(tx, "vigil_audit_event", _COLUMNS, rows)

    async def flush(self) -> int:
        """Write what is queued now; returns how many were written."""
        if not self._queue:
            return 0
        batch = list(self._queue)
        self._queue.clear()
        try:
            await asyncio.to_thread(self._write, batch)
        except BaseException:
            self._queue.extendleft(reversed(batch))
            raise
        self.written += len(batch)
        return len(batch)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.flush()

    # --- searching --------------------------------------------------------------------------------

    def search(self, *, date: list[tuple[str, str]] = (), agent: str | None = None, patient: str | None = None,
               entity: str | None = None, outcome: str | None = None, action: str | None = None,
               count: int = 50, offset: int = 0) -> tuple[int, list[dict]]:
        """(total, page) newest first. date: [(op, instant)] with op in lt, le, gt, ge, eq (prefix match)."""
        self._ensure_schema()
        where, args = [], []
        for op, value in date:
            if op == "eq":
                where.append("recorded LIKE ?")
                args.append(value.replace("%", "") + "%")
            else:
                where.append(f"recorded {_OPS[op]} ?")
                args.append(value)
        for col, value in (("agent", agent), ("patient", patient), ("entity", entity), ("outcome", outcome),
                           ("action", action)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        with self.store._read_tx() as tx:
            total = tx.q(f"SELECT count(*) FROM vigil_audit_event{cond}", args)[0][0]
            rows = tx.q(f"SELECT body FROM vigil_audit_event{cond} ORDER BY recorded DESC, id LIMIT ? OFFSET ?",
                        [*args, count, offset])
        return int(total), [orjson.loads(r[0]) for r in rows]
