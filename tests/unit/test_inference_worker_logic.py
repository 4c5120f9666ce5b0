"""The worker's scoring logic without servers: EHR demographics (before or after the readings),
re-scoring, NEWS2 assessments, SHAP rationale, partitions; final scores equal offline ones."""
from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from vigil_inference import features as F
from vigil_inference.client import LocalModel
from vigil_inference.model import LoadedModel
from vigil_inference.worker import NEWS2_MODEL, Worker, partition_of

from vigil import bus, ehr, physionet, timecontract
from vigil.settings import Settings

DATA = physionet.default_dataset()
needs_data = pytest.mark.skipif(not DATA.exists(), reason="PhysioNet data set not present")


class FakeJS:
    def __init__(self):
        self.published: list[tuple[str, bytes, str]] = []

    async def publish(self, subject, body, stream=None, headers=None):
        self.published.append((subject, body, headers[bus.MSG_ID]))


def _tiny_model(stays) -> LoadedModel:
    import xgboost as xgb

    xs, ys = zip(*[F.stay_features(s)[:2] for s in stays], strict=True)
    x, y = np.vstack(xs), np.concatenate(ys)
    y[::7] = 1  # make sure both classes exist
    b = xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1}, xgb.DMatrix(
        x, label=y, missing=np.nan, feature_names=F.feature_names()), num_boost_round=15)
    return LoadedModel(booster=b, threshold=0.3, feature_names=F.feature_names(), version="test1")


def _ehr_messages(stay) -> list[bytes]:
    t0 = timecontract.DEFAULT_T0
    patient = {**ehr.patient_from_stay(stay, t0), "id": stay.stem}
    hosp, icu = ehr.encounters_from_stay(stay, t0, f"Patient/{stay.stem}")
    hosp = {**hosp, "id": f"{stay.stem}-hospital"}
    icu = {**icu, "id": f"{stay.stem}-icu", "partOf": {"reference": f"Encounter/{stay.stem}-hospital"}}
    return [bus.encode_bundle([r]) for r in (patient, hosp, icu)]


def _latest(js: FakeJS, model_name: str) -> dict[str, dict[int, float]]:
    import datetime as dt

    out: dict[str, dict[int, float]] = {}
    for _, body, _ in js.published:
        ra = bus.decode_bundle(body)[0]
        if ra["method"]["coding"][0]["code"] != model_name:
            continue
        pid = ra["subject"]["reference"].split("/")[1]
        start = int(dt.datetime.fromisoformat(ra["occurrencePeriod"]["start"]).timestamp())
        out.setdefault(pid, {})[start] = ra["prediction"][0]["probabilityDecimal"]
    return out


@needs_data
@pytest.mark.parametrize("ehr_first", [True, False])
def test_worker_final_scores_equal_offline(ehr_first):
    stays = list(physionet.iter_stays(DATA, limit=6))
    model = _tiny_model(stays)
    js = FakeJS()
    w = Worker(js, LocalModel(model), Settings())
    t0 = timecontract.DEFAULT_T0.timestamp()

    async def go():
        for stay in stays:
            hours = [bus.encode_bundle(h) for h in F.stay_observations(stay, stay.stem) if h]
            ehr_msgs = _ehr_messages(stay)
            if ehr_first:
                await w.process([], ehr_msgs)
            for i in range(0, len(hours), 5):
                await w.process(hours[i:i + 5])
            if not ehr_first:
                await w.process([], ehr_msgs)
    asyncio.run(go())
    live = _latest(js, "vigil-sepsis")
    for stay in stays:
        x, _, dropped = F.stay_features(stay)
        offline = model.predict(x)
        starts = [int(timecontract.row_effective_epoch(t0, int(k))) for k in stay.iculos[dropped:]]
        got = live[stay.stem]
        assert got, stay.stem
        for start, p_off in zip(starts, offline, strict=True):
            if start in got:
                assert abs(got[start] - p_off) < 1e-6, (stay.stem, start)
    # NEWS2 assessments exist too, with their own ids
    news2 = _latest(js, NEWS2_MODEL)
    assert set(news2) == {s.stem for s in stays}


@needs_data
def test_online_icu_hours_equal_iculos_and_demographics_match():
    stays = list(physionet.iter_stays(DATA, limit=30))
    w = Worker(FakeJS(), None, Settings(), explain=False)
    for stay in stays:
        w._apply_ehr(_ehr_messages(stay))
        st = w.states[stay.stem]
        assert st.static == F.stay_static(stay) or all(
            (a == b) or (np.isnan(a) and np.isnan(b)) for a, b in zip(st.static.values(), F.stay_static(stay).values()))
        first = timecontract.interval_index(timecontract.row_effective_epoch(
            timecontract.DEFAULT_T0.timestamp(), int(stay.iculos[0])))
        np.testing.assert_array_equal(st.icu_hours(first, len(stay.iculos)), stay.iculos.astype(float))


def test_rationale_and_msg_ids_change_with_demographics():
    grid_obs = []
    from vigil.catalogue import load_catalogue
    from vigil.observation import build_observation

    cat = load_catalogue()
    t0 = timecontract.DEFAULT_T0.timestamp()
    for i, (k, v) in enumerate([("HR", 120.0), ("Resp", 26.0), ("SBP", 95.0)]):
        grid_obs.append(build_observation(cat.by_key[k], device_id="d", patient_id="px", sequence=i, value=v,
                                          effective=t0 + 60))
    import xgboost as xgb

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, F.N_FEATURES))
    b = xgb.train({"objective": "binary:logistic", "max_depth": 2, "nthread": 1},
                  xgb.DMatrix(x, label=rng.integers(0, 2, 200), feature_names=F.feature_names()), 5)
    js = FakeJS()
    w = Worker(js, LocalModel(LoadedModel(b, 0.5, F.feature_names(), "v1")), Settings())
    out1 = asyncio.run(w.process([bus.encode_bundle(grid_obs)]))
    sepsis = next(p for p in out1 if p.risk_assessment["method"]["coding"][0]["code"] == "vigil-sepsis")
    pred = sepsis.risk_assessment["prediction"][0]
    assert "SHAP" in pred["rationale"] and len(pred["extension"]) == 5
    news2 = next(p for p in out1 if p.risk_assessment["method"]["coding"][0]["code"] == NEWS2_MODEL)
    # HR 120 -> 2, Resp 26 -> 3, SBP 95 -> 2: NEWS2 7 -> high
    assert news2.risk_assessment["prediction"][0]["probabilityDecimal"] == pytest.approx(7 / 20)
    assert news2.risk_assessment["prediction"][0]["qualitativeRisk"]["coding"][0]["code"] == "high"
    assert news2.risk_assessment["id"] != sepsis.risk_assessment["id"]
    assert "/v1/" in sepsis.msg_id
    patient = {"resourceType": "Patient", "id": "px", "gender": "male", "birthDate": "1950-01-01"}
    out2 = asyncio.run(w.process([], [bus.encode_bundle([patient])]))
    s2 = next(p for p in out2 if p.risk_assessment["method"]["coding"][0]["code"] == "vigil-sepsis")
    assert s2.risk_assessment["id"] == sepsis.risk_assessment["id"] and s2.msg_id != sepsis.msg_id


def test_partitions_split_patients_stably():
    ids = [f"p{i:06d}" for i in range(1000)]
    parts = [partition_of(p, 4) for p in ids]
    assert set(parts) == {0, 1, 2, 3} and parts == [partition_of(p, 4) for p in ids]
    assert all(partition_of(p, 1) == 0 for p in ids)
    w = Worker(FakeJS(), None, Settings(), partition=1, partitions=4)
    random.Random(0).shuffle(ids)
    assert all(w.owns(p) == (partition_of(p, 4) == 1) for p in ids)
    assert w.durable.endswith("-p1of4")


def test_anomaly_detector_flags_a_sudden_hr_jump_against_the_personal_baseline():
    from vigil_inference import anomaly

    grid = np.full((12, F.N_KEYS), np.nan)
    hr = F.KEY_INDEX["HR"]
    grid[:10, hr] = [80, 82, 79, 81, 80, 83, 78, 80, 81, 82]
    grid[10, hr], grid[11, hr] = 84, 125
    z = anomaly.vital_z_scores(grid)
    assert np.isnan(z[:6, 0]).all() and abs(z[10, 0]) < anomaly.Z_ALERT and z[11, 0] > anomaly.Z_ALERT
    assert anomaly.flags(z[11])[0][0] == "HR" and not anomaly.flags(z[10])
    np.testing.assert_array_equal(anomaly.vital_z_scores(grid[:11]), z[:11])  # causal
