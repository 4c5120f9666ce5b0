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

KEYS: tuple[str, ...] = tuple(physionet.MEASUREMENT_COLUMNS)
KEY_INDEX = {k: i for i, k in enumerate(KEYS)}
N_KEYS = len(KEYS)
TREND_KEYS: tuple[str, ...] = ("HR", "MAP", "Resp", "Temp", "O2Sat", "SBP")
WINDOW = 6  # hours
NEVER_HOURS = 1000.0  # "hours since last measurement" when a key was never measured (stays are <= 336 h)


def feature_names() -> list[str]:
    names = [f"{k}_last" for k in KEYS]
    names += [f"{k}_hours_since" for k in KEYS]
    for k in TREND_KEYS:
        names += [f"{k}_delta{WINDOW}h", f"{k}_mean{WINDOW}h", f"{k}_min{WINDOW}h", f"{k}_max{WINDOW}h"]
    names += ["n_measured", f"n_measured_{WINDOW}h", "n_keys_ever", "hours_since_first"]
    return names


N_FEATURES = len(feature_names())


def _last_index(measured: np.ndarray) -> np.ndarray:
    """Per cell: the row index of the latest measured row <= this row, or -1."""
    rows = np.arange(measured.shape[0])[:, None]
    return np.maximum.accumulate(np.where(measured, rows, -1), axis=0)


def features_for_grid(grid: np.ndarray) -> np.ndarray:
    """Feature matrix (rows x len(feature_names())), float64; row r depends on grid rows <= r only."""
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
    out[:, :N_KEYS] = last
    out[:, N_KEYS:2 * N_KEYS] = since
    j = 2 * N_KEYS

    # Trailing windows over rows r-WINDOW+1..r (padded with NaN above row 0).
    tidx = [KEY_INDEX[k] for k in TREND_KEYS]
    pad = np.full((WINDOW - 1, len(tidx)), np.nan)
    vals = np.concatenate([pad, grid[:, tidx]], axis=0)
    win = np.lib.stride_tricks.sliding_window_view(vals, WINDOW, axis=0)  # n x T x WINDOW
    wmask = ~np.isnan(win)
    cnt = wmask.sum(axis=2)
    has = cnt > 0
    wsum = np.where(wmask, win, 0.0).sum(axis=2)
    mean = np.where(has, wsum / np.maximum(cnt, 1), np.nan)
    wmin = np.where(has, np.where(wmask, win, np.inf).min(axis=2), np.nan)
    wmax = np.where(has, np.where(wmask, win, -np.inf).max(axis=2), np.nan)
    tlast = last[:, tidx]
    delta = np.full_like(tlast, np.nan)
    if n > WINDOW:
        delta[WINDOW:] = tlast[WINDOW:] - tlast[:-WINDOW]
    for t in range(len(tidx)):
        out[:, j] = delta[:, t]
        out[:, j + 1] = mean[:, t]
        out[:, j + 2] = wmin[:, t]
        out[:, j + 3] = wmax[:, t]
        j += 4

    per_row = measured.sum(axis=1).astype(np.float64)
    out[:, j] = per_row
    c = np.cumsum(per_row)
    prev = np.concatenate([np.zeros(WINDOW), c[:-WINDOW]]) if n > WINDOW else np.zeros(n)
    out[:, j + 1] = c - prev[:n]
    out[:, j + 2] = seen.sum(axis=1)
    out[:, j + 3] = rows
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

    def features(self, intervals: Iterable[int]) -> dict[int, np.ndarray]:
        """Feature row per requested interval (each from data with interval index <= it only)."""
        wanted = sorted(set(intervals))
        first = self.first_interval
        if not wanted or first is None:
            return {}
        g, first = self.grid(wanted[-1])
        feats = features_for_grid(g)
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
