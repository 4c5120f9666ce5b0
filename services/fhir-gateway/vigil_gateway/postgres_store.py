"""PostgreSQL adapter of the Store port (psycopg 3), same semantics as the SQLite adapter.

Two connections (writes, reads), each behind a lock and reopened if the server dropped it. Batches
are written with executemany (psycopg pipelines them); migrations hold an advisory lock so several
gateway replicas can start at once.
"""
from __future__ import annotations

import threading

import orjson
import psycopg

from vigil_gateway.migrate import SCHEMA_VERSION_DDL, migration_files
from vigil_gateway.store import TokenFilter, UpsertCounts, chunks, now_instant, plan_upsert, token_where

_MIGRATION_LOCK = 0x76696769  # 'vigi': pg_advisory_xact_lock key for migrations
_IN_CHUNK = 1000


class PostgresStore:
    dialect = "postgresql"

    def __init__(self, database_url: str, *, connect_timeout: int = 10):
        if not database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"not a PostgreSQL URL: {database_url!r}")
        self.url = database_url
        self._timeout = connect_timeout
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._write: psycopg.Connection | None = None
        self._read: psycopg.Connection | None = None
        self._write = self._connect()  # fail fast on a bad URL

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=False, connect_timeout=self._timeout,
                               application_name="vigil-gateway")

    def _writer(self) -> psycopg.Connection:
        if self._write is None or self._write.closed or self._write.broken:
            self._write = self._connect()
        return self._write

    def _reader(self) -> psycopg.Connection:
        if self._read is None or self._read.closed or self._read.broken:
            self._read = self._connect()
            # REPEATABLE READ: a search's total and page come from one snapshot
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
                return conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]

    # --- writes -------------------------------------------------------------------------------

    def upsert_many(self, resources: list[dict]) -> UpsertCounts:
        if not resources:
            return UpsertCounts()
        with self._write_lock:
            conn = self._writer()
            with conn.transaction(), conn.cursor() as cur:
                keys = list({(r.get("resourceType"), r.get("id")) for r in resources if isinstance(r, dict)})
                existing: dict[tuple[str, str], tuple[int, str]] = {}
                for part in chunks(keys, _IN_CHUNK):
                    types = [str(k[0]) for k in part]
                    ids = [str(k[1]) for k in part]
                    # FOR UPDATE: a concurrent writer of the same rows waits, so versions never fork
                    cur.execute(
                        "SELECT r.resource_type, r.id, r.version_id, r.content_hash FROM resources r "
                        "JOIN unnest(%s::text[], %s::text[]) AS k(t, i) ON r.resource_type=k.t AND r.id=k.i "
                        "FOR UPDATE OF r", (types, ids))
                    for rt, rid, ver, digest in cur.fetchall():
                        existing[(rt, rid)] = (ver, digest)
                counts, rows, replaced = plan_upsert(resources, existing, now_instant())
                if replaced:
                    cur.executemany("DELETE FROM resource_tokens WHERE resource_type=%s AND resource_id=%s",
                                    list(replaced))
                if rows:
                    cur.executemany(
                        "INSERT INTO resources (resource_type, id, version_id, last_updated, subject, date, "
                        "content_hash, body) VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb) "
                        "ON CONFLICT (resource_type, id) DO UPDATE SET version_id=excluded.version_id, "
                        "last_updated=excluded.last_updated, subject=excluded.subject, date=excluded.date, "
                        "content_hash=excluded.content_hash, body=excluded.body",
                        [(r.resource_type, r.id, r.version_id, r.last_updated, r.subject, r.date,
                          r.content_hash, r.body_json()) for r in rows])
                tokens = [(r.resource_type, r.id, r.subject, s, c, r.date) for r in rows for s, c in r.codes]
                if tokens:
                    with cur.copy("COPY resource_tokens (resource_type, resource_id, subject, system, code, date) "
                                  "FROM STDIN") as copy:
                        for t in tokens:
                            copy.write_row(t)
                return counts

    # --- reads --------------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict | None:
        with self._read_lock:
            conn = self._reader()
            with conn.transaction():
                row = conn.execute("SELECT body::text FROM resources WHERE resource_type=%s AND id=%s",
                                   (resource_type, resource_id)).fetchone()
        return _ordered(orjson.loads(row[0])) if row else None

    def search(self, resource_type: str, subject: str | None = None, code: list[TokenFilter] | None = None,
               count: int = 50, offset: int = 0) -> tuple[int, list[dict]]:
        if code:
            token_sql, params = token_where(resource_type, subject, code, "%s")
            count_sql = (f"SELECT COUNT(*) FROM (SELECT DISTINCT resource_id FROM resource_tokens "
                         f"WHERE {token_sql}) d")
            page_sql = (f"SELECT r.body::text FROM (SELECT DISTINCT date, resource_id FROM resource_tokens "
                        f"WHERE {token_sql}) m JOIN resources r ON r.resource_type=%s AND r.id=m.resource_id "
                        f"ORDER BY m.date DESC NULLS LAST, m.resource_id LIMIT %s OFFSET %s")
            page_params = [*params, resource_type, count, offset]
        else:
            where, params = "resource_type=%s", [resource_type]
            if subject is not None:
                where += " AND subject=%s"
                params.append(subject)
            count_sql = f"SELECT COUNT(*) FROM resources WHERE {where}"
            page_sql = (f"SELECT body::text FROM resources WHERE {where} "
                        f"ORDER BY date DESC NULLS LAST, id LIMIT %s OFFSET %s")
            page_params = [*params, count, offset]
        with self._read_lock:
            conn = self._reader()
            with conn.transaction():
                total = conn.execute(count_sql, params).fetchone()[0]
                rows = conn.execute(page_sql, page_params).fetchall() if count > 0 else []
        return total, [_ordered(orjson.loads(r[0])) for r in rows]

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
            for conn in (self._write, self._read):
                if conn is not None and not conn.closed:
                    conn.close()


def _ordered(resource: dict) -> dict:
    """jsonb sorts keys by length; put resourceType, id, meta first as FHIR JSON customarily has."""
    head = {k: resource[k] for k in ("resourceType", "id", "meta") if k in resource}
    head.update((k, v) for k, v in resource.items() if k not in head)
    return head
