"""Validation of REST-written resources (Patient, Encounter) against the base FHIR structure.

https://hl7.org/fhir/R4/http.html#create and #update: a resource that "failed basic FHIR validation
rules" is refused with 400 and an OperationOutcome saying what is wrong. Checked here: the element
names, JSON types (a boolean, integer or decimal must be one in the JSON: the models alone would coerce
"yes" or "2"), cardinalities (required elements such as Encounter.status and Encounter.class,
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


def _base_types(annotation) -> tuple:
    """The element types inside Optional[...], List[...] and Annotated[...] of a model field."""
    import typing

    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _base_types(args[0])
    if origin is None:
        return (annotation,)
    return tuple(t for a in args if a is not type(None) for t in _base_types(a))


@functools.cache
def _fields(model) -> dict:
    """JSON name -> element types of a fhir.resources model."""
    return {f.alias or name: _base_types(f.annotation) for name, f in model.model_fields.items()}


def _complex_model(tp, value: dict):
    from fhir.resources.R4B import get_fhir_model_class

    name = getattr(tp, "__name__", "")
    if not name.endswith("Type"):
        return None
    if name == "ResourceType" and isinstance(value.get("resourceType"), str):  # contained resources
        name = value["resourceType"] + "Type"
    try:
        return get_fhir_model_class(name[:-4])
    except KeyError:
        return None


def _json_type_issues(model, obj: dict, path: str) -> list[dict]:
    """Primitives the models would coerce but JSON FHIR forbids: a boolean must be true/false, an
    integer a JSON integer, a decimal a JSON number (https://hl7.org/fhir/R4/json.html#primitive);
    pydantic's lax mode takes "yes", 1 or "2" for them."""
    import decimal

    issues = []
    fields = _fields(model)
    for key, value in obj.items():
        types = fields.get(key)
        if not types or key.startswith("_"):
            continue
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            where = f"{path}.{key}" + (f"[{i}]" if isinstance(value, list) else "")
            want = None
            if bool in types and not isinstance(item, bool):
                want = "a JSON boolean (true or false)"
            elif int in types and (isinstance(item, bool) or not isinstance(item, int)):
                want = "a JSON integer"
            elif decimal.Decimal in types and (isinstance(item, bool) or not isinstance(item, int | float)):
                want = "a JSON number"
            if want is not None and item is not None:
                issues.append({"severity": "error", "code": "structure",
                               "diagnostics": f"{where}: must be {want}, not {item!r}", "expression": [where]})
            elif isinstance(item, dict):
                for tp in types:
                    sub = _complex_model(tp, item)
                    if sub is not None:
                        issues += _json_type_issues(sub, item, where)
                        break
    return issues


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
    if not issues:  # the model accepted the structure; now the JSON types it coerced
        issues = _json_type_issues(_model(rtype), body, rtype)
    for (t, element), codes in _REQUIRED_CODES.items():
        value = resource.get(element)
        if t == rtype and isinstance(value, str) and value not in codes:
            issues.append({"severity": "error", "code": "code-invalid",
                           "diagnostics": f"{rtype}.{element}: {value!r} is not in the required value set "
                                          f"({', '.join(codes)})",
                           "expression": [f"{rtype}.{element}"]})
    return issues
