"""Device reading -> FHIR R4 Observation: golden files, FHIR validation, vital-signs rules, violations.

Regenerate the goldens with VIGIL_UPDATE_GOLDEN=1 (then review the diff by eye).
"""
from __future__ import annotations

import json
import os
import pathlib

import pytest
from fhir.resources.R4B.observation import Observation
from vigil_ingest.client import make_reading
from vigil_ingest.handler import BatchRejected, prepare_batch

from vigil import bus, codes
from vigil.catalogue import load_catalogue
from vigil.device.v1 import ingest_pb2
from vigil.observation import map_batch
from vigil.timecontract import DEFAULT_T0

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden"
T = DEFAULT_T0.timestamp() + 4 * 3600  # row ICULOS=5
MDC = codes.MDC

# name -> (sequence, code, system, value, unit)
CASES = {
    "heart-rate": (1, "8867-4", "", 72.0, "/min"),
    "oxygen-saturation-fraction": (2, "59408-5", "", 0.95, "1"),
    "body-temperature-degF": (3, "8310-5", "", 100.4, "[degF]"),
    "systolic-bp-mdc": (4, "150017", MDC, 118.0, "mm[Hg]"),
    "lactate": (5, "2524-7", "", 2.4, "mmol/L"),
    "heart-rate-implausible": (6, "8867-4", "", 400.0, "/min"),
}


def _observation(name: str) -> dict:
    seq, code, system, value, unit = CASES[name]
    obs, violations = map_batch(load_catalogue(), "monitor-1", "p000001", [(seq, code, system, value, unit, T)])
    assert violations == []
    assert len(obs) == 1
    return obs[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_observation_matches_golden(name):
    obs = _observation(name)
    path = GOLDEN / f"observation-{name}.json"
    text = json.dumps(obs, indent=2, sort_keys=True) + "\n"
    if os.environ.get("VIGIL_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run with VIGIL_UPDATE_GOLDEN=1"
    assert json.loads(path.read_text()) == json.loads(text)


@pytest.mark.parametrize("name", sorted(CASES))
def test_observation_is_valid_fhir_and_follows_vital_signs_rules(name):
    obs = _observation(name)
    Observation.model_validate(obs)  # raises on any R4B structural error
    assert obs["status"] in {"final", "preliminary"}
    cats = {c["code"] for cat in obs["category"] for c in cat["coding"]
            if c["system"] == codes.OBSERVATION_CATEGORY}
    loinc = [c["code"] for c in obs["code"]["coding"] if c["system"] == codes.LOINC]
    assert loinc, "a LOINC coding is required"
    assert obs["subject"] == {"reference": "Patient/p000001"}
    assert obs["effectiveDateTime"] == "2026-01-01T04:00:00Z"
    assert "valueQuantity" in obs or "dataAbsentReason" in obs
    q = obs["valueQuantity"]
    assert q["system"] == codes.UCUM and q["code"] == q["unit"]
    if name == "lactate":
        assert cats == {"laboratory"} and "meta" not in obs
    else:
        assert cats == {"vital-signs"}
        assert codes.VITAL_SIGNS_PROFILE in obs["meta"]["profile"]


def test_unit_conversions_and_flags():
    assert _observation("oxygen-saturation-fraction")["valueQuantity"]["value"] == pytest.approx(95.0)
    assert _observation("oxygen-saturation-fraction")["valueQuantity"]["unit"] == "%"
    assert _observation("body-temperature-degF")["valueQuantity"]["value"] == pytest.approx(38.0)
    assert _observation("body-temperature-degF")["valueQuantity"]["code"] == "Cel"
    bad = _observation("heart-rate-implausible")
    assert bad["status"] == "preliminary"
    assert bad["valueQuantity"]["value"] == 400.0  # flagged, never dropped
    assert bad["interpretation"][0]["coding"][0]["code"] == "implausible"
    assert _observation("heart-rate")["status"] == "final"
    assert "interpretation" not in _observation("heart-rate")


def test_observation_ids_are_deterministic():
    a, b = _observation("heart-rate"), _observation("heart-rate")
    assert a["id"] == b["id"]
    assert a["identifier"][0]["value"] == "monitor-1/1"


def _batch(readings, device="monitor-1", patient="p000001"):
    return ingest_pb2.ReadingBatch(device_id=device, patient_id=patient, readings=readings)


def _violations(batch):
    with pytest.raises(BatchRejected) as e:
        prepare_batch(batch)
    return {v.field: v.description for v in e.value.violations}


def test_violations_name_each_bad_reading():
    batch = _batch([
        make_reading(1, "8867-4", 72, "/min", T),         # ok
        make_reading(2, "9999-9", 1, "/min", T),          # unknown code
        make_reading(3, "8867-4", 72, "kg", T),           # bad unit
        make_reading(4, "8867-4", float("nan"), "/min", T),  # NaN
        make_reading(1, "8310-5", 37, "Cel", T),          # duplicate sequence
        ingest_pb2.Reading(sequence=6, code="8867-4", value=70, unit="/min"),  # no effective_time
    ])
    v = _violations(batch)
    assert set(v) == {"readings[1].code", "readings[2].unit", "readings[3].value", "readings[4].sequence",
                      "readings[5].effective_time"}
    assert "9999-9" in v["readings[1].code"]
    assert "'kg'" in v["readings[2].unit"] and "/min" in v["readings[2].unit"]


def test_bad_ids_and_empty_batch():
    v = _violations(_batch([make_reading(1, "8867-4", 72, "/min", T)], device="bad id!", patient="p/1"))
    assert set(v) == {"device_id", "patient_id"}
    assert set(_violations(_batch([]))) == {"readings"}


def test_prepared_batch_is_one_message_with_idempotent_id():
    batch = _batch([make_reading(7, "8867-4", 72, "/min", T), make_reading(3, "8310-5", 37.2, "Cel", T)])
    p = prepare_batch(batch)
    assert p.subject == "vigil.v1.observation.p000001"
    assert p.msg_id == bus.batch_msg_id("monitor-1", [7, 3]) == bus.batch_msg_id("monitor-1", [3, 7])
    assert p.msg_id.startswith("obs/monitor-1/3-7/2/")
    # same first, last and count but another sequence inside: another message id
    assert bus.batch_msg_id("monitor-1", [3, 5, 7]) != bus.batch_msg_id("monitor-1", [3, 6, 7])
    assert (p.first_sequence, p.last_sequence, p.count) == (3, 7, 2)
    doc = json.loads(p.body)
    assert doc["resourceType"] == "Bundle" and doc["type"] == "collection"
    assert [e["resource"]["valueQuantity"]["value"] for e in doc["entry"]] == [72.0, 37.2]


def test_fhir_id_refuses_a_trailing_newline():
    from vigil.ids import is_fhir_id

    assert is_fhir_id("p000001") and is_fhir_id("a" * 64) and is_fhir_id("dev-1.2")
    for bad in ("p000001\n", "", "a" * 65, "bad id", "a*b", "\np1"):
        assert not is_fhir_id(bad), bad
