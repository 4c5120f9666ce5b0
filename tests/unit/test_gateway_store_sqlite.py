"""SQLite-specific behaviour of the store (the shared contract is tests/integration/test_gateway_store_contract.py,
whose SQLite half needs no server)."""
from __future__ import annotations

import sqlite3

import pytest
from vigil_gateway.bootstrap import build_store
from vigil_gateway.sqlite_store import SqliteStore, sqlite_path
from vigil_gateway.store import TokenFilter, UpsertCounts, content_hash, normalise_date


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
    assert store.migrate() == 1
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
    store = build_store(f"sqlite:///{tmp_path}/g.db")
    store.migrate()
    conn = sqlite3.connect(f"{tmp_path}/g.db")
    plan = " ".join(r[3] for r in conn.execute(
        "EXPLAIN QUERY PLAN SELECT body FROM resources WHERE resource_type=? AND subject=? "
        "ORDER BY date DESC NULLS LAST, id LIMIT 10", ("Observation", "Patient/p1")))
    assert "resources_by_subject_date" in plan and "SCAN resources" not in plan
    plan = " ".join(r[3] for r in conn.execute(
        "EXPLAIN QUERY PLAN SELECT DISTINCT date, resource_id FROM resource_tokens WHERE resource_type=? "
        "AND subject=? AND ((code=? AND system=?))", ("Observation", "Patient/p1", "x", "y")))
    assert "resource_tokens_search" in plan
    conn.close()
    store.close()


def test_content_hash_ignores_only_store_owned_meta():
    a = _obs("o1")
    b = {**_obs("o1"), "meta": {"versionId": "7", "lastUpdated": "2020-01-01T00:00:00Z"}}
    c = {**_obs("o1"), "meta": {"source": "device-a"}}
    assert content_hash(a) == content_hash(b) != content_hash(c)
    # key order does not matter
    assert content_hash(dict(reversed(list(a.items())))) == content_hash(a)


def test_date_normalisation():
    assert normalise_date("2026-01-01T12:00:00+02:00") == "2026-01-01T10:00:00.000000Z"
    assert normalise_date("2026-01-01T10:00:00Z") == "2026-01-01T10:00:00.000000Z"
    assert normalise_date("2026-01") == "2026-01"
    assert normalise_date(None) is None


def test_token_filter_with_system_only(tmp_path):
    store = build_store(f"sqlite:///{tmp_path}/g.db")
    store.migrate()
    store.upsert_many([_obs("o1")])
    assert store.search("Observation", code=[TokenFilter("http://loinc.org", None)])[0] == 1
    assert store.search("Observation", code=[TokenFilter("http://snomed.info/sct", None)])[0] == 0
    store.close()
