"""Feature engineering shared by training (offline) and the worker (online): one pure module.

A patient is an hourly *grid*: rows are consecutive scoring intervals starting at the patient's first
interval with any measurement, columns are the 34 measurement keys in `physionet.MEASUREMENT_COLUMNS`
order (values in the catalogue's canonical unit), NaN = not measured in that interval. When an interval
holds several values for a key, the one with the latest effective time wins.

`features_for_grid` is causal: feature row r only reads grid rows 0..r, so the last feature row of
`grid[:r + 1]` equals row r of the features of the whole grid (tested). Online scoring of interval r
therefore gives exactly the row training saw for the same data.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from vigil import physionet
from vigil.catalogue import load_catalogue
from vigil.codes import LOINC

if False:  # typing only
    import datetime as dt

KEYS: tuple[str, ...] = tuple(physionet.MEASUREMENT_COLUMNS)
KEY_INDEX = {k: i for i, k in enumerate(KEYS)}
N_KEYS = len(KEYS)
TREND_KEYS: tuple[str, ...] = ("HR", "MAP", "Resp", "Temp", "O2Sat", "SBP")
LONG_KEYS: tuple[str, ...] = ("HR", "MAP", "Resp", "Temp")
# 24 h change and 12 h least-squares slope of the main vitals (slower trends than the 6 h window).
SLOPE_KEYS: tuple[str, ...] = ("HR", "MAP", "SBP", "Resp", "Temp", "O2Sat")
WINDOW = 6  # hours
LONG_WINDOW = 24  # hours
SLOPE_WINDOW = 12  # hours
NEVER_HOURS = 1000.0  # "hours since last measurement" when a key was never measured (stays are <= 336 h)
# Per-stay values from the EHR (vigil.ehr.demographics), NaN when unknown. The ICU length of stay is
# computed per row from icu_admit_epoch (online) or ICULOS (offline); both give the same hours.
STATIC_KEYS: tuple[str, ...] = ("age", "gender_male", "hosp_adm_hours", "unit_micu", "unit_sicu")


def feature_names() -> list[str]:
    names = [f"{k}_last" for k in KEYS]
    names += [f"{k}_hours_since" for k in KEYS]
    names += [f"{k}_prev_delta" for k in KEYS]  # last value minus the measurement before it
    names += [f"{k}_count" for k in KEYS]  # measurements so far (missingness pattern)
    for k in TREND_KEYS:
        names += [f"{k}_delta{WINDOW}h", f"{k}_mean{WINDOW}h", f"{k}_min{WINDOW}h", f"{k}_max{WINDOW}h",
                  f"{k}_std{WINDOW}h"]
    for k in LONG_KEYS:
        names += [f"{k}_mean{LONG_WINDOW}h", f"{k}_min{LONG_WINDOW}h", f"{k}_max{LONG_WINDOW}h"]
    names += ["shock_index", "bun_creatinine", "news2_partial", "sirs_partial", "qsofa_partial"]
    for k in SLOPE_KEYS:
        names += [f"{k}_delta{LONG_WINDOW}h", f"{k}_slope{SLOPE_WINDOW}h"]
    names += ["sofa_platelets", "sofa_bilirubin", "sofa_creatinine", "sofa_map", "sofa_resp_sf", "sf_ratio",
              "sofa_partial", f"sofa_rise{LONG_WINDOW}h", "sofa_rise_since_first"]
    names += ["n_measured", f"n_measured_{WINDOW}h", "n_keys_ever", "hours_since_first"]
    names += list(STATIC_KEYS) + ["icu_hours"]
    return names


N_FEATURES = len(feature_names())


def _last_index(measured: np.ndarray) -> np.ndarray:
    """Per cell: the row index of the latest measured row <= this row, or -1."""
    rows = np.arange(measured.shape[0])[:, None]
    return np.maximum.accumulate(np.where(measured, rows, -1), axis=0)


def _window_stats(vals: np.ndarray, width: int):
    """Trailing-window (rows r-width+1..r) count, mean, min, max, std of each column, NaN-aware."""
    pad = np.full((width - 1, vals.shape[1]), np.nan)
    win = np.lib.stride_tricks.sliding_window_view(np.concatenate([pad, vals], axis=0), width, axis=0)
    wmask = ~np.isnan(win)
    cnt = wmask.sum(axis=2)
    has = cnt > 0
    w0 = np.where(wmask, win, 0.0)
    mean = np.where(has, w0.sum(axis=2) / np.maximum(cnt, 1), np.nan)
    wmin = np.where(has, np.where(wmask, win, np.inf).min(axis=2), np.nan)
    wmax = np.where(has, np.where(wmask, win, -np.inf).max(axis=2), np.nan)
    dev = np.where(wmask, win - np.where(has, mean, 0.0)[:, :, None], 0.0)
    std = np.where(cnt >= 2, np.sqrt((dev * dev).sum(axis=2) / np.maximum(cnt, 1)), np.nan)
    return cnt, mean, wmin, wmax, std


def _window_slope(vals: np.ndarray, width: int) -> np.ndarray:
    """Least-squares slope (per hour) of the measured values in rows r-width+1..r; NaN below 3 values."""
    pad = np.full((width - 1, vals.shape[1]), np.nan)
    win = np.lib.stride_tricks.sliding_window_view(np.concatenate([pad, vals], axis=0), width, axis=0)
    m = ~np.isnan(win)
    t = np.arange(width, dtype=np.float64)
    c = m.sum(axis=2)
    st, stt = (m * t).sum(axis=2), (m * t * t).sum(axis=2)
    w0 = np.where(m, win, 0.0)
    sy, sty = w0.sum(axis=2), (w0 * t).sum(axis=2)
    den = c * stt - st * st
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((c >= 3) & (den > 0), (c * sty - st * sy) / np.where(den > 0, den, 1.0), np.nan)


def sofa_from_last(last: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Partial SOFA (Vincent et al. 1996) from last known values, missing = 0: (platelets, bilirubin,
    creatinine, MAP < 70 (no vasopressor data), respiration from the SpO2/FiO2 ratio, the S/F ratio).
    Respiration uses SaO2 (else SpO2) / FiO2 with the S/F cut-offs 512/357/214/89 that correspond to
    P/F 400/300/200/100 (Rice et al., Chest 2007); FiO2 unknown -> S/F unknown (scored 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        pl, bi, cr = last["Platelets"], last["Bilirubin_total"], last["Creatinine"]
        plat = np.select([pl < 20, pl < 50, pl < 100, pl < 150], [4, 3, 2, 1], 0).astype(np.float64)
        bili = np.select([bi >= 12, bi >= 6, bi >= 2, bi >= 1.2], [4, 3, 2, 1], 0).astype(np.float64)
        crea = np.select([cr >= 5, cr >= 3.5, cr >= 2, cr >= 1.2], [4, 3, 2, 1], 0).astype(np.float64)
        card = (last["MAP"] < 70).astype(np.float64)
        sat = np.where(np.isnan(last["SaO2"]), last["O2Sat"], last["SaO2"])
        sf = sat / (np.clip(last["FiO2"], 21.0, 100.0) / 100.0)
        resp = np.select([sf < 89, sf < 214, sf < 357, sf < 512], [4, 3, 2, 1], 0).astype(np.float64)
    return plat, bili, crea, card, resp, sf


def news2_from_last(last: dict[str, np.ndarray]) -> np.ndarray:
    """NEWS2 (Royal College of Physicians 2017) from the last known values, consciousness unknown (0).

    Respiration rate, SpO2 (scale 1), supplemental oxygen (FiO2 > 21 %, the catalogue unit), systolic BP, pulse,
    temperature. A missing parameter scores 0 (the usual convention when it was not charted)."""
    rr, spo2, sbp, hr, temp, fio2 = (last[k] for k in ("Resp", "O2Sat", "SBP", "HR", "Temp", "FiO2"))
    with np.errstate(invalid="ignore"):
        s = np.zeros(len(rr))
        s += np.select([rr <= 8, rr <= 11, rr <= 20, rr <= 24, rr >= 25], [3, 1, 0, 2, 3], 0)
        s += np.select([spo2 <= 91, spo2 <= 93, spo2 <= 95, spo2 >= 96], [3, 2, 1, 0], 0)
        s += np.where(fio2 > 21.0, 2, 0)
        s += np.select([sbp <= 90, sbp <= 100, sbp <= 110, sbp <= 219, sbp >= 220], [3, 2, 1, 0, 3], 0)
        s += np.select([hr <= 40, hr <= 50, hr <= 90, hr <= 110, hr <= 130, hr >= 131], [3, 1, 0, 1, 2, 3], 0)
        s += np.select([temp <= 35.0, temp <= 36.0, temp <= 38.0, temp <= 39.0, temp >= 39.1], [3, 1, 0, 1, 2], 0)
    return s


def sirs_from_last(last: dict[str, np.ndarray]) -> np.ndarray:
    """SIRS criteria met (0-4): temperature, heart rate, respiration (rate or PaCO2), WBC."""
    with np.errstate(invalid="ignore"):
        return ((last["Temp"] > 38) | (last["Temp"] < 36)).astype(float) + (last["HR"] > 90) \
            + ((last["Resp"] > 20) | (last["PaCO2"] < 32)) + ((last["WBC"] > 12) | (last["WBC"] < 4))


def qsofa_from_last(last: dict[str, np.ndarray]) -> np.ndarray:
    """qSOFA without mental status (not in the data): respiration >= 22, systolic BP <= 100 (0-2)."""
    with np.errstate(invalid="ignore"):
        return (last["Resp"] >= 22).astype(float) + (last["SBP"] <= 100)


def features_for_grid(grid: np.ndarray, static: dict[str, float] | None = None,
                      icu_hours: np.ndarray | None = None) -> np.ndarray:
    """Feature matrix (rows x len(feature_names())), float64; row r depends on grid rows <= r only.

    `static`: vigil.ehr.demographics() of the stay (missing keys are NaN); `icu_hours`: per row, hours
    from ICU admission to the end of the row's interval (= ICULOS), NaN when unknown."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 2 or grid.shape[1] != N_KEYS:
        raise ValueError(f"grid must be rows x {N_KEYS}, got {grid.shape}")
    n = grid.shape[0]
    out = np.empty((n, N_FEATURES), dtype=np.float64)
    if n == 0:
        return out
    measured = ~np.isnan(grid)
    rows = np.arange(n)
    last_idx = _last_index(measured)
    seen = last_idx >= 0
    cols = np.broadcast_to(np.arange(N_KEYS), grid.shape)
    last = np.where(seen, grid[np.maximum(last_idx, 0), cols], np.nan)
    since = np.where(seen, rows[:, None] - last_idx, NEVER_HOURS).astype(np.float64)
    # The measurement before the last one: last index over rows strictly before last_idx.
    prev_idx = np.where(seen, np.concatenate([np.full((1, N_KEYS), -1), last_idx[:-1]])[np.maximum(last_idx, 0), cols], -1)
    prev = np.where(prev_idx >= 0, grid[np.maximum(prev_idx, 0), cols], np.nan)
    counts = np.cumsum(measured, axis=0).astype(np.float64)
    out[:, :N_KEYS] = last
    out[:, N_KEYS:2 * N_KEYS] = since
    out[:, 2 * N_KEYS:3 * N_KEYS] = last - prev
    out[:, 3 * N_KEYS:4 * N_KEYS] = counts
    j = 4 * N_KEYS

    tidx = [KEY_INDEX[k] for k in TREND_KEYS]
    _, mean, wmin, wmax, std = _window_stats(grid[:, tidx], WINDOW)
    tlast = last[:, tidx]
    delta = np.full_like(tlast, np.nan)
    if n > WINDOW:
        delta[WINDOW:] = tlast[WINDOW:] - tlast[:-WINDOW]
    for t in range(len(tidx)):
        out[:, j:j + 5] = np.stack([delta[:, t], mean[:, t], wmin[:, t], wmax[:, t], std[:, t]], axis=1)
        j += 5
    lidx = [KEY_INDEX[k] for k in LONG_KEYS]
    _, mean, wmin, wmax, _ = _window_stats(grid[:, lidx], LONG_WINDOW)
    for t in range(len(lidx)):
        out[:, j:j + 3] = np.stack([mean[:, t], wmin[:, t], wmax[:, t]], axis=1)
        j += 3

    lv = {k: last[:, KEY_INDEX[k]] for k in KEYS}
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, j] = lv["HR"] / lv["SBP"]
        out[:, j + 1] = lv["BUN"] / lv["Creatinine"]
    out[:, j + 2] = news2_from_last(lv)
    out[:, j + 3] = sirs_from_last(lv)
    out[:, j + 4] = qsofa_from_last(lv)
    j += 5

    sidx = [KEY_INDEX[k] for k in SLOPE_KEYS]
    slast = last[:, sidx]
    d24 = np.full_like(slast, np.nan)
    if n > LONG_WINDOW:
        d24[LONG_WINDOW:] = slast[LONG_WINDOW:] - slast[:-LONG_WINDOW]
    slope = _window_slope(grid[:, sidx], SLOPE_WINDOW)
    for t in range(len(sidx)):
        out[:, j] = d24[:, t]
        out[:, j + 1] = slope[:, t]
        j += 2
    parts = sofa_from_last(lv)
    sofa = parts[0] + parts[1] + parts[2] + parts[3] + parts[4]
    pad = np.concatenate([np.full(LONG_WINDOW, np.inf), sofa])
    min24 = np.lib.stride_tricks.sliding_window_view(pad, LONG_WINDOW + 1)[:n].min(axis=1)
    out[:, j:j + 9] = np.stack([*parts, sofa, sofa - min24, sofa - np.minimum.accumulate(sofa)], axis=1)
    j += 9

    per_row = measured.sum(axis=1).astype(np.float64)
    out[:, j] = per_row
    c = np.cumsum(per_row)
    prev_c = np.concatenate([np.zeros(WINDOW), c[:-WINDOW]]) if n > WINDOW else np.zeros(n)
    out[:, j + 1] = c - prev_c[:n]
    out[:, j + 2] = seen.sum(axis=1)
    out[:, j + 3] = rows
    j += 4
    static = static or {}
    for k in STATIC_KEYS:
        out[:, j] = float(static.get(k, np.nan))
        j += 1
    out[:, j] = np.nan if icu_hours is None else np.asarray(icu_hours, dtype=np.float64)
    j += 1
    assert j == N_FEATURES
    return out


# --- offline -----------------------------------------------------------------------------------


def _unit_factors() -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per key converting the data set's units to the catalogue's, as replay does."""
    cat = load_catalogue()
    scale, offset = np.ones(N_KEYS), np.zeros(N_KEYS)
    for i, key in enumerate(KEYS):
        unit = physionet.SOURCE_UNITS.get(key)
        if unit is None:
            continue
        m = cat.by_key[key]
        scale[i], offset[i] = m.convert[unit]
    return scale, offset


def to_canonical(key: str, value: float) -> float:
    """One PhysioNet value in the catalogue unit, exactly as replay converts it."""
    unit = physionet.SOURCE_UNITS.get(key)
    m = load_catalogue().by_key[key]
    v = m.to_canonical(value, unit or m.ucum)
    assert v is not None
    return v


def grid_from_stay(stay: physionet.Stay) -> tuple[np.ndarray, np.ndarray]:
    """(grid, labels) for a stay, leading rows without any measurement dropped (online never sees them).

    Rows are consecutive hours (ICULOS + 1 per row), so the rows after the first measured one are the
    consecutive scoring intervals. Units are converted with the catalogue exactly as replay sends them.
    `len(stay.data) - len(labels)` is the number of dropped leading rows.
    """
    raw = stay.data[:, :N_KEYS]
    measured_rows = np.flatnonzero((~np.isnan(raw)).any(axis=1))
    if measured_rows.size == 0:
        return np.empty((0, N_KEYS)), np.empty(0, dtype=int)
    first = int(measured_rows[0])
    grid = raw[first:].copy()
    for i, key in enumerate(KEYS):
        if key in physionet.SOURCE_UNITS:
            col = grid[:, i]
            ok = ~np.isnan(col)
            col[ok] = [to_canonical(key, float(v)) for v in col[ok]]
    return grid, stay.labels[first:].copy()


def stay_static(stay: physionet.Stay, t0: dt.datetime | None = None) -> dict[str, float]:
    """vigil.ehr.demographics() over the Patient and Encounters the EHR writes for this stay (T0 =
    timecontract.DEFAULT_T0): exactly the values the worker reads back online."""
    from vigil import ehr, timecontract

    t0 = t0 or timecontract.DEFAULT_T0
    patient = ehr.patient_from_stay(stay, t0)
    hospital, icu = ehr.encounters_from_stay(stay, t0, f"Patient/{stay.stem}")
    return ehr.demographics(patient, icu, hospital)


def stay_features(stay: physionet.Stay) -> tuple[np.ndarray, np.ndarray, int]:
    """(features, labels, dropped leading rows) of a stay, offline, as the worker computes them online:
    grid from `grid_from_stay`, demographics from `stay_static`, ICU hours = ICULOS (the end of the
    row's interval minus the ICU admission, in hours)."""
    grid, labels = grid_from_stay(stay)
    dropped = len(stay.labels) - len(labels)
    x = features_for_grid(grid, stay_static(stay), stay.iculos[dropped:].astype(np.float64))
    return x, labels, dropped


# --- online ------------------------------------------------------------------------------------


@dataclass
class _Cell:
    effective: float
    observation_id: str
    value: float


@dataclass
class PatientState:
    """Online accumulation of one patient's measurements, keyed by scoring interval.

    `add` is idempotent for a redelivered observation id. Within an interval the value with the
    latest effective time wins (ties: the larger observation id, so arrival order never matters).
    """

    cells: dict[tuple[int, int], _Cell] = field(default_factory=dict)
    observation_ids: dict[str, int] = field(default_factory=dict)  # id -> interval index
    static: dict[str, float] = field(default_factory=dict)  # vigil.ehr.demographics(); {} = not known yet

    def add(self, interval_index: int, key: str, value: float, effective_epoch: float,
            observation_id: str) -> bool:
        """Record one measurement; False when it is a duplicate or an unknown key."""
        col = KEY_INDEX.get(key)
        if col is None or observation_id in self.observation_ids:
            return False
        self.observation_ids[observation_id] = interval_index
        cell = self.cells.get((interval_index, col))
        if cell is None or (effective_epoch, observation_id) > (cell.effective, cell.observation_id):
            self.cells[(interval_index, col)] = _Cell(effective_epoch, observation_id, float(value))
        return True

    @property
    def first_interval(self) -> int | None:
        return min((i for i, _ in self.cells), default=None)

    def grid(self, upto_interval: int) -> tuple[np.ndarray, int]:
        """(grid of intervals first..upto_interval, first interval index); empty grid without data."""
        first = self.first_interval
        if first is None or upto_interval < first:
            return np.empty((0, N_KEYS)), upto_interval + 1
        g = np.full((upto_interval - first + 1, N_KEYS), np.nan)
        for (i, col), cell in self.cells.items():
            if i <= upto_interval:
                g[i - first, col] = cell.value
        return g, first

    def basis(self, upto_interval: int, cap: int = 50) -> tuple[list[str], int]:
        """(ids of the observations whose values the grid up to the interval holds, latest `cap` by
        effective time; the number of distinct observations received for intervals <= upto_interval)."""
        used = sorted((c.effective, c.observation_id) for (i, _), c in self.cells.items() if i <= upto_interval)
        n_seen = sum(1 for i in self.observation_ids.values() if i <= upto_interval)
        return [oid for _, oid in used[-cap:]], n_seen

    def icu_hours(self, first: int, n: int, interval_seconds: int = 3600) -> np.ndarray:
        """Per grid row: (end of the row's interval - ICU admission) in hours; NaN when not known."""
        admit = self.static.get("icu_admit_epoch", np.nan)
        ends = (np.arange(first, first + n, dtype=np.float64) + 1) * interval_seconds
        return (ends - admit) / 3600.0

    def features(self, intervals: Iterable[int], interval_seconds: int = 3600) -> dict[int, np.ndarray]:
        """Feature row per requested interval (each from data with interval index <= it only)."""
        wanted = sorted(set(intervals))
        first = self.first_interval
        if not wanted or first is None:
            return {}
        g, first = self.grid(wanted[-1])
        feats = features_for_grid(g, self.static, self.icu_hours(first, len(g), interval_seconds))
        return {i: feats[i - first] for i in wanted if i >= first}


@functools.cache
def _coding_signatures() -> dict[tuple[tuple[str, str], ...], str]:
    sig = {}
    for m in load_catalogue().measurements:
        sig[((LOINC, m.loinc),) + tuple((s, c) for s, c, _ in m.extra_codings)] = m.key
    return sig


def key_for_coding(codings: list[tuple[str, str]]) -> str | None:
    """Catalogue key of an Observation's code.coding list as `build_observation` writes it.

    The full coding list is matched first: O2Sat and SaO2 share LOINC 2708-6 as their first coding
    (the oxygensat profile requires it) and only O2Sat adds 59408-5. Otherwise the most specific
    (last) coding the catalogue accepts as input decides.
    """
    key = _coding_signatures().get(tuple(codings))
    if key is None:
        for system, code in reversed(codings):
            m = load_catalogue().lookup(code, system)
            if m is not None:
                key = m.key
                break
    return key if key in KEY_INDEX else None


def observation_event(obs: dict, interval_seconds: int = 3600) -> tuple[str, int, str, float, float, str] | None:
    """(patient_id, interval_index, key, value, effective_epoch, observation_id) of a bus Observation,
    or None when it is not a Vigil measurement (unknown code, no value, no subject)."""
    import datetime as dt

    try:
        ref = obs["subject"]["reference"]
        obs["code"]["coding"][0]
        value = float(obs["valueQuantity"]["value"])
        eff = obs["effectiveDateTime"]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if not ref.startswith("Patient/"):
        return None
    key = key_for_coding([(c.get("system", ""), c.get("code", "")) for c in obs["code"]["coding"]])
    if key is None:
        return None
    epoch = dt.datetime.fromisoformat(eff).timestamp()
    return ref[len("Patient/"):], int(epoch // interval_seconds), key, value, epoch, obs["id"]


def stay_observations(stay: physionet.Stay, patient_id: str, *, device_id: str | None = None,
                      t0_epoch: float | None = None) -> list[list[dict]]:
    """The Observations replay sends for a stay, one list per row (hour): values converted with the
    catalogue from physionet.SOURCE_UNITS, effective = timecontract.row_effective_epoch(T0, ICULOS).
    Used by tests to check that online features equal offline ones."""
    from vigil import timecontract
    from vigil.observation import build_observation

    cat = load_catalogue()
    t0 = timecontract.DEFAULT_T0.timestamp() if t0_epoch is None else t0_epoch
    device = device_id or f"replay-{patient_id}"
    seq, hours = 0, []
    for row, iculos in zip(stay.data, stay.iculos, strict=True):
        obs = []
        for i, key in enumerate(KEYS):
            v = row[i]
            if np.isnan(v):
                continue
            m = cat.by_key[key]
            value = m.to_canonical(float(v), physionet.SOURCE_UNITS.get(key, m.ucum))
            obs.append(build_observation(m, device_id=device, patient_id=patient_id, sequence=seq, value=value,
                                         effective=timecontract.row_effective_epoch(t0, int(iculos))))
            seq += 1
        hours.append(obs)
    return hours
