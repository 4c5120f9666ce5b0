"""What each supported resource type is searchable by, and how index rows are extracted from a resource.

Search parameters follow the R4 definitions (https://hl7.org/fhir/R4/searchparameter-registry.html):
each is a token, reference, date or string parameter with a FHIRPath-like extractor written by hand.
Index rows go to the idx_token, idx_reference, idx_date and idx_string tables (migration 0002) and,
for number parameters, idx_quantity (migration 0005). A resource's own single-valued `subject`, `date` and
Observation `value-quantity` are columns of its resources row instead (RESOURCE_COLUMN_QUANTITY).
Dates are stored as inclusive UTC ranges [low, high] with microsecond precision, so partial dates
(2024, 2024-05) and periods compare correctly with every search prefix.
"""
from __future__ import annotations

import calendar
import datetime as dt
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field


def format_utc(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def normalise_reference(ref: str, default_type: str = "Patient") -> str:
    """'x' -> 'Patient/x'; 'Patient/x' stays; 'http://host/fhir/Patient/x' -> 'Patient/x'."""
    ref = ref.strip()
    parts = [p for p in ref.split("/") if p]
    if "_history" in parts:
        parts = parts[:parts.index("_history")]
    if len(parts) >= 2:
        return f"{parts[-2]}/{parts[-1]}"
    return f"{default_type}/{ref}"


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: str  # token | reference | date | string | number | quantity
    extract: Callable[[dict], list]
    definition: str
    targets: tuple[str, ...] = ()  # reference params: allowed target types (first = default for bare ids)
    doc: str = ""


# --- date ranges ------------------------------------------------------------------------------------

_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
                      r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")
_US = dt.timedelta(microseconds=1)


def date_range(value: str) -> tuple[str, str] | None:
    """A FHIR date/dateTime/instant (possibly partial) -> inclusive UTC range (low, high), or None."""
    if not isinstance(value, str):
        return None
    m = _DATE_RE.match(value.strip())
    if not m:
        return None
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    if ss is not None and not frac and tz in (None, "Z") and y >= "1000":
        # fast path for the common UTC dateTime to the second (every device reading): no strftime
        try:
            dt.datetime(int(y), int(mo), int(d), int(hh), int(mi), int(ss))
        except ValueError:
            return None
        base = f"{y}-{mo}-{d}T{hh}:{mi}:{ss}"
        return base + ".000000Z", base + ".999999Z"
    try:
        zone = dt.UTC
        if tz and tz != "Z":
            sign = 1 if tz[0] == "+" else -1
            zone = dt.timezone(sign * dt.timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
        if mo is None:
            low = dt.datetime(int(y), 1, 1, tzinfo=zone)
            high = dt.datetime(int(y) + 1, 1, 1, tzinfo=zone) - _US
        elif d is None:
            yi, mi_ = int(y), int(mo)
            low = dt.datetime(yi, mi_, 1, tzinfo=zone)
            high = low + dt.timedelta(days=calendar.monthrange(yi, mi_)[1]) - _US
        elif hh is None:
            low = dt.datetime(int(y), int(mo), int(d), tzinfo=zone)
            high = low + dt.timedelta(days=1) - _US
        else:
            low = dt.datetime(int(y), int(mo), int(d), int(hh), int(mi), int(ss or 0), tzinfo=zone)
            if ss is None:
                high = low + dt.timedelta(minutes=1) - _US
            elif not frac:
                high = low + dt.timedelta(seconds=1) - _US
            else:
                digits = frac[1:7]
                low = low.replace(microsecond=int(digits.ljust(6, "0")))
                high = low + dt.timedelta(microseconds=10 ** (6 - len(digits))) - _US
    except ValueError:
        return None
    return format_utc(low), format_utc(high)


def parse_instant(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


# --- extractors -----------------------------------------------------------------------------------

def _list(v) -> list:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


def _cc_tokens(*keys: str) -> Callable[[dict], list]:
    """CodeableConcept(s) -> [(system, code)]."""
    def extract(r: dict) -> list:
        out = []
        for key in keys:
            for cc in _list(r.get(key)):
                if isinstance(cc, dict):
                    for c in _list(cc.get("coding")):
                        if isinstance(c, dict) and isinstance(c.get("code"), str):
                            out.append((c.get("system") if isinstance(c.get("system"), str) else "", c["code"]))
        return out
    return extract


def _coding_tokens(key: str) -> Callable[[dict], list]:
    def extract(r: dict) -> list:
        return [(c.get("system") if isinstance(c.get("system"), str) else "", c["code"])
                for c in _list(r.get(key)) if isinstance(c, dict) and isinstance(c.get("code"), str)]
    return extract


def _code_token(key: str) -> Callable[[dict], list]:
    def extract(r: dict) -> list:
        v = r.get(key)
        return [("", v)] if isinstance(v, str) and v else []
    return extract


def _nested_cc_tokens(key: str, inner: str) -> Callable[[dict], list]:
    """CodeableConcepts one level down (e.g. RiskAssessment.prediction.qualitativeRisk) -> [(system, code)]."""
    flat = _cc_tokens(inner)

    def extract(r: dict) -> list:
        return [t for item in _list(r.get(key)) if isinstance(item, dict) for t in flat(item)]
    return extract


def _finite(v) -> float | None:
    """A JSON number as float; None for anything else (booleans, strings, NaN/inf)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _prediction_probability(r: dict) -> list:
    """RiskAssessment.prediction.probabilityDecimal -> [(value, '', '', '')] (a probabilityRange is not a
    number: https://hl7.org/fhir/R4/riskassessment.html#search, `probability`)."""
    out = []
    for pred in _list(r.get("prediction")):
        if isinstance(pred, dict):
            v = _finite(pred.get("probabilityDecimal"))
            if v is not None:
                out.append((v, "", "", ""))
    return out


def _quantity(key: str) -> Callable[[dict], list]:
    """A Quantity element -> [(value, system, code, unit)] ('' for what it does not have)."""
    def extract(r: dict) -> list:
        q = r.get(key)
        if not isinstance(q, dict):
            return []
        v = _finite(q.get("value"))
        if v is None:
            return []
        return [(v, *(q.get(k) if isinstance(q.get(k), str) else "" for k in ("system", "code", "unit")))]
    return extract


def _identifier_tokens(r: dict) -> list:
    return [(i.get("system") if isinstance(i.get("system"), str) else "", i["value"])
            for i in _list(r.get("identifier")) if isinstance(i, dict) and isinstance(i.get("value"), str)]


def _refs(key: str, only: str | None = None) -> Callable[[dict], list]:
    def extract(r: dict) -> list:
        out = []
        for ref in _list(r.get(key)):
            if isinstance(ref, dict) and isinstance(ref.get("reference"), str) and ref["reference"].strip():
                target = normalise_reference(ref["reference"])
                if only is None or target.startswith(only + "/"):
                    out.append(target)
        return out
    return extract


def _date_of(*keys: str) -> Callable[[dict], list]:
    """dateTime/instant/date or Period elements -> [(low, high)]."""
    def extract(r: dict) -> list:
        for key in keys:
            v = r.get(key)
            if isinstance(v, str):
                rng = date_range(v)
                return [rng] if rng else []
            if isinstance(v, dict) and ("start" in v or "end" in v):  # Period: open ends are unbounded
                lo = date_range(v["start"]) if isinstance(v.get("start"), str) else None
                hi = date_range(v["end"]) if isinstance(v.get("end"), str) else None
                return [(lo[0] if lo else "0001-01-01T00:00:00.000000Z",
                         hi[1] if hi else "9999-12-31T23:59:59.999999Z")]
        return []
    return extract


def normalise_string(s: str) -> str:
    """Case- and accent-insensitive form for string search (https://hl7.org/fhir/R4/search.html#string)."""
    import unicodedata
    return "".join(c for c in unicodedata.normalize("NFD", s) if not unicodedata.combining(c)).lower()


def _names(parts: tuple[str, ...]) -> Callable[[dict], list]:
    def extract(r: dict) -> list:
        out = []
        for n in _list(r.get("name")):
            if not isinstance(n, dict):
                continue
            for p in parts:
                for v in _list(n.get(p)):
                    if isinstance(v, str) and v:
                        out.append(v)
        return out
    return extract


_R = "http://hl7.org/fhir/SearchParameter/"


def _p(name, kind, extract, definition, targets=(), doc=""):
    return Param(name, kind, extract, _R + definition, tuple(targets), doc)


SEARCH_PARAMS: dict[str, dict[str, Param]] = {
    "Observation": {p.name: p for p in (
        _p("code", "token", _cc_tokens("code"), "clinical-code"),
        _p("category", "token", _cc_tokens("category"), "Observation-category"),
        _p("status", "token", _code_token("status"), "Observation-status"),
        _p("identifier", "token", _identifier_tokens, "clinical-identifier"),
        _p("subject", "reference", _refs("subject"), "Observation-subject", ("Patient", "Device", "Group")),
        _p("patient", "reference", _refs("subject", "Patient"), "clinical-patient", ("Patient",)),
        _p("encounter", "reference", _refs("encounter"), "clinical-encounter", ("Encounter",)),
        _p("device", "reference", _refs("device"), "Observation-device", ("Device",)),
        _p("date", "date", _date_of("effectiveDateTime", "effectiveInstant", "effectivePeriod"), "clinical-date"),
        _p("value-quantity", "quantity", _quantity("valueQuantity"), "Observation-value-quantity"),
    )},
    "RiskAssessment": {p.name: p for p in (
        _p("identifier", "token", _identifier_tokens, "RiskAssessment-identifier"),
        _p("method", "token", _cc_tokens("method"), "RiskAssessment-method"),
        _p("subject", "reference", _refs("subject"), "RiskAssessment-subject", ("Patient", "Group")),
        _p("patient", "reference", _refs("subject", "Patient"), "clinical-patient", ("Patient",)),
        _p("encounter", "reference", _refs("encounter"), "clinical-encounter", ("Encounter",)),
        _p("date", "date", _date_of("occurrenceDateTime", "occurrencePeriod"), "clinical-date"),
        _p("risk", "token", _nested_cc_tokens("prediction", "qualitativeRisk"), "RiskAssessment-risk"),
        _p("probability", "number", _prediction_probability, "RiskAssessment-probability"),
        _p("performer", "reference", _refs("performer"), "RiskAssessment-performer",
           ("Device", "Practitioner", "PractitionerRole")),
    )},
    "Encounter": {p.name: p for p in (
        _p("identifier", "token", _identifier_tokens, "clinical-identifier"),
        _p("status", "token", _code_token("status"), "Encounter-status"),
        _p("class", "token", _coding_tokens("class"), "Encounter-class"),
        _p("subject", "reference", _refs("subject"), "Encounter-subject", ("Patient", "Group")),
        _p("patient", "reference", _refs("subject", "Patient"), "clinical-patient", ("Patient",)),
        _p("part-of", "reference", _refs("partOf"), "Encounter-part-of", ("Encounter",)),
        _p("date", "date", _date_of("period"), "clinical-date"),
    )},
    "Patient": {p.name: p for p in (
        _p("identifier", "token", _identifier_tokens, "Patient-identifier"),
        _p("gender", "token", _code_token("gender"), "individual-gender"),
        _p("birthdate", "date", _date_of("birthDate"), "individual-birthdate"),
        _p("family", "string", _names(("family",)), "individual-family"),
        _p("given", "string", _names(("given",)), "individual-given"),
        _p("name", "string", _names(("text", "family", "given", "prefix", "suffix")), "Patient-name"),
    )},
    "Device": {p.name: p for p in (
        _p("identifier", "token", _identifier_tokens, "Device-identifier"),
        _p("status", "token", _code_token("status"), "Device-status"),
        _p("type", "token", _cc_tokens("type"), "Device-type"),
        _p("patient", "reference", _refs("patient", "Patient"), "Device-patient", ("Patient",)),
    )},
}
WRITABLE_TYPES = ("Patient", "Encounter")
SUPPORTED_TYPES = tuple(SEARCH_PARAMS)

# the quantity parameter of an element that is 0..1 (Observation.value[x]): kept in the resources row's
# value_* columns (IndexRows.value), searched there, no idx_quantity row
RESOURCE_COLUMN_QUANTITY = {"Observation": "value-quantity"}

# the reference whose target is the resource's patient (denormalised onto token rows for fast search)
_PATIENT_REF = {"Observation": "subject", "RiskAssessment": "subject", "Encounter": "subject",
                "Device": "patient"}


@dataclass(slots=True)
class IndexRows:
    subject: str | None
    date: tuple[str, str] | None
    tokens: list[tuple[str, str, str]]      # (param, system, value)
    refs: list[tuple[str, str]]             # (param, target)
    dates: list[tuple[str, str, str]]       # (param, low, high)
    strings: list[tuple[str, str, str]]     # (param, normalised, exact)
    quantities: list[tuple[str, float, str, str, str]] = field(default_factory=list)  # (param, value, system, code, unit)
    value: tuple[float, str, str, str] | None = None  # RESOURCE_COLUMN_QUANTITY's (value, system, code, unit)


def quantity_rows(resource_type: str, ix: IndexRows) -> list[tuple[str, float, str, str, str]]:
    """The idx_quantity rows of a resource: its number/quantity values but RESOURCE_COLUMN_QUANTITY's."""
    own = RESOURCE_COLUMN_QUANTITY.get(resource_type)
    return [q for q in ix.quantities if q[0] != own]


def index_rows(resource: dict) -> IndexRows:
    params = SEARCH_PARAMS.get(resource.get("resourceType"), {})
    tokens, refs, dates, strings, quantities = [], [], [], [], []
    for p in params.values():
        try:
            values = p.extract(resource)
        except Exception:  # noqa: BLE001 - malformed element: not searchable by it, still stored
            values = []
        seen = set()
        for v in values:
            if v in seen:
                continue
            seen.add(v)
            if p.kind == "token":
                tokens.append((p.name, v[0], v[1]))
            elif p.kind == "reference":
                refs.append((p.name, v))
            elif p.kind == "date":
                dates.append((p.name, v[0], v[1]))
            elif p.kind == "string":
                strings.append((p.name, normalise_string(v), v))
            elif p.kind in ("number", "quantity"):
                quantities.append((p.name, *v))
    subject = None
    pref = _PATIENT_REF.get(resource.get("resourceType"))
    if pref:
        subject = next((t for n, t in refs if n == pref), None)
    date = next(((lo, hi) for n, lo, hi in dates if n == "date"), None)
    own = RESOURCE_COLUMN_QUANTITY.get(resource.get("resourceType"))
    value = next((q[1:] for q in quantities if q[0] == own), None) if own else None
    return IndexRows(subject, date, tokens, refs, dates, strings, quantities, value)
