"""vigil.tokens.TokenValidator against a real (local, in-process) OIDC discovery + JWKS HTTP server."""
from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vigil.tokens import KeyFetchError, TokenError, TokenValidator

AUD = "vigil-fhir"


def _jwk(key, kid: str, alg: str) -> dict:
    algo = jwt.algorithms.RSAAlgorithm if alg.startswith(("RS", "PS")) else jwt.algorithms.ECAlgorithm
    d = json.loads(algo.to_jwk(key.public_key()))
    return {**d, "kid": kid, "alg": alg, "use": "sig"}


class Issuer:
    """Serves /.well-known/openid-configuration and /jwks; counts JWKS fetches."""

    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.keys = [_jwk(self.rsa, "rsa1", "RS256"), _jwk(self.ec, "ec1", "ES256"),
                     {"kty": "RSA", "use": "enc", "kid": "enc1", "n": "AQAB", "e": "AQAB"}]
        self.jwks_fetches = 0
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/realms/t/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.base + "/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_fetches += 1
                    body = {"keys": issuer.keys}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.base + "/realms/t"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, *, key=None, kid="rsa1", alg="RS256", **claims) -> str:
        now = int(time.time())
        payload = {"iss": self.url, "aud": AUD, "exp": now + 300, "iat": now, "sub": "client"}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key if key is not None else self.rsa, algorithm=alg, headers={"kid": kid})


@pytest.fixture(scope="module")
def issuer():
    i = Issuer()
    yield i
    i.httpd.shutdown()


def test_valid_rsa_and_ec_tokens(issuer):
    v = TokenValidator(issuer.url, AUD)
    assert v.validate(issuer.token())["sub"] == "client"
    assert v.validate(issuer.token(key=issuer.ec, kid="ec1", alg="ES256"))["aud"] == AUD
    assert v.validate(issuer.token(aud=["account", AUD]))["sub"] == "client"


def test_no_network_until_first_validation(issuer):
    before = issuer.jwks_fetches
    TokenValidator(issuer.url, AUD)
    assert issuer.jwks_fetches == before


def test_keys_are_cached(issuer):
    v = TokenValidator(issuer.url, AUD)
    t = issuer.token()
    v.validate(t)
    before = issuer.jwks_fetches
    for _ in range(50):
        v.validate(t)
    assert issuer.jwks_fetches == before


@pytest.mark.parametrize("claims, reason", [
    ({"aud": "someone-else"}, "audience"),
    ({"aud": None}, "aud"),
    ({"iss": "http://evil.example/realms/t"}, "issuer"),
    ({"exp": int(time.time()) - 120}, "expired"),
    ({"exp": None}, "exp"),
    ({"nbf": int(time.time()) + 600}, "not yet valid"),
])
def test_rejected_claims(issuer, claims, reason):
    v = TokenValidator(issuer.url, AUD)
    with pytest.raises(TokenError) as e:
        v.validate(issuer.token(**claims))
    assert reason in e.value.reason


def test_leeway(issuer):
    v = TokenValidator(issuer.url, AUD, leeway=30)
    assert v.validate(issuer.token(exp=int(time.time()) - 10))
    assert v.validate(issuer.token(nbf=int(time.time()) + 10))


def test_algorithm_attacks(issuer):
    v = TokenValidator(issuer.url, AUD)
    v.validate(issuer.token())  # load keys
    now = int(time.time())
    claims = {"iss": issuer.url, "aud": AUD, "exp": now + 300}
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": "rsa1"})
    with pytest.raises(TokenError, match="not accepted"):
        v.validate(unsigned)
    # HS256 "signed" with the RSA public key PEM as HMAC secret (algorithm confusion), built by hand
    pem = issuer.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = (jwt.utils.base64url_encode(b'{"alg":"HS256","kid":"rsa1","typ":"JWT"}') + b"."
                     + jwt.utils.base64url_encode(json.dumps(claims).encode()))
    mac = hmac.new(pem, signing_input, hashlib.sha256).digest()
    hs = (signing_input + b"." + jwt.utils.base64url_encode(mac)).decode()
    with pytest.raises(TokenError, match="not accepted"):
        v.validate(hs)
    # RS256 header on the EC key id
    with pytest.raises(TokenError, match="does not match"):
        v.validate(issuer.token(kid="ec1", alg="RS256"))
    # signed by another key claiming a known kid
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(TokenError, match="signature"):
        v.validate(issuer.token(key=other))
    # tampered payload
    head, _body, sig = issuer.token().split(".")
    forged = jwt.utils.base64url_encode(json.dumps({**claims, "sub": "admin"}).encode()).decode()
    with pytest.raises(TokenError):
        v.validate(f"{head}.{forged}.{sig}")
    for garbage in ("", "abc", "a.b.c", "Bearer x"):
        with pytest.raises(TokenError):
            v.validate(garbage)


def test_unknown_kid_refetch_is_rate_limited(issuer):
    v = TokenValidator(issuer.url, AUD, min_refetch_seconds=60)
    v.validate(issuer.token())
    before = issuer.jwks_fetches
    with pytest.raises(TokenError, match="unknown key"):
        v.validate(issuer.token(kid="rotated"))
    with pytest.raises(TokenError, match="unknown key"):
        v.validate(issuer.token(kid="rotated"))
    assert issuer.jwks_fetches == before  # the first fetch was < 60 s ago: no refetch


def test_key_rotation_is_picked_up(issuer):
    v = TokenValidator(issuer.url, AUD, min_refetch_seconds=0)
    v.validate(issuer.token())
    new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer.keys.append(_jwk(new, "rsa2", "RS256"))
    try:
        assert v.validate(issuer.token(key=new, kid="rsa2"))["sub"] == "client"
    finally:
        issuer.keys.pop()


def test_unreachable_issuer_is_a_key_fetch_error():
    v = TokenValidator("http://127.0.0.1:9/realms/none", AUD, http_timeout=1)
    with pytest.raises(KeyFetchError):
        v.validate(jwt.encode({"a": 1}, rsa.generate_private_key(public_exponent=65537, key_size=2048),
                              algorithm="RS256", headers={"kid": "k"}))


async def test_async_validate(issuer):
    v = TokenValidator(issuer.url, AUD)
    assert v.needs_fetch(issuer.token())
    assert (await v.avalidate(issuer.token()))["sub"] == "client"
    assert not v.needs_fetch(issuer.token())
    assert (await v.avalidate(issuer.token()))["sub"] == "client"


def test_azp_allow_list(issuer):
    v = TokenValidator(issuer.url, AUD, allowed_clients={"vigil-ehr"})
    assert v.validate(issuer.token(azp="vigil-ehr"))["azp"] == "vigil-ehr"
    for claims in ({"azp": "vigil-other"}, {}):
        with pytest.raises(TokenError) as e:
            v.validate(issuer.token(**claims))
        assert "azp" in e.value.reason
    assert TokenValidator(issuer.url, AUD).validate(issuer.token(azp="anyone"))  # empty list: any client
