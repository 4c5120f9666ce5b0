"""Validation of REST-written resources (Patient, Encounter) against the base FHIR structure.

https://hl7.org/fhir/R4/http.html#create and #update: a resource that "failed basic FHIR validation
rules" is refused with 400 and an OperationOutcome saying what is wrong. Checked here: the element
names, JSON types, cardinalities (required elements such as Encounter.status and Encounter.class,
lists where the spec has 0..*), primitive formats (date, dateTime, instant...), choice-type rules, and
the required value sets of the coded elements the gateway indexes (Patient.gender, Encounter.status).
The structural rules come from the fhir.resources models (R4B, whose Patient and Encounter are those
of R4). The elements the store owns (id on create, meta.versionId and meta.lastUpdated) are not checked:
they are replaced anyway (store.py).
"""
from __future__ import annotations

import functools

from vigil_gateway.store import without_store_meta

# Required bindings (https://hl7.org/fhir/R4/terminologies.html#required) of indexed code elements.
_REQUIRED_CODES = {
    ("Patient", "gender"): ("male", "female", "other", "unknown"),  # administrative-gender
    ("Encounter", "status"): ("planned", "arrived", "triaged", "in-progress", "onleave", "finished",
                              "cancelled", "entered-in-error", "unknown"),  # encounter-status
}


@functools.cache
def _model(resource_type: str):
    if resource_type == "Patient":
        from fhir.resources.R4B.patient import Patient
        return Patient
    if resource_type == "Encounter":
        from fhir.resources.R4B.encounter import Encounter
        return Encounter
    raise KeyError(resource_type)


def _expression(resource_type: str, loc: tuple) -> str:
    out = resource_type
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _issue_code(error_type: str) -> str:
    if error_type.endswith("missing"):
        return "required"
    if error_type == "extra_forbidden" or error_type.endswith("_type") or error_type == "json_invalid":
        return "structure"
    return "value"


def validate_resource(resource: dict, *, create: bool) -> list[dict]:
    """OperationOutcome issues (severity error) for what is wrong with `resource`; [] when it is valid."""
    import pydantic

    rtype = resource["resourceType"]
    body = without_store_meta({k: v for k, v in resource.items() if not (create and k == "id")})
    issues = []
    try:
        _model(rtype).model_validate(body)
    except pydantic.ValidationError as exc:
        for err in exc.errors(include_url=False, include_input=False):
            loc = tuple(p for p in err["loc"] if p != "__root__")
            msg = err["msg"].removeprefix("Value error, ")
            issues.append({"severity": "error", "code": _issue_code(err["type"]),
                           "diagnostics": f"{_expression(rtype, loc)}: {msg}",
                           "expression": [_expression(rtype, loc)]})
    for (t, element), codes in _REQUIRED_CODES.items():
        value = resource.get(element)
        if t == rtype and isinstance(value, str) and value not in codes:
            issues.append({"severity": "error", "code": "code-invalid",
                           "diagnostics": f"{rtype}.{element}: {value!r} is not in the required value set "
                                          f"({', '.join(codes)})",
                           "expression": [f"{rtype}.{element}"]})
    return issues
