"""The replay/evaluation time contract.

A stay's ICU admission is T0. A PhysioNet row with ICULOS = k holds what was measured in
[T0 + (k-1) h, T0 + k h); Vigil gives its readings the effective time T0 + (k-1) h, the start of that
hour. Scoring intervals are aligned on the epoch, so with T0 on a whole hour row k falls in exactly
one 1-hour interval, the one ending at T0 + k h.
"""
from __future__ import annotations

import datetime as dt

DEFAULT_T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
HOUR = 3600


def row_effective_epoch(t0_epoch: float, iculos: int) -> float:
    return t0_epoch + (iculos - 1) * HOUR


def interval_index(epoch_seconds: float, interval_seconds: int = HOUR) -> int:
    return int(epoch_seconds // interval_seconds)


def interval_bounds(index: int, interval_seconds: int = HOUR) -> tuple[int, int]:
    return index * interval_seconds, (index + 1) * interval_seconds
