"""Bearer-token auth of the FHIR API against a real Keycloak (realm deploy/keycloak/vigil-realm.json)."""
from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest
from vigil_gateway.app import create_app
from vigil_gateway.bootstrap import build_store, build_validator

from vigil.settings import Settings
from vigil.tokens import TokenError, TokenValidator

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(keycloak, tmp_path):
    store = build_store(f"sqlite:///{tmp_path}/gw.db")
    store.migrate()
    store.upsert_many([{"resourceType": "Observation", "id": "o1", "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                        "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-01-01T10:00:00Z"}])
    settings = Settings(oidc_issuer=keycloak.issuer)
    validator = build_validator(settings)
    assert validator is not None and validator.audience == "vigil-fhir"
    app = create_app(settings, store, validator)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c
    store.close()


def assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="vigil", error="invalid_token"')
    assert r.headers["content-type"] == "application/fhir+json"
    body = r.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "login"


async def test_ehr_token_is_accepted(client, keycloak):
    token = await asyncio.to_thread(keycloak.token, "vigil-ehr")
    auth = {"Authorization": f"Bearer {token}"}
    r = await client.get("/fhir/Observation/o1", headers=auth)
    assert r.status_code == 200 and r.json()["id"] == "o1"
    r = await client.get("/fhir/Observation", params={"subject": "p1"}, headers=auth)
    assert r.status_code == 200 and r.json()["total"] == 1
    # an authenticated request to an unknown type is still a FHIR 404
    assert (await client.get("/fhir/Patient/p1", headers=auth)).status_code == 404


async def test_missing_token_is_401(client):
    assert_401(await client.get("/fhir/Observation/o1"))
    assert_401(await client.get("/fhir/Observation", params={"subject": "p1"}))
    assert_401(await client.get("/fhir/Observation/o1", headers={"Authorization": "Basic dXNlcjpwdw=="}))
    assert_401(await client.get("/fhir/Observation/o1", headers={"Authorization": "Bearer "}))


async def test_metadata_needs_no_token_and_advertises_smart(client):
    r = await client.get("/fhir/metadata")
    assert r.status_code == 200
    service = r.json()["rest"][0]["security"]["service"][0]["coding"][0]
    assert service["code"] == "SMART-on-FHIR"
    assert (await client.get("/healthz")).status_code == 200


async def test_token_without_vigil_audience_is_401(client, keycloak):
    token = await asyncio.to_thread(keycloak.token, "vigil-no-audience")
    r = await client.get("/fhir/Observation/o1", headers={"Authorization": f"Bearer {token}"})
    assert_401(r)
    assert "aud" in r.json()["issue"][0]["diagnostics"]  # no aud claim, or not vigil-fhir


async def test_garbage_and_tampered_tokens_are_401(client, keycloak):
    token = await asyncio.to_thread(keycloak.token, "vigil-ehr")
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    for bad in ("garbage", "a.b.c", f"{head}.{forged}.{sig}", f"{head}.{payload}.", token[:-4] + "AAAA"):
        assert_401(await client.get("/fhir/Observation/o1", headers={"Authorization": f"Bearer {bad}"}))


async def test_wrong_issuer_configuration_rejects_real_tokens(keycloak):
    token = await asyncio.to_thread(keycloak.token, "vigil-ehr")
    # same server, issuer string differs (trailing slash): exact issuer match is required
    v = TokenValidator(keycloak.issuer + "/", "vigil-fhir", jwks_url=f"{keycloak.issuer}/protocol/openid-connect/certs")
    with pytest.raises(TokenError, match="issuer"):
        await v.avalidate(token)
    ok = TokenValidator(keycloak.issuer, "vigil-fhir")
    claims = await ok.avalidate(token)
    assert claims["iss"] == keycloak.issuer
