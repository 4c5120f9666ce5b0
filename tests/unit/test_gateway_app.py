"""The FHIR REST API on an embedded SQLite store, through the ASGI interface (no auth)."""
from __future__ import annotations

import datetime as dt
import email.utils

import httpx
import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.riskassessment import RiskAssessment
from vigil_gateway.app import create_app
from vigil_gateway.bootstrap import build_store

from vigil.settings import Settings

LOINC = "http://loinc.org"
BASE = "http://127.0.0.1:8080/fhir"


def observation(oid, patient="p1", code="8867-4", minute=0, value=80.0):
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "subject": {"reference": f"Patient/{patient}"},
            "effectiveDateTime": f"2026-01-01T10:{minute:02d}:00Z",
            "valueQuantity": {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org",
                              "code": "/min"}}


def risk(rid, patient="p1"):
    return {"resourceType": "RiskAssessment", "id": rid, "status": "final",
            "subject": {"reference": f"Patient/{patient}"}, "occurrenceDateTime": "2026-01-01T11:00:00Z",
            "method": {"text": "vigil-sepsis xgboost"},
            "prediction": [{"outcome": {"text": "Sepsis within 6 hours"}, "probabilityDecimal": 0.12}]}


class Boom:
    """A store whose every call fails: for the 500 path."""
    dialect = "broken"

    def __getattr__(self, name):
        def fail(*a, **k):
            raise RuntimeError("database on fire")
        return fail


@pytest.fixture
def store(tmp_path):
    s = build_store(f"sqlite:///{tmp_path}/gw.db")
    s.migrate()
    s.upsert_many([observation(f"hr-{i}", minute=i) for i in range(7)]
                  + [observation("spo2-1", code="59408-5"), observation("other", patient="p2"),
                     risk("ra-1"), risk("ra-2", patient="p2")])
    yield s
    s.close()


@pytest.fixture
async def client(store):
    app = create_app(Settings(), store, None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c


def assert_outcome(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    OperationOutcome.model_validate(body)
    assert body["issue"][0]["code"] == code and body["issue"][0]["severity"] == "error"
    return body


async def test_metadata(client):
    r = await client.get("/fhir/metadata")
    assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
    cs = r.json()
    CapabilityStatement.model_validate({**cs, "fhirVersion": "4.3.0"})  # R4B model; shape check
    assert cs["fhirVersion"] == "4.0.1" and "security" not in cs["rest"][0]
    types = {res["type"]: res for res in cs["rest"][0]["resource"]}
    assert set(types) == {"Observation", "RiskAssessment", "Patient", "Encounter", "Device"}
    assert {"_id", "_lastUpdated", "subject", "patient", "code", "category", "date", "device", "status",
            "encounter", "identifier", "value-quantity"} == {p["name"] for p in types["Observation"]["searchParam"]}
    assert {"_id", "_lastUpdated", "subject", "patient", "date", "encounter", "identifier", "method", "risk", "probability",
            "performer"} == {p["name"] for p in types["RiskAssessment"]["searchParam"]}
    kinds = {p["name"]: p["type"] for p in types["RiskAssessment"]["searchParam"]}
    assert (kinds["probability"], kinds["risk"]) == ("number", "token")
    assert {p["name"]: p["type"] for p in types["Observation"]["searchParam"]}["value-quantity"] == "quantity"
    assert [i["code"] for i in types["Observation"]["interaction"]] == \
        ["read", "vread", "history-instance", "history-type", "search-type"]
    assert {"create", "update"} <= {i["code"] for i in types["Patient"]["interaction"]}
    # read answers If-None-Match and If-Modified-Since with 304: conditional read "full-support" (http.html#cread)
    assert {res["conditionalRead"] for res in types.values()} == {"full-support"}
    assert types["Patient"]["versioning"] == "versioned-update" and types["Observation"]["versioning"] == "versioned"


async def test_conditional_read_as_the_capability_statement_says(client):
    cs = (await client.get("/fhir/metadata")).json()
    obs = next(res for res in cs["rest"][0]["resource"] if res["type"] == "Observation")
    assert obs["conditionalRead"] == "full-support"
    r = await client.get("/fhir/Observation/hr-3", headers={"If-None-Match": 'W/"1"'})
    assert r.status_code == 304 and r.headers["etag"] == 'W/"1"'
    assert (await client.get("/fhir/Observation/hr-3", headers={"If-None-Match": 'W/"0"'})).status_code == 200
    # If-Modified-Since (RFC 9110 13.1.3), compared to the second as Last-Modified carries it
    modified = email.utils.parsedate_to_datetime((await client.get("/fhir/Observation/hr-3")).headers["last-modified"])
    for delta, status in ((0, 304), (3600, 304), (-1, 200), (-86400, 200)):
        when = email.utils.format_datetime(modified + dt.timedelta(seconds=delta), usegmt=True)
        r = await client.get("/fhir/Observation/hr-3", headers={"If-Modified-Since": when})
        assert r.status_code == status, (delta, r.status_code)
        assert r.headers["etag"] == 'W/"1"'
    later = email.utils.format_datetime(modified + dt.timedelta(hours=1), usegmt=True)
    # If-None-Match decides when both are sent; an unparsable date is ignored
    r = await client.get("/fhir/Observation/hr-3", headers={"If-None-Match": 'W/"0"', "If-Modified-Since": later})
    assert r.status_code == 200
    for junk in ("yesterday", "Mon, 32 Foo 2026 99:00:00 GMT", ""):
        assert (await client.get("/fhir/Observation/hr-3", headers={"If-Modified-Since": junk})).status_code == 200
    r = await client.get("/fhir/Observation/hr-3/_history/1", headers={"If-Modified-Since": later})
    assert r.status_code == 304


async def test_head_is_read_without_the_body(client):
    full = await client.get("/fhir/Observation/hr-3")
    r = await client.head("/fhir/Observation/hr-3")
    assert r.status_code == 200 and r.content == b""
    for h in ("etag", "last-modified", "content-type", "content-length"):
        assert r.headers[h] == full.headers[h], h
    r = await client.head("/fhir/Observation/hr-3/_history/1")
    assert r.status_code == 200 and r.content == b"" and r.headers["etag"] == 'W/"1"'
    assert (await client.head("/fhir/Observation/nope")).status_code == 404
    assert (await client.head("/fhir/Observation/hr-3", headers={"If-None-Match": 'W/"1"'})).status_code == 304


async def test_head_on_every_get_interaction(client):
    """search, history and capabilities answer HEAD too: the GET's status and headers, no body."""
    for path in ("/fhir/metadata", "/fhir/Observation?subject=Patient/p1", "/fhir/Observation/hr-3/_history",
                 "/fhir/Observation/_history"):
        full = await client.get(path)
        r = await client.head(path)
        assert r.status_code == full.status_code == 200, path
        assert r.content == b"" and r.headers["content-type"] == full.headers["content-type"], path
        assert int(r.headers["content-length"]) > 0, path
    meta = await client.get("/fhir/metadata")  # the same statement each time: the same length
    assert (await client.head("/fhir/metadata")).headers["content-length"] == str(len(meta.content))
    # errors as the GET's (OperationOutcome's status), without the body
    for path, status in (("/fhir/Nope?x=1", 404), ("/fhir/Observation?bogus-param=1", 400)):
        full = await client.get(path, headers={"Prefer": "handling=strict"})
        r = await client.head(path, headers={"Prefer": "handling=strict"})
        assert full.status_code == r.status_code == status and r.content == b"", path
    # HEAD is not a write: a write-only path answers as the GET would (405)
    assert (await client.head("/fhir/Observation/_search")).status_code == \
        (await client.get("/fhir/Observation/_search")).status_code


async def test_read_with_etag_and_last_modified(client):
    r = await client.get("/fhir/Observation/hr-3")
    assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
    assert r.headers["etag"] == 'W/"1"' and r.headers["last-modified"].endswith("GMT")
    assert r.json()["id"] == "hr-3" and r.json()["meta"]["versionId"] == "1"
    r2 = await client.get("/fhir/Observation/hr-3", headers={"If-None-Match": 'W/"1"'})
    assert r2.status_code == 304
    ra = (await client.get("/fhir/RiskAssessment/ra-1")).json()
    RiskAssessment.model_validate(ra)


async def test_search_bundle_paging(client):
    r = await client.get("/fhir/Observation", params={"subject": "Patient/p1", "code": f"{LOINC}|8867-4",
                                                      "_count": "3"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
    bundle = r.json()
    Bundle.model_validate(bundle)
    assert bundle["type"] == "searchset" and bundle["total"] == 7
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["hr-6", "hr-5", "hr-4"]
    assert all(e["search"]["mode"] == "match" for e in bundle["entry"])
    assert bundle["entry"][0]["fullUrl"] == f"{BASE}/Observation/hr-6"
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert links["self"].startswith(f"{BASE}/Observation?") and "previous" not in links
    # follow next links to the end
    ids = [e["resource"]["id"] for e in bundle["entry"]]
    while "next" in links:
        nxt = links["next"].removeprefix("http://127.0.0.1:8080")
        page = (await client.get(nxt)).json()
        Bundle.model_validate(page)
        ids += [e["resource"]["id"] for e in page.get("entry", [])]
        links = {link["relation"]: link["url"] for link in page["link"]}
    assert ids == [f"hr-{i}" for i in range(6, -1, -1)]
    assert "previous" in links


async def test_next_links_keep_format_and_pretty(client):
    r = await client.get("/fhir/Observation", params={"subject": "p1", "_count": "2", "_format": "json",
                                                      "_pretty": "true"})
    assert r.status_code == 200 and b"\n  " in r.content
    links = {lk["relation"]: lk["url"] for lk in r.json()["link"]}
    assert "_format=json" in links["self"] and "_pretty=true" in links["next"]
    page = await client.get(links["next"].removeprefix("http://127.0.0.1:8080"))
    assert page.status_code == 200 and b"\n  " in page.content  # page 2 is pretty as well


async def test_search_forms(client):
    async def ids(path, **params):
        r = await client.get(path, params=params)
        assert r.status_code == 200, r.text
        return r.json()["total"], [e["resource"]["id"] for e in r.json().get("entry", [])]

    assert (await ids("/fhir/Observation", subject="p1", code="59408-5")) == (1, ["spo2-1"])
    assert (await ids("/fhir/Observation", patient="p2")) == (1, ["other"])
    assert (await ids("/fhir/Observation", subject="p1", patient="p2")) == (0, [])
    assert (await ids("/fhir/RiskAssessment", subject="Patient/p1")) == (1, ["ra-1"])
    assert (await ids("/fhir/RiskAssessment", patient="p2")) == (1, ["ra-2"])
    total, entries = await ids("/fhir/Observation", _count="0")
    assert total == 9 and entries == []
    bundle = (await client.get("/fhir/RiskAssessment", params={"subject": "p1"})).json()
    Bundle.model_validate(bundle)
    RiskAssessment.model_validate(bundle["entry"][0]["resource"])

    # number and quantity parameters over HTTP; a value that is not a number is an OperationOutcome
    assert (await ids("/fhir/Observation", **{"value-quantity": "gt79|http://unitsofmeasure.org|/min",
                                              "subject": "p2"})) == (1, ["other"])
    assert (await ids("/fhir/Observation", **{"value-quantity": "lt79"})) == (0, [])
    assert (await ids("/fhir/RiskAssessment", probability="0.12", subject="p2")) == (1, ["ra-2"])
    assert (await ids("/fhir/RiskAssessment", probability="gt0.2")) == (0, [])
    outcome = assert_outcome(await client.get("/fhir/RiskAssessment", params={"probability": "high"}), 400,
                             "invalid")
    assert "probability: 'high' is not a number" in outcome["issue"][0]["diagnostics"]
    assert_outcome(await client.get("/fhir/Observation", params={"value-quantity": "5|sys|"}), 400, "invalid")
    assert_outcome(await client.get("/fhir/RiskAssessment", params={"probability:exact": "0.1"},
                                    headers={"Prefer": "handling=strict"}), 400, "not-supported")


async def test_errors_are_operation_outcomes(client):
    assert_outcome(await client.get("/fhir/Observation/nope"), 404, "not-found")
    assert_outcome(await client.get("/fhir/Patient/p1"), 404, "not-found")
    assert_outcome(await client.get("/fhir/Medication"), 404, "not-supported")
    assert_outcome(await client.get("/fhir/Observation", params={"_count": "-1"}), 400, "invalid")
    assert_outcome(await client.get("/fhir/Observation", params={"_count": "x"}), 400, "invalid")
    strict = {"Prefer": "handling=strict"}
    assert_outcome(await client.get("/fhir/Observation", params={"bogus": "1"}, headers=strict), 400,
                   "not-supported")
    assert_outcome(await client.get("/fhir/RiskAssessment", params={"code": "1"}, headers=strict), 400,
                   "not-supported")
    assert_outcome(await client.get("/fhir/Observation/a/b/c"), 404, "not-found")
    assert_outcome(await client.get("/nothing-here"), 404, "not-found")
    r = await client.post("/fhir/Observation", content=b'{"resourceType": "Observation"}')
    assert_outcome(r, 405, "not-supported")
    assert_outcome(await client.delete("/fhir/Observation/hr-1"), 405, "not-supported")


@pytest.mark.parametrize("method, path", [
    ("post", "/fhir"),                          # batch / transaction
    ("get", "/fhir?_id=hr-1"),                  # system-level search
    ("post", "/fhir/_search"),
    ("get", "/fhir/_history"),                  # system-level history
    ("get", "/fhir/$export"),                   # operations, at every level
    ("get", "/fhir/Patient/$everything"),
    ("get", "/fhir/Patient/p1/$everything"),
    ("post", "/fhir/Observation/$validate"),
    ("get", "/fhir/Observation/hr-1/_history/1/$meta"),
])
async def test_unsupported_interactions_are_405(client, method, path):
    # docs/fhir-api.md: batch/transaction, system-level search and history and $operations -> 405
    # (not 404 "no such endpoint", nor "_history is not a resource type", nor "$everything is not an id")
    body = assert_outcome(await client.request(method.upper(), path), 405, "not-supported")
    assert "not supported" in body["issue"][0]["diagnostics"]


async def test_history_count_must_be_ascii_digits(client):
    # '²'.isdigit() is True but int('²') fails: that was a 500
    assert_outcome(await client.get("/fhir/Observation/_history", params={"_count": "²"}), 400, "invalid")
    assert_outcome(await client.get("/fhir/Observation/hr-1/_history", params={"_offset": "٣"}), 400, "invalid")



@pytest.mark.parametrize("value", ["５", " 5", "+5", "1_0", "-1", "5.0", ""])
async def test_paging_numbers_are_ascii_digits_on_every_endpoint(client, value):
    # one parser (search_params.non_negative_int) for search, history and AuditEvent paging
    for path in ("/fhir/Observation", "/fhir/Observation/_history", "/fhir/Observation/hr-1/_history"):
        for name in ("_count", "_offset"):
            body = assert_outcome(await client.get(path, params={name: value}), 400, "invalid")
            assert name in body["issue"][0]["diagnostics"], (path, name)
    assert (await client.get("/fhir/Observation", params={"_count": "007"})).status_code == 200


async def test_audit_event_date_prefixes_are_ranges(client):
    import datetime as dt
    assert (await client.get("/fhir/Observation/hr-1")).status_code == 200  # leaves an AuditEvent now
    now = dt.datetime.now(dt.UTC)
    day = now.date().isoformat()
    plus5 = dt.timezone(dt.timedelta(hours=5))
    hour_ago, in_an_hour = ((now + dt.timedelta(hours=h)).astimezone(plus5).strftime("%Y-%m-%dT%H:%M%z")
                            for h in (-1, 1))

    async def total(*dates):
        r = await client.get("/fhir/AuditEvent", params={"date": list(dates)})
        assert r.status_code == 200, r.text
        return r.json()["total"]

    # search.html#prefix: a day is a range. Today's events are "le today" and "ge today", not "gt today"
    assert await total(f"le{day}") >= 1 and await total(f"ge{day}") >= 1 and await total(day) >= 1
    assert await total(f"gt{day}") == 0 and await total(f"lt{day}") == 0
    # a zone offset is applied before comparing (+0500 written as +05:00)
    assert await total("ge" + hour_ago[:-2] + ":" + hour_ago[-2:]) >= 1
    assert await total("ge" + in_an_hour[:-2] + ":" + in_an_hour[-2:]) == 0
    assert await total("lt" + in_an_hour[:-2] + ":" + in_an_hour[-2:]) >= 1
    assert_outcome(await client.get("/fhir/AuditEvent", params={"date": f"{day}T99"}), 400, "invalid")


async def test_unhandled_exception_is_500_outcome():
    app = create_app(Settings(), Boom(), None)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        body = assert_outcome(await c.get("/fhir/Observation/x"), 500, "exception")
        assert "fire" not in orjson.dumps(body).decode()  # no internals leaked
        assert_outcome(await c.get("/readyz"), 503, "transient")


async def test_health(client, store):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200

    class Stopped:
        running = False
    app = create_app(Settings(), store, None, consumer=Stopped())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        assert_outcome(await c.get("/readyz"), 503, "transient")


async def test_custom_base_path(store):
    app = create_app(Settings(fhir_base_path="/api/fhir/", public_base_url="https://vigil.example/api/fhir"),
                     store, None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        bundle = (await c.get("/api/fhir/Observation", params={"patient": "p2"})).json()
        assert bundle["entry"][0]["fullUrl"] == "https://vigil.example/api/fhir/Observation/other"
        assert (await c.get("/fhir/metadata")).status_code == 404
