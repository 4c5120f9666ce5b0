"""The challenge utility against the published definition and the README's reference facts."""
from __future__ import annotations

import numpy as np
import pytest
from vigil_inference.utility import (
    UtilityEvaluator,
    best_predictions,
    normalized_utility,
    rewards,
    stay_utility,
)

from vigil import physionet

DATA = physionet.default_dataset()


def septic(n=40, first_label=20):
    lab = np.zeros(n, dtype=int)
    lab[first_label:] = 1
    return lab


def test_row_rewards_follow_the_published_piecewise_definition():
    lab = septic()  # t_sepsis = 26
    base = stay_utility(lab, np.zeros(len(lab), dtype=int))
    neg = rewards(lab)[1]

    def one(t):  # the reward of a positive prediction at row t alone
        return stay_utility(lab, np.eye(len(lab), dtype=int)[t]) - base + neg[t]

    assert one(26 - 13) == pytest.approx(-0.05)  # d < -12
    assert one(26 - 12) == pytest.approx(0.0)
    assert one(26 - 9) == pytest.approx(0.5)
    assert one(26 - 6) == pytest.approx(1.0)
    assert one(26) == pytest.approx(1 - 6 / 9)
    assert one(26 + 3) == pytest.approx(0.0)
    assert one(26 + 4) == 0.0
    zeros = np.zeros(len(lab), dtype=int)
    # negative predictions: -2(d+6)/9 for -6 < d <= 3, summed over d = -5..3
    assert stay_utility(lab, zeros) == pytest.approx(sum(-2 * (d + 6) / 9 for d in range(-5, 4)))
    assert stay_utility(np.zeros(10, dtype=int), np.ones(10, dtype=int)) == pytest.approx(-0.5)


def test_normalized_bounds():
    labels = [septic(), np.zeros(30, dtype=int), septic(15, 0)]
    assert normalized_utility(labels, [np.zeros(len(x), dtype=int) for x in labels]) == 0.0
    assert normalized_utility(labels, [best_predictions(x) for x in labels]) == pytest.approx(1.0)
    exact = normalized_utility(labels, labels)
    assert 0 < exact < 1
    ev = UtilityEvaluator(labels)
    assert ev.score(np.concatenate(labels)) == pytest.approx(exact)


@pytest.mark.skipif(not DATA.exists(), reason="PhysioNet data set not present")
def test_reference_points_on_set_a():
    """README: on set A, predicting SepsisLabel scores 0.869 and predicting 1 every hour -0.311."""
    labels = [s.labels for s in physionet.iter_stays(DATA)]
    assert len(labels) == 20_336
    assert normalized_utility(labels, labels) == pytest.approx(0.869, abs=5e-4)
    assert normalized_utility(labels, [np.ones_like(x) for x in labels]) == pytest.approx(-0.311, abs=5e-4)
    assert normalized_utility(labels, [np.zeros_like(x) for x in labels]) == 0.0
