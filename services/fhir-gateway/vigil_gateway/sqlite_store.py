"""SQLite adapter of the Store port (stdlib sqlite3): the embedded, single-machine default.

WAL journal so readers are not blocked by the bus consumer's writes; one connection for writes and
one for reads, each behind a lock (sqlite3 connections must not be used by two threads at once).
"""
from __future__ import annotations

import pathlib
import sqlite3
import threading

import orjson

from vigil_gateway.migrate import SCHEMA_VERSION_DDL, migration_files
from vigil_gateway.store import TokenFilter, UpsertCounts, chunks, now_instant, plan_upsert, token_where

_IN_CHUNK = 400  # stays well under SQLite's bound-parameter limit (2 per key)


def sqlite_path(database_url: str) -> str:
    """sqlite:///relative/path.db, sqlite:////absolute/path.db, or sqlite:///:memory:"""
    if not database_url.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URL: {database_url!r} (expected sqlite:///path)")
    return database_url[len("sqlite:///"):]


class SqliteStore:
    dialect = "sqlite"

    def __init__(self, path: str | pathlib.Path):
        self.path = str(path)
        memory = self.path == ":memory:"
        if not memory:
            pathlib.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._write = self._connect()
        # An in-memory database exists only for its connection: share it.
        self._read = self._write if memory else self._connect()
        self._write_lock = threading.Lock()
        self._read_lock = self._write_lock if memory else threading.Lock()

    @classmethod
    def from_url(cls, database_url: str) -> SqliteStore:
        return cls(sqlite_path(database_url))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
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
            return conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]

    # --- writes -------------------------------------------------------------------------------

    def upsert_many(self, resources: list[dict]) -> UpsertCounts:
        if not resources:
            return UpsertCounts()
        with self._write_lock:
            conn = self._write
            conn.execute("BEGIN IMMEDIATE")
            try:
                keys = list({(r.get("resourceType"), r.get("id")) for r in resources if isinstance(r, dict)})
                existing: dict[tuple[str, str], tuple[int, str]] = {}
                for part in chunks(keys, _IN_CHUNK):
                    where = " OR ".join(["(resource_type=? AND id=?)"] * len(part))
                    params = [x for k in part for x in k]
                    for rt, rid, ver, digest in conn.execute(
                            f"SELECT resource_type, id, version_id, content_hash FROM resources WHERE {where}",
                            params):
                        existing[(rt, rid)] = (ver, digest)
                counts, rows, replaced = plan_upsert(resources, existing, now_instant())
                if replaced:
                    conn.executemany("DELETE FROM resource_tokens WHERE resource_type=? AND resource_id=?",
                                     list(replaced))
                conn.executemany(
                    "INSERT INTO resources (resource_type, id, version_id, last_updated, subject, date, "
                    "content_hash, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (resource_type, id) DO UPDATE SET version_id=excluded.version_id, "
                    "last_updated=excluded.last_updated, subject=excluded.subject, date=excluded.date, "
                    "content_hash=excluded.content_hash, body=excluded.body",
                    [(r.resource_type, r.id, r.version_id, r.last_updated, r.subject, r.date, r.content_hash,
                      r.body_json()) for r in rows])
                conn.executemany(
                    "INSERT INTO resource_tokens (resource_type, resource_id, subject, system, code, date) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(r.resource_type, r.id, r.subject, s, c, r.date) for r in rows for s, c in r.codes])
                conn.execute("COMMIT")
                return counts
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    # --- reads --------------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict | None:
        with self._read_lock:
            row = self._read.execute("SELECT body FROM resources WHERE resource_type=? AND id=?",
                                     (resource_type, resource_id)).fetchone()
        return orjson.loads(row[0]) if row else None

    def search(self, resource_type: str, subject: str | None = None, code: list[TokenFilter] | None = None,
               count: int = 50, offset: int = 0) -> tuple[int, list[dict]]:
        if code:
            token_sql, params = token_where(resource_type, subject, code, "?")
            count_sql = f"SELECT COUNT(*) FROM (SELECT DISTINCT resource_id FROM resource_tokens WHERE {token_sql})"
            page_sql = (f"SELECT r.body FROM (SELECT DISTINCT date, resource_id FROM resource_tokens "
                        f"WHERE {token_sql}) m JOIN resources r ON r.resource_type=? AND r.id=m.resource_id "
                        f"ORDER BY m.date DESC NULLS LAST, m.resource_id LIMIT ? OFFSET ?")
            page_params = [*params, resource_type, count, offset]
        else:
            where, params = "resource_type=?", [resource_type]
            if subject is not None:
                where += " AND subject=?"
                params.append(subject)
            count_sql = f"SELECT COUNT(*) FROM resources WHERE {where}"
            page_sql = (f"SELECT body FROM resources WHERE {where} "
                        f"ORDER BY date DESC NULLS LAST, id LIMIT ? OFFSET ?")
            page_params = [*params, count, offset]
        with self._read_lock:
            conn = self._read
            conn.execute("BEGIN")  # one snapshot for the total and the page
            try:
                total = conn.execute(count_sql, params).fetchone()[0]
                rows = conn.execute(page_sql, page_params).fetchall() if count > 0 else []
            finally:
                conn.execute("COMMIT")
        return total, [orjson.loads(r[0]) for r in rows]

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


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (migrations contain no semicolons inside literals)."""
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
