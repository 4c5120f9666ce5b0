"""Parsing of FHIR search parameters (https://hl7.org/fhir/R4/search.html)."""
from __future__ import annotations

import pytest
from vigil_gateway.outcomes import FhirError
from vigil_gateway.search_params import DEFAULT_COUNT, MAX_COUNT, parse_search, parse_token
from vigil_gateway.store import TokenFilter, normalise_reference


@pytest.mark.parametrize("value, expected", [
    ("8867-4", TokenFilter(None, "8867-4")),
    ("http://loinc.org|8867-4", TokenFilter("http://loinc.org", "8867-4")),
    ("|8867-4", TokenFilter("", "8867-4")),
    ("http://loinc.org|", TokenFilter("http://loinc.org", None)),
])
def test_token_forms(value, expected):
    assert parse_token(value) == expected


@pytest.mark.parametrize("value, expected", [
    ("urn:acme|A\\|7", TokenFilter("urn:acme", "A|7")),           # search.html#escaping: \| is a literal |
    ("urn:a\\|b|7", TokenFilter("urn:a|b", "7")),
    ("A\\|7", TokenFilter(None, "A|7")),
    ("urn:acme\\\\|7", TokenFilter("urn:acme\\", "7")),            # \\ is a backslash, then the separator
    ("urn:acme|A\\,B", TokenFilter("urn:acme", "A,B")),
])
def test_escaped_token_characters(value, expected):
    (f,) = parse_search("Observation", [("identifier", value)]).query.filters
    assert f.values == (expected,)


def test_format_and_pretty_stay_in_paging_links():
    p = parse_search("Observation", [("subject", "p1"), ("_format", "json"), ("_pretty", "true")])
    assert p.link_params == [("subject", "p1"), ("_format", "json"), ("_pretty", "true")]
    assert p.query.filters and not p.ignored


@pytest.mark.parametrize("value", ["|", "", "a|b|c"])
def test_bad_tokens(value):
    with pytest.raises(FhirError) as e:
        parse_token(value)
    assert e.value.status == 400


@pytest.mark.parametrize("ref, expected", [
    ("p1", "Patient/p1"), ("Patient/p1", "Patient/p1"), ("Group/g1", "Group/g1"),
    ("https://ehr.example/fhir/Patient/p1", "Patient/p1"), ("Patient/p1/_history/3", "Patient/p1"),
])
def test_reference_normalisation(ref, expected):
    assert normalise_reference(ref) == expected


def test_subject_patient_count_offset_code():
    from vigil_gateway.store import Filter
    p = parse_search("Observation", [("subject", "p1"), ("code", "http://loinc.org|8867-4,59408-5"),
                                     ("_count", "10"), ("_offset", "20"), ("_format", "json")])
    q = p.query
    assert q.count == 10 and q.offset == 20
    assert Filter("subject", None, ("Patient/p1",)) in q.filters
    assert Filter("code", None, (TokenFilter("http://loinc.org", "8867-4"), TokenFilter(None, "59408-5"))) \
        in q.filters
    assert ("code", "http://loinc.org|8867-4,59408-5") in p.link_params
    q = parse_search("RiskAssessment", [("patient", "Patient/p1")]).query
    assert q.filters == (Filter("patient", None, ("Patient/p1",)),) and q.count == DEFAULT_COUNT
    assert parse_search("Observation", [("_count", "5000")]).query.count == MAX_COUNT
    assert parse_search("Observation", [("_count", "0")]).query.count == 0
    # OR lists and repeats (AND) are supported now
    assert len(parse_search("Observation", [("subject", "p1"), ("subject", "p2")]).query.filters) == 2
    assert parse_search("Observation", [("subject", "p1,p2")]).query.filters[0].values == \
        ("Patient/p1", "Patient/p2")


@pytest.mark.parametrize("items", [
    [("_count", "-1")], [("_count", "ten")], [("_count", "1.5")], [("_offset", "-3")],
    [("subject", "bad id!")],
    [("patient", "Group/g1")],                       # patient must be a Patient
    [("date", "yesterday")], [("date", "xx2024")], [("_sort", "value")],
    [("subject:missing", "maybe")], [("_include", "Observation:code")],
])
def test_bad_searches_are_400(items):
    with pytest.raises(FhirError) as e:
        parse_search("Observation", items)
    assert e.value.status == 400


@pytest.mark.parametrize("items", [[("foo", "bar")], [("code:text", "heart")], [("_summary", "true")]])
def test_unknown_is_ignored_unless_strict(items):
    assert parse_search("Observation", items).ignored == [items[0][0]]
    with pytest.raises(FhirError) as e:
        parse_search("Observation", items, strict=True)
    assert e.value.status == 400


def test_code_is_not_a_riskassessment_parameter():
    assert parse_search("RiskAssessment", [("code", "x")]).ignored == ["code"]
    with pytest.raises(FhirError) as e:
        parse_search("RiskAssessment", [("code", "x")], strict=True)
    assert e.value.status == 400 and "code" in e.value.diagnostics


@pytest.mark.parametrize("value, prefix, low, high", [
    ("2024", "eq", "2024-01-01T00:00:00.000000Z", "2024-12-31T23:59:59.999999Z"),
    ("ge2024-02", "ge", "2024-02-01T00:00:00.000000Z", "2024-02-29T23:59:59.999999Z"),
    ("lt2024-02-03", "lt", "2024-02-03T00:00:00.000000Z", "2024-02-03T23:59:59.999999Z"),
    ("sa2024-02-03T10:00+02:00", "sa", "2024-02-03T08:00:00.000000Z", "2024-02-03T08:00:59.999999Z"),
    ("ap2024-02-03T10:00:05Z", "ap", "2024-02-03T10:00:05.000000Z", "2024-02-03T10:00:05.999999Z"),
    ("eb2024-02-03T10:00:05.5Z", "eb", "2024-02-03T10:00:05.500000Z", "2024-02-03T10:00:05.599999Z"),
])
def test_date_values(value, prefix, low, high):
    from vigil_gateway.store import DateValue
    (f,) = parse_search("Observation", [("date", value)]).query.filters
    assert f.values == (DateValue(prefix, low, high),)


@pytest.mark.parametrize("value, prefix, number, low, high", [
    ("100", "eq", 100.0, 99.5, 100.5), ("100.00", "eq", 100.0, 99.995, 100.005), ("gt0.5", "gt", 0.5, 0.45, 0.55),
    ("1e2", "eq", 100.0, 50.0, 150.0), ("-1.5", "eq", -1.5, -1.55, -1.45), ("ap0", "ap", 0.0, -0.5, 0.5),
    ("le2E-1", "le", 0.2, 0.15, 0.25),
])
def test_number_values(value, prefix, number, low, high):
    from vigil_gateway.search_params import parse_number

    got = parse_number("probability", value)
    assert (got.prefix, got.system, got.code) == (prefix, None, None)
    assert got.value == pytest.approx(number) and got.low == pytest.approx(low) and got.high == pytest.approx(high)


def test_quantity_values():
    from vigil_gateway.search_params import parse_quantity

    q = parse_quantity("value-quantity", "ge130|http://unitsofmeasure.org|/min")
    assert (q.prefix, q.value, q.system, q.code) == ("ge", 130.0, "http://unitsofmeasure.org", "/min")
    q = parse_quantity("value-quantity", "5.4||mg")
    assert (q.system, q.code, q.low, q.high) == ("", "mg", pytest.approx(5.35), pytest.approx(5.45))
    assert parse_quantity("value-quantity", "7").code is None


def test_golden_resources_are_searchable_by_the_new_parameters():
    """What the worker and ingest publish (the golden files) yields risk, probability, performer and
    value-quantity index rows."""
    import json
    import pathlib

    from vigil_gateway.fhirindex import index_rows

    golden = pathlib.Path(__file__).parents[1] / "golden"
    high = index_rows(json.loads((golden / "riskassessment-high.json").read_text()))
    assert ("risk", "http://terminology.hl7.org/CodeSystem/risk-probability", "high") in high.tokens
    [prob] = [q for q in high.quantities if q[0] == "probability"]
    assert 0.0 <= prob[1] <= 1.0 and prob[2:] == ("", "", "")
    assert any(p == "performer" and t.startswith("Device/") for p, t in high.refs)
    temp = index_rows(json.loads((golden / "observation-body-temperature-degF.json").read_text()))
    assert temp.quantities == [("value-quantity", 38.0, "http://unitsofmeasure.org", "Cel", "Cel")]
    panel = index_rows(json.loads((golden / "observation-blood-pressure-panel.json").read_text()))
    assert panel.quantities == []  # a panel's values are in its components (component-value-quantity: not indexed)
