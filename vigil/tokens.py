"""OAuth 2.0 bearer access-token (JWT) validation against an OIDC issuer's published keys.

Shared by the FHIR gateway and the gRPC ingest. The issuer's JSON Web Key Set is found through
`{issuer}/.well-known/openid-configuration` (`jwks_uri`), fetched lazily on first use (never at
import or construction), cached, and refetched at most once per `min_refetch_seconds` when a token
names a key id (`kid`) that is not cached (key rotation).

Only asymmetric signature algorithms are accepted (RS*, PS*, ES*, EdDSA): never `none`, never HS*
(an HMAC "signed" with a public key is the classic algorithm-confusion attack). The token's `alg`
must also match the key type (and the key's own `alg` when the JWKS states one). The issuer must
match exactly, the audience is required, `exp` is required and `exp`/`nbf`/`iat` are checked with
`leeway` seconds of clock skew. With `allowed_clients` (client ids), the token's authorized party
(`azp`, else `client_id`) must be one of them (an azp allow-list: other clients of the realm are refused).
"""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import jwt
from jwt.algorithms import has_crypto

ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                "ES256", "ES384", "ES512", "EdDSA"})
# Which JWK key type may verify which algorithm family.
_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


class TokenError(Exception):
    """The token is not acceptable; `reason` is safe to show to the client (no secrets)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class KeyFetchError(TokenError):
    """The issuer's keys could not be fetched: a server-side (transient) failure, not a bad token."""


class TokenValidator:
    """Validates bearer JWTs for one issuer and audience; thread-safe, keys cached in memory."""

    def __init__(self, issuer: str, audience: str, leeway: float = 30, jwks_url: str | None = None, *,
                 min_refetch_seconds: float = 10.0, http_timeout: float = 5.0,
                 allowed_clients: frozenset[str] | set[str] | tuple[str, ...] = ()):
        if not issuer:
            raise ValueError("issuer is required")
        if not audience:
            raise ValueError("audience is required")
        if not has_crypto:
            raise RuntimeError("PyJWT is installed without 'cryptography': install pyjwt[crypto]")
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.allowed_clients = frozenset(allowed_clients)
        self._jwks_url = jwks_url
        self._min_refetch = min_refetch_seconds
        self._timeout = http_timeout
        self._keys: dict[str, tuple[jwt.PyJWK, str | None]] = {}  # kid -> (key, the JWK's own alg)
        self._last_fetch = float("-inf")
        self._loaded = False  # True once a JWKS was fetched successfully
        self._lock = threading.Lock()

    # --- keys ---------------------------------------------------------------------------------

    def _discover_jwks_url(self, client: httpx.Client) -> str:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        r = client.get(url)
        r.raise_for_status()
        doc = r.json()
        if doc.get("issuer") != self.issuer:
            raise KeyFetchError(f"discovery issuer {doc.get('issuer')!r} does not match {self.issuer!r}")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise KeyFetchError("discovery document has no jwks_uri")
        return jwks_uri

    def refresh_keys(self, *, force: bool = False) -> bool:
        """Fetch the JWKS (blocking). Rate-limited unless `force`; returns True if a fetch happened."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_fetch < self._min_refetch:
                return False
            self._last_fetch = now
            try:
                with httpx.Client(timeout=self._timeout, follow_redirects=False) as client:
                    if self._jwks_url is None:
                        self._jwks_url = self._discover_jwks_url(client)
                    r = client.get(self._jwks_url)
                    r.raise_for_status()
                    jwks = r.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise KeyFetchError(f"cannot fetch the issuer's signing keys: {exc.__class__.__name__}") from exc
            keys: dict[str, tuple[jwt.PyJWK, str | None]] = {}
            for jwk in jwks.get("keys", []):
                if jwk.get("use", "sig") != "sig" or jwk.get("kty") not in ("RSA", "EC", "OKP"):
                    continue
                if jwk.get("alg") and jwk["alg"] not in ALLOWED_ALGORITHMS:
                    continue
                try:
                    keys[jwk.get("kid", "")] = (jwt.PyJWK(jwk), jwk.get("alg"))
                except jwt.PyJWTError:
                    continue  # an unusable key (unsupported curve...) must not hide the others
            self._keys = keys
            self._loaded = True
            return True

    def _key_for(self, kid: str | None) -> tuple[jwt.PyJWK, str | None] | None:
        keys = self._keys
        if kid is None:
            return next(iter(keys.values())) if len(keys) == 1 else None
        return keys.get(kid)

    def needs_fetch(self, token: str) -> bool:
        """True when validating `token` would need the network (key not cached)."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            return False
        return self._key_for(kid) is None

    # --- validation ---------------------------------------------------------------------------

    def validate(self, token: str) -> dict:
        """Return the verified claims, or raise TokenError. May block to fetch keys."""
        if not token or not isinstance(token, str):
            raise TokenError("no token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError("malformed token") from exc
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise TokenError(f"algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("malformed key id")
        found = self._key_for(kid)
        if found is None:
            self.refresh_keys()  # at most once per min_refetch_seconds
            found = self._key_for(kid)
        if found is None:
            if not self._loaded:
                raise KeyFetchError("the issuer's signing keys are not available yet")
            raise TokenError("token signed with an unknown key")
        key, key_alg = found
        if key.key_type != _KTY_FOR_ALG[alg[:2]] or (key_alg is not None and key_alg != alg):
            raise TokenError(f"algorithm {alg!r} does not match the signing key")
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"], "verify_signature": True, "verify_exp": True,
                         "verify_nbf": True, "verify_iat": True, "verify_aud": True, "verify_iss": True},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenError("token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise TokenError("token not yet valid") from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenError(f"token audience does not include {self.audience!r}") from exc
        except jwt.InvalidIssuerError as exc:
            raise TokenError("token issuer does not match") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token lacks the {exc.claim!r} claim") from exc
        except jwt.InvalidSignatureError as exc:
            raise TokenError("signature verification failed") from exc
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc.__class__.__name__}") from exc
        if self.allowed_clients and (claims.get("azp") or claims.get("client_id")) not in self.allowed_clients:
            raise TokenError("the token's client (azp) is not allowed here")
        return claims

    async def avalidate(self, token: str) -> dict:
        """Async validate: inline when the key is cached (fast path), in a thread when it must fetch."""
        if self.needs_fetch(token):
            return await asyncio.to_thread(self.validate, token)
        return self.validate(token)
