"""Parsing of the supported search parameters (https://hl7.org/fhir/R4/search.html).

Supported: `subject` and `patient` (reference, https://hl7.org/fhir/R4/search.html#reference),
`code` (token, https://hl7.org/fhir/R4/search.html#token; comma = OR), `_count`
(https://hl7.org/fhir/R4/search.html#count) and `_offset` (paging position used in next/previous
links). Unknown parameters are refused with 400 (strict handling) rather than silently ignored, since
ignoring a filter would return more clinical data than asked for; `_format` is accepted (JSON only).
"""
from __future__ import annotations

from dataclasses import dataclass

from vigil.ids import is_fhir_id
from vigil_gateway.outcomes import FhirError
from vigil_gateway.store import TokenFilter, normalise_reference

DEFAULT_COUNT = 50
MAX_COUNT = 1000
MAX_OFFSET = 1_000_000

# resource type -> search parameters it supports (besides _count/_offset)
SEARCH_PARAMS: dict[str, tuple[str, ...]] = {
    "Observation": ("subject", "patient", "code"),
    "RiskAssessment": ("subject", "patient"),
}
IGNORED_PARAMS = frozenset({"_format"})


@dataclass(frozen=True)
class SearchQuery:
    subject: str | None = None          # normalised reference, e.g. Patient/p1
    code: tuple[TokenFilter, ...] = ()
    count: int = DEFAULT_COUNT
    offset: int = 0
    contradictory: bool = False         # subject and patient name different patients: no match

    def link_params(self, *, offset: int | None = None) -> list[tuple[str, str]]:
        """Query parameters that reproduce this search (for Bundle.link self/next/previous)."""
        out: list[tuple[str, str]] = []
        if self.subject is not None:
            out.append(("subject", self.subject))
        if self.code:
            out.append(("code", ",".join(_format_token(t) for t in self.code)))
        out.append(("_count", str(self.count)))
        out.append(("_offset", str(self.offset if offset is None else offset)))
        return out


def _format_token(t: TokenFilter) -> str:
    if t.system is None:
        return t.code or ""
    return f"{t.system}|{t.code or ''}"


def parse_token(value: str) -> TokenFilter:
    """'code' (any system), 'system|code', '|code' (no system), 'system|' (any code in system)."""
    if "|" in value:
        system, _, code = value.partition("|")
        if not system and not code:
            raise FhirError(400, "invalid", "empty token '|' in code")
        if "|" in code:
            raise FhirError(400, "invalid", f"token {value!r} has more than one '|'")
        return TokenFilter(system=system, code=code or None)
    if not value:
        raise FhirError(400, "invalid", "empty code value")
    return TokenFilter(system=None, code=value)


def parse_reference(name: str, value: str, *, patient_only: bool) -> str:
    if not value or "," in value:
        raise FhirError(400, "invalid", f"{name}: one reference expected (comma lists are not supported)")
    ref = normalise_reference(value)
    rtype, _, rid = ref.partition("/")
    if not is_fhir_id(rid):
        raise FhirError(400, "invalid", f"{name}: {value!r} is not a valid reference")
    if patient_only and rtype != "Patient":
        raise FhirError(400, "invalid", f"{name}: must reference a Patient, got {rtype}")
    return ref


def _non_negative_int(name: str, value: str, maximum: int) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise FhirError(400, "invalid", f"{name} must be a non-negative integer, got {value!r}") from None
    if n < 0:
        raise FhirError(400, "invalid", f"{name} must be a non-negative integer, got {value!r}")
    return min(n, maximum)


def parse_search(resource_type: str, items: list[tuple[str, str]]) -> SearchQuery:
    """Query-string pairs (in order, repeats kept) -> SearchQuery, or FhirError 400."""
    allowed = SEARCH_PARAMS[resource_type]
    seen: dict[str, str] = {}
    for name, value in items:
        if name in IGNORED_PARAMS:
            continue
        base = name.split(":", 1)[0]
        if name != base:
            raise FhirError(400, "not-supported", f"search modifier in {name!r} is not supported")
        if base not in allowed and base not in ("_count", "_offset"):
            supported = ", ".join([*allowed, "_count"])
            raise FhirError(400, "not-supported",
                            f"unknown search parameter {name!r} for {resource_type} (supported: {supported})")
        if base in seen:
            raise FhirError(400, "not-supported", f"parameter {name!r} given more than once")
        seen[base] = value

    count = _non_negative_int("_count", seen["_count"], MAX_COUNT) if "_count" in seen else DEFAULT_COUNT
    offset = _non_negative_int("_offset", seen["_offset"], MAX_OFFSET) if "_offset" in seen else 0
    subject = parse_reference("subject", seen["subject"], patient_only=False) if "subject" in seen else None
    patient = parse_reference("patient", seen["patient"], patient_only=True) if "patient" in seen else None
    contradictory = subject is not None and patient is not None and subject != patient
    code: tuple[TokenFilter, ...] = ()
    if "code" in seen:
        code = tuple(parse_token(v) for v in seen["code"].split(","))
    return SearchQuery(subject=subject or patient, code=code, count=count, offset=offset,
                       contradictory=contradictory)
