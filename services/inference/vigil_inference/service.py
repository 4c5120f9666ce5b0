"""The BentoML 1.4 service serving the sepsis model, and its HTTP client used by the worker.

Serve: `bentoml serve vigil_inference.service:SepsisRisk --host 127.0.0.1 --port 3000`
(BENTOML_HOME selects the model store; VIGIL_MODEL_TAG overrides `vigil-sepsis:latest`).

HTTP contract (BentoML's JSON encoding of the API's arguments):
  POST /predict   {"features": [[f0, f1, ...], ...]}  -> [p0, p1, ...]   (JSON list of probabilities)
  POST /predict_explain {"features": ...} -> [[p, i1, c1, ..., i5, c5], ...]  (top-5 SHAP contributions)
  POST /metadata  {}                                  -> {"name", "version", "threshold", ...}
  GET  /readyz    200 once the model is loaded.
Missing feature values (NaN) travel as JSON null and become NaN again in the service, which is what
XGBoost treats as missing; `ModelClient` encodes them so.
"""
from __future__ import annotations

import os

import bentoml
import numpy as np

from vigil_inference.model import MODEL_NAME, load_model

SERVICE_NAME = "vigil-sepsis-risk"
MAX_BATCH_SIZE = 1024
MAX_LATENCY_MS = 2000


def _to_matrix(features) -> np.ndarray:
    arr = np.asarray(features, dtype=object)
    arr = np.where(arr == None, np.nan, arr)
    return arr.astype(np.float64)


@bentoml.service(name=SERVICE_NAME, workers=1, traffic={"timeout": 30})
class SepsisRisk:
    def __init__(self) -> None:
        self.model = load_model(os.environ.get("VIGIL_MODEL_TAG", f"{MODEL_NAME}:latest"))

    def __is_ready__(self) -> bool:
        """/readyz is 200 only once the model is loaded (BentoML's readiness hook)."""
        return getattr(self, "model", None) is not None

    def _matrix(self, features) -> np.ndarray:
        """The request as a float matrix, refused unless it is rows x len(feature_names)."""
        x = _to_matrix(features)
        if x.ndim != 2 or x.shape[1] != len(self.model.feature_names):
            raise bentoml.exceptions.InvalidArgument(
                f"features must be rows x {len(self.model.feature_names)}, got {x.shape}")
        return x

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict(self, features: np.ndarray) -> np.ndarray:
        """Sepsis probability per feature row (rows x len(feature_names))."""
        return self.model.predict(self._matrix(features))

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict_explain(self, features: np.ndarray) -> np.ndarray:
        """rows x (1 + 2 TOP_K): probability, then (feature index, SHAP contribution) pairs."""
        return self.model.predict_explain(self._matrix(features))

    @bentoml.api
    def metadata(self) -> dict:
        m = self.model
        return {"name": m.name, "version": m.version, "threshold": m.threshold,
                "feature_names": list(m.feature_names)}
