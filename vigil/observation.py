"""Device reading -> FHIR R4 Observation, as plain dicts (no pydantic per reading).

Observations follow the R4 vital-signs profile where it applies
(https://hl7.org/fhir/R4/observation-vitalsigns.html): status, category vital-signs, a LOINC code,
subject, effective[x] and a UCUM valueQuantity. Labs carry category laboratory
(https://hl7.org/fhir/R4/valueset-observation-category.html).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from vigil import codes
from vigil.catalogue import Catalogue, Measurement
from vigil.ids import is_fhir_id, observation_id, observation_ids

MAX_BATCH = 10_000
# google.protobuf.Timestamp's range ends at 9999-12-31T23:59:59.999999999Z, and so do FHIR's 4-digit years:
# an effective time at or past 10000-01-01T00:00:00Z (as an epoch float) cannot be an Observation.
END_OF_TIME = 253_402_300_800.0


@dataclass(frozen=True, slots=True)
class Violation:
    """One reason a reading (or the batch) was refused; `field` is a path such as readings[3].unit."""

    field: str
    description: str


_INSTANTS: dict[float, str] = {}


def format_instant(epoch_seconds: float) -> str:
    """FHIR dateTime/instant in UTC with second or millisecond precision (memoised: readings of a
    batch share few distinct times)."""
    s = _INSTANTS.get(epoch_seconds)
    if s is None:
        if len(_INSTANTS) > 65536:
            _INSTANTS.clear()
        whole = math.floor(epoch_seconds)
        frac = epoch_seconds - whole
        base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        if frac:
            ms = min(999, round(frac * 1e6) // 1000)  # truncation as datetime isoformat(milliseconds)
            s = f"{base}.{ms:03d}Z"
        else:
            s = base + "Z"
        _INSTANTS[epoch_seconds] = s
    return s


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


def _meta(m: Measurement) -> dict | None:
    if m.category != "vital-signs":
        return None
    return {"profile": [codes.VITAL_SIGNS_PROFILE] + ([m.profile] if m.profile else [])}


def _implausible(m: Measurement) -> list[dict]:
    return [{
        "coding": [{"system": codes.DATA_QUALITY_SYSTEM, "code": "implausible",
                    "display": "Outside the physiologic plausibility range"}],
        "text": f"outside plausible range {m.plausible[0]:g}..{m.plausible[1]:g} {m.ucum}",
    }]


class _Parts:
    """Per-measurement constant parts of an Observation, built once and shared by every reading
    (they are only serialized, never mutated, on the hot path)."""

    __slots__ = ("category", "code", "implausible", "meta")

    def __init__(self, m: Measurement):
        self.category = _category(m)
        self.code = _code(m)
        self.meta = _meta(m)
        self.implausible = _implausible(m)


_PARTS: dict[int, _Parts] = {}


def _parts(m: Measurement) -> _Parts:
    p = _PARTS.get(id(m))
    if p is None:
        p = _PARTS[id(m)] = _Parts(m)
    return p


def _quantity(m: Measurement, value: float) -> dict:
    return {"value": value, "unit": m.ucum, "system": codes.UCUM, "code": m.ucum}


def build_observation(
    m: Measurement, *, device_id: str, patient_id: str, sequence: int, value: float | None, effective: float,
    components: list[tuple[Measurement, float]] | None = None, obs_id: str | None = None,
    _shared: bool = False,
) -> dict:
    """One Observation dict for a reading already validated and converted to the catalogue unit.

    A panel (m.components) has `components` [(component measurement, canonical value)] and no value.
    """
    parts = _parts(m)
    obs: dict = {
        "resourceType": "Observation",
        "id": obs_id or observation_id(device_id, sequence),
        "identifier": [{"system": codes.READING_IDENTIFIER_SYSTEM, "value": f"{device_id}/{sequence}"}],
        "status": "final",
        "category": parts.category if _shared else _category(m),
        "code": parts.code if _shared else _code(m),
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": format_instant(effective),
        "device": {"reference": f"Device/{device_id}"},
    }
    if components is None:
        obs["valueQuantity"] = _quantity(m, value)
        if not m.is_plausible(value):
            # Flagged, never dropped: the value stays, marked for review.
            obs["status"] = "preliminary"
            obs["interpretation"] = parts.implausible if _shared else _implausible(m)
    else:
        comps = []
        for cm, cv in components:
            c = {"code": _parts(cm).code if _shared else _code(cm), "valueQuantity": _quantity(cm, cv)}
            if not cm.is_plausible(cv):
                c["interpretation"] = _parts(cm).implausible if _shared else _implausible(cm)
                obs["status"] = "preliminary"
            comps.append(c)
        obs["component"] = comps
    if parts.meta is not None:
        obs["meta"] = parts.meta if _shared else _meta(m)
    return obs


def _panel_components(m: Measurement, comps, where: str, catalogue: Catalogue,
                      violations: list[Violation]) -> list[tuple[Measurement, float]] | None:
    out: list[tuple[Measurement, float]] = []
    seen: set[str] = set()
    ok = True
    for j, (code, system, value, unit) in enumerate(comps):
        cw = f"{where}.components[{j}]"
        cm = catalogue.lookup(code, system)
        if cm is None or cm.key not in m.components:
            violations.append(Violation(f"{cw}.code", f"{system or codes.LOINC}|{code} is not a component of "
                                                      f"{m.key} (allowed: {list(m.components)})"))
            ok = False
            continue
        if cm.key in seen:
            violations.append(Violation(f"{cw}.code", f"component {cm.key} appears twice"))
            ok = False
            continue
        seen.add(cm.key)
        if not math.isfinite(value):
            violations.append(Violation(f"{cw}.value", "value must be a finite number"))
            ok = False
            continue
        canonical = cm.to_canonical(value, unit)
        if canonical is None:
            violations.append(Violation(
                f"{cw}.unit", f"unit {unit!r} is not accepted for {cm.key}; use one of {list(cm.accepted_units)}"))
            ok = False
            continue
        if not math.isfinite(canonical):
            violations.append(Violation(f"{cw}.value", f"{value!r} {unit} is out of range in {cm.ucum}"))
            ok = False
            continue
        out.append((cm, canonical))
    missing = [k for k in m.required if k not in seen]
    if missing and ok:
        violations.append(Violation(f"{where}.components", f"panel {m.key} needs components {missing}"))
        ok = False
    return out if ok else None


def map_batch(
    catalogue: Catalogue,
    device_id: str,
    patient_id: str,
    readings: list[tuple],
) -> tuple[list[dict], list[Violation]]:
    """Validate and map a batch as a whole.

    `readings` are (sequence, code, system, value, unit, effective epoch seconds[, components]) where
    components are (code, system, value, unit) tuples of a panel reading. Returns the Observations, or
    no Observations and every violation found (the batch is refused whole).
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
    lookup = catalogue.by_input.get
    loinc = codes.LOINC
    ids = observation_ids(device_id)
    identifier_prefix = f"{device_id}/"
    subject = {"reference": f"Patient/{patient_id}"}
    device = {"reference": f"Device/{device_id}"}
    reading_system = codes.READING_IDENTIFIER_SYSTEM
    instants = _INSTANTS
    for i, r in enumerate(readings):
        seq, code, system, value, unit, effective = r[:6]
        if seq in seen:
            violations.append(Violation(f"readings[{i}].sequence", f"sequence {seq} appears twice in the batch"))
        seen.add(seq)
        m = lookup((system or loinc, code))
        if m is None:
            violations.append(Violation(f"readings[{i}].code", f"unknown measurement code {system or loinc}|{code}"))
            continue
        if not 0 < effective < END_OF_TIME:
            violations.append(Violation(f"readings[{i}].effective_time", (
                "effective_time is required" if effective == 0 else
                "effective_time must not be before 1970-01-01T00:00:00Z" if effective < 0 else
                "effective_time must be before 10000-01-01T00:00:00Z")))
            continue
        if m.components:
            comps = _panel_components(m, r[6] if len(r) > 6 else (), f"readings[{i}]", catalogue, violations)
            if comps is None or violations:
                continue
            out.append(build_observation(m, device_id=device_id, patient_id=patient_id, sequence=seq, value=None,
                                         effective=effective, components=comps, obs_id=ids(seq), _shared=True))
            continue
        if len(r) > 6 and r[6]:
            violations.append(Violation(f"readings[{i}].components", f"{m.key} is not a panel; send no components"))
            continue
        if not math.isfinite(value):
            violations.append(Violation(f"readings[{i}].value", "value must be a finite number"))
            continue
        if unit == m.ucum:
            canonical = value
        else:
            canonical = m.to_canonical(value, unit)
            if canonical is None:
                violations.append(Violation(
                    f"readings[{i}].unit", f"unit {unit!r} is not accepted for {m.key}; use one of {list(m.accepted_units)}"))
                continue
            if not math.isfinite(canonical):
                violations.append(Violation(f"readings[{i}].value", f"{value!r} {unit} is out of range in {m.ucum}"))
                continue
        if violations:
            continue  # the batch is refused anyway: only collect violations
        parts = _PARTS.get(id(m)) or _parts(m)
        eff = instants.get(effective) or format_instant(effective)
        obs = {
            "resourceType": "Observation",
            "id": ids(seq),
            "identifier": [{"system": reading_system, "value": f"{identifier_prefix}{seq}"}],
            "status": "final",
            "category": parts.category,
            "code": parts.code,
            "subject": subject,
            "effectiveDateTime": eff,
            "valueQuantity": {"value": canonical, "unit": m.ucum, "system": codes.UCUM, "code": m.ucum},
            "device": device,
        }
        if parts.meta is not None:
            obs["meta"] = parts.meta
        if not (m.plausible[0] <= canonical <= m.plausible[1]):
            obs["status"] = "preliminary"
            obs["interpretation"] = parts.implausible
        out.append(obs)
    if violations:
        return [], violations
    return out, []
