"""The PhysioNet/CinC 2019 challenge score (normalized utility), as published by Reyna et al. 2020.

Pure numpy. Time t is the row number within a stay (not ICULOS). A stay is septic when any label is 1;
t_sepsis = first labelled row + 6 (labels are shifted 6 h before onset); d = t - t_sepsis.
Positive prediction, septic stay: -0.05 if d < -12, (d+12)/6 for -12 <= d <= -6, 1-(d+6)/9 for
-6 < d <= 3, 0 after. Negative prediction, septic stay: 0 for d <= -6, -2(d+6)/9 for -6 < d <= 3, 0 after.
Non-septic stay: -0.05 per positive prediction. Normalized: (U_obs - U_inaction) / (U_best - U_inaction).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

DT_EARLY, DT_OPTIMAL, DT_LATE = -12, -6, 3
U_FP, U_TP_MAX, U_FN_MIN = -0.05, 1.0, -2.0


def rewards(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reward of a positive prediction, reward of a negative prediction) per row of one stay."""
    labels = np.asarray(labels).astype(int)
    n = len(labels)
    if not labels.any():
        return np.full(n, U_FP), np.zeros(n)
    t_sepsis = int(np.argmax(labels)) - DT_OPTIMAL
    d = np.arange(n) - t_sepsis
    pos = np.where(d < DT_EARLY, U_FP,
                   np.where(d <= DT_OPTIMAL, (d - DT_EARLY) * U_TP_MAX / (DT_OPTIMAL - DT_EARLY),
                            np.where(d <= DT_LATE, U_TP_MAX - (d - DT_OPTIMAL) * U_TP_MAX / (DT_LATE - DT_OPTIMAL),
                                     0.0)))
    pos = np.maximum(pos, U_FP)  # as the official code: the early ramp is floored at the false-positive cost
    neg = np.where((d > DT_OPTIMAL) & (d <= DT_LATE), (d - DT_OPTIMAL) * U_FN_MIN / (DT_LATE - DT_OPTIMAL), 0.0)
    return pos, neg


def stay_utility(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Utility of one stay's binary predictions (row-aligned with its labels)."""
    pred = np.asarray(predictions).astype(bool)
    if np.shape(labels) != pred.shape:
        raise ValueError("labels and predictions must have the same length")
    pos, neg = rewards(labels)
    return float(np.where(pred, pos, neg).sum())


def best_predictions(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels).astype(int)
    best = np.zeros(len(labels), dtype=int)
    if labels.any():
        t_sepsis = int(np.argmax(labels)) - DT_OPTIMAL
        best[max(0, t_sepsis + DT_EARLY): min(t_sepsis + DT_LATE + 1, len(labels))] = 1
    return best


def normalized_utility(labels: Iterable[np.ndarray], predictions: Iterable[np.ndarray]) -> float:
    """The challenge score over a set of stays (lists of per-stay arrays, row-aligned)."""
    u_obs = u_best = u_inaction = 0.0
    for lab, pred in zip(labels, predictions, strict=True):
        u_obs += stay_utility(lab, pred)
        u_best += stay_utility(lab, best_predictions(lab))
        u_inaction += stay_utility(lab, np.zeros(len(lab), dtype=int))
    if u_best == u_inaction:
        return 0.0
    return (u_obs - u_inaction) / (u_best - u_inaction)


class UtilityEvaluator:
    """Normalized utility of many thresholds on fixed stays: rewards are computed once."""

    def __init__(self, labels: Iterable[np.ndarray]):
        labels = [np.asarray(lab) for lab in labels]
        pairs = [rewards(lab) for lab in labels]
        self.pos = np.concatenate([p for p, _ in pairs]) if pairs else np.empty(0)
        self.neg = np.concatenate([n for _, n in pairs]) if pairs else np.empty(0)
        self.u_inaction = float(self.neg.sum())
        self.u_best = sum(stay_utility(lab, best_predictions(lab)) for lab in labels)

    def score(self, predictions: np.ndarray) -> float:
        """`predictions`: all stays' binary predictions concatenated in the same order as the labels."""
        u_obs = float(np.where(np.asarray(predictions).astype(bool), self.pos, self.neg).sum())
        if self.u_best == self.u_inaction:
            return 0.0
        return (u_obs - self.u_inaction) / (self.u_best - self.u_inaction)
