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
    assert store.migrate() == 2
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

    def plan(items):
        sql, args = store.search_sql(parse_search("Observation", items).query)
        return " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))

    hot = plan([("subject", "p1"), ("code", "http://loinc.org|8867-4"), ("date", "ge2026-01-01"),
                ("_count", "100")])
    assert "idx_token_subject" in hot and "SCAN" not in hot and "TEMP B-TREE" not in hot, hot
    by_subject = plan([("subject", "p1")])
    assert "resources_by_subject_date" in by_subject and "SCAN" not in by_subject, by_subject
    conn.close()
    store.close()
