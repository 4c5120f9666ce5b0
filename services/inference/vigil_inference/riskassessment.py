"""Pure builder of the FHIR R4 RiskAssessment Vigil publishes per (patient, model, scoring interval).

https://hl7.org/fhir/R4/riskassessment.html

- id: vigil.ids.risk_assessment_id(patient, model, interval start) - one logical resource per interval;
  a re-score of the same interval is a new version of it (the gateway versions it).
- status final; subject Patient/<id>; occurrencePeriod = the scoring interval [start, end).
- method: the model (Vigil's model code system, code = model name), text with its version.
- performer: R4 allows Reference(Practitioner | PractitionerRole | Device), so the model is named as a
  Device: reference Device/vigil-model-<name>, display "<name> <version>", identifier
  (Vigil model naming system, value "<name>:<version>").
- basis: references to the Observations whose values the features used (the latest `BASIS_CAP`).
- prediction[0]: outcome sepsis (SNOMED CT 91302008), probabilityDecimal in [0, 1] and qualitativeRisk
  high/low (http://terminology.hl7.org/CodeSystem/risk-probability), high exactly when
  probability >= the model's alert threshold. prediction[0].rationale (optional): the top contributing
  features as text, and the same as a structured extension (CONTRIBUTION_EXTENSION: one `feature`
  sub-extension per feature with name, value and SHAP contribution in log-odds). Note: R4's invariant ras-2 only bounds probabilityDecimal
  by 100 (it reads as a percentage there); Vigil always uses the fraction in [0, 1].
"""
from __future__ import annotations

import math

import orjson

from vigil import codes
from vigil.ids import risk_assessment_id
from vigil.observation import format_instant

BASIS_CAP = 50
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
MODEL_SYSTEM = f"{codes.VIGIL_BASE}/CodeSystem/model"
MODEL_IDENTIFIER_SYSTEM = f"{codes.VIGIL_BASE}/NamingSystem/model"
QUALITATIVE = {"high": "High likelihood", "low": "Low likelihood"}
CONTRIBUTION_EXTENSION = f"{codes.VIGIL_BASE}/StructureDefinition/feature-contribution"


def model_device_id(model_name: str) -> str:
    return f"vigil-model-{model_name}"


def qualitative_risk(probability: float, threshold: float) -> str:
    return "high" if probability >= threshold else "low"


def build_risk_assessment(
    *, patient_id: str, model_name: str, model_version: str, interval_start: int, interval_end: int,
    probability: float, threshold: float, basis: list[str], rationale: str | None = None,
    contributions: list[tuple[str, float, float]] | None = None, outcome_text: str = "Sepsis",
    outcome_coding: list[dict] | None = None,
) -> dict:
    """RiskAssessment dict; `basis` are Observation ids (oldest first; the last BASIS_CAP are kept)."""
    if not (0.0 <= probability <= 1.0) or math.isnan(probability):
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    risk = qualitative_risk(probability, threshold)
    ra: dict = {
        "resourceType": "RiskAssessment",
        "id": risk_assessment_id(patient_id, model_name, int(interval_start)),
        "status": "final",
        "method": {
            "coding": [{"system": MODEL_SYSTEM, "code": model_name, "display": f"Vigil model {model_name}"}],
            "text": f"{model_name} {model_version}",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "occurrencePeriod": {"start": format_instant(interval_start), "end": format_instant(interval_end)},
        "performer": {
            "reference": f"Device/{model_device_id(model_name)}",
            "identifier": {"system": MODEL_IDENTIFIER_SYSTEM, "value": f"{model_name}:{model_version}"},
            "display": f"{model_name} {model_version}",
        },
        "prediction": [{
            "outcome": {"coding": [dict(codes.SEPSIS)] if outcome_coding is None else outcome_coding,
                        "text": outcome_text},
            "probabilityDecimal": float(probability),
            "qualitativeRisk": {
                "coding": [{"system": RISK_PROBABILITY, "code": risk, "display": QUALITATIVE[risk]}],
                "text": f"{QUALITATIVE[risk]} (alert threshold {threshold:.4f})",
            },
        }],
    }
    pred = ra["prediction"][0]
    if contributions:
        pred["extension"] = [{"url": CONTRIBUTION_EXTENSION, "extension": [
            {"url": "feature", "valueString": name},
            *([{"url": "value", "valueDecimal": float(value)}] if not math.isnan(value) else []),
            {"url": "contribution", "valueDecimal": round(float(contrib), 6)},
        ]} for name, value, contrib in contributions]
        if rationale is None:
            rationale = "Top contributing features (SHAP, log-odds): " + "; ".join(
                f"{n} {c:+.3f}" + (f" (value {v:.4g})" if not math.isnan(v) else " (missing)") for n, v, c in contributions)
    if rationale:
        pred["rationale"] = rationale
    if basis:
        ra["basis"] = [{"reference": f"Observation/{oid}"} for oid in basis[-BASIS_CAP:]]
    return ra


def dumps(ra: dict) -> bytes:
    return orjson.dumps(ra)
