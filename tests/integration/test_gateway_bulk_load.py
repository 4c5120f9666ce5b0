"""The bench's bulk loader (bench/vigil_bench/bulk_load.py) stores exactly what the gateway's own write path
stores: 2000 Observations + 200 RiskAssessments bulk-loaded into one store and written with `upsert_many`
into another give the same rows in every table (created_seq and lastUpdated aside: those are the time of
writing) and the same answers from the gateway's HTTP API (searches, totals, reads), valid FHIR R4.
Run on SQLite and on a real PostgreSQL."""
from __future__ import annotations

import json
import urllib.parse
import uuid

import httpx
import psycopg
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.observation import Observation
from vigil_bench import bulk_load
from vigil_gateway.app import create_app
from vigil_gateway.bootstrap import build_store

from vigil.settings import Settings

pytestmark = pytest.mark.integration

END = 1_767_225_600  # 2026-01-01T00:00:00Z: the window is the week before


@pytest.fixture(params=["sqlite", "postgresql"])
def two_urls(request, tmp_path):
    """(bulk store URL, normal store URL), both empty."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/bulk/g.db", f"sqlite:///{tmp_path}/normal/g.db"
        return
    server = request.getfixturevalue("postgres_url")
    names = ["t_bulk_" + uuid.uuid4().hex[:10], "t_norm_" + uuid.uuid4().hex[:10]]
    with psycopg.connect(server, autocommit=True) as conn:
        for n in names:
            conn.execute(f'CREATE DATABASE "{n}"')
    base = server.rsplit("/", 1)[0]
    yield tuple(f"{base}/{n}" for n in names)
    with psycopg.connect(server, autocommit=True) as conn:
        for n in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')


def dump(url: str) -> dict[str, list]:
    """Every row of the store's resource tables, without created_seq and the time of writing."""
    db = bulk_load._Db(url)
    try:
        out = {}
        for table in bulk_load.TABLES:
            cols = db.columns(table)
            select = ", ".join(f"{n}::text" if t in ("json", "jsonb") else n for n, t in cols)
            rows = []
            for values in db.q(f"SELECT {select} FROM {table}"):
                row = dict(zip([n for n, _ in cols], values, strict=True))
                row.pop("created_seq", None)
                row.pop("last_updated", None)
                if "body" in row:
                    body = json.loads(row["body"])
                    assert body["meta"].pop("lastUpdated").endswith("Z")
                    row["body"] = body
                rows.append(json.dumps(row, sort_keys=True))
            out[table] = sorted(rows)
        return out
    finally:
        db.close()


def without_time(resource: dict) -> dict:
    r = json.loads(json.dumps(resource))
    r["meta"].pop("lastUpdated")
    return r


async def test_bulk_load_equals_the_write_path(two_urls):
    bulk_url, normal_url = two_urls
    plan = bulk_load.make_plan(2000, 20, weeks=1, end=END)
    assert (plan.observations, plan.risk_assessments) == (2000, 200)

    res = bulk_load.bulk_load(bulk_url, plan, chunk_hours=5)
    assert (res.observations, res.risk_assessments) == (2000, 200)
    assert res.rows["resources"] == res.rows["resource_history"] == 2200
    assert bulk_load.verify_sample(bulk_url, plan, n=5) > 0

    normal = build_store(normal_url)
    normal.migrate()
    everything = list(bulk_load.resources(plan))
    assert len(everything) == 2200
    for i in range(0, len(everything), 500):
        normal.upsert_many(everything[i:i + 500])

    a, b = dump(bulk_url), dump(normal_url)
    for table in bulk_load.TABLES:
        assert a[table] == b[table], table
    assert a["idx_token"] and a["idx_reference"] and a["idx_quantity"]

    bulk = build_store(bulk_url)
    try:
        assert bulk.migrate() == normal.migrate()  # same schema version, nothing left to apply
        # the sequence went on: a resource written after the load is newer than every loaded one
        bulk.upsert_many([{"resourceType": "Observation", "id": "after-load", "status": "final",
                           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                           "subject": {"reference": "Patient/not-in-the-plan"},
                           "effectiveDateTime": "2020-01-01T00:00:00Z"}])
        db = bulk_load._Db(bulk_url)
        try:
            seqs = db.q("SELECT created_seq FROM resources WHERE id <> 'after-load'")
            mine = db.q("SELECT created_seq FROM resources WHERE id = 'after-load'")[0][0]
        finally:
            db.close()
        assert len({s for (s,) in seqs}) == 2200 and None not in {s for (s,) in seqs}
        assert mine > max(s for (s,) in seqs)
        await _same_http_answers(plan, bulk, normal)
    finally:
        bulk.close()
        normal.close()


async def _same_http_answers(plan: bulk_load.Plan, bulk, normal) -> None:
    since = plan.window_start_iso()
    paths = []
    for p in (0, 7, 19):
        subject = urllib.parse.quote(f"Patient/{plan.patient_id(p)}", safe="")
        for code in ("8867-4", "8480-6"):
            paths.append(f"/fhir/Observation?subject={subject}&code=http%3A%2F%2Floinc.org%7C{code}"
                         f"&date=ge{since}&_count=100")
            paths.append(f"/fhir/Observation?subject={subject}&code=http%3A%2F%2Floinc.org%7C{code}&_count=7")
        paths.append(f"/fhir/RiskAssessment?subject={subject}&_count=5")
        paths.append(f"/fhir/Observation?subject={subject}&value-quantity=gt90&_count=100")
    paths.append("/fhir/Observation?code=http%3A%2F%2Floinc.org%7C8867-4&value-quantity=lt150&_count=20")
    paths.append("/fhir/RiskAssessment?probability=ge0.5&risk=high&_count=20")
    answers = []
    for store in (bulk, normal):
        app = create_app(Settings(), store, None)
        got = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            for path in paths:
                r = await http.get(path)
                assert r.status_code == 200, r.text
                bundle = r.json()
                Bundle.model_validate(bundle)
                got.append((bundle["total"], [without_time(e["resource"]) for e in bundle["entry"]]))
            obs_id = plan.obs_id(7, plan.starts[7], 3)
            r = await http.get(f"/fhir/Observation/{obs_id}")
            assert r.status_code == 200
            assert Observation.model_validate(r.json()).id == obs_id
            got.append(without_time(r.json()))
        answers.append(got)
    assert answers[0] == answers[1]
    for path, (total, _entries) in zip(paths, answers[0]):  # the number/quantity searches find something
        if "value-quantity" in path or "probability" in path:
            assert total > 0, path
    # and they are the patient's data, newest first, a full page where there is one
    first_total, first_entries = answers[0][0]
    assert first_total == plan.lengths[0] and len(first_entries) == min(100, plan.lengths[0])
    dates = [e["effectiveDateTime"] for e in first_entries]
    assert dates == sorted(dates, reverse=True)
    assert {e["subject"]["reference"] for e in first_entries} == {f"Patient/{plan.patient_id(0)}"}
