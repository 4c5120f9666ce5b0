"""PostgreSQL adapter of the Store port (psycopg 3), same semantics as the SQLite adapter.

One write connection behind a lock, and a small pool of read connections (`read_pool` of them, so
concurrent searches do not queue behind each other), each reopened if the server dropped it. All SQL
lives in store.SqlStore except the batched writes: a bus batch is one `INSERT ... SELECT FROM unnest(arrays)
ON CONFLICT` into resources and one COPY per history/index table (not a statement per row); migrations
hold an advisory lock so several gateway replicas can start at once. A search without
_include/_revinclude is one statement (snapshot, total and page: one round trip, one snapshot); other
multi-statement reads run in a REPEATABLE READ transaction, so a search's total, page and includes
come from one snapshot. Writes are ordered by the store's WriteGate (REST writes before bus batches).
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import zlib

import orjson
import psycopg
from psycopg.adapt import Loader
from psycopg.types.string import ByteaBinaryLoader

from vigil_gateway.migrate import SCHEMA_VERSION_DDL, migration_files
from vigil_gateway.store import (
    INDEX_TABLES,
    SearchQuery,
    SearchResult,
    SqlStore,
    Tx,
    WriteGate,
    _SqlBuilder,
    chunks,
    now_instant,
)

_MIGRATION_LOCK = 0x76696769  # 'vigi': pg_advisory_xact_lock key for migrations
_IN_CHUNK = 1000


class PostgresStore(SqlStore):
    dialect = "postgresql"
    body_col = "r.body"  # json (migration 0004): the stored text, loaded as bytes (_JsonBytes)
    json_param = "?::json"
    in_chunk = 1000

    def __init__(self, database_url: str, *, connect_timeout: int = 10, read_pool: int = 8):
        if not database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"not a PostgreSQL URL: {database_url!r}")
        self.url = database_url
        self._timeout = connect_timeout
        self._write_lock = threading.RLock()
        self._read_lock = threading.RLock()
        self._gate = WriteGate()  # REST writes before bus batches (store.WriteGate)
        self._write: psycopg.Connection | None = None
        self._read: psycopg.Connection | None = None  # the reader used by ping()
        self._pool: queue.LifoQueue = queue.LifoQueue()
        for _ in range(read_pool):
            self._pool.put(None)  # opened on first use
        self._readers: list[psycopg.Connection] = []
        self._read_pool_size = read_pool
        # search_query_async: idle async read connections and a bound on them, for one event loop
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._aidle: list[psycopg.AsyncConnection] = []
        self._asem: asyncio.Semaphore | None = None
        self._aall: list[psycopg.AsyncConnection] = []
        self._write = self._connect()  # fail fast on a bad URL

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.url, autocommit=False, connect_timeout=self._timeout,
                               application_name="vigil-gateway")
        _raw_json(conn)
        return conn

    def _writer(self) -> psycopg.Connection:
        if self._write is None or self._write.closed or self._write.broken:
            self._write = self._connect()
        return self._write

    def _reader(self) -> psycopg.Connection:
        if self._read is None or self._read.closed or self._read.broken:
            self._read = self._connect()
            self._read.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        return self._read

    # --- schema -------------------------------------------------------------------------------

    def migrate(self) -> int:
        with self._write_lock:
            conn = self._writer()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                conn.execute(SCHEMA_VERSION_DDL)
            for version, name, sql in migration_files("postgresql"):
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                    if conn.execute("SELECT 1 FROM schema_version WHERE version=%s", (version,)).fetchone():
                        continue
                    conn.execute(sql)
                    conn.execute("INSERT INTO schema_version (version, name, applied_at) VALUES (%s, %s, %s)",
                                 (version, name, now_instant()))
            with conn.transaction():
                version = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        self._reindex_after_migrate(version)
        return version

    # --- SqlStore hooks -----------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    @contextlib.contextmanager
    def _open_write_tx(self):
        with self._write_lock:
            conn = self._writer()
            with conn.transaction(), conn.cursor() as cur:
                yield Tx(cur, "%s")

    @contextlib.contextmanager
    def _read_conn(self):
        """A pooled read connection (autocommit: a lone statement is its own snapshot; `transaction()`
        starts a REPEATABLE READ one)."""
        conn = self._pool.get()
        try:
            if conn is None or conn.closed or conn.broken:
                conn = self._connect()
                conn.autocommit = True
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                with self._read_lock:
                    self._readers.append(conn)
            yield conn
        finally:
            self._pool.put(conn)

    @contextlib.contextmanager
    def _read_tx(self):
        with self._read_conn() as conn, conn.transaction(), conn.cursor() as cur:
            yield Tx(cur, "%s")

    def search_sql(self, q: SearchQuery) -> tuple[str, list]:
        """The one statement search_query runs (without _include/_revinclude): snapshot, total and
        page together, so one round trip and one snapshot (a lone statement needs no BEGIN/COMMIT)."""
        if q.include or q.revinclude:
            return super().search_sql(q)
        builder = _SqlBuilder(q, self.dialect)
        frm, where, args, order = builder.build()
        cols, params = [], []
        if q.snapshot is None:
            cols.append("(SELECT COALESCE(MAX(created_seq), 0) FROM resources)")
        else:
            cols.append("NULL::bigint")
        if q.total != "none":
            cfrm, cwhere, cargs = builder.count_parts()
            cols.append(f"(SELECT COUNT(*) FROM {cfrm} WHERE {cwhere})")
            params += cargs
        else:
            cols.append("NULL::bigint")
        if q.count > 0:
            cols.append(f"ARRAY(SELECT {self.body_col} FROM {frm} WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?)")
            params += [*args, q.count + 1, q.offset]
        else:
            cols.append("NULL::json[]")
        return self._sql("SELECT " + ", ".join(cols)), params

    def search_query(self, query: SearchQuery) -> SearchResult:
        if query.include or query.revinclude:  # several statements: one REPEATABLE READ transaction
            return super().search_query(query)
        sql, params = self.search_sql(query)
        with self._read_conn() as conn:
            # binary results: the bodies' array arrives length-prefixed, not as an array literal with
            # every quote of every JSON body escaped (and unescaped again here)
            row = conn.execute(sql, params, binary=True).fetchone()
        return self._one_statement_result(query, row)

    async def search_query_async(self, query: SearchQuery) -> SearchResult:
        """search_query from the event loop: the one-statement search runs on an async connection (no
        worker-thread hop per search: the hand-over cost about as much CPU as the rest of a search's
        Python side); a search with _include/_revinclude goes to a thread as before."""
        if query.include or query.revinclude:
            return await asyncio.to_thread(self.search_query, query)
        sql, params = self.search_sql(query)
        return self._one_statement_result(query, await self._afetchone(sql, params))

    async def read_async(self, resource_type: str, resource_id: str) -> dict | None:
        """read from the event loop: one statement on an async connection (autocommit: no BEGIN/COMMIT
        round trips, no worker-thread hop); the same answer as read()."""
        row = await self._afetchone(self._sql(self.read_sql), [resource_type, resource_id])
        return self._decode(row[0]) if row else None

    async def vread_async(self, resource_type: str, resource_id: str, version: int) -> dict | None:
        """vread from the event loop, as read_async; the same answer as vread()."""
        row = await self._afetchone(self._sql(self.vread_sql), [resource_type, resource_id, version])
        return self._decode(row[0]) if row else None

    async def _afetchone(self, sql: str, params: list):
        """One statement on an idle async read connection (binary results), its first row."""
        sem = self._async_pool()
        async with sem:
            conn = self._aidle.pop() if self._aidle else None
            if conn is None or conn.closed or conn.broken:
                conn = await self._aconnect()
            try:
                cur = await conn.execute(sql, params, binary=True)
                row = await cur.fetchone()
            except psycopg.Error:
                self._aidle.append(conn)  # reopened on next use if the error broke it
                raise
            except BaseException:  # cancelled mid-statement: the connection's state is unknown
                conn.pgconn.finish()
                raise
            self._aidle.append(conn)
        return row

    def _async_pool(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._aloop is not loop:  # first use, or another event loop (tests): connections start afresh
            self._aloop, self._asem = loop, asyncio.Semaphore(self._read_pool_size)
            self._aidle = []
        return self._asem

    async def _aconnect(self) -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=self._timeout,
                                                     application_name="vigil-gateway")
        _raw_json(conn)
        with self._read_lock:
            self._aall.append(conn)
        return conn

    def _one_statement_result(self, query: SearchQuery, row) -> SearchResult:
        snapshot, total, bodies = row
        bodies = bodies or []
        raw = bodies[:query.count]
        if not all(b.startswith(_CANONICAL_HEAD) for b in raw):
            raw = [self._raw(b) for b in raw]
        return SearchResult(total, None, len(bodies) > query.count,
                            query.snapshot if query.snapshot is not None else snapshot, raw=raw, decode=self._decode)

    def _existing(self, tx, keys, *, lock: bool = True):
        existing = {}
        # FOR UPDATE: a concurrent writer of the same rows waits, so versions never fork
        suffix = " FOR UPDATE OF r" if lock else ""
        for part in chunks(keys, _IN_CHUNK):
            for rt, rid, ver, digest in tx.q(
                    "SELECT r.resource_type, r.id, r.version_id, r.content_hash FROM resources r "
                    "JOIN unnest(?::text[], ?::text[]) AS k(t, i) ON r.resource_type=k.t AND r.id=k.i"
                    + suffix, [[str(k[0]) for k in part], [str(k[1]) for k in part]]):
                existing[(rt, rid)] = (ver, digest)
        return existing

    # Batched writes: one round trip per table whatever the batch size (see SqlStore._apply).

    def _upsert_resources(self, tx, values: list[tuple], *, with_history: bool = False) -> bool:
        """INSERT ... SELECT FROM unnest(arrays) ON CONFLICT: the batch as fourteen array parameters. With
        with_history, the history rows are inserted from its RETURNING rows in the same statement (each
        body is sent and checked as json once)."""
        if not values:
            return False
        cols = list(zip(*values, strict=True))
        head, tail = "", ""
        if with_history:
            head = "WITH u AS ("
            tail = (" RETURNING resource_type, id, version_id, last_updated, body) "
                    "INSERT INTO resource_history (resource_type, id, version_id, last_updated, method, body) "
                    "SELECT resource_type, id, version_id, last_updated, "
                    "CASE WHEN version_id = 1 THEN 'POST' ELSE 'PUT' END, body FROM u")
        # %b: binary array parameters (text-format arrays escape every quote of every JSON body in Python)
        tx.cur.execute(
            head + "INSERT INTO resources (resource_type, id, version_id, last_updated, subject, date, date_high, "
            "content_hash, body, created_seq, value_num, value_system, value_code, value_unit) "
            "SELECT t, i, v, lu, s, d, dh, h, b::json, cs, vn, vs, vc, vu FROM unnest(?::text[], ?::text[], "
            "?::int[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::bigint[], "
            "?::float8[], ?::text[], ?::text[], ?::text[]) AS u(t, i, v, lu, s, d, dh, h, b, cs, vn, vs, vc, vu) "
            "ON CONFLICT (resource_type, id) DO UPDATE SET version_id=excluded.version_id, "
            "last_updated=excluded.last_updated, subject=excluded.subject, date=excluded.date, "
            "date_high=excluded.date_high, content_hash=excluded.content_hash, body=excluded.body, "
            "value_num=excluded.value_num, value_system=excluded.value_system, value_code=excluded.value_code, "
            "value_unit=excluded.value_unit"
            .replace("?", "%b") + tail, [list(c) for c in cols])
        return with_history

    def _append(self, tx, table: str, columns: tuple[str, ...], values: list[tuple],
                json_col: int | None = None) -> None:
        """COPY FROM STDIN (text format; the server checks the json column): rows that never conflict."""
        if not values:
            return
        with tx.cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in values:
                copy.write_row(row)

    def _delete_index(self, tx, keys: list[tuple[str, str]]) -> None:
        types, ids = [k[0] for k in keys], [k[1] for k in keys]
        for table in INDEX_TABLES:
            tx.q(f"DELETE FROM {table} x USING unnest(?::text[], ?::text[]) AS k(t, i) "
                 "WHERE x.resource_type=k.t AND x.resource_id=k.i", [types, ids])

    def _next_seqs(self, tx, n: int) -> list[int]:
        return [r[0] for r in tx.q("SELECT nextval('resource_seq') FROM generate_series(1, ?)", [n])]

    def _lock_key(self, tx, key: str) -> None:
        tx.q("SELECT pg_advisory_xact_lock(?)", [zlib.crc32(key.encode())])

    def _decode(self, body) -> dict:
        resource = orjson.loads(body)
        return resource if _canonical(body) else _ordered(resource)

    def _raw(self, body) -> bytes:
        """The stored JSON, as written by the store (resourceType, id, meta first); a body stored
        before migration 0004 (jsonb's text: keys by length) is put in that order first."""
        if isinstance(body, str):
            body = body.encode()
        return body if _canonical(body) else orjson.dumps(self._decode(body))

    def ping(self) -> bool:
        try:
            with self._read_lock:
                conn = self._reader()
                with conn.transaction():
                    conn.execute("SELECT 1 FROM schema_version LIMIT 1").fetchall()
            return True
        except psycopg.Error:
            return False

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            for conn in (self._write, self._read, *self._readers):
                if conn is not None and not conn.closed:
                    conn.close()
            for aconn in self._aall:  # async connections: closed without their event loop
                if not aconn.closed:
                    aconn.pgconn.finish()
            self._aall, self._aidle = [], []


_CANONICAL_HEAD = b'{"resourceType":'  # how every body the store serialises starts


def _canonical(body: bytes | str) -> bool:
    return body.startswith(_CANONICAL_HEAD if isinstance(body, bytes) else '{"resourceType":')


class _JsonBytes(Loader):
    """json column -> its bytes (text format)."""

    def load(self, data) -> bytes:
        return bytes(data)


def _raw_json(conn) -> None:
    """json values (bodies) arrive as their bytes, not parsed: the store decodes them only when needed.
    Binary format: json's binary form is its text, so bytea's binary loader (psycopg's C one) returns
    exactly those bytes."""
    conn.adapters.register_loader("json", _JsonBytes)
    conn.adapters.register_loader("json", ByteaBinaryLoader)


def _ordered(resource: dict) -> dict:
    """jsonb sorts keys by length; put resourceType, id, meta first as FHIR JSON customarily has (bodies
    stored before migration 0004)."""
    head = {k: resource[k] for k in ("resourceType", "id", "meta") if k in resource}
    head.update((k, v) for k, v in resource.items() if k not in head)
    return head
