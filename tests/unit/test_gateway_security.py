"""SMART authorization in the gateway app (scopes, Patient compartment, AuditEvent trail), through the
ASGI interface with a stub validator (claims are given; token validation itself is tested in
test_gateway_tokens.py and, with real Keycloak tokens, in tests/integration/test_security_attacks.py)."""
from __future__ import annotations

import logging

import httpx
import orjson
import pytest
from vigil_gateway.app import _compartment_param, create_app, smart_configuration_document
from vigil_gateway.bootstrap import build_store

from vigil.settings import Settings
from vigil.tokens import TokenError

ISSUER = "https://kc.example/realms/vigil"
CLAIMS = {
    "ehr": {"azp": "vigil-ehr", "scope": "system/*.read system/Patient.write"},
    "pa": {"azp": "vigil-smart-app", "scope": "openid launch/patient patient/*.rs", "patient": "pa"},
    "pa-obs": {"azp": "vigil-smart-app", "scope": "patient/Observation.rs", "patient": "pa"},
    "pa-write": {"azp": "vigil-smart-app", "scope": "patient/Encounter.write", "patient": "pa"},
    "none": {"azp": "vigil-no-scope", "scope": ""},
    "admin": {"azp": "vigil-admin", "scope": "system/AuditEvent.rs"},
    "stranger": {"azp": "not-allowed", "scope": "system/*.read"},
}


class StubValidator:
    async def avalidate(self, token: str) -> dict:
        if token not in CLAIMS:
            raise TokenError("signature verification failed")
        return CLAIMS[token]


def obs(oid, patient):
    return {"resourceType": "Observation", "id": oid, "status": "final", "code": {"text": "hr"},
            "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": "2026-01-01T10:00:00Z"}


@pytest.fixture
async def http(tmp_path):
    store = build_store(f"sqlite:///{tmp_path}/gw.db")
    store.migrate()
    store.upsert_many([{"resourceType": "Patient", "id": "pa"}, {"resourceType": "Patient", "id": "pb"},
                       obs("a1", "pa"), obs("a2", "pa"), obs("b1", "pb"),
                       {"resourceType": "Encounter", "id": "eb", "status": "finished", "class": {"code": "IMP"},
                        "subject": {"reference": "Patient/pb"}}])
    settings = Settings(oidc_issuer=ISSUER, oidc_allowed_clients="vigil-ehr,vigil-smart-app,vigil-no-scope,vigil-admin")
    app = create_app(settings, store, StubValidator())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        c.app = app
        yield c
    store.close()


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {who}"}


def ids(r) -> set[str]:
    return {e["resource"]["id"] for e in r.json().get("entry", [])}


async def test_scopes_per_interaction_and_type(http):
    assert (await http.get("/fhir/Observation/b1", headers=auth("ehr"))).status_code == 200
    r = await http.get("/fhir/Observation/b1", headers=auth("none"))
    assert r.status_code == 403 and r.json()["issue"][0]["code"] == "forbidden"
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    assert (await http.get("/fhir/Patient/pa", headers=auth("pa-obs"))).status_code == 403
    r = await http.put("/fhir/Encounter/e1", headers=auth("ehr"), json={"resourceType": "Encounter", "id": "e1",
                                                                        "status": "planned", "class": {"code": "IMP"}})
    assert r.status_code == 403  # system/*.read and system/Patient.write: no Encounter write


async def test_unknown_signature_and_client_not_allowed_are_401(http):
    r = await http.get("/fhir/Patient/pa", headers=auth("forged"))
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith('Bearer realm="vigil"')
    assert (await http.get("/fhir/Patient/pa", headers=auth("stranger"))).status_code == 401


async def test_patient_token_is_confined(http):
    h = auth("pa")
    assert (await http.get("/fhir/Patient/pa", headers=h)).status_code == 200
    for url in ("/fhir/Patient/pb", "/fhir/Observation/b1", "/fhir/Observation/b1/_history",
                "/fhir/Observation/b1/_history/1", "/fhir/Encounter/eb"):
        assert (await http.get(url, headers=h)).status_code == 404, url
    r = await http.get("/fhir/Observation", headers=h)
    assert r.status_code == 200 and ids(r) == {"a1", "a2"}
    assert (await http.get("/fhir/Observation?subject=Patient/pb", headers=h)).status_code == 403
    r = await http.get("/fhir/Observation?_include=Observation:subject", headers=h)
    assert ids(r) == {"a1", "a2", "pa"}
    r = await http.get("/fhir/Patient?_revinclude=Observation:subject&_id=pa,pb", headers=h)
    assert ids(r) == {"pa", "a1", "a2"}
    r = await http.get("/fhir/Observation?_count=1&_offset=2", headers=h)  # a page past A's data
    assert ids(r) == set()
    assert (await http.get("/fhir/Observation/_history", headers=h)).status_code == 403


async def test_include_needs_a_scope_for_the_included_type(http):
    r = await http.get("/fhir/Observation?_include=Observation:subject", headers=auth("pa-obs"))
    assert r.status_code == 200 and ids(r) == {"a1", "a2"}  # no Patient scope: the Patient is not included


async def test_patient_token_writes_only_its_own_compartment(http):
    h = auth("pa-write")
    enc = {"resourceType": "Encounter", "status": "planned", "class": {"code": "IMP"}}
    r = await http.put("/fhir/Encounter/ea", headers=h, json={**enc, "id": "ea", "subject": {"reference": "Patient/pa"}})
    assert r.status_code == 201, r.text
    r = await http.put("/fhir/Encounter/ex", headers=h, json={**enc, "id": "ex", "subject": {"reference": "Patient/pb"}})
    assert r.status_code == 403
    # taking over B's encounter by re-pointing it at A
    r = await http.put("/fhir/Encounter/eb", headers=h, json={**enc, "id": "eb", "subject": {"reference": "Patient/pa"}})
    assert r.status_code == 403


async def test_audit_trail(http, caplog):
    caplog.set_level(logging.DEBUG)
    await http.get("/fhir/Observation/b1", headers=auth("pa"))
    await http.get("/fhir/Observation?code=hr", headers=auth("ehr"))
    await http.get("/fhir/Patient/pa")
    assert (await http.get("/fhir/AuditEvent", headers=auth("ehr"))).status_code == 403
    r = await http.get("/fhir/AuditEvent", headers=auth("admin"))
    assert r.status_code == 200
    events = [e["resource"] for e in r.json()["entry"]]
    by = {(e["subtype"][0]["code"], e["agent"][0]["who"]["display"], e["outcome"]) for e in events}
    assert {("read", "vigil-smart-app", "4"), ("search-type", "vigil-ehr", "0"), ("read", "anonymous", "4"),
            ("search-type", "vigil-ehr", "4")} <= by
    r = await http.get("/fhir/AuditEvent?patient=pb&agent=vigil-smart-app", headers=auth("admin"))
    assert [e["resource"]["outcomeDesc"] for e in r.json()["entry"]] == ["HTTP 404"]
    r = await http.get("/fhir/AuditEvent?date=ge2000-01-01&date=lt2000-01-02", headers=auth("admin"))
    assert r.json()["total"] == 0
    ours = [rec.getMessage() for rec in caplog.records if rec.name.startswith("vigil")]  # (httpx is the test client)
    assert not [m for m in ours if "pb" in m or "b1" in m]


def test_compartment_params():
    assert _compartment_param("Patient", "x") == ("_id", "x")
    assert _compartment_param("Observation", "x") == ("subject", "Patient/x")
    assert _compartment_param("Device", "x") == ("patient", "Patient/x")


def test_smart_configuration_document():
    doc = smart_configuration_document(ISSUER, {"issuer": ISSUER, "jwks_uri": f"{ISSUER}/certs",
                                                "authorization_endpoint": f"{ISSUER}/auth",
                                                "token_endpoint": f"{ISSUER}/token"})
    assert doc["token_endpoint"] == f"{ISSUER}/token" and doc["code_challenge_methods_supported"] == ["S256"]
    assert "private_key_jwt" in doc["token_endpoint_auth_methods_supported"]
    assert "introspection_endpoint" not in doc


async def test_authentication_comes_before_the_body_is_read(http):
    """A caller without a valid token gets 401 whatever its body is: the gateway does not tell it whether
    the JSON, the content type or the resource would have been accepted."""
    bad = {"content-type": "application/fhir+json"}
    for headers in (bad, {**bad, **auth("forged")}):
        for r in (await http.post("/fhir/Patient", content=b"{not json", headers=headers),
                  await http.put("/fhir/Patient/pa", content=b"{not json", headers=headers),
                  await http.post("/fhir/Patient", json={"resourceType": "Patient", "gender": "robot"},
                                  headers=headers),
                  await http.put("/fhir/Encounter/e1", content=b"x", headers={**headers, "content-type": "text/plain"}),
                  await http.post("/fhir/Observation/_search", content=b"subject=Patient/pa",
                                  headers={**headers, "content-type": "text/plain"})):
            assert r.status_code == 401, (r.request.method, r.request.url, r.text)
            assert r.json()["issue"][0]["code"] == "login"
    # With a valid token the same bodies get their precise errors.
    r = await http.post("/fhir/Patient", content=b"{not json", headers={**bad, **auth("ehr")})
    assert r.status_code == 400 and r.json()["issue"][0]["code"] == "structure"
    r = await http.post("/fhir/Observation/_search", content=b"subject=Patient/pa",
                        headers={**auth("ehr"), "content-type": "text/plain"})
    assert r.status_code == 415
    r = await http.post("/fhir/Patient", json={"resourceType": "Patient", "id": "pz", "gender": "robot"},
                        headers={**bad, **auth("ehr")})
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["Patient.gender"]
    # A POST search with a valid token runs (authenticated once, then authorized for its patient).
    r = await http.post("/fhir/Observation/_search", content=b"subject=Patient/pa",
                        headers={**auth("pa"), "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and ids(r) == {"a1", "a2"}


async def test_a_token_without_the_scope_gets_403_before_its_body_is_judged(http):
    """A valid token whose scopes do not cover the write (or the search) gets 403 whatever its body is,
    as the token without any credentials gets 401: its body is not read, let alone judged."""
    fhir = {"content-type": "application/fhir+json"}
    cases = [  # "ehr" has system/*.read and system/Patient.write: no Encounter write
        ("ehr", "PUT", "/fhir/Encounter/e1", b"{not json", fhir),
        ("ehr", "POST", "/fhir/Encounter", orjson.dumps({"resourceType": "Encounter", "status": "robot"}), fhir),
        ("ehr", "PUT", "/fhir/Encounter/e1", b"x", {"content-type": "text/plain"}),
        ("none", "POST", "/fhir/Patient", b"{not json", fhir),
        ("none", "POST", "/fhir/Observation/_search", b"subject=Patient/pa", {"content-type": "text/plain"}),
        ("pa-obs", "PUT", "/fhir/Encounter/ea", orjson.dumps({"resourceType": "Patient"}), fhir),
    ]
    for who, method, url, body, headers in cases:
        r = await http.request(method, url, content=body, headers={**headers, **auth(who)})
        assert r.status_code == 403, (who, method, url, r.text)
        assert r.json()["issue"][0]["code"] == "forbidden"
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    # A token holding the scope gets the precise error for the same kind of body...
    r = await http.put("/fhir/Encounter/ea", content=b"{not json", headers={**fhir, **auth("pa-write")})
    assert r.status_code == 400 and r.json()["issue"][0]["code"] == "structure"
    # ...and its compartment is still checked against the body once it is read.
    enc = {"resourceType": "Encounter", "id": "ex", "status": "planned", "class": {"code": "IMP"},
           "subject": {"reference": "Patient/pb"}}
    r = await http.put("/fhir/Encounter/ex", content=orjson.dumps(enc), headers={**fhir, **auth("pa-write")})
    assert r.status_code == 403
