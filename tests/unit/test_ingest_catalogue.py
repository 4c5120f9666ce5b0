"""The measurement catalogue covers the issue's list and PhysioNet's columns; the blood pressure panel;
the R4 vital-signs profile rules (https://hl7.org/fhir/R4/observation-vitalsigns.html) for every vital sign."""
from __future__ import annotations

import json
import os
import pathlib

import pytest
from fhir.resources.R4B.observation import Observation

from vigil import codes, physionet
from vigil.catalogue import load_catalogue
from vigil.ids import observation_id, observation_ids
from vigil.observation import format_instant, map_batch
from vigil.timecontract import DEFAULT_T0

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden"
T = DEFAULT_T0.timestamp() + 4 * 3600
MDC = codes.MDC
# Profile -> (LOINC, UCUM units the profile allows), from the R4 vital-signs profiles.
PROFILES = {
    "http://hl7.org/fhir/StructureDefinition/heartrate": ("8867-4", {"/min"}),
    "http://hl7.org/fhir/StructureDefinition/oxygensat": ("2708-6", {"%"}),
    "http://hl7.org/fhir/StructureDefinition/bodytemp": ("8310-5", {"Cel", "[degF]"}),
    "http://hl7.org/fhir/StructureDefinition/resprate": ("9279-1", {"/min"}),
    "http://hl7.org/fhir/StructureDefinition/bp": ("85354-9", {"mm[Hg]"}),
}
VITAL_SIGNS_UNITS = {"%", "cm", "[in_i]", "kg", "g", "[lb_av]", "Cel", "[degF]", "mm[Hg]", "/min", "kg/m2"}


def test_catalogue_has_every_required_measurement():
    cat = load_catalogue()
    for key in physionet.MEASUREMENT_COLUMNS:  # HR, O2Sat, Temp, SBP, MAP, DBP, Resp, EtCO2, FiO2 and every lab
        m = cat.by_key[key]
        assert m.loinc and m.ucum and m.plausible[0] < m.plausible[1], key
        assert any(i.startswith(codes.LOINC + "|") for i in m.inputs), key
    assert cat.by_key["BP"].loinc == "85354-9" and set(cat.by_key["BP"].required) == {"SBP", "DBP"}
    for key in ("HR", "O2Sat", "Temp", "SBP", "DBP", "MAP", "Resp", "BP"):  # MDC beside LOINC
        assert any(i.startswith(MDC + "|") for i in cat.by_key[key].inputs), key


def test_vital_signs_follow_their_profiles():
    for m in load_catalogue().measurements:
        if m.category != "vital-signs":
            continue
        if m.profile:
            loinc, units = PROFILES[m.profile]
            assert m.loinc == loinc and m.ucum in units, m.key
        if not m.components:
            obs, v = map_batch(load_catalogue(), "d1", "p1", [(1, m.inputs[0].split("|", 1)[1],
                                                               m.inputs[0].split("|", 1)[0], m.plausible[0], m.ucum, T)])
            assert v == [], (m.key, v)
            Observation.model_validate(obs[0])
            if m.ucum not in VITAL_SIGNS_UNITS:
                pytest.fail(f"{m.key}: {m.ucum} is not in the vital-signs units value set")


def _bp(systolic=(118, "mm[Hg]"), diastolic=(76, "mm[Hg]"), code="85354-9", system="", seq=7, extra=()):
    comps = (("8480-6", "", *systolic), ("8462-4", "", *diastolic), *extra)
    return (seq, code, system, 0.0, "", T, comps)


@pytest.mark.parametrize("name,reading", [
    ("blood-pressure-panel", _bp()),
    ("blood-pressure-panel-mdc-kpa-implausible", _bp(systolic=(45.0, "kPa"), code="150020", system=MDC)),
])
def test_blood_pressure_panel_golden_and_profile(name, reading):
    obs, v = map_batch(load_catalogue(), "monitor-1", "p000001", [reading])
    assert v == []
    [o] = obs
    path = GOLDEN / f"observation-{name}.json"
    text = json.dumps(o, indent=2, sort_keys=True) + "\n"
    if os.environ.get("VIGIL_UPDATE_GOLDEN"):
        path.write_text(text)
    assert json.loads(path.read_text()) == json.loads(text)
    Observation.model_validate(o)
    # bp profile: code 85354-9, no value, components systolic 8480-6 and diastolic 8462-4 in mm[Hg]
    assert o["code"]["coding"][0]["code"] == "85354-9" and "valueQuantity" not in o
    assert "http://hl7.org/fhir/StructureDefinition/bp" in o["meta"]["profile"]
    by_code = {c["code"]["coding"][0]["code"]: c for c in o["component"]}
    assert set(by_code) == {"8480-6", "8462-4"}
    for c in o["component"]:
        assert c["valueQuantity"]["code"] == "mm[Hg]" and c["valueQuantity"]["system"] == codes.UCUM
    if "implausible" in name:
        assert o["status"] == "preliminary"
        assert by_code["8480-6"]["valueQuantity"]["value"] == pytest.approx(337.5277)  # flagged, kept
        assert by_code["8480-6"]["interpretation"][0]["coding"][0]["code"] == "implausible"


def test_blood_pressure_panel_refusals():
    cat = load_catalogue()
    _, v = map_batch(cat, "m", "p", [_bp(diastolic=(76, "kg"))])
    assert [x.field for x in v] == ["readings[0].components[1].unit"]
    _, v = map_batch(cat, "m", "p", [(1, "85354-9", "", 0.0, "", T, (("8480-6", "", 120.0, "mm[Hg]"),))])
    assert [x.field for x in v] == ["readings[0].components"]
    _, v = map_batch(cat, "m", "p", [_bp(extra=(("8867-4", "", 70.0, "/min"),))])
    assert [x.field for x in v] == ["readings[0].components[2].code"]
    _, v = map_batch(cat, "m", "p", [(1, "8867-4", "", 70.0, "/min", T, (("8480-6", "", 1.0, "mm[Hg]"),))])
    assert [x.field for x in v] == ["readings[0].components"]


def test_fast_ids_and_instants_match_the_reference_implementation():
    import datetime as dt

    f = observation_ids("monitor-1")
    assert all(f(s) == observation_id("monitor-1", s) for s in range(0, 10_000, 37))
    for e in (T, T + 0.5, T + 0.123456, T + 59.9994):
        t = dt.datetime.fromtimestamp(e, tz=dt.UTC)
        ref = (t.isoformat(timespec="milliseconds").replace("+00:00", "Z") if t.microsecond
               else t.strftime("%Y-%m-%dT%H:%M:%SZ"))
        assert format_instant(e) == ref
