"""Real OAuth flows against the test Keycloak, for the security tests.

Nothing secret is stored in the repository: the SMART Backend Services key pair is generated here and
only its public JWKS is registered (admin API); the SMART app's test user is created here with a random
password; its `patient` attribute becomes the token's `patient` claim (scope launch/patient).
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import time
import urllib.parse
import uuid

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


class KeycloakAdmin:
    def __init__(self, base_url: str, admin_token: str, realm: str = "vigil"):
        self.base, self.realm = base_url, realm
        self.http = httpx.Client(base_url=f"{base_url}/admin/realms/{realm}", timeout=15,
                                 headers={"Authorization": f"Bearer {admin_token}"})

    def client_uuid(self, client_id: str) -> str:
        r = self.http.get("/clients", params={"clientId": client_id})
        r.raise_for_status()
        return r.json()[0]["id"]

    def update_client(self, client_id: str, **changes) -> None:
        cid = self.client_uuid(client_id)
        rep = self.http.get(f"/clients/{cid}").json()
        attrs = {**rep.get("attributes", {}), **changes.pop("attributes", {})}
        rep.update(changes, attributes=attrs)
        self.http.put(f"/clients/{cid}", json=rep).raise_for_status()

    def register_jwks(self, client_id: str, public_jwks: dict) -> None:
        self.update_client(client_id, attributes={"use.jwks.url": "false", "use.jwks.string": "true",
                                                  "jwks.string": json.dumps(public_jwks)})

    def allow_unmanaged_attributes(self) -> None:
        r = self.http.get("/users/profile")
        r.raise_for_status()
        profile = r.json()
        if profile.get("unmanagedAttributePolicy") != "ADMIN_EDIT":
            profile["unmanagedAttributePolicy"] = "ADMIN_EDIT"
            self.http.put("/users/profile", json=profile).raise_for_status()

    def create_user(self, username: str, password: str, attributes: dict[str, list[str]]) -> None:
        self.allow_unmanaged_attributes()
        r = self.http.post("/users", json={
            "username": username, "enabled": True, "email": f"{username}@example.org", "emailVerified": True,
            "firstName": "Test", "lastName": "Patient", "attributes": attributes, "requiredActions": [],
            "credentials": [{"type": "password", "value": password, "temporary": False}]})
        if r.status_code != 409:
            r.raise_for_status()
            return
        # already there (a second test session on the same Keycloak): new password, same attributes
        uid = self.http.get("/users", params={"username": username, "exact": "true"}).json()[0]["id"]
        rep = self.http.get(f"/users/{uid}").json()
        rep["attributes"] = {**rep.get("attributes", {}), **attributes}
        self.http.put(f"/users/{uid}", json=rep).raise_for_status()
        self.http.put(f"/users/{uid}/reset-password", json={"type": "password", "value": password,
                                                            "temporary": False}).raise_for_status()


def new_rsa_jwk(kid: str) -> tuple[object, dict]:
    """(private key, public JWK) for private_key_jwt (RS384, as SMART Backend Services requires)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update(kid=kid, alg="RS384", use="sig")
    return key, public


def backend_services_token(issuer: str, client_id: str, private_key, kid: str, scope: str | None = None) -> str:
    """SMART Backend Services: client_credentials with a signed client_assertion (private_key_jwt)."""
    token_url = f"{issuer}/protocol/openid-connect/token"
    now = int(time.time())
    assertion = jwt.encode({"iss": client_id, "sub": client_id, "aud": token_url, "jti": str(uuid.uuid4()),
                            "iat": now, "exp": now + 60}, private_key, algorithm="RS384", headers={"kid": kid})
    data = {"grant_type": "client_credentials", "client_assertion_type":
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer", "client_assertion": assertion}
    if scope:
        data["scope"] = scope
    r = httpx.post(token_url, data=data, timeout=15)
    r.raise_for_status()
    return r.json()["access_token"]


def authorization_code_pkce_token(issuer: str, client_id: str, redirect_uri: str, username: str, password: str,
                                  scope: str) -> dict:
    """SMART standalone launch: authorization code + PKCE (S256), driven like a browser. The token response."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(16)
    with httpx.Client(timeout=15, follow_redirects=False) as browser:
        r = browser.get(f"{issuer}/protocol/openid-connect/auth", params={
            "response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "scope": scope,
            "state": state, "code_challenge": challenge, "code_challenge_method": "S256"})
        r.raise_for_status()
        m = re.search(r'<form[^>]*id="kc-form-login"[^>]*action="([^"]+)"', r.text) or \
            re.search(r'action="([^"]+login-actions/authenticate[^"]*)"', r.text)
        assert m, "no login form in the authorization page"
        # Keycloak marks its login cookies Secure; over the test's plain-HTTP loopback httpx would not send
        # them back, so they are passed explicitly (as a browser on http://127.0.0.1 does).
        cookies = "; ".join(f"{c.name}={c.value}" for c in r.cookies.jar)
        r = browser.post(html.unescape(m.group(1)), data={"username": username, "password": password,
                                                          "credentialId": ""}, headers={"Cookie": cookies})
        assert r.status_code in (302, 303), f"login did not redirect: {r.status_code}"
        location = r.headers["location"]
        assert location.startswith(redirect_uri), "redirected elsewhere than the client's redirect URI"
        q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
        assert q.get("state") == state and "code" in q, "no code / wrong state in the redirect"
        r = browser.post(f"{issuer}/protocol/openid-connect/token", data={
            "grant_type": "authorization_code", "code": q["code"], "redirect_uri": redirect_uri,
            "client_id": client_id, "code_verifier": verifier})
        r.raise_for_status()
        return r.json()
