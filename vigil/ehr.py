"""Patient and Encounter from a PhysioNet stay, as an EHR would write them (the replay time contract).

The time contract (see vigil/timecontract.py): T0 is the ICU admission. The stay becomes
- a Patient (https://hl7.org/fhir/R4/patient.html) with the identifier
  `https://physionet.org/content/challenge-2019/|<stem>`, gender from Gender (1 male, 0 female) and a
  birthDate derived from Age at T0;
- a hospital Encounter (https://hl7.org/fhir/R4/encounter.html) starting at T0 + HospAdmTime hours;
- an ICU Encounter starting at T0, partOf the hospital one, with the ICU unit (Unit1 = MICU,
  Unit2 = SICU) as its location display.
`demographics()` is the one function that reads them back, used both offline (training) and online
(the worker), so that both see exactly the same values.
"""
from __future__ import annotations

import datetime as dt
import math

import numpy as np

from vigil.codes import PHYSIONET_PATIENT_SYSTEM
from vigil.physionet import COL, Stay

ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
UNITS = {"Unit1": "MICU", "Unit2": "SICU"}


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _first(stay: Stay, column: str) -> float:
    values = stay.data[:, COL[column]]
    finite = values[~np.isnan(values)]
    return float(finite[0]) if len(finite) else math.nan


def patient_from_stay(stay: Stay, t0: dt.datetime) -> dict:
    """Patient resource (no id: the EHR's server assigns it, or PUT by id = stem)."""
    age, gender = _first(stay, "Age"), _first(stay, "Gender")
    patient: dict = {
        "resourceType": "Patient",
        "identifier": [{"system": PHYSIONET_PATIENT_SYSTEM, "value": stay.stem}],
        "active": True,
    }
    if not math.isnan(gender):
        patient["gender"] = "male" if gender == 1 else "female"
    if not math.isnan(age):
        # birthDate at day precision such that the completed years at T0 equal the data set's Age.
        whole = int(age)
        patient["birthDate"] = (t0.date().replace(year=t0.year - whole) - dt.timedelta(days=1)).isoformat() \
            if not (t0.month == 2 and t0.day == 29) else dt.date(t0.year - whole, 2, 28).isoformat()
    return patient


def encounters_from_stay(stay: Stay, t0: dt.datetime, patient_ref: str) -> tuple[dict, dict]:
    """(hospital Encounter, ICU Encounter); the ICU one's partOf must be set to the hospital one's id."""
    hosp_adm = _first(stay, "HospAdmTime")
    hospital_start = t0 + dt.timedelta(hours=0.0 if math.isnan(hosp_adm) else hosp_adm)
    identifier = {"system": PHYSIONET_PATIENT_SYSTEM, "value": stay.stem}
    hospital = {
        "resourceType": "Encounter",
        "identifier": [{**identifier, "value": f"{stay.stem}-hospital"}],
        "status": "in-progress",
        "class": {"system": ACT_CODE, "code": "IMP", "display": "inpatient encounter"},
        "subject": {"reference": patient_ref},
        "period": {"start": _iso(hospital_start)},
    }
    unit = next((UNITS[c] for c in UNITS if _first(stay, c) == 1), None)
    icu = {
        "resourceType": "Encounter",
        "identifier": [{**identifier, "value": f"{stay.stem}-icu"}],
        "status": "in-progress",
        "class": {"system": ACT_CODE, "code": "ACUTE", "display": "inpatient acute"},
        "subject": {"reference": patient_ref},
        "period": {"start": _iso(t0)},
    }
    if unit:
        icu["location"] = [{"location": {"display": unit}, "status": "active"}]
    return hospital, icu


def _parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts)  # Python 3.11 reads the Z suffix


def demographics(patient: dict | None, icu: dict | None, hospital: dict | None) -> dict[str, float]:
    """Values the model may use, NaN where unknown: age (completed years at ICU admission),
    gender_male (1/0), hosp_adm_hours (hospital admission minus ICU admission, hours), unit_micu,
    unit_sicu (1/0), icu_admit_epoch (seconds)."""
    nan = math.nan
    out = {"age": nan, "gender_male": nan, "hosp_adm_hours": nan, "unit_micu": nan, "unit_sicu": nan,
           "icu_admit_epoch": nan}
    icu_start = _parse(icu["period"]["start"]) if icu and icu.get("period", {}).get("start") else None
    if icu_start is not None:
        out["icu_admit_epoch"] = icu_start.timestamp()
        unit = next((loc.get("location", {}).get("display") for loc in icu.get("location", [])), None)
        out["unit_micu"], out["unit_sicu"] = (float(unit == "MICU"), float(unit == "SICU")) if unit else (nan, nan)
        if hospital and hospital.get("period", {}).get("start"):
            out["hosp_adm_hours"] = (_parse(hospital["period"]["start"]) - icu_start).total_seconds() / 3600
    if patient:
        if patient.get("gender") in ("male", "female"):
            out["gender_male"] = float(patient["gender"] == "male")
        if patient.get("birthDate") and icu_start is not None:
            born = dt.date.fromisoformat(patient["birthDate"][:10])
            d = icu_start.date()
            out["age"] = float(d.year - born.year - ((d.month, d.day) < (born.month, born.day)))
    return out
