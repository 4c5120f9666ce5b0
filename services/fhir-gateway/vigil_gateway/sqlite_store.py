"""SQLite adapter of the Store port (stdlib sqlite3): the embedded, single-machine default.

WAL journal so readers are not blocked by the bus consumer's writes; one connection for writes and
one for reads, each behind a lock (sqlite3 connections must not be used by two threads at once).
Write transactions start in the store's WriteGate order: a REST write waiting goes before the next
bus batch (see store.WriteGate and consumer.BusConsumer.max_tx_resources).
All SQL lives in store.SqlStore, shared with PostgreSQL.
"""
from __future__ import annotations

import asyncio
import contextlib
import pathlib
import sqlite3
import threading

from vigil_gateway.migrate import SCHEMA_VERSION_DDL, migration_files
from vigil_gateway.store import SqlStore, Tx, WriteGate, chunks, now_instant

_IN_CHUNK = 400  # stays well under SQLite's bound-parameter limit (2 per key)
_CACHE_KIB = 65536  # page cache per connection (the default, 2 MiB, rereads index pages every batch)
# Checkpoint (copy into the database file + fsync) every ~256 MiB of WAL instead of every 4 MiB: a bus
# batch dirties pages all over the subject-keyed indexes, and a page rewritten by many batches is copied
# once per checkpoint. Checkpoints were ~half the write time at the default. The file is cut back to
# _WAL_KEEP_BYTES after each checkpoint.
_WAL_CHECKPOINT_PAGES = 65536
_WAL_KEEP_BYTES = 64 * 1024 * 1024


def sqlite_path(database_url: str) -> str:
    """sqlite:///relative/path.db, sqlite:////absolute/path.db, or sqlite:///:memory:"""
    if not database_url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URL: {database_url!r} (expected sqlite:///path)")
    return database_url[len("sqlite:///"):]


class SqliteStore(SqlStore):
    dialect = "sqlite"

    def __init__(self, path: str | pathlib.Path):
        self.path = str(path)
        memory = self.path == ":memory:"
        if not memory:
            pathlib.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._write = self._connect()
        # An in-memory database exists only for its connection: share it.
        self._read = self._write if memory else self._connect()
        self._write_lock = threading.RLock()
        self._read_lock = self._write_lock if memory else threading.RLock()
        self._gate = WriteGate()  # REST writes before bus batches (store.WriteGate)
        # read_async/vread_async: a third connection, used only by one event loop's thread
        self._loop_conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_url(cls, database_url: str) -> SqliteStore:
        return cls(sqlite_path(database_url))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: commits do not fsync (checkpoints do). The database stays consistent; a power
        # loss (not a process crash) may drop the commits since the last checkpoint, including bus batches
        # already acked. The trade-off is documented in docs/operations.md (Backup and restore).
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")  # index pages of a bus batch stay in memory
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute(f"PRAGMA wal_autocheckpoint={_WAL_CHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit={_WAL_KEEP_BYTES}")
        return conn

    # --- schema -------------------------------------------------------------------------------

    def migrate(self) -> int:
        with self._write_lock:
            conn = self._write
            conn.execute(SCHEMA_VERSION_DDL)
            applied = {r[0] for r in conn.execute("SELECT version FROM schema_version")}
            for version, name, sql in migration_files("sqlite"):
                if version in applied:
                    continue
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # re-check under the write lock: another process may have just applied it
                    if conn.execute("SELECT 1 FROM schema_version WHERE version=?", (version,)).fetchone():
                        conn.execute("COMMIT")
                        continue
                    for statement in _statements(sql):
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                                 (version, name, now_instant()))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            version = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        self._reindex_after_migrate(version)
        return version

    # --- SqlStore hooks -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _open_write_tx(self):
        with self._write_lock:
            conn = self._write
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(conn.cursor())
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _read_tx(self):
        with self._read_lock:
            conn = self._read
            if conn is self._write and conn.in_transaction:  # nested in a write (in-memory database)
                yield Tx(conn.cursor())
                return
            conn.execute("BEGIN")  # one snapshot for the total and the page
            try:
                yield Tx(conn.cursor())
            finally:
                conn.execute("COMMIT")

    def _existing(self, tx, keys, *, lock: bool = True):  # BEGIN IMMEDIATE already serialises writers
        existing = {}
        for part in chunks(keys, _IN_CHUNK):
            where = " OR ".join(["(resource_type=? AND id=?)"] * len(part))
            for rt, rid, ver, digest in tx.q(
                    f"SELECT resource_type, id, version_id, content_hash FROM resources WHERE {where}",
                    [x for k in part for x in k]):
                existing[(rt, rid)] = (ver, digest)
        return existing

    def _next_seqs(self, tx, n: int) -> list[int]:
        end = tx.q("UPDATE resource_seq SET value=value+? WHERE id=1 RETURNING value", [n])[0][0]
        return list(range(end - n + 1, end + 1))

    async def read_async(self, resource_type: str, resource_id: str) -> dict | None:
        """read from the event loop: the same answer as read(), without the worker-thread hop (which
        costs more than the lookup itself)."""
        return await self._loop_lookup(self.read, self.read_sql, resource_type, resource_id)

    async def vread_async(self, resource_type: str, resource_id: str, version: int) -> dict | None:
        """vread from the event loop, as read_async."""
        return await self._loop_lookup(self.vread, self.vread_sql, resource_type, resource_id, version)

    async def _loop_lookup(self, sync, sql: str, *args) -> dict | None:
        """One primary-key lookup run inline on the event loop, on a connection only this loop's thread
        uses (no lock to wait for). WAL readers do not wait for the writer; if SQLite still answers busy
        (e.g. WAL recovery after a crash), the loop does not wait either: the lookup goes to a thread as
        read()/vread() do. An in-memory database has one connection: always the thread."""
        conn = None if self._read is self._write else self._loop_reader()
        if conn is not None:
            try:
                row = conn.execute(sql, args).fetchone()
            except sqlite3.OperationalError:
                pass  # busy/locked: fall through to the thread, which waits with the usual timeout
            else:
                return self._decode(row[0]) if row else None
        return await asyncio.to_thread(sync, *args)

    def _loop_reader(self) -> sqlite3.Connection:
        loop = asyncio.get_running_loop()
        if self._loop_conn is None or self._loop is not loop:  # first use, or another loop (tests)
            with self._read_lock:
                old, self._loop_conn = self._loop_conn, None
                if old is not None:
                    old.close()
                conn = self._connect()
                conn.execute("PRAGMA busy_timeout=0")  # never block the event loop on a lock
                self._loop_conn, self._loop = conn, loop
        return self._loop_conn

    def ping(self) -> bool:
        try:
            with self._read_lock:
                self._read.execute("SELECT 1 FROM schema_version LIMIT 1").fetchall()
            return True
        except sqlite3.Error:
            return False

    def close(self) -> None:
        with self._write_lock:
            self._write.close()
            if self._read is not self._write:
                self._read.close()
            if self._loop_conn is not None:
                self._loop_conn.close()
                self._loop_conn = None


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (migrations contain no semicolons inside literals)."""
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
