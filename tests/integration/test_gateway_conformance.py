"""FHIR R4 REST conformance of the gateway, per interaction and per search parameter, run against both
stores (SQLite embedded; PostgreSQL from the session server) through the ASGI app (auth off)."""
from __future__ import annotations

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome
from vigil_gateway.app import create_app
from vigil_gateway.bootstrap import build_store

from vigil.settings import Settings

LOINC = "http://loinc.org"
HR, RR = "8867-4", "9279-1"
CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
PN = "https://physionet.org/content/challenge-2019/"


def obs(oid, patient="p1", code=HR, when="2026-01-01T10:00:00Z", status="final", device="d1", enc=None,
        category="vital-signs"):
    o = {"resourceType": "Observation", "id": oid, "status": status,
         "identifier": [{"system": "urn:vigil:reading", "value": oid}],
         "category": [{"coding": [{"system": CAT, "code": category}]}],
         "code": {"coding": [{"system": LOINC, "code": code}]},
         "subject": {"reference": f"Patient/{patient}"}, "valueQuantity": {"value": 80}}
    if when:
        o["effectiveDateTime"] = when
    if device:
        o["device"] = {"reference": f"Device/{device}"}
    if enc:
        o["encounter"] = {"reference": f"Encounter/{enc}"}
    return o


def patient(pid, family="Doe", gender="female", birth="1950-03-04"):
    return {"resourceType": "Patient", "id": pid, "identifier": [{"system": PN, "value": pid}],
            "name": [{"family": family, "given": ["Ann"]}], "gender": gender, "birthDate": birth}


def encounter(eid, pid, start, part_of=None, status="in-progress"):
    e = {"resourceType": "Encounter", "id": eid, "status": status,
         "identifier": [{"system": PN, "value": eid}],
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
         "subject": {"reference": f"Patient/{pid}"}, "period": {"start": start}}
    if part_of:
        e["partOf"] = {"reference": f"Encounter/{part_of}"}
    return e


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = build_store(f"sqlite:///{tmp_path}/gw.db")
    else:
        s = build_store(request.getfixturevalue("fresh_postgres_url"))
    s.migrate()
    s.upsert_many([
        obs("o1", when="2026-01-01T10:00:00Z", enc="e1"),
        obs("o2", when="2026-01-01T11:00:00Z"),
        obs("o3", when="2026-01-02T10:00:00Z", code=RR, status="preliminary"),
        obs("o4", patient="p2", when="2025-12-31T23:00:00Z", device="d2", category="laboratory"),
        obs("o5", when=None, device=None),
        {"resourceType": "RiskAssessment", "id": "ra1", "status": "final", "subject": {"reference": "Patient/p1"},
         "occurrenceDateTime": "2026-01-01T12:00:00Z", "encounter": {"reference": "Encounter/e1"}},
        {"resourceType": "Device", "id": "d1", "status": "active", "patient": {"reference": "Patient/p1"},
         "identifier": [{"system": "urn:vigil:device", "value": "d1"}]},
        patient("p1"), patient("p2", family="Müller", gender="male", birth="1960"),
        encounter("e0", "p1", "2025-12-30T08:00:00Z"),
        encounter("e1", "p1", "2026-01-01T09:00:00Z", part_of="e0"),
    ])
    yield s
    s.close()


@pytest.fixture
async def client(store):
    app = create_app(Settings(), store, None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c


async def ids(client, rtype, params, headers=None):
    r = await client.get(f"/fhir/{rtype}", params=params, headers=headers)
    assert r.status_code == 200, r.text
    Bundle.model_validate(r.json())
    return [e["resource"]["id"] for e in r.json().get("entry", []) if e["search"]["mode"] == "match"]


def outcome(r, status):
    assert r.status_code == status, r.text
    OperationOutcome.model_validate(r.json())
    return r.json()


# --- interactions -----------------------------------------------------------------------------------

async def test_create_read_update_vread_history(client, store):
    r = await client.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "male"})
    assert r.status_code == 201 and r.headers["etag"] == 'W/"1"'
    pid = r.json()["id"]
    assert r.headers["location"].endswith(f"/fhir/Patient/{pid}/_history/1")
    assert r.headers["last-modified"].endswith("GMT")
    r = await client.get(f"/fhir/Patient/{pid}")
    assert r.status_code == 200 and r.json()["gender"] == "male"
    assert (await client.get(f"/fhir/Patient/{pid}", headers={"If-None-Match": 'W/"1"'})).status_code == 304
    r = await client.put(f"/fhir/Patient/{pid}", json={"resourceType": "Patient", "id": pid, "gender": "female"},
                         headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.headers["etag"] == 'W/"2"' and r.json()["meta"]["versionId"] == "2"
    outcome(await client.put(f"/fhir/Patient/{pid}", json={"resourceType": "Patient", "id": pid},
                             headers={"If-Match": 'W/"1"'}), 412)
    # identical content: no new version
    r = await client.put(f"/fhir/Patient/{pid}", json={"resourceType": "Patient", "id": pid, "gender": "female"})
    assert r.status_code == 200 and r.headers["etag"] == 'W/"2"'
    assert (await client.get(f"/fhir/Patient/{pid}/_history/1")).json()["gender"] == "male"
    assert (await client.get(f"/fhir/Patient/{pid}/_history/2")).headers["etag"] == 'W/"2"'
    outcome(await client.get(f"/fhir/Patient/{pid}/_history/3"), 404)
    h = (await client.get(f"/fhir/Patient/{pid}/_history")).json()
    Bundle.model_validate(h)
    assert h["type"] == "history" and h["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in h["entry"]] == ["2", "1"]
    assert [e["request"]["method"] for e in h["entry"]] == ["PUT", "POST"]
    th = (await client.get("/fhir/Patient/_history", params={"_count": "1"})).json()
    assert th["total"] == 4 and len(th["entry"]) == 1 and any(lk["relation"] == "next" for lk in th["link"])
    # both writes (v1, v2) are waiting in the outbox for the bus, in order
    pending = [(t, i, v) for _, t, i, v, _ in store.outbox_pending()]
    assert pending == [("Patient", pid, 1), ("Patient", pid, 2)]


async def test_update_as_create_and_errors(client):
    r = await client.put("/fhir/Encounter/s1-icu", json=encounter("s1-icu", "p1", "2026-01-03T00:00:00Z"))
    assert r.status_code == 201 and r.headers["etag"] == 'W/"1"'
    outcome(await client.put("/fhir/Encounter/other", json=encounter("s1-icu", "p1", "2026")), 400)
    outcome(await client.put("/fhir/Observation/o1", json=obs("o1")), 405)
    outcome(await client.post("/fhir/RiskAssessment", json={"resourceType": "RiskAssessment"}), 405)
    outcome(await client.post("/fhir/Patient", content=b"{not json", headers={"content-type": "application/fhir+json"}),
            400)
    outcome(await client.post("/fhir/Patient", json={"resourceType": "Encounter"}), 400)
    outcome(await client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers={"content-type": "text/xml"}),
            415)
    outcome(await client.get("/fhir/Observation/o1", params={"_format": "xml"}), 406)
    outcome(await client.get("/fhir/Observation/o1", headers={"Accept": "application/fhir+xml"}), 406)
    r = await client.get("/fhir/Observation/o1", params={"_format": "application/fhir+json", "_pretty": "true"})
    assert r.status_code == 200 and b"\n  " in r.content
    outcome(await client.delete("/fhir/Patient/p1"), 405)
    # update-as-create with an id FHIR does not allow: a bad request, not "not found"
    o = outcome(await client.put("/fhir/Patient/bad_id!", json={"resourceType": "Patient", "id": "bad_id!"}), 400)
    assert o["issue"][0]["code"] == "invalid" and "id" in o["issue"][0]["diagnostics"]


async def test_token_search_with_escaped_pipe(client, store):
    store.upsert_many([{**patient("pipe1"), "identifier": [{"system": "urn:acme", "value": "A|7"}]}])
    assert await ids(client, "Patient", {"identifier": "urn:acme|A\\|7"}) == ["pipe1"]
    assert await ids(client, "Patient", {"identifier": "A\\|7"}) == ["pipe1"]


async def test_instance_history_since_after_last_change_is_empty_not_404(client):
    # http.html#history: _since narrows the versions; an existing resource with none in the window is an
    # empty history Bundle, not "not found"
    r = await client.get("/fhir/Patient/p1/_history", params={"_since": "2099-01-01"})
    assert r.status_code == 200, r.text
    h = r.json()
    Bundle.model_validate(h)
    assert h["type"] == "history" and h["total"] == 0 and not h.get("entry")
    r = await client.get("/fhir/Patient/p1/_history", params={"_offset": "5"})  # a page past the end
    assert r.status_code == 200 and r.json()["total"] == 1 and not r.json().get("entry")
    outcome(await client.get("/fhir/Patient/nobody/_history", params={"_since": "2099-01-01"}), 404)
    outcome(await client.get("/fhir/Patient/nobody/_history"), 404)


@pytest.mark.parametrize("method, path, body, code, where", [
    ("put", "/fhir/Encounter/bad1", {"resourceType": "Encounter", "id": "bad1", "status": "planned"},
     "required", "Encounter.class"),
    ("put", "/fhir/Encounter/bad2", {"resourceType": "Encounter", "id": "bad2", "class": {"code": "IMP"}},
     "required", "Encounter.status"),
    ("put", "/fhir/Encounter/bad3", {"resourceType": "Encounter", "id": "bad3", "status": "admitted",
                                     "class": {"code": "IMP"}}, "code-invalid", "Encounter.status"),
    ("put", "/fhir/Encounter/bad4", {"resourceType": "Encounter", "id": "bad4", "status": "planned",
                                     "class": {"code": "IMP"}, "period": {"start": "2026-13-01"}},
     "value", "Encounter.period.start"),
    ("put", "/fhir/Patient/bad5", {"resourceType": "Patient", "id": "bad5", "birthDate": "04/03/1950"},
     "value", "Patient.birthDate"),
    ("post", "/fhir/Patient", {"resourceType": "Patient", "gender": "F"}, "code-invalid", "Patient.gender"),
    ("post", "/fhir/Patient", {"resourceType": "Patient", "name": {"family": "Doe"}}, "structure", "Patient.name"),
    ("post", "/fhir/Patient", {"resourceType": "Patient", "nmae": [{"family": "Doe"}]}, "structure",
     "Patient.nmae"),
    ("post", "/fhir/Patient", {"resourceType": "Patient", "name": [{"family": ["Doe"]}]}, "structure",
     "Patient.name[0].family"),
    # JSON primitives the models alone would coerce (json.html#primitive): booleans, integers, decimals
    ("post", "/fhir/Patient", {"resourceType": "Patient", "active": "yes"}, "structure", "Patient.active"),
    ("post", "/fhir/Patient", {"resourceType": "Patient", "deceasedBoolean": 0}, "structure",
     "Patient.deceasedBoolean"),
    ("post", "/fhir/Patient", {"resourceType": "Patient", "multipleBirthInteger": "2"}, "structure",
     "Patient.multipleBirthInteger"),
    ("post", "/fhir/Patient", {"resourceType": "Patient", "multipleBirthInteger": 2.0}, "structure",
     "Patient.multipleBirthInteger"),
    ("post", "/fhir/Patient", {"resourceType": "Patient", "communication": [
        {"language": {"text": "en"}, "preferred": "true"}]}, "structure", "Patient.communication[0].preferred"),
    ("post", "/fhir/Patient", {"resourceType": "Patient", "extension": [
        {"url": "urn:x", "extension": [{"url": "a", "valueDecimal": "1.5"}]}]}, "structure",
     "Patient.extension[0].extension[0].valueDecimal"),
    ("put", "/fhir/Encounter/bad6", {"resourceType": "Encounter", "id": "bad6", "status": "finished",
                                     "class": {"code": "IMP"}, "length": {"value": "3", "unit": "h"}},
     "structure", "Encounter.length.value"),
])
async def test_writes_failing_basic_validation_are_400_and_not_stored(client, store, method, path, body, code,
                                                                      where):
    # http.html#create/#update: a resource that fails basic FHIR validation is refused with 400 and an
    # OperationOutcome naming the element; nothing is stored or queued for the bus
    before = len(store.outbox_pending())
    r = await getattr(client, method)(path, json=body)
    o = outcome(r, 400)
    assert any(i["code"] == code and i["expression"] == [where] for i in o["issue"]), o
    assert len(store.outbox_pending()) == before
    if method == "put":
        outcome(await client.get(path), 404)


async def test_valid_writes_pass_validation(client):
    # the store's own elements are not judged: a stale or odd meta.lastUpdated is replaced, and the id of
    # a create is assigned by the server
    body = {**patient("ok1"), "meta": {"versionId": "9", "lastUpdated": "yesterday"}, "active": True,
            "extension": [{"url": "urn:x", "valueString": "y"}], "_gender": {"id": "g"}}
    r = await client.put("/fhir/Patient/ok1", json=body)
    assert r.status_code == 201, r.text
    r = await client.post("/fhir/Patient", json={**patient("x"), "id": "not a valid id!"})
    assert r.status_code == 201, r.text
    r = await client.put("/fhir/Encounter/ok2", json=encounter("ok2", "p1", "2026-01-03T00:00:00+01:00"))
    assert r.status_code == 201, r.text
    r = await client.put("/fhir/Encounter/ok3", json={**encounter("ok3", "p1", "2026-01-03T00:00:00+01:00"),
                                                       "length": {"value": 3, "unit": "h"}, "extension": [
                                                           {"url": "urn:d", "valueDecimal": 1.5},
                                                           {"url": "urn:b", "valueBoolean": False},
                                                           {"url": "urn:i", "valueInteger": -2}]})
    assert r.status_code == 201, r.text
    r = await client.put("/fhir/Patient/ok4", json={**patient("ok4"), "multipleBirthInteger": 2,
                                                     "communication": [{"language": {"text": "en"},
                                                                        "preferred": True}]})
    assert r.status_code == 201, r.text


async def test_conditional_create(client):
    body = {"resourceType": "Patient", "identifier": [{"system": PN, "value": "p1"}]}
    r = await client.post("/fhir/Patient", json=body, headers={"If-None-Exist": f"identifier={PN}|p1"})
    assert r.status_code == 200 and r.json()["id"] == "p1"
    r = await client.post("/fhir/Patient", json=body, headers={"If-None-Exist": f"identifier={PN}|new"})
    assert r.status_code == 201
    outcome(await client.post("/fhir/Patient", json=body, headers={"If-None-Exist": f"identifier={PN}|"}), 412)
    r = await client.post("/fhir/Patient", json=body, headers={"If-None-Exist": f"identifier={PN}|x",
                                                               "Prefer": "return=minimal"})
    assert r.status_code == 201 and r.content == b"" and r.headers["location"]


# --- search parameters ------------------------------------------------------------------------------

async def test_reference_and_token_params(client):
    assert await ids(client, "Observation", {"subject": "Patient/p1", "_sort": "_id"}) == ["o1", "o2", "o3", "o5"]
    assert await ids(client, "Observation", {"subject": "p1", "_sort": "_id"}) == ["o1", "o2", "o3", "o5"]
    assert await ids(client, "Observation", {"patient": "p2"}) == ["o4"]
    assert await ids(client, "Observation", {"subject:Patient": "p2"}) == ["o4"]
    assert await ids(client, "Observation", {"subject": "p1,p2", "code": RR}) == ["o3"]
    assert await ids(client, "Observation", {"code": f"{LOINC}|{RR}"}) == ["o3"]
    assert await ids(client, "Observation", {"code": f"|{RR}"}) == []
    assert await ids(client, "Observation", {"code": f"{LOINC}|", "_sort": "-_id"}) == ["o5", "o4", "o3", "o2", "o1"]
    assert await ids(client, "Observation", {"code:not": HR}) == ["o3"]
    assert await ids(client, "Observation", {"category": "laboratory"}) == ["o4"]
    assert await ids(client, "Observation", {"category": f"{CAT}|vital-signs", "subject": "p2"}) == []
    assert await ids(client, "Observation", {"status": "preliminary"}) == ["o3"]
    assert await ids(client, "Observation", {"device": "Device/d2"}) == ["o4"]
    assert await ids(client, "Observation", {"device": "d1", "_sort": "_id"}) == ["o1", "o2", "o3"]
    assert await ids(client, "Observation", {"device:missing": "true"}) == ["o5"]
    assert await ids(client, "Observation", {"encounter": "e1"}) == ["o1"]
    assert await ids(client, "Observation", {"identifier": "urn:vigil:reading|o2"}) == ["o2"]
    assert await ids(client, "Observation", {"_id": "o2,o4", "_sort": "_id"}) == ["o2", "o4"]
    assert await ids(client, "RiskAssessment", {"subject": "p1", "encounter": "Encounter/e1"}) == ["ra1"]
    assert await ids(client, "Encounter", {"part-of": "e0"}) == ["e1"]
    assert await ids(client, "Encounter", {"patient": "p1", "status": "in-progress", "_sort": "date"}) == ["e0", "e1"]
    assert await ids(client, "Device", {"patient": "p1"}) == ["d1"]
    assert await ids(client, "Patient", {"identifier": f"{PN}|p2"}) == ["p2"]
    assert await ids(client, "Patient", {"gender": "male"}) == ["p2"]
    assert await ids(client, "Patient", {"family": "mul"}) == ["p2"]   # starts-with, accent/case-insensitive
    assert await ids(client, "Patient", {"family:exact": "Müller"}) == ["p2"]
    assert await ids(client, "Patient", {"family:exact": "müller"}) == []
    assert await ids(client, "Patient", {"name:contains": "oe"}) == ["p1"]
    assert await ids(client, "Patient", {"birthdate": "1960"}) == ["p2"]


@pytest.mark.parametrize("value, expected", [
    ("2026-01-01", ["o1", "o2"]),
    ("eq2026-01-01T10:00:00Z", ["o1"]),
    ("ne2026-01-01", ["o3", "o4"]),
    ("lt2026-01-01T11:00:00Z", ["o1", "o4"]),
    ("le2026-01-01T11:00:00Z", ["o1", "o2", "o4"]),
    ("gt2026-01-01", ["o3"]),
    ("ge2026-01-01T11:00:00Z", ["o2", "o3"]),
    ("sa2026-01-01T10:00", ["o2", "o3"]),
    ("eb2026", ["o4"]),
    ("2025", ["o4"]),
    ("ge2026-01", ["o1", "o2", "o3"]),
])
async def test_date_prefixes(client, value, expected):
    assert await ids(client, "Observation", {"date": value, "_sort": "_id"}) == expected


async def test_date_combinations_and_missing(client):
    got = await ids(client, "Observation", {"subject": "p1", "code": f"{LOINC}|{HR}", "date": ["ge2026-01-01",
                                                                                              "lt2026-01-01T11:00"]})
    assert got == ["o1"]
    assert await ids(client, "Observation", {"date:missing": "true"}) == ["o5"]
    # an open period (no end) is not contained in a day (eq), but starts after the 31st (sa)
    assert await ids(client, "Encounter", {"date": "2026-01-01"}) == []
    assert await ids(client, "Encounter", {"date": "sa2025-12-31"}) == ["e1"]
    # ap: within 10% of the distance to now
    near = await ids(client, "Observation", {"date": "ap2026-01-02T10:00:00Z", "_sort": "_id"})
    assert "o3" in near and "o5" not in near
    assert await ids(client, "Observation", {"_lastUpdated": "ge2000-01-01", "_count": "1"}) != []
    assert await ids(client, "Observation", {"_lastUpdated": "lt2000-01-01"}) == []


async def test_sort_count_total_summary_elements(client):
    assert await ids(client, "Observation", {"subject": "p1"}) == ["o3", "o2", "o1", "o5"]  # newest first
    assert await ids(client, "Observation", {"subject": "p1", "_sort": "date"}) == ["o1", "o2", "o3", "o5"]
    assert await ids(client, "Observation", {"_sort": "-date,_id"}) == ["o3", "o2", "o1", "o4", "o5"]
    assert await ids(client, "Observation", {"_sort": "_lastUpdated,-_id", "_count": "2"}) == ["o5", "o4"]
    b = (await client.get("/fhir/Observation", params={"_summary": "count"})).json()
    assert b["total"] == 5 and "entry" not in b
    b = (await client.get("/fhir/Observation", params={"_total": "none", "_count": "2"})).json()
    assert "total" not in b and len(b["entry"]) == 2 and any(lk["relation"] == "next" for lk in b["link"])
    b = (await client.get("/fhir/Observation", params={"_count": "100000"})).json()
    assert "_count=1000" in b["link"][0]["url"]
    b = (await client.get("/fhir/Observation", params={"_id": "o1", "_elements": "status"})).json()
    res = b["entry"][0]["resource"]
    assert set(res) == {"resourceType", "id", "meta", "status"} and res["meta"]["tag"][0]["code"] == "SUBSETTED"


async def test_include_revinclude(client):
    b = (await client.get("/fhir/Observation", params={"_id": "o1", "_include": ["Observation:subject",
                                                                                  "Observation:encounter"]})).json()
    modes = sorted((e["search"]["mode"], e["resource"]["resourceType"]) for e in b["entry"])
    assert modes == [("include", "Encounter"), ("include", "Patient"), ("match", "Observation")]
    b = (await client.get("/fhir/Patient", params={"_id": "p1", "_revinclude": ["RiskAssessment:subject",
                                                                                 "Encounter:patient"]})).json()
    inc = sorted(e["resource"]["id"] for e in b["entry"] if e["search"]["mode"] == "include")
    assert inc == ["e0", "e1", "ra1"]
    r = await client.get("/fhir/Observation", params={"_include": "Observation:status"})
    outcome(r, 400)


async def test_unknown_params_lenient_or_strict(client):
    b = (await client.get("/fhir/Observation", params={"subject": "p2", "bogus": "1"})).json()
    assert [e["resource"]["id"] for e in b["entry"] if e["search"]["mode"] == "match"] == ["o4"]
    assert any(e["search"]["mode"] == "outcome" for e in b["entry"])
    outcome(await client.get("/fhir/Observation", params={"bogus": "1"}, headers={"Prefer": "handling=strict"}), 400)


async def test_post_search(client):
    r = await client.post("/fhir/Observation/_search", data={"subject": "p2"})
    assert r.status_code == 200 and [e["resource"]["id"] for e in r.json()["entry"]] == ["o4"]


async def test_paging_stays_correct_while_data_arrives(client, store):
    store.upsert_many([obs(f"x{i:02d}", patient="p9", when=f"2026-02-01T10:{i:02d}:00Z") for i in range(10)])
    r = (await client.get("/fhir/Observation", params={"subject": "p9", "code": f"{LOINC}|{HR}", "_count": "4"})).json()
    seen = [e["resource"]["id"] for e in r["entry"]]
    # new readings arrive, newer and older than the current page
    store.upsert_many([obs(f"y{i:02d}", patient="p9", when=f"2026-02-01T{9 + 2 * (i % 2):02d}:30:00Z")
                       for i in range(6)])
    links = {lk["relation"]: lk["url"] for lk in r["link"]}
    while "next" in links:
        page = (await client.get(links["next"].removeprefix("http://127.0.0.1:8080"))).json()
        seen += [e["resource"]["id"] for e in page["entry"]]
        links = {lk["relation"]: lk["url"] for lk in page["link"]}
    assert seen == [f"x{i:02d}" for i in range(9, -1, -1)]
    prev = (await client.get(links["previous"].removeprefix("http://127.0.0.1:8080"))).json()
    assert [e["resource"]["id"] for e in prev["entry"]] == ["x05", "x04", "x03", "x02"]
    # a fresh search sees everything
    assert len(await ids(client, "Observation", {"subject": "p9", "_count": "100"})) == 16


async def test_bus_echo_never_adds_a_version(store):
    from vigil_gateway.store import UpsertCounts
    w1 = store.write(patient("px"), create=False)
    w2 = store.write({**patient("px"), "gender": "male"}, create=False)
    assert (w1.outcome, w2.outcome) == ("created", "updated")
    # the v1 message redelivered from VIGIL_EHR after v2 was stored: not applied
    assert store.upsert_many([w1.resource], stale_guard=True) == UpsertCounts(unchanged=1)
    assert store.upsert_many([w2.resource], stale_guard=True) == UpsertCounts(unchanged=1)
    assert store.read("Patient", "px")["meta"]["versionId"] == "2"
