"""Bearer-token authentication for the FHIR endpoints (RFC 6750; SMART Backend Services).

Missing or invalid tokens get 401 with `WWW-Authenticate: Bearer realm="vigil", error="invalid_token"`
and an OperationOutcome of issue code `login` (https://hl7.org/fhir/R4/valueset-issue-type.html).
"""
from __future__ import annotations

from starlette.requests import Request

from vigil.tokens import KeyFetchError, TokenError, TokenValidator
from vigil_gateway.outcomes import FhirError

REALM = "vigil"


def _challenge(description: str | None) -> dict[str, str]:
    if description is None:  # no credentials (RFC 6750 §3.1 allows omitting error; sent for uniformity)
        return {"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'}
    safe = description.replace('"', "'").replace("\\", "/")
    return {"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token", error_description="{safe}"'}


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def authenticate(request: Request, validator: TokenValidator) -> dict:
    """The verified claims, or FhirError 401."""
    token = bearer_token(request)
    if token is None:
        raise FhirError(401, "login", "authentication required: send Authorization: Bearer <token>",
                        headers=_challenge(None))
    try:
        return await validator.avalidate(token)
    except KeyFetchError as exc:
        raise FhirError(503, "transient", f"cannot validate tokens right now: {exc.reason}",
                        headers={"Retry-After": "5"}) from None
    except TokenError as exc:
        raise FhirError(401, "login", f"invalid bearer token: {exc.reason}",
                        headers=_challenge(exc.reason)) from None


async def authorize(request: Request, claims: dict | None, resource_type: str | None, interaction: str,
                    patient: str | None, *, resource: dict | None = None) -> None:
    """The one per-request authorization hook, called for every FHIR interaction after authentication.

    resource_type: the type addressed (None for system-level); interaction: a code of
    https://hl7.org/fhir/R4/valueset-type-restful-interaction.html (read, vread, history-instance,
    history-type, search-type, create, update); patient: the Patient compartment the request targets
    when known (Patient/x), and `resource` the resource read when the check needs its content.
    It is called a second time for read/vread with the stored resource. Raise FhirError(403, ...) to
    refuse. Today every authenticated caller may do everything (token semantics unchanged); SMART
    scopes (vigil/smart.py) plug in here.
    """
    return
