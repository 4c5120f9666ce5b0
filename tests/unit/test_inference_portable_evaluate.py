"""Portable scorer == XGBoost; evaluation metrics, baselines and the equal-sensitivity comparison."""
from __future__ import annotations

import json

import numpy as np
import pytest
from vigil_inference import evaluate as E
from vigil_inference import features as F
from vigil_inference.portable import PortableModel

from vigil import physionet

DATA = physionet.default_dataset()
needs_data = pytest.mark.skipif(not DATA.exists(), reason="PhysioNet data set not present")


def test_portable_scorer_equals_xgboost(tmp_path):
    import xgboost as xgb

    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 20))
    x[rng.random(x.shape) < 0.3] = np.nan
    y = (np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 1]) * 0.5 + rng.normal(size=3000) > 0.5).astype(int)
    b = xgb.train({"objective": "binary:logistic", "max_depth": 5, "eta": 0.3, "nthread": 1,
                   "scale_pos_weight": 3.0}, xgb.DMatrix(x, label=y, missing=np.nan), 40)
    b.save_model(str(tmp_path / "model.json"))
    (tmp_path / "metadata.json").write_text(json.dumps({"threshold": 0.5, "feature_names": []}))
    pm = PortableModel.load(tmp_path)
    np.testing.assert_allclose(pm.predict(x), b.predict(xgb.DMatrix(x, missing=np.nan)), rtol=0, atol=1e-6)


def test_news2_sirs_qsofa_rules():
    last = {k: np.array([np.nan, 0.0]) for k in F.KEYS}
    last.update(Resp=np.array([np.nan, 25.0]), O2Sat=np.array([np.nan, 91.0]), FiO2=np.array([np.nan, 40.0]),
                SBP=np.array([np.nan, 90.0]), HR=np.array([np.nan, 131.0]), Temp=np.array([np.nan, 39.5]),
                WBC=np.array([np.nan, 13.0]), PaCO2=np.array([np.nan, 40.0]))
    assert list(F.news2_from_last(last)) == [0, 3 + 3 + 2 + 3 + 3 + 2]
    assert list(F.sirs_from_last(last)) == [0, 4]
    assert list(F.qsofa_from_last(last)) == [0, 2]


def test_equal_sensitivity_and_metrics():
    labels = [np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0])]
    model = [np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.1, 0.1, 0.1, 0.3])]
    news2 = [np.array([5.0, 5, 5, 5]), np.array([5.0, 5, 0, 0])]
    e = E.equal_sensitivity(labels, model, news2)
    assert e["sensitivity"] == 1.0 and e["model_sensitivity"] == 1.0
    assert e["news2_false_alerts"] == 4 and e["model_false_alerts"] == 0 and e["reduction"] == 1.0
    m = E.metrics_at(labels, model, 0.5)
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["accuracy"] == 1.0
    assert m["alerts_per_patient_day"] == pytest.approx(2 / (8 / 24))


def test_auroc_breakdown_separates_between_and_within_stays():
    # Two never-septic stays scored low; two septic stays scored high but flat: perfect between stays,
    # no timing information within them.
    labels = [np.zeros(4, int), np.zeros(3, int), np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1, 1])]
    flat = [np.full(4, 0.1), np.full(3, 0.2), np.full(4, 0.7), np.full(5, 0.8)]
    b = E.auroc_breakdown(labels, flat)
    assert b["vs_non_septic"] == 1.0 and b["stay_max"] == 1.0
    assert b["within_stay_mean"] == 0.5 and b["within_stay_n"] == 2
    # Pooled within septic stays, 4 positives x 5 negatives: stay 3's positives (0.7) tie its own
    # negatives and lose to stay 4's (0.8); stay 4's positives beat stay 3's and tie their own.
    assert b["within_septic"] == pytest.approx((2 * 2 * 0.5 + 2 * 3 * 0.0 + 2 * 2 * 1.0 + 2 * 3 * 0.5) / 20)
    assert b["septic_stay_negative_share"] == pytest.approx(5 / 12)
    # A score that rises at the label within each stay, with -inf before the first measurement.
    rising = [np.full(4, 0.1), np.array([-np.inf, 0.2, 0.2]), np.array([0.3, 0.3, 0.9, 0.9]),
              np.array([-np.inf, 0.3, 0.3, 0.9, 0.9])]
    b = E.auroc_breakdown(labels, rising)
    assert b["within_stay_mean"] == 1.0 and b["within_septic"] == 1.0 and b["vs_non_septic"] == 1.0
    # Ties count half, as in the row AUROC; a model that ranks stays backwards shows it.
    b = E.auroc_breakdown(labels, [np.full(4, 0.9), np.full(3, 0.9), np.full(4, 0.1), np.full(5, 0.1)])
    assert b["vs_non_septic"] == 0.0 and b["stay_max"] == 0.0 and b["within_stay_mean"] == 0.5
    assert E.metrics_at(labels, rising, 0.5)["auroc_breakdown"] == E.auroc_breakdown(labels, rising)


@needs_data
def test_compare_runs_on_real_stays():
    ds = E.build_dataset(physionet.iter_stays(DATA, limit=150))
    col = F.feature_names().index("news2_partial")
    res = E.compare(ds, ds.x[:, col] / 20, 0.25, n_boot=5)
    assert {"model", "NEWS2", "qSOFA", "SIRS", "time-only", "equal_sensitivity_vs_news2"} <= set(res)
    assert res["model"]["auroc"] == pytest.approx(res["NEWS2"]["auroc"])
    table = E.format_table(res)
    assert "NEWS2" in table and "within_stay_mean" in table
    b = res["model"]["auroc_breakdown"]
    # Row AUROC = mix of its two kinds of negative, weighted by their share.
    share = b["septic_stay_negative_share"]
    assert res["model"]["auroc"] == pytest.approx((1 - share) * b["vs_non_septic"] + share * b["within_septic"])
