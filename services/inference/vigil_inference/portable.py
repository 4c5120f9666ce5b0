"""Portable model for edge scoring: XGBoost's JSON model plus this scorer, which needs only numpy.

`vigil export --out DIR` writes DIR/model.json (XGBoost JSON), DIR/metadata.json (feature names,
threshold, version) and DIR/vigil_scorer.py (a copy of this file). On the edge device:

    from vigil_scorer import PortableModel
    m = PortableModel.load("DIR")
    p = m.predict(features)   # rows x len(m.feature_names), NaN = missing -> probabilities

Semantics follow XGBoost: features are compared as float32 (`x < split_condition` goes left), a
missing value takes the node's default direction, margin = logit(base_score) + sum of leaf values,
probability = sigmoid(margin) (binary:logistic). Tested to equal XGBoost's predictions to 1e-6.
This file must not import anything but numpy and the standard library.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np


def _base_score(text) -> float:
    return float(str(text).strip("[]"))


class PortableModel:
    def __init__(self, model_json: dict, metadata: dict | None = None):
        learner = model_json["learner"]
        obj = learner["objective"]["name"]
        if obj != "binary:logistic":
            raise ValueError(f"unsupported objective {obj}")
        self.base_margin = float(np.log(p := _base_score(learner["learner_model_param"]["base_score"]))
                                 - np.log1p(-p))
        self.trees = []
        for t in learner["gradient_booster"]["model"]["trees"]:
            self.trees.append((np.asarray(t["left_children"], dtype=np.int64),
                               np.asarray(t["right_children"], dtype=np.int64),
                               np.asarray(t["split_indices"], dtype=np.int64),
                               np.asarray(t["split_conditions"], dtype=np.float32),
                               np.asarray(t["default_left"], dtype=bool)))
        self.metadata = metadata or {}
        self.feature_names = list(self.metadata.get("feature_names") or learner.get("feature_names") or [])
        self.threshold = self.metadata.get("threshold")

    @classmethod
    def load(cls, directory) -> PortableModel:
        d = pathlib.Path(directory)
        meta = json.loads((d / "metadata.json").read_text()) if (d / "metadata.json").exists() else None
        return cls(json.loads((d / "model.json").read_text()), meta)

    def margin(self, features) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        x = x.astype(np.float32)
        n = len(x)
        rows = np.arange(n)
        total = np.zeros(n, dtype=np.float64)
        for left, right, split, cond, dleft in self.trees:
            node = np.zeros(n, dtype=np.int64)
            active = left[node] != -1
            while active.any():
                idx = rows[active]
                nd = node[idx]
                v = x[idx, split[nd]]
                go_left = np.where(np.isnan(v), dleft[nd], v < cond[nd])
                node[idx] = np.where(go_left, left[nd], right[nd])
                active[idx] = left[node[idx]] != -1
            total += cond[node]  # a leaf's split_condition holds its value
        return total + self.base_margin

    def predict(self, features) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.margin(features)))


def export(out_dir, *, model_tag: str = "vigil-sepsis:latest") -> pathlib.Path:
    """Write model.json, metadata.json and vigil_scorer.py (this file) to out_dir."""
    import bentoml

    from vigil_inference.model import MODEL_FILE

    stored = bentoml.models.get(model_tag)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stored.path_of(MODEL_FILE), out / "model.json")
    meta = dict(stored.info.metadata)
    (out / "metadata.json").write_text(json.dumps({
        "name": str(stored.tag.name), "version": str(stored.tag.version), "threshold": meta["threshold"],
        "feature_names": meta["feature_names"], "features_module": meta.get("features_module")}, indent=1))
    shutil.copyfile(pathlib.Path(__file__), out / "vigil_scorer.py")
    return out
