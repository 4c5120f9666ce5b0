"""Deterministic FHIR logical ids (https://hl7.org/fhir/R4/datatypes.html#id) shared by all services."""
from __future__ import annotations

import re
import uuid

_NS = uuid.UUID("6f1c3c8e-6b0e-4a8e-9a37-1f0b6c2d9e11")
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def is_fhir_id(value: str) -> bool:
    return bool(FHIR_ID.match(value))


def observation_id(device_id: str, sequence: int) -> str:
    """Observation id for one device reading: the same (device, sequence) always gives the same id."""
    return str(uuid.uuid5(_NS, f"obs/{device_id}/{sequence}"))


def risk_assessment_id(patient_id: str, model: str, interval_start_epoch: int) -> str:
    """RiskAssessment id per (patient, model, scoring interval)."""
    return str(uuid.uuid5(_NS, f"ra/{patient_id}/{model}/{interval_start_epoch}"))
