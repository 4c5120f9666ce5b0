"""Device reading -> FHIR R4 Observation, as plain dicts (no pydantic per reading).

Observations follow the R4 vital-signs profile where it applies
(https://hl7.org/fhir/R4/observation-vitalsigns.html): status, category vital-signs, a LOINC code,
subject, effective[x] and a UCUM valueQuantity. Labs carry category laboratory
(https://hl7.org/fhir/R4/valueset-observation-category.html).
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from vigil import codes
from vigil.catalogue import Catalogue, Measurement
from vigil.ids import is_fhir_id, observation_id

MAX_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class Violation:
    """One reason a reading (or the batch) was refused; `field` is a path such as readings[3].unit."""

    field: str
    description: str


def format_instant(epoch_seconds: float) -> str:
    """FHIR dateTime/instant in UTC with second or sub-second precision."""
    t = dt.datetime.fromtimestamp(epoch_seconds, tz=dt.UTC)
    if t.microsecond:
        return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _category(m: Measurement) -> list[dict]:
    return [{
        "coding": [{"system": codes.OBSERVATION_CATEGORY, "code": m.category,
                    "display": codes.CATEGORY_DISPLAY[m.category]}],
        "text": codes.CATEGORY_DISPLAY[m.category],
    }]


def _code(m: Measurement) -> dict:
    coding = [{"system": codes.LOINC, "code": m.loinc, "display": m.display}]
    coding += [{"system": s, "code": c, "display": d} for s, c, d in m.extra_codings]
    return {"coding": coding, "text": m.display}


def build_observation(
    m: Measurement, *, device_id: str, patient_id: str, sequence: int, value: float, effective: float
) -> dict:
    """One Observation dict for a reading already validated and converted to the catalogue unit."""
    obs: dict = {
        "resourceType": "Observation",
        "id": observation_id(device_id, sequence),
        "identifier": [{"system": codes.READING_IDENTIFIER_SYSTEM, "value": f"{device_id}/{sequence}"}],
        "status": "final",
        "category": _category(m),
        "code": _code(m),
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": format_instant(effective),
        "valueQuantity": {"value": value, "unit": m.ucum, "system": codes.UCUM, "code": m.ucum},
        "device": {"reference": f"Device/{device_id}"},
    }
    if m.category == "vital-signs":
        profiles = [codes.VITAL_SIGNS_PROFILE] + ([m.profile] if m.profile else [])
        obs["meta"] = {"profile": profiles}
    if not m.is_plausible(value):
        # Flagged, never dropped: the value stays, marked for review.
        obs["status"] = "preliminary"
        obs["interpretation"] = [{
            "coding": [{"system": codes.DATA_QUALITY_SYSTEM, "code": "implausible",
                        "display": "Outside the physiologic plausibility range"}],
            "text": f"outside plausible range {m.plausible[0]:g}..{m.plausible[1]:g} {m.ucum}",
        }]
    return obs


def map_batch(
    catalogue: Catalogue,
    device_id: str,
    patient_id: str,
    readings: list[tuple[int, str, str, float, str, float]],
) -> tuple[list[dict], list[Violation]]:
    """Validate and map a batch as a whole.

    `readings` are (sequence, code, system, value, unit, effective epoch seconds). Returns the
    Observations, or no Observations and every violation found (the batch is refused whole).
    """
    violations: list[Violation] = []
    if not is_fhir_id(device_id):
        violations.append(Violation("device_id", "must match [A-Za-z0-9-.]{1,64}"))
    if not is_fhir_id(patient_id):
        violations.append(Violation("patient_id", "must match [A-Za-z0-9-.]{1,64}"))
    if not readings:
        violations.append(Violation("readings", "a batch needs at least one reading"))
    if len(readings) > MAX_BATCH:
        violations.append(Violation("readings", f"at most {MAX_BATCH} readings per batch"))
    if violations:
        return [], violations

    out: list[dict] = []
    seen: set[int] = set()
    for i, (seq, code, system, value, unit, effective) in enumerate(readings):
        where = f"readings[{i}]"
        if seq in seen:
            violations.append(Violation(f"{where}.sequence", f"sequence {seq} appears twice in the batch"))
        seen.add(seq)
        m = catalogue.lookup(code, system)
        if m is None:
            violations.append(Violation(f"{where}.code", f"unknown measurement code {system or codes.LOINC}|{code}"))
            continue
        if not math.isfinite(value):
            violations.append(Violation(f"{where}.value", "value must be a finite number"))
            continue
        if effective <= 0:
            violations.append(Violation(f"{where}.effective_time", "effective_time is required"))
            continue
        canonical = m.to_canonical(value, unit)
        if canonical is None:
            violations.append(Violation(
                f"{where}.unit", f"unit {unit!r} is not accepted for {m.key}; use one of {list(m.accepted_units)}"))
            continue
        out.append(build_observation(m, device_id=device_id, patient_id=patient_id, sequence=seq,
                                     value=canonical, effective=effective))
    if violations:
        return [], violations
    return out, []
