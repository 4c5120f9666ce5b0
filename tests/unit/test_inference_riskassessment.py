"""RiskAssessment builder: golden files, FHIR validation (fhir.resources R4B) and the threshold rule."""
from __future__ import annotations

import json
import pathlib

import orjson
import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment
from vigil_inference.riskassessment import BASIS_CAP, build_risk_assessment, dumps, qualitative_risk

from vigil import timecontract
from vigil.ids import risk_assessment_id

GOLDEN = pathlib.Path(__file__).resolve().parent.parent / "golden"
START = int(timecontract.DEFAULT_T0.timestamp()) + 5 * 3600
BASIS = ["0f0e8c5e-1b8c-5f0a-9d43-2f3f5a0c1d01", "0f0e8c5e-1b8c-5f0a-9d43-2f3f5a0c1d02"]


def build(probability, threshold=0.25, basis=BASIS, patient="p000001"):
    return build_risk_assessment(patient_id=patient, model_name="vigil-sepsis", model_version="abc123def456",
                                 interval_start=START, interval_end=START + 3600, probability=probability,
                                 threshold=threshold, basis=basis)


@pytest.mark.parametrize("name,probability", [("high", 0.8125), ("low", 0.03125)])
def test_golden(name, probability):
    ra = build(probability)
    golden = json.loads((GOLDEN / f"riskassessment-{name}.json").read_text())
    assert orjson.loads(dumps(ra)) == golden
    parsed = RiskAssessment.model_validate(golden)  # raises on an invalid R4(B) resource
    assert parsed.id == risk_assessment_id("p000001", "vigil-sepsis", START)
    assert parsed.prediction[0].qualitativeRisk.coding[0].code == name
    assert float(parsed.prediction[0].probabilityDecimal) == probability
    assert parsed.performer.reference == "Device/vigil-model-vigil-sepsis"
    assert golden["occurrencePeriod"] == {"start": "2026-01-01T05:00:00Z", "end": "2026-01-01T06:00:00Z"}


@pytest.mark.parametrize("p,t,expected", [(0.25, 0.25, "high"), (0.2499999, 0.25, "low"), (1.0, 1.0, "high"),
                                          (0.0, 0.0, "high"), (0.0, 0.01, "low")])
def test_high_exactly_when_probability_reaches_threshold(p, t, expected):
    assert qualitative_risk(p, t) == expected
    ra = build(p, threshold=t)
    assert ra["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == expected
    RiskAssessment.model_validate(ra)


def test_basis_is_capped_to_the_latest_and_probability_checked():
    ids = [f"obs-{i}" for i in range(120)]
    ra = build(0.5, basis=ids)
    assert [b["reference"] for b in ra["basis"]] == [f"Observation/obs-{i}" for i in range(120 - BASIS_CAP, 120)]
    assert "basis" not in build(0.5, basis=[])
    RiskAssessment.model_validate(build(0.5, basis=[]))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            build(bad)
