"""Unsupervised per-patient anomaly detector for vital signs: a personal baseline per patient.

For HR, SBP and MAP, a value in interval r is compared with the patient's own earlier values (all
measured intervals before r, at least MIN_BASELINE of them): robust z = (value - median) /
max(1.4826 * MAD, FLOOR). |z| >= Z_ALERT flags a sudden change. Causal (row r reads rows <= r only),
pure numpy, no training: it works the same in a hospital it never saw. The worker emits a
RiskAssessment of its own (model `vigil-vitals-anomaly`) for flagged intervals only.
"""
from __future__ import annotations

import numpy as np

from vigil_inference.features import KEY_INDEX

VITALS: tuple[str, ...] = ("HR", "SBP", "MAP")
FLOOR = {"HR": 4.0, "SBP": 6.0, "MAP": 5.0}  # minimum scale (bpm / mmHg): a very flat baseline is not news
MIN_BASELINE = 6
Z_ALERT = 4.0


def vital_z_scores(grid: np.ndarray) -> np.ndarray:
    """rows x len(VITALS) robust z-scores vs the personal baseline; NaN without value or baseline."""
    grid = np.asarray(grid, dtype=np.float64)
    out = np.full((len(grid), len(VITALS)), np.nan)
    for j, key in enumerate(VITALS):
        col = grid[:, KEY_INDEX[key]]
        idx = np.flatnonzero(~np.isnan(col))
        vals = col[idx]
        for n in range(MIN_BASELINE, len(idx)):
            base = vals[:n]
            med = np.median(base)
            scale = max(1.4826 * np.median(np.abs(base - med)), FLOOR[key])
            out[idx[n], j] = (vals[n] - med) / scale
    return out


def flags(z_row: np.ndarray) -> list[tuple[str, float]]:
    """(vital, z) pairs at or beyond the alert level."""
    return [(k, float(z)) for k, z in zip(VITALS, z_row, strict=True) if not np.isnan(z) and abs(z) >= Z_ALERT]
