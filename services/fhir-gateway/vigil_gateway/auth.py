"""Bearer-token authentication and SMART authorization for the FHIR endpoints (RFC 6750; SMART App
Launch 2 and Backend Services). docs/security.md explains the model.

Missing or invalid tokens get 401 with `WWW-Authenticate: Bearer realm="vigil", error="invalid_token"`
and an OperationOutcome of issue code `login` (https://hl7.org/fhir/R4/valueset-issue-type.html). A valid
token whose scopes do not cover the interaction gets 403 with `error="insufficient_scope"` and issue code
`forbidden`. A token whose only covering scopes are `patient/` ones is confined to the Patient
compartment of its `patient` claim: `request.state.confine` is set to that patient id and the app
filters reads, searches (and their _include/_revinclude), history and writes to it.
"""
from __future__ import annotations

from starlette.requests import Request

from vigil import smart
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
        claims = await validator.avalidate(token)
    except KeyFetchError as exc:
        raise FhirError(503, "transient", f"cannot validate tokens right now: {exc.reason}",
                        headers={"Retry-After": "5"}) from None
    except TokenError as exc:
        raise FhirError(401, "login", f"invalid bearer token: {exc.reason}",
                        headers=_challenge(exc.reason)) from None
    allowed = getattr(request.app.state, "allowed_clients", frozenset())
    if allowed and claims.get("azp") not in allowed:
        reason = "the token's client (azp) is not allowed here"
        raise FhirError(401, "login", f"invalid bearer token: {reason}", headers=_challenge(reason))
    return claims


def require_scope(claims: dict, resource_type: str, interaction: str) -> smart.Decision:
    """The allowing decision, or FhirError 403 unless some scope of `claims` covers `interaction` on
    `resource_type`, whatever the target: the check that needs no request body, so a token without e.g.
    a write scope gets its 403 before its body is read (a malformed body would otherwise earn it a 400
    that judges the body). authorize() starts with it."""
    decision = smart.decide(scopes_of(claims), resource_type, interaction, patient_claim(claims))
    if not decision.allowed:
        raise forbidden(decision.reason)
    return decision


def patient_claim(claims: dict) -> str | None:
    """The launch-context patient id of a token (SMART `patient` claim; `Patient/x` accepted too)."""
    value = claims.get("patient")
    if not isinstance(value, str) or not value:
        return None
    return value.removeprefix("Patient/")


def forbidden(reason: str) -> FhirError:
    safe = reason.replace('"', "'").replace("\\", "/")
    return FhirError(403, "forbidden", f"insufficient scope: {reason}",
                     headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope", '
                                                  f'error_description="{safe}"'})


def not_found(request: Request, resource_type: str) -> FhirError:
    """The app's own 404 for an unknown resource (same text), so confinement does not reveal existence."""
    rid, vid = request.path_params.get("resource_id"), request.path_params.get("version_id")
    if vid is not None:
        return FhirError(404, "not-found", f"{resource_type}/{rid}/_history/{vid} is not known")
    return FhirError(404, "not-found", f"{resource_type}/{rid} is not known")


def scopes_of(claims: dict) -> list[smart.Scope]:
    return smart.parse_scopes(claims.get("scope"))


def may_read_type(claims: dict | None, resource_type: str) -> smart.Decision:
    """Whether `claims` may read resources of `resource_type` (e.g. an _include-d resource)."""
    if claims is None:
        return smart.Decision(True)
    return smart.decide(scopes_of(claims), resource_type, "read", patient_claim(claims))


def may_search_audit(claims: dict | None) -> bool:
    """AuditEvents need a system- or user-level scope naming AuditEvent itself (not a wildcard)."""
    if claims is None:
        return True
    return any(s.resource_type == "AuditEvent" and s.level in ("system", "user") and "s" in s.permissions
               for s in scopes_of(claims))


async def authorize(request: Request, claims: dict | None, resource_type: str | None, interaction: str,
                    patient: str | None, *, resource: dict | None = None) -> None:
    """The one per-request authorization hook, called for every FHIR interaction after authentication.

    resource_type: the type addressed (None for system-level); interaction: a code of
    https://hl7.org/fhir/R4/valueset-type-restful-interaction.html (read, vread, history-instance,
    history-type, search-type, create, update); patient: the Patient compartment the request targets
    when known (Patient/x), and `resource` the resource read when the check needs its content.
    It is called a second time for read/vread with the stored resource. Raises FhirError 403 when no
    scope covers the interaction; a resource outside a patient-level token's compartment is answered
    404 (as if it did not exist: no leak of existence). Sets request.state.confine for patient-level
    tokens. `claims` None means auth is off: everything is allowed.
    """
    if claims is None:
        return
    if resource_type is None:
        raise forbidden("system-level interactions are not available")
    decision = require_scope(claims, resource_type, interaction)
    request.state.confine = decision.patient
    if decision.patient is None:
        return
    own = f"Patient/{decision.patient}"
    if interaction in ("read", "vread", "history-instance"):
        # Outside the compartment = not found, word for word as for a resource that does not exist.
        if (resource is not None and not smart.in_compartment(resource, decision.patient)) or (
                resource is None and resource_type == "Patient" and patient and patient != own):
            raise not_found(request, resource_type)
    elif interaction == "search-type":
        if patient and patient != own:
            raise forbidden("a patient-level token searches only its own patient's data")
    elif interaction in ("create", "update"):
        if patient != own:
            raise forbidden("a patient-level token writes only into its own patient's compartment")
    elif interaction == "history-type":
        raise forbidden("history-type is not available to patient-level tokens (search instead)")
