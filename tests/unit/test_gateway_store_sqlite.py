"""SQLite-specific behaviour of the store (the shared contract is tests/integration/test_gateway_store_contract.py,
whose SQLite half needs no server)."""
from __future__ import annotations

import sqlite3

import pytest
from vigil_gateway.bootstrap import build_store
from vigil_gateway.sqlite_store import SqliteStore, sqlite_path
from vigil_gateway.store import UpsertCounts


def _obs(oid, value=1.0):
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-01-01T00:00:00Z",
            "valueQuantity": {"value": value}}


def test_url_parsing_and_parent_dir(tmp_path):
    assert sqlite_path("sqlite:///vigil-data/gateway.db") == "vigil-data/gateway.db"
    assert sqlite_path("sqlite:////abs/x.db") == "/abs/x.db"
    with pytest.raises(ValueError):
        sqlite_path("postgresql://x")
    with pytest.raises(ValueError):
        build_store("mysql://nope")
    store = build_store(f"sqlite:///{tmp_path}/a/b/c.db")
    assert (tmp_path / "a" / "b").is_dir()
    store.migrate()
    store.close()
    # reopening keeps data and the schema version
    store = build_store(f"sqlite:///{tmp_path}/a/b/c.db")
    assert store.migrate() == 5
    store.close()


def test_memory_database_works():
    store = SqliteStore(":memory:")
    store.migrate()
    assert store.upsert_many([_obs("o1")]) == UpsertCounts(new=1)
    assert store.upsert_many([_obs("o1")]) == UpsertCounts(unchanged=1)
    assert store.upsert_many([_obs("o1", 2.0)]) == UpsertCounts(updated=1)
    assert store.read("Observation", "o1")["meta"]["versionId"] == "2"
    store.close()


def test_searches_use_indexes(tmp_path):
    from vigil_gateway.search_params import parse_search
    store = build_store(f"sqlite:///{tmp_path}/g.db")
    store.migrate()
    conn = sqlite3.connect(f"{tmp_path}/g.db")

    def plan(items, which=store.search_sql):
        sql, args = which(parse_search("Observation", items).query)
        return " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))

    hot_items = [("subject", "p1"), ("code", "http://loinc.org|8867-4"), ("date", "ge2026-01-01"), ("_count", "100")]
    hot = plan(hot_items)
    assert "idx_token_subject" in hot and "SCAN" not in hot and "TEMP B-TREE" not in hot, hot
    # migration 0003: the index covers the token side (date_low included): no idx_token row is read
    assert "COVERING INDEX idx_token_subject" in hot, hot
    # the total is counted on idx_token alone
    total = plan(hot_items, store.count_sql)
    assert total.startswith("SEARCH t USING COVERING INDEX idx_token_subject") and " r " not in total, total
    by_subject = plan([("subject", "p1")])
    assert "resources_by_subject_date" in by_subject and "SCAN" not in by_subject, by_subject
    conn.close()
    store.close()


def test_upsert_replans_when_locked_read_differs(tmp_path):
    """upsert_many reads current versions without row locks, then locks (re-reads) only the rows it is
    about to change; when that locked read differs (a concurrent writer got there first), it plans again."""
    store = build_store(f"sqlite:///{tmp_path}/r.db")
    store.migrate()
    assert store.upsert_many([_obs("o1", 1.0)]) == UpsertCounts(new=1)
    assert store.upsert_many([_obs("o1", 2.0)]) == UpsertCounts(updated=1)
    real = store._existing
    calls = []

    def stale_unlocked(tx, keys, *, lock=True):
        calls.append(lock)
        got = real(tx, keys, lock=lock)
        return got if lock else {k: (1, "stale-hash") for k in got}  # as if version 2 were not yet committed

    store._existing = stale_unlocked
    # same content as version 2: the first plan says `updated`, the locked read shows it is `unchanged`
    assert store.upsert_many([_obs("o1", 2.0)]) == UpsertCounts(unchanged=1)
    assert calls == [False, True]
    store._existing = real
    assert store.read("Observation", "o1")["meta"]["versionId"] == "2"
    assert store.vread("Observation", "o1", 3) is None
    # all new, or all unchanged: one unlocked read, no locking read
    calls.clear()
    store._existing = stale_unlocked
    store.upsert_many([_obs("o2")])
    assert calls == [False]
    store.close()


def test_resource_date_is_not_in_idx_date(tmp_path):
    """The resource's own `date` is searched in resources.date/date_high; idx_date holds other dates."""
    store = build_store(f"sqlite:///{tmp_path}/d.db")
    store.migrate()
    store.upsert_many([_obs("o1"), {"resourceType": "Observation", "id": "o2", "status": "final",
                                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}])
    conn = sqlite3.connect(f"{tmp_path}/d.db")
    assert conn.execute("SELECT COUNT(*) FROM idx_date WHERE param='date'").fetchone()[0] == 0
    from vigil_gateway.search_params import parse_search

    def ids(items):
        return sorted(r["id"] for r in store.search_query(parse_search("Observation", items).query).resources)

    assert ids([("date:missing", "true")]) == ["o2"]
    assert ids([("date:missing", "false")]) == ["o1"]
    assert ids([("code", "http://loinc.org|8867-4"), ("date:missing", "true")]) == ["o2"]
    store.close()
