"""Parsing of search requests (https://hl7.org/fhir/R4/search.html) into store.SearchQuery.

Supported per type: the parameters of fhirindex.SEARCH_PARAMS, plus _id, _lastUpdated, _sort, _count,
_total, _summary=count|false, _elements, _include, _revinclude, _format, _pretty, and the paging
parameters this server writes into its own links (_offset, _snapshot). Comma = OR within one
parameter; repeating a parameter = AND. Unknown parameters (or unsupported modifiers/values) are
ignored (the spec's lenient default) and reported back as not applied; with `Prefer: handling=strict`
they are refused with 400.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal

from vigil.ids import is_fhir_id
from vigil_gateway.fhirindex import SEARCH_PARAMS as PARAMS
from vigil_gateway.fhirindex import date_range, normalise_reference
from vigil_gateway.outcomes import FhirError
from vigil_gateway.store import DateValue, Filter, NumberValue, SearchQuery, TokenFilter

DEFAULT_COUNT = 50
MAX_COUNT = 1000
MAX_OFFSET = 1_000_000

SEARCH_PARAMS: dict[str, tuple[str, ...]] = {t: tuple(ps) for t, ps in PARAMS.items()}
RESULT_PARAMS = ("_sort", "_count", "_total", "_summary", "_elements", "_include", "_revinclude")
FORMAT_PARAMS = ("_format", "_pretty")
PAGING_PARAMS = ("_offset", "_snapshot")
SORT_KEYS = ("_id", "_lastUpdated", "date")
DATE_PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap")
_PREFIX = re.compile(r"^(eq|ne|lt|gt|le|ge|sa|eb|ap)?(\d.*)$")
# a FHIR decimal (https://hl7.org/fhir/R4/datatypes.html#decimal) after an optional prefix
_NUMBER = re.compile(r"^(eq|ne|lt|gt|le|ge|sa|eb|ap)?(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)$")


@dataclass
class ParsedSearch:
    query: SearchQuery
    summary_count: bool = False
    elements: tuple[str, ...] = ()
    ignored: list[str] = field(default_factory=list)
    link_params: list[tuple[str, str]] = field(default_factory=list)  # what reproduces the search


def parse_token(value: str) -> TokenFilter:
    """'code' (any system), 'system|code', '|code' (no system), 'system|' (any code in system).

    `value` is one comma-separated part as _split(..., keep="|\\\\") leaves it: an escaped '\\|' is a literal
    '|' in the system or code (https://hl7.org/fhir/R4/search.html#escaping), not the separator."""
    parts = _split(value, sep="|")
    if len(parts) > 2:
        raise FhirError(400, "invalid", f"token {value!r} has more than one unescaped '|'")
    if len(parts) == 2:
        system, code = parts
        if not system and not code:
            raise FhirError(400, "invalid", "empty token '|'")
        return TokenFilter(system=system, code=code or None)
    if not parts[0]:
        raise FhirError(400, "invalid", "empty token value")
    return TokenFilter(system=None, code=parts[0])


def parse_reference(name: str, value: str, default_type: str, allowed: tuple[str, ...] = ()) -> str:
    ref = normalise_reference(value, default_type)
    rtype, _, rid = ref.partition("/")
    if not value or not is_fhir_id(rid):
        raise FhirError(400, "invalid", f"{name}: {value!r} is not a valid reference")
    if allowed and rtype not in allowed:
        raise FhirError(400, "invalid", f"{name}: must reference {' or '.join(allowed)}, got {rtype}")
    return ref


def parse_date(name: str, value: str) -> DateValue:
    m = _PREFIX.match(value)
    rng = date_range(m.group(2)) if m else None
    if rng is None:
        raise FhirError(400, "invalid", f"{name}: {value!r} is not a date (prefix + YYYY[-MM[-DD[Thh:mm[:ss]]]][Z])")
    return DateValue(m.group(1) or "eq", rng[0], rng[1])


def parse_number(name: str, value: str) -> NumberValue:
    """[prefix]decimal -> NumberValue with the range its precision implies: 100 -> [99.5, 100.5),
    100.00 -> [99.995, 100.005), 1e2 (one significant figure) -> [50, 150)
    (https://hl7.org/fhir/R4/search.html#number)."""
    m = _NUMBER.match(value)
    if not m:
        raise FhirError(400, "invalid", f"{name}: {value!r} is not a number ([prefix]decimal, e.g. gt0.5; "
                                        "prefixes eq ne lt gt le ge sa eb ap)")
    d = Decimal(m.group(2))
    half = Decimal(5).scaleb(d.as_tuple().exponent - 1)
    return NumberValue(m.group(1) or "eq", float(d), float(d - half), float(d + half))


def parse_quantity(name: str, value: str) -> NumberValue:
    """[prefix]number, [prefix]number|system|code or [prefix]number||code
    (https://hl7.org/fhir/R4/search.html#quantity); `value` is one comma-separated part, as parse_token's."""
    parts = _split(value, sep="|")
    if len(parts) not in (1, 3):
        raise FhirError(400, "invalid", f"{name}: {value!r} is not a quantity ([prefix]number, "
                                        "[prefix]number|system|code or [prefix]number||code)")
    number = parse_number(name, parts[0])
    if len(parts) == 1:
        return number
    system, code = parts[1], parts[2]
    if not code:
        raise FhirError(400, "invalid", f"{name}: {value!r} has a system but no code")
    return NumberValue(number.prefix, number.value, number.low, number.high, system, code)


def non_negative_int(name: str, value: str, maximum: int) -> int:
    """A paging parameter (_count, _offset, _snapshot): ASCII digits only, capped at `maximum`.
    int() alone would also take ' 5', '+5', '1_000' and non-ASCII digits such as '５'."""
    if not (value.isascii() and value.isdigit()):
        raise FhirError(400, "invalid", f"{name} must be a non-negative integer, got {value!r}")
    return min(int(value), maximum)


def _split(value: str, sep: str = ",", keep: str = "") -> list[str]:
    """`sep`-separated values; '\\,', '\\$', '\\|' and '\\\\' are literal characters
    (https://hl7.org/fhir/R4/search.html#escaping). Escapes of the characters in `keep` stay escaped (a
    token's '|' is split later, by parse_token)."""
    parts, cur, i = [], "", 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value) and value[i + 1] in ",$|\\":
            cur += value[i:i + 2] if value[i + 1] in keep else value[i + 1]
            i += 2
            continue
        if c == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return parts


def _include_spec(name: str, value: str, rtype: str, rev: bool) -> tuple[str, str, str | None]:
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise FhirError(400, "invalid", f"{name}={value!r}: expected Type:param[:TargetType]")
    src, param = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if src not in PARAMS or param not in PARAMS[src] or PARAMS[src][param].kind != "reference":
        raise FhirError(400, "not-supported", f"{name}={value!r}: not a supported reference parameter")
    if not rev and src != rtype:
        raise FhirError(400, "invalid", f"_include={value!r}: source type must be {rtype}")
    if target is not None and target not in PARAMS[src][param].targets:
        raise FhirError(400, "invalid", f"{name}={value!r}: {param} cannot reference {target}")
    if rev and (target or rtype) not in PARAMS[src][param].targets:
        raise FhirError(400, "invalid", f"_revinclude={value!r}: {src}.{param} does not reference {rtype}")
    return src, param, target


def parse_search(resource_type: str, items: list[tuple[str, str]], *, strict: bool = False) -> ParsedSearch:
    """Query pairs (in order, repeats kept) -> ParsedSearch, or FhirError 400."""
    params = PARAMS[resource_type]
    filters: list[Filter] = []
    ignored: list[str] = []
    link: list[tuple[str, str]] = []
    count, offset, snapshot, total = DEFAULT_COUNT, 0, None, "accurate"
    sort: tuple = ()
    summary_count, elements = False, ()
    include: list = []
    revinclude: list = []

    def unknown(name: str, why: str) -> None:
        if strict:
            raise FhirError(400, "not-supported", f"{why} (Prefer: handling=strict)")
        ignored.append(name)

    for name, value in items:
        base, _, modifier = name.partition(":")
        modifier = modifier or None
        if base in FORMAT_PARAMS:  # not a filter, but paging links keep it (same format on every page)
            link.append((name, value))
            continue
        if base == "_count":
            count = non_negative_int("_count", value, MAX_COUNT)
            continue
        if base == "_offset":
            offset = non_negative_int("_offset", value, MAX_OFFSET)
            continue
        if base == "_snapshot":
            snapshot = non_negative_int("_snapshot", value, 2 ** 62)
            continue
        if base == "_total":
            if value not in ("none", "estimate", "accurate"):
                raise FhirError(400, "invalid", "_total must be none, estimate or accurate")
            total = value
            link.append((name, value))
            continue
        if base == "_summary":
            if value == "count":
                summary_count = True
            elif value != "false":
                unknown(name, f"_summary={value} is not supported (count and false are)")
                continue
            link.append((name, value))
            continue
        if base == "_elements":
            elements = tuple(e.strip() for e in value.split(",") if e.strip())
            link.append((name, value))
            continue
        if base == "_sort":
            keys = []
            for k in value.split(","):
                desc = k.startswith("-")
                k = k.lstrip("-")
                if k not in SORT_KEYS:
                    raise FhirError(400, "not-supported", f"_sort by {k!r} is not supported (supported: "
                                    f"{', '.join(SORT_KEYS)})")
                keys.append((k, desc))
            sort = tuple(keys)
            link.append((name, value))
            continue
        if base in ("_include", "_revinclude"):
            spec = _include_spec(base, value, resource_type, base == "_revinclude")
            (revinclude if base == "_revinclude" else include).append(spec)
            link.append((name, value))
            continue
        if not value and modifier != "missing":
            continue  # an empty value is ignored (https://hl7.org/fhir/R4/search.html#errors)
        if base == "_id":
            if modifier == "missing":
                filters.append(Filter("_id", "missing", (value == "true",)))
            elif modifier is None:
                filters.append(Filter("_id", None, tuple(_split(value))))
            else:
                unknown(name, f"modifier :{modifier} is not supported on _id")
                continue
            link.append((name, value))
            continue
        if base == "_lastUpdated":
            if modifier is not None:
                unknown(name, f"modifier :{modifier} is not supported on _lastUpdated")
                continue
            filters.append(Filter("_lastUpdated", None, tuple(parse_date(name, v) for v in _split(value))))
            link.append((name, value))
            continue
        p = params.get(base)
        if p is None:
            unknown(name, f"unknown search parameter {name!r} for {resource_type} (supported: "
                    f"{', '.join(['_id', '_lastUpdated', *params])})")
            continue
        if modifier == "missing":
            if value not in ("true", "false"):
                raise FhirError(400, "invalid", f"{name} must be true or false")
            filters.append(Filter(base, "missing", (value == "true",)))
        elif p.kind == "token":
            if modifier not in (None, "not"):
                unknown(name, f"modifier :{modifier} is not supported on token parameter {base}")
                continue
            filters.append(Filter(base, modifier, tuple(parse_token(v) for v in _split(value, keep="|\\"))))
        elif p.kind == "reference":
            default = p.targets[0]
            if modifier is not None:
                if modifier not in p.targets:
                    unknown(name, f"modifier :{modifier} is not supported on reference parameter {base}")
                    continue
                default = modifier
            refs = tuple(parse_reference(base, v, default, p.targets) for v in _split(value))
            if modifier is not None and any(not r.startswith(modifier + "/") for r in refs):
                raise FhirError(400, "invalid", f"{name}: references must be to {modifier}")
            filters.append(Filter(base, None, refs))
        elif p.kind == "date":
            if modifier is not None:
                unknown(name, f"modifier :{modifier} is not supported on date parameter {base}")
                continue
            filters.append(Filter(base, None, tuple(parse_date(base, v) for v in _split(value))))
        elif p.kind in ("number", "quantity"):
            if modifier is not None:
                unknown(name, f"modifier :{modifier} is not supported on {p.kind} parameter {base}")
                continue
            parse = parse_number if p.kind == "number" else parse_quantity
            filters.append(Filter(base, None, tuple(parse(base, v) for v in _split(value, keep="|\\"))))
        elif p.kind == "string":
            if modifier not in (None, "exact", "contains"):
                unknown(name, f"modifier :{modifier} is not supported on string parameter {base}")
                continue
            filters.append(Filter(base, modifier, tuple(_split(value))))
        link.append((name, value))

    query = SearchQuery(resource_type, tuple(filters), sort, 0 if summary_count else count, offset, snapshot,
                        "accurate" if summary_count else total, tuple(include), tuple(revinclude))
    return ParsedSearch(query, summary_count, elements, ignored, link)
