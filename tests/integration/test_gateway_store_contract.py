"""The Store contract, run identically against SQLite and a real PostgreSQL 15."""
from __future__ import annotations

import pytest
from vigil_gateway.bootstrap import build_store
from vigil_gateway.store import InvalidResource, TokenFilter, UpsertCounts

LOINC = "http://loinc.org"
HR, SPO2 = "8867-4", "59408-5"


def obs(oid: str, patient: str = "p1", code: str = HR, value: float = 80.0,
        when: str = "2026-01-01T10:00:00Z", extra_system: str | None = None) -> dict:
    coding = [{"system": LOINC, "code": code}]
    if extra_system:
        coding.append({"system": extra_system, "code": code})
    return {"resourceType": "Observation", "id": oid, "status": "final", "code": {"coding": coding},
            "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org",
                              "code": "/min"}}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = build_store(f"sqlite:///{tmp_path}/nested/dir/gateway.db")
    else:
        s = build_store(request.getfixturevalue("fresh_postgres_url"))
    assert s.migrate() == 5
    assert s.migrate() == 5  # idempotent
    yield s
    s.close()


def test_versioning_semantics(store):
    assert store.upsert_many([obs("o1")]) == UpsertCounts(new=1)
    first = store.read("Observation", "o1")
    assert first["meta"]["versionId"] == "1" and first["meta"]["lastUpdated"].endswith("Z")

    # same content (even with producer-set versionId/lastUpdated) -> no new version
    again = obs("o1")
    again["meta"] = {"versionId": "99", "lastUpdated": "2000-01-01T00:00:00Z"}
    assert store.upsert_many([again]) == UpsertCounts(unchanged=1)
    assert store.read("Observation", "o1") == first

    # different content -> version 2
    assert store.upsert_many([obs("o1", value=81.0)]) == UpsertCounts(updated=1)
    second = store.read("Observation", "o1")
    assert second["meta"]["versionId"] == "2"
    assert second["valueQuantity"]["value"] == 81.0
    assert second["meta"]["lastUpdated"] >= first["meta"]["lastUpdated"]

    # a repeat inside one batch is applied in order
    counts = store.upsert_many([obs("o2"), obs("o2"), obs("o2", value=1.0), obs("o1", value=81.0)])
    assert counts == UpsertCounts(new=1, updated=1, unchanged=2)
    assert store.read("Observation", "o2")["meta"]["versionId"] == "2"
    assert store.read("Observation", "missing") is None
    assert store.read("RiskAssessment", "o1") is None


def test_meta_other_than_version_is_content(store):
    store.upsert_many([obs("o1")])
    with_profile = obs("o1")
    with_profile["meta"] = {"profile": ["http://hl7.org/fhir/StructureDefinition/vitalsigns"]}
    assert store.upsert_many([with_profile]) == UpsertCounts(updated=1)
    got = store.read("Observation", "o1")
    assert got["meta"]["profile"] == with_profile["meta"]["profile"] and got["meta"]["versionId"] == "2"


def test_search_by_subject_and_code(store):
    store.upsert_many([
        obs("a", "p1", HR, when="2026-01-01T10:00:00Z"),
        obs("b", "p1", HR, when="2026-01-01T12:00:00+02:00"),   # = 10:00Z, ties broken by id
        obs("c", "p1", SPO2, when="2026-01-01T11:00:00Z", extra_system="urn:local"),
        obs("d", "p2", HR, when="2026-01-02T10:00:00Z"),
        {"resourceType": "Observation", "id": "nodate", "status": "final",
         "code": {"coding": [{"code": HR}]}, "subject": {"reference": "Patient/p1"}},
    ])
    total, page = store.search("Observation", subject="Patient/p1")
    assert total == 4
    assert [r["id"] for r in page] == ["c", "a", "b", "nodate"]  # newest first, undated last

    total, page = store.search("Observation", subject="Patient/p1", code=[TokenFilter(LOINC, HR)])
    assert (total, [r["id"] for r in page]) == (2, ["a", "b"])
    total, page = store.search("Observation", subject="Patient/p1", code=[TokenFilter(None, HR)])
    assert (total, [r["id"] for r in page]) == (3, ["a", "b", "nodate"])
    total, page = store.search("Observation", subject="Patient/p1", code=[TokenFilter("", HR)])
    assert [r["id"] for r in page] == ["nodate"]
    # a resource matching through two codings is returned once
    total, page = store.search("Observation", code=[TokenFilter(None, SPO2)])
    assert (total, [r["id"] for r in page]) == (1, ["c"])
    total, page = store.search("Observation", code=[TokenFilter("urn:local", None), TokenFilter(LOINC, HR)])
    assert total == 4
    total, page = store.search("Observation")
    assert total == 5
    assert store.search("Observation", subject="Patient/nobody") == (0, [])
    assert store.search("RiskAssessment", subject="Patient/p1") == (0, [])


def test_search_paging_is_stable_and_total_exact(store):
    store.upsert_many([obs(f"o{i:03d}", when=f"2026-01-01T10:{i % 60:02d}:00Z") for i in range(120)])
    seen = []
    for offset in range(0, 130, 25):
        total, page = store.search("Observation", subject="Patient/p1", count=25, offset=offset)
        assert total == 120
        seen += [r["id"] for r in page]
    assert len(seen) == 120 and len(set(seen)) == 120
    assert store.search("Observation", subject="Patient/p1", count=0) == (120, [])


def test_update_moves_search_tokens(store):
    store.upsert_many([obs("o1", code=HR)])
    store.upsert_many([obs("o1", code=SPO2, patient="p9")])
    assert store.search("Observation", code=[TokenFilter(None, HR)])[0] == 0
    assert store.search("Observation", subject="Patient/p9", code=[TokenFilter(LOINC, SPO2)])[0] == 1
    assert store.search("Observation", subject="Patient/p1")[0] == 0


def test_invalid_resources_are_refused_whole_batch(store):
    for bad in ({"resourceType": "Observation"}, {"resourceType": "Observation", "id": "bad id!"},
                {"id": "x"}, "not an object"):
        with pytest.raises(InvalidResource):
            store.upsert_many([obs("good"), bad])
    assert store.read("Observation", "good") is None  # nothing of a refused batch is kept


def test_large_batch(store):
    counts = store.upsert_many([obs(f"big-{i}", patient=f"p{i % 7}") for i in range(2500)])
    assert counts == UpsertCounts(new=2500)
    assert store.upsert_many([obs(f"big-{i}", patient=f"p{i % 7}") for i in range(2500)]) == \
        UpsertCounts(unchanged=2500)
    assert store.search("Observation", subject="Patient/p3", count=1)[0] == len(range(3, 2500, 7))
    assert store.ping()


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def test_upgrade_from_schema_1_reindexes_existing_rows(dialect, request, tmp_path, monkeypatch):
    """A database created by 0001 (resources + resource_tokens) upgrades in place: history rows,
    index rows and creation sequence numbers are built for the existing resources."""
    import orjson

    url, old = _store_at_schema(1, dialect, request, tmp_path, monkeypatch)
    body = obs("legacy")
    body["meta"] = {"versionId": "3", "lastUpdated": "2025-01-01T00:00:00.000000Z"}
    with _raw(old) as execute:
        execute("INSERT INTO resources (resource_type, id, version_id, last_updated, subject, date, content_hash, "
                "body) VALUES ('Observation', 'legacy', 3, '2025-01-01T00:00:00.000000Z', 'Patient/p1', "
                "'2026-01-01T10:00:00.000000Z', 'x', ?)", orjson.dumps(body).decode())
    old.close()
    monkeypatch.undo()
    new = build_store(url)
    assert new.migrate() == 5
    assert new.search("Observation", subject="Patient/p1", code=[TokenFilter(LOINC, HR)])[0] == 1
    assert new.vread("Observation", "legacy", 3)["meta"]["versionId"] == "3"
    assert new.upsert_many([obs("fresh")]) == UpsertCounts(new=1)
    assert new.search("Observation", subject="Patient/p1")[0] == 2
    new.close()


def _store_at_schema(version: int, dialect: str, request, tmp_path, monkeypatch):
    """(url, store) of a new database migrated only up to `version`; the monkeypatch is undone by the
    caller before it opens the store again (then every migration applies)."""
    from vigil_gateway import migrate as migrate_mod
    from vigil_gateway import postgres_store, sqlite_store

    url = f"sqlite:///{tmp_path}/old.db" if dialect == "sqlite" else request.getfixturevalue("fresh_postgres_url")
    first = lambda d: migrate_mod.migration_files(d)[:version]
    monkeypatch.setattr(sqlite_store, "migration_files", first)
    monkeypatch.setattr(postgres_store, "migration_files", first)
    old = build_store(url)
    assert old.migrate() == version
    return url, old


class _raw:
    """Execute one statement on a store's write connection with `?` placeholders, committed."""

    def __init__(self, store):
        self.store = store

    def __enter__(self):
        conn = self.store._write
        if self.store.dialect == "sqlite":
            return lambda sql, *a: conn.execute(sql, a)
        return lambda sql, *a: conn.execute(sql.replace("?", "%s"), a)

    def __exit__(self, *exc):
        if self.store.dialect == "postgresql" and exc[0] is None:
            self.store._write.commit()


async def test_async_reads_answer_as_the_sync_ones(store):
    """read_async/vread_async (the gateway's read path, on the event loop) give exactly
    what read/vread give: every version, a missing id, a missing version, another type's id."""
    store.upsert_many([obs("o1"), obs("o2", patient="p2")])
    store.upsert_many([obs("o1", value=81.0)])
    read_async = store.read_async
    for rtype, rid in (("Observation", "o1"), ("Observation", "o2"), ("Observation", "nope"),
                       ("RiskAssessment", "o1")):
        assert await read_async(rtype, rid) == store.read(rtype, rid)
    assert (await read_async("Observation", "o1"))["meta"]["versionId"] == "2"
    for version in (1, 2, 3):
        assert await store.vread_async("Observation", "o1", version) == store.vread("Observation", "o1", version)
    assert (await store.vread_async("Observation", "o1", 1))["valueQuantity"]["value"] == 80.0
    assert await store.vread_async("Observation", "o1", 3) is None



async def test_sqlite_event_loop_read_goes_to_a_thread_when_busy(tmp_path, monkeypatch):
    """SQLite's read_async runs inline on the event loop with busy_timeout 0, so it never waits there.
    WAL readers are not blocked by the writer; when SQLite answers "database is locked" all the same,
    the lookup is answered by read() in a worker thread. The busy connection here is a real one: a
    rollback-journal database held exclusively by another connection."""
    import sqlite3

    store = build_store(f"sqlite:///{tmp_path}/gw.db")
    store.migrate()
    store.upsert_many([obs("o1")])
    expected = store.read("Observation", "o1")
    assert await store.read_async("Observation", "o1") == expected
    locked = tmp_path / "locked.db"
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("CREATE TABLE resources (body TEXT, resource_type TEXT, id TEXT)")
    holder.execute("BEGIN EXCLUSIVE")
    busy = sqlite3.connect(locked, isolation_level=None, check_same_thread=False)
    busy.execute("PRAGMA busy_timeout=0")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        busy.execute(store.read_sql, ["Observation", "o1"]).fetchone()
    monkeypatch.setattr(store, "_loop_reader", lambda: busy)
    assert await store.read_async("Observation", "o1") == expected
    assert await store.vread_async("Observation", "o1", 1) == store.vread("Observation", "o1", 1)
    holder.execute("ROLLBACK")
    for c in (holder, busy):
        c.close()
    store.close()


# --- number and quantity parameters (migration 0005) -----------------------------------------------

UCUM = "http://unitsofmeasure.org"


def risk(rid: str, probability: float, band: str, patient: str = "p1", performer: str = "Device/model-a") -> dict:
    return {"resourceType": "RiskAssessment", "id": rid, "status": "final",
            "subject": {"reference": f"Patient/{patient}"},
            "occurrencePeriod": {"start": "2026-01-01T10:00:00Z", "end": "2026-01-01T11:00:00Z"},
            "performer": {"reference": performer},
            "prediction": [{"probabilityDecimal": probability, "qualitativeRisk": {"coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/risk-probability", "code": band}]}}]}


def _ids(store, rtype: str, query: str) -> set[str]:
    import urllib.parse

    from vigil_gateway.search_params import parse_search

    parsed = parse_search(rtype, urllib.parse.parse_qsl(query), strict=True)
    return {r["id"] for r in store.search_query(parsed.query).resources}


def test_number_and_quantity_search(store):
    """R4 number/quantity semantics (search.html#number, #quantity): eq/ne/ap use the search value's
    precision, the other prefixes the number itself; units by system|code or by code-or-unit."""
    store.upsert_many([risk("r1", 0.05, "low"), risk("r2", 0.5, "moderate"), risk("r3", 0.549, "moderate"),
                       risk("r4", 0.91, "high", patient="p2", performer="Device/model-b")])
    mgdl = obs("glu", code="2345-7", value=120.0)
    mgdl["valueQuantity"] = {"value": 120.0, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"}
    no_code = obs("nocode", value=99.0)
    no_code["valueQuantity"] = {"value": 99.0, "unit": "beats/min"}
    no_value = obs("novalue")
    del no_value["valueQuantity"]
    no_value["dataAbsentReason"] = {"text": "sensor off"}
    store.upsert_many([obs("hr80", value=80.0), obs("hr121", value=121.0), obs("hr1205", value=120.5),
                       mgdl, no_code, no_value])

    ra = lambda q: _ids(store, "RiskAssessment", q)
    assert ra("probability=gt0.5") == {"r3", "r4"}
    assert ra("probability=ge0.5") == {"r2", "r3", "r4"}
    assert ra("probability=lt0.5") == {"r1"} and ra("probability=le0.05") == {"r1"}
    assert ra("probability=0.5") == {"r2", "r3"}          # [0.45, 0.55): 0.549 too
    assert ra("probability=0.50") == {"r2"}               # [0.495, 0.505)
    assert ra("probability=ne0.5") == {"r1", "r4"}
    assert ra("probability=ap0.9") == {"r4"}              # 0.9 +- 10 %
    assert ra("probability=sa0.9") == {"r4"} and ra("probability=eb0.06") == {"r1"}
    assert ra("probability=lt0.1,gt0.9") == {"r1", "r4"}  # comma = OR
    assert ra("probability=gt0.1&probability=lt0.9") == {"r2", "r3"}  # repeated = AND
    assert ra("risk=high") == {"r4"}
    assert ra("risk=http://terminology.hl7.org/CodeSystem/risk-probability|moderate") == {"r2", "r3"}
    assert ra("subject=Patient/p1&risk=http://terminology.hl7.org/CodeSystem/risk-probability|moderate"
              "&probability=gt0.52") == {"r3"}
    assert ra("performer=Device/model-b") == {"r4"} and ra("performer:missing=true") == set()

    o = lambda q: _ids(store, "Observation", q)
    assert o("value-quantity=gt120") == {"hr121", "hr1205"}
    assert o("value-quantity=120") == {"glu"}              # [119.5, 120.5): 120.5 is outside
    assert o("value-quantity=120.5") == {"hr1205"}
    assert o(f"value-quantity=120|{UCUM}|mg/dL") == {"glu"}
    assert o("value-quantity=ge80|http://unitsofmeasure.org|/min") == {"hr80", "hr121", "hr1205"}
    assert o("value-quantity=99||beats/min") == {"nocode"}  # code or unit
    assert o("value-quantity=le100||/min") == {"hr80"}
    assert o(f"code={LOINC}|{HR}&value-quantity=gt100") == {"hr121", "hr1205"}  # token-driven plan
    assert o("value-quantity=1e2") == {"hr80", "hr121", "hr1205", "glu", "nocode"}  # one significant figure: [50, 150)
    assert o("value-quantity:missing=true") == {"novalue"}
    assert o("value-quantity:missing=false&value-quantity=lt100") == {"hr80", "nocode"}
    assert o("value-quantity=lt100,gt121") == {"hr80", "nocode"}
    assert o("subject=Patient/p1&value-quantity=ne80") == {"hr121", "hr1205", "glu", "nocode"}

    # a new version replaces the old version's rows
    store.upsert_many([obs("hr80", value=130.0), risk("r4", 0.2, "low", patient="p2", performer="Device/model-b")])
    assert o("value-quantity=gt125") == {"hr80"} and o("value-quantity=80") == set()
    assert ra("risk=high") == set() and ra("probability=0.2") == {"r4"}


@pytest.mark.parametrize("query, why", [
    ("probability=high", "is not a number"), ("probability=gt", "is not a number"),
    ("probability=0x10", "is not a number"), ("probability=1.", "is not a number"),
    ("probability=zz0.5", "is not a number"), ("value-quantity=5|a", "is not a quantity"),
    ("value-quantity=5|a|b|c", "is not a quantity"), ("value-quantity=5|http://unitsofmeasure.org|", "no code"),
])
def test_bad_number_or_quantity_is_refused(query, why):
    import urllib.parse

    from vigil_gateway.outcomes import FhirError
    from vigil_gateway.search_params import parse_search

    rtype = "RiskAssessment" if query.startswith("probability") else "Observation"
    with pytest.raises(FhirError, match=why) as e:
        parse_search(rtype, urllib.parse.parse_qsl(query))
    assert e.value.status == 400


@pytest.mark.parametrize("dialect", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def test_upgrade_to_schema_5_indexes_new_parameters_of_stored_resources(dialect, request, tmp_path, monkeypatch):
    """Resources stored before 0005 become searchable by value-quantity, risk, probability and performer
    when the store migrates (reindex_params), without duplicating the index rows they had."""
    import orjson

    url, old = _store_at_schema(4, dialect, request, tmp_path, monkeypatch)
    with _raw(old) as execute:
        for n, body in enumerate((obs("old-hr", value=150.0), risk("old-ra", 0.95, "high"))):
            body["meta"] = {"versionId": "1", "lastUpdated": "2026-01-01T11:00:00.000000Z"}
            execute("INSERT INTO resources (resource_type, id, version_id, last_updated, subject, date, date_high, "
                    "content_hash, body, created_seq) VALUES (?, ?, 1, '2026-01-01T11:00:00.000000Z', 'Patient/p1', "
                    "'2026-01-01T10:00:00.000000Z', '2026-01-01T10:00:00.999999Z', 'x', ?, ?)",
                    body["resourceType"], body["id"], orjson.dumps(body).decode(), n + 1)
            execute("INSERT INTO idx_reference (resource_type, resource_id, param, target) VALUES (?, ?, 'subject', "
                    "'Patient/p1')", body["resourceType"], body["id"])
    old.close()
    monkeypatch.undo()
    new = build_store(url)
    assert new.migrate() == 5
    assert _ids(new, "Observation", "value-quantity=gt140") == {"old-hr"}
    assert _ids(new, "RiskAssessment", "probability=gt0.9") == {"old-ra"}
    assert _ids(new, "RiskAssessment", "risk=high") == {"old-ra"}
    assert _ids(new, "RiskAssessment", "performer=Device/model-a") == {"old-ra"}
    assert _ids(new, "RiskAssessment", "subject=Patient/p1") == {"old-ra"}  # untouched parameters still work
    with _raw(new) as execute:
        rows = execute("SELECT param, COUNT(*) FROM idx_reference WHERE resource_id='old-ra' GROUP BY param").fetchall()
        assert dict(rows) == {"subject": 1, "performer": 1}  # subject not indexed twice
        assert execute("SELECT COUNT(*) FROM reindex_params").fetchone()[0] == 0
        # an Observation's value is in its resources row, a RiskAssessment's probability in idx_quantity
        assert execute("SELECT value_num, value_code FROM resources WHERE id='old-hr'").fetchone() == (150.0, "/min")
        assert execute("SELECT resource_type, param, value FROM idx_quantity").fetchall() == \
            [("RiskAssessment", "probability", 0.95)]
    assert new.migrate() == 5  # nothing pending any more
    assert _ids(new, "Observation", "value-quantity=gt140") == {"old-hr"}
    # what a gateway of the previous release leaves behind during a rolling upgrade (docs/operations.md,
    # Upgrade): no value columns, no risk row. Queuing the re-index again and migrating repairs it.
    with _raw(new) as execute:
        execute("UPDATE resources SET value_num=NULL, value_system=NULL, value_code=NULL, value_unit=NULL")
        execute("DELETE FROM idx_token WHERE param='risk'")
    assert _ids(new, "Observation", "value-quantity=gt140") == set() == _ids(new, "RiskAssessment", "risk=high")
    with _raw(new) as execute:
        execute("INSERT INTO reindex_params (resource_type, param) VALUES ('Observation', 'value-quantity'), "
                "('RiskAssessment', 'risk'), ('RiskAssessment', 'probability'), ('RiskAssessment', 'performer')")
    assert new.migrate() == 5
    assert _ids(new, "Observation", "value-quantity=gt140") == {"old-hr"}
    assert _ids(new, "RiskAssessment", "risk=high") == _ids(new, "RiskAssessment", "probability=gt0.9") == {"old-ra"}
    with _raw(new) as execute:  # recomputed, not added twice
        assert execute("SELECT COUNT(*) FROM idx_quantity").fetchone()[0] == 1
        assert execute("SELECT COUNT(*) FROM idx_reference WHERE param='performer'").fetchone()[0] == 1
    new.close()
