"""Features: causality (no look-ahead) and offline == online (replayed Observations -> PatientState)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from vigil_inference import features as F

from vigil import bus, physionet, timecontract

DATA = physionet.default_dataset()
needs_data = pytest.mark.skipif(not DATA.exists(), reason="PhysioNet data set not present")


def test_feature_names_match_columns():
    names = F.feature_names()
    assert len(names) == len(set(names)) == F.N_FEATURES
    x = F.features_for_grid(np.full((3, len(physionet.MEASUREMENT_COLUMNS)), np.nan))
    assert x.shape == (3, F.N_FEATURES) and x.dtype == np.float64


def test_no_look_ahead_on_random_grids():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        grid = rng.normal(80, 10, size=(n, F.N_KEYS))
        grid[rng.random(grid.shape) < 0.7] = np.nan
        full = F.features_for_grid(grid)
        for r in range(n):
            changed = grid.copy()
            changed[r + 1:] = rng.normal(0, 100, size=changed[r + 1:].shape)
            got = F.features_for_grid(changed)
            np.testing.assert_array_equal(got[: r + 1], full[: r + 1])
            np.testing.assert_array_equal(F.features_for_grid(grid[: r + 1]), full[: r + 1])


def test_simple_values():
    grid = np.full((8, F.N_KEYS), np.nan)
    hr = F.KEY_INDEX["HR"]
    grid[0, hr], grid[2, hr], grid[7, hr] = 80, 100, 110
    x = F.features_for_grid(grid)
    col = {n: i for i, n in enumerate(F.feature_names())}
    assert list(x[:, col["HR_last"]]) == [80, 80, 100, 100, 100, 100, 100, 110]
    assert list(x[:, col["HR_hours_since"]]) == [0, 1, 0, 1, 2, 3, 4, 0]
    assert x[5, col["HR_mean6h"]] == 90 and x[6, col["HR_mean6h"]] == 100  # row 0 left the window
    assert x[7, col["HR_min6h"]] == 100 and x[7, col["HR_max6h"]] == 110
    assert np.isnan(x[5, col["HR_delta6h"]]) and x[6, col["HR_delta6h"]] == 20  # 100 - 80
    assert x[0, col["Temp_hours_since"]] == F.NEVER_HOURS and np.isnan(x[0, col["Temp_last"]])
    assert list(x[:, col["hours_since_first"]]) == list(range(8))
    assert x[3, col["n_measured"]] == 0 and x[2, col["n_measured_6h"]] == 2


def test_sofa_and_slopes():
    grid = np.full((32, F.N_KEYS), np.nan)
    k = F.KEY_INDEX
    grid[0, k["Platelets"]], grid[0, k["Creatinine"]] = 200, 1.0  # SOFA 0 + 0
    grid[5, k["Platelets"]], grid[5, k["Creatinine"]] = 90, 2.5  # 2 + 2
    grid[6, k["O2Sat"]], grid[6, k["FiO2"]] = 92, 50  # S/F 184 -> 3
    grid[:3, k["HR"]] = [80, 82, 84]
    grid[3:, k["HR"]] = 90
    x = F.features_for_grid(grid)
    col = {n: i for i, n in enumerate(F.feature_names())}
    assert list(x[[0, 5, 6], col["sofa_partial"]]) == [0, 4, 7]
    assert x[6, col["sofa_platelets"]] == 2 and x[6, col["sofa_creatinine"]] == 2 and x[6, col["sofa_resp_sf"]] == 3
    assert x[6, col["sf_ratio"]] == 92 / 0.5
    assert x[6, col["sofa_rise24h"]] == 7 and x[6, col["sofa_rise_since_first"]] == 7
    assert x[29, col["sofa_rise24h"]] == 3 and x[30, col["sofa_rise24h"]] == 0  # rows 5..29, then 6..30
    assert x[30, col["sofa_rise_since_first"]] == 7
    assert np.isnan(x[1, col["HR_slope12h"]]) and x[2, col["HR_slope12h"]] == 2.0
    assert np.isnan(x[23, col["HR_delta24h"]]) and x[24, col["HR_delta24h"]] == 10  # 90 - 80


def test_last_value_by_effective_time_wins_and_duplicates_are_ignored():
    s = F.PatientState()
    assert s.add(10, "HR", 90.0, 36_010.0, "b")
    assert s.add(10, "HR", 70.0, 36_005.0, "a")  # earlier effective time, arrives later: loses
    assert not s.add(10, "HR", 55.0, 36_020.0, "b")  # same id again: ignored
    g, first = s.grid(10)
    assert first == 10 and g[0, F.KEY_INDEX["HR"]] == 90.0
    basis, n = s.basis(10)
    assert basis == ["b"] and n == 2


def test_o2sat_and_sao2_are_told_apart():
    from vigil.catalogue import load_catalogue
    from vigil.observation import build_observation

    cat = load_catalogue()
    for key in ("O2Sat", "SaO2", "FiO2", "HR"):
        obs = build_observation(cat.by_key[key], device_id="d", patient_id="p", sequence=1, value=50.0,
                                effective=3600.0)
        assert F.observation_event(obs)[2] == key


def _online_features(stay, patient="p1", shuffle=False):
    hours = F.stay_observations(stay, patient)
    msgs = [bus.encode_bundle(h) for h in hours if h]
    if shuffle:
        random.Random(0).shuffle(msgs)
        msgs += msgs[:3]  # redelivered duplicates
    state = F.PatientState()
    touched = set()
    for body in msgs:
        for obs in bus.decode_bundle(body):
            p, interval, key, value, eff, oid = F.observation_event(obs)
            assert p == patient
            state.add(interval, key, value, eff, oid)
            touched.add(interval)
    return state, touched


@needs_data
def test_offline_equals_online_on_real_stays():
    t0_interval = timecontract.interval_index(timecontract.DEFAULT_T0.timestamp())
    checked = 0
    for stay in physionet.iter_stays(DATA, limit=40):
        grid, _ = F.grid_from_stay(stay)
        offline = F.features_for_grid(grid)
        for shuffle in (False, True):
            state, touched = _online_features(stay, shuffle=shuffle)
            dropped = len(stay.data) - len(grid)
            first = t0_interval + int(stay.iculos[dropped]) - 1
            assert state.first_interval == first
            # every interval with data, each computed the way the worker does (only data < its end)
            for interval in sorted(touched):
                g, _ = state.grid(interval)
                row = F.features_for_grid(g)[-1]
                np.testing.assert_allclose(row, offline[interval - first], rtol=0, atol=1e-9)
                checked += 1
            # and all intervals at once, including those without data
            allrows = state.features(range(first, first + len(grid)))
            np.testing.assert_allclose(np.vstack([allrows[i] for i in sorted(allrows)]), offline,
                                       rtol=0, atol=1e-9)
    assert checked > 500


@needs_data
def test_grid_from_stay_converts_fio2_to_percent_and_drops_leading_empty_rows():
    for stay in physionet.iter_stays(DATA, limit=200):
        grid, labels = F.grid_from_stay(stay)
        raw = stay.data[:, : F.N_KEYS]
        dropped = len(raw) - len(grid)
        assert np.isnan(raw[:dropped]).all() and not np.isnan(grid[0]).all()
        np.testing.assert_array_equal(labels, stay.labels[dropped:])
        fio2 = F.KEY_INDEX["FiO2"]
        np.testing.assert_allclose(grid[:, fio2], raw[dropped:, fio2] * 100.0, rtol=1e-12)
