"""The model as stored in the BentoML model store, and loading it back.

A stored model is a directory holding `model.json` (XGBoost's framework-neutral JSON format, also
the portable export) plus BentoML metadata: threshold, feature_names, auroc, utility, n_stays, ...
The store location is BentoML's: $BENTOML_HOME (default ~/bentoml).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODEL_NAME = "vigil-sepsis"
MODEL_FILE = "model.json"
TOP_K = 5  # contributing features reported per RiskAssessment


@dataclass(frozen=True)
class LoadedModel:
    booster: object  # xgboost.Booster
    threshold: float
    feature_names: list[str]
    version: str
    name: str = MODEL_NAME
    metadata: dict | None = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if len(x) == 0:
            return np.empty(0)
        if x.shape[1] != len(self.feature_names):
            raise ValueError(f"expected {len(self.feature_names)} features, got {x.shape[1]}")
        # inplace_predict: no DMatrix copy (the batched hot path); same trees, same result.
        return self.booster.inplace_predict(x, missing=np.nan, validate_features=False).astype(np.float64)

    def predict_explain(self, features: np.ndarray, k: int = TOP_K) -> np.ndarray:
        """rows x (1 + 2k): probability, then k (feature index, SHAP contribution) pairs, largest
        |contribution| first (XGBoost TreeSHAP, pred_contribs=True; contributions in log-odds)."""
        import xgboost as xgb

        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        out = np.zeros((len(x), 1 + 2 * k))
        if len(x) == 0:
            return out
        dm = xgb.DMatrix(x, missing=np.nan, feature_names=list(self.feature_names))
        out[:, 0] = self.booster.predict(dm)
        contrib = self.booster.predict(dm, pred_contribs=True)[:, :-1]  # last column: bias
        top = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :k]
        out[:, 1::2] = top
        out[:, 2::2] = np.take_along_axis(contrib, top, axis=1)
        return out


def load_model(tag: str = f"{MODEL_NAME}:latest") -> LoadedModel:
    """Load a model from the BentoML store ($BENTOML_HOME)."""
    import bentoml
    import xgboost as xgb

    stored = bentoml.models.get(tag)
    booster = xgb.Booster()
    booster.load_model(stored.path_of(MODEL_FILE))
    meta = dict(stored.info.metadata)
    return LoadedModel(booster=booster, threshold=float(meta["threshold"]),
                       feature_names=list(meta["feature_names"]), version=str(stored.tag.version),
                       name=str(stored.tag.name), metadata=meta)
