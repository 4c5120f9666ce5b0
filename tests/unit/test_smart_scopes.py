"""SMART v1/v2 scope parsing and the access decision (pure)."""
import pytest

from vigil.smart import Decision, decide, in_compartment, parse_scope, parse_scopes, patient_of


@pytest.mark.parametrize("text,expected", [
    ("patient/Observation.read", ("patient", "Observation", "rs")),
    ("patient/Observation.rs", ("patient", "Observation", "rs")),
    ("user/*.write", ("user", "*", "cud")),
    ("system/*.*", ("system", "*", "cruds")),
    ("system/RiskAssessment.s", ("system", "RiskAssessment", "s")),
    ("patient/*.cruds", ("patient", "*", "cruds")),
])
def test_parse(text, expected):
    s = parse_scope(text)
    assert (s.level, s.resource_type, s.permissions) == expected


@pytest.mark.parametrize("text", ["openid", "launch/patient", "patient/Observation.rs?category=vital-signs",
                                  "patient/Observation.sr", "patient/Observation.", "admin/*.read", "fhirUser"])
def test_scopes_granting_nothing(text):
    assert parse_scope(text) is None


def test_system_scope_allows_any_patient():
    assert decide(parse_scopes("system/*.read"), "Observation", "search-type", None) == Decision(True)


def test_patient_scope_confines_to_the_launch_patient():
    d = decide(parse_scopes("openid patient/Observation.rs"), "Observation", "read", "p1")
    assert d == Decision(True, patient="p1")


def test_patient_scope_without_patient_claim_is_refused():
    assert not decide(parse_scopes("patient/*.read"), "Observation", "read", None).allowed


def test_missing_permission_is_refused_with_a_reason():
    d = decide(parse_scopes("patient/Observation.r"), "Observation", "search-type", "p1")
    assert not d.allowed and "Observation.s" in d.reason
    assert not decide(parse_scopes("system/Observation.read"), "RiskAssessment", "read", None).allowed
    assert not decide(parse_scopes("system/*.read"), "Patient", "create", None).allowed


def test_system_scope_wins_over_patient_scope():
    assert decide(parse_scopes("patient/*.read system/Observation.read"), "Observation", "read", "p1").patient is None


def test_compartment_membership():
    obs = {"resourceType": "Observation", "subject": {"reference": "Patient/p1"}}
    assert patient_of(obs) == "p1" and in_compartment(obs, "p1") and not in_compartment(obs, "p2")
    assert patient_of({"resourceType": "Patient", "id": "p2"}) == "p2"
    assert patient_of({"resourceType": "Device", "patient": {"reference": "Patient/p3"}}) == "p3"
    assert patient_of({"resourceType": "Device"}) is None
    assert patient_of({"resourceType": "Observation", "subject": {"reference": "Group/g"}}) is None
