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


@dataclass(frozen=True)
class LoadedModel:
    booster: object  # xgboost.Booster
    threshold: float
    feature_names: list[str]
    version: str
    name: str = MODEL_NAME
    metadata: dict | None = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        import xgboost as xgb

        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if len(x) == 0:
            return np.empty(0)
        dm = xgb.DMatrix(x, missing=np.nan, feature_names=list(self.feature_names))
        return self.booster.predict(dm).astype(np.float64)


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
