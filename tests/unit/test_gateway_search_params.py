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
    q = parse_search("Observation", [("subject", "p1"), ("code", "http://loinc.org|8867-4,59408-5"),
                                     ("_count", "10"), ("_offset", "20"), ("_format", "json")])
    assert q.subject == "Patient/p1" and q.count == 10 and q.offset == 20 and not q.contradictory
    assert q.code == (TokenFilter("http://loinc.org", "8867-4"), TokenFilter(None, "59408-5"))
    assert ("code", "http://loinc.org|8867-4,59408-5") in q.link_params()

    q = parse_search("RiskAssessment", [("patient", "Patient/p1")])
    assert q.subject == "Patient/p1" and q.count == DEFAULT_COUNT and q.offset == 0
    assert parse_search("Observation", [("_count", "5000")]).count == MAX_COUNT
    assert parse_search("Observation", [("_count", "0")]).count == 0
    assert parse_search("Observation", [("subject", "p1"), ("patient", "p2")]).contradictory
    assert not parse_search("Observation", [("subject", "Patient/p1"), ("patient", "p1")]).contradictory


@pytest.mark.parametrize("items", [
    [("_count", "-1")], [("_count", "ten")], [("_count", "1.5")], [("_offset", "-3")],
    [("foo", "bar")],                               # unknown parameter (strict)
    [("subject", "p1"), ("subject", "p2")],          # repeated (AND) not supported
    [("subject", "p1,p2")],                          # OR list not supported
    [("subject", "bad id!")],
    [("patient", "Group/g1")],                       # patient must be a Patient
    [("code:text", "heart")],                        # modifiers not supported
])
def test_bad_searches_are_400(items):
    with pytest.raises(FhirError) as e:
        parse_search("Observation", items)
    assert e.value.status == 400


def test_code_is_not_a_riskassessment_parameter():
    with pytest.raises(FhirError) as e:
        parse_search("RiskAssessment", [("code", "x")])
    assert e.value.status == 400 and "code" in e.value.diagnostics
