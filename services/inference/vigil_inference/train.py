"""Offline training: PhysioNet stays -> features (vigil_inference.features) -> XGBoost -> BentoML store.

Split: patient-grouped (GroupShuffleSplit by stay): 70 % train, 15 % validation, 15 % test; no stay has
rows in two folds. Early stopping (validation AUROC) and the alert threshold use the validation stays;
the threshold maximises the challenge's normalized utility there (vigil_inference.utility), computed on
whole stays with the leading rows that carry no measurement predicted 0 (online cannot alert before
data). `auroc`/`utility` are reported on the untouched test stays with that threshold.
"""
from __future__ import annotations

import datetime as dt
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vigil import physionet
from vigil_inference import features as F
from vigil_inference.model import MODEL_FILE, MODEL_NAME, LoadedModel, load_model  # noqa: F401 (re-export)
from vigil_inference.utility import UtilityEvaluator

QUICK_LIMIT = 2000


@dataclass(frozen=True)
class TrainResult:
    """auroc/utility: held-out test stays (threshold fixed on valid); valid_*: the validation stays."""

    tag: str
    threshold: float
    auroc: float
    utility: float
    valid_auroc: float
    valid_utility: float
    n_stays: int
    n_train_stays: int
    n_valid_stays: int
    n_test_stays: int
    n_rows: int
    best_iteration: int
    seconds: float
    path: str


@dataclass
class Dataset:
    x: np.ndarray
    y: np.ndarray
    group: np.ndarray  # stay index per row
    full_labels: list[np.ndarray]  # per stay, all rows (utility is defined on whole stays)
    dropped: np.ndarray  # per stay, leading rows without any measurement
    stems: list[str]


def build_dataset(stays) -> Dataset:
    xs, ys, gs, full, dropped, stems = [], [], [], [], [], []
    for i, stay in enumerate(stays):
        grid, labels = F.grid_from_stay(stay)
        xs.append(F.features_for_grid(grid))
        ys.append(labels)
        gs.append(np.full(len(labels), i))
        full.append(stay.labels)
        dropped.append(len(stay.labels) - len(labels))
        stems.append(stay.stem)
    return Dataset(np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), full, np.array(dropped), stems)


def whole_stay_scores(ds: Dataset, rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scores over whole stays (the stays of `rows`, in order), -inf on dropped leading rows, and their
    full label arrays. `rows` must cover every kept row of each of its stays, in dataset order."""
    stay_ids = np.unique(ds.group[rows])
    out, labels, k = [], [], 0
    for s in stay_ids:
        n_kept = len(ds.full_labels[s]) - ds.dropped[s]
        out.append(np.concatenate([np.full(ds.dropped[s], -np.inf), scores[k:k + n_kept]]))
        labels.append(ds.full_labels[s])
        k += n_kept
    assert k == len(rows)
    return np.concatenate(out), labels


def choose_threshold(ds: Dataset, rows: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, normalized utility) maximising the challenge utility on the stays of `rows`."""
    full_scores, labels = whole_stay_scores(ds, rows, scores)
    ev = UtilityEvaluator(labels)
    candidates = np.unique(np.quantile(scores, np.linspace(0.0, 0.999, 400)))
    best = (float(scores.max()) + 1e-9, 0.0)  # never alerting scores 0
    for t in candidates:
        u = ev.score(full_scores >= t)
        if u > best[1]:
            best = (float(t), u)
    return best


def train(dataset_path: str | os.PathLike | None = None, *, limit: int | None = None, quick: bool = False,
          seed: int = 0, progress: Callable[[str], None] = print, save: bool = True) -> TrainResult:
    """Train the sepsis model and (save=True) store it as `vigil-sepsis` in the BentoML store."""
    import bentoml
    import xgboost as xgb
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupShuffleSplit

    t_start = time.monotonic()
    path = pathlib.Path(dataset_path) if dataset_path else physionet.default_dataset()
    if quick and limit is None:
        limit = QUICK_LIMIT
    progress(f"loading stays from {path} (limit={limit})")
    ds = build_dataset(physionet.iter_stays(path, limit))
    n_stays = len(ds.stems)
    progress(f"{n_stays} stays, {len(ds.y)} rows, {int(ds.y.sum())} positive rows, "
             f"{len(F.feature_names())} features ({time.monotonic() - t_start:.1f}s)")

    # Patient-grouped three-way split: train / valid (early stopping + threshold) / test (reported).
    outer = GroupShuffleSplit(n_splits=1, test_size=0.15, random_state=seed)
    dev, te = next(outer.split(ds.x, ds.y, groups=ds.group))
    inner = GroupShuffleSplit(n_splits=1, test_size=0.15 / 0.85, random_state=seed + 1)
    tr_i, va_i = next(inner.split(dev, ds.y[dev], groups=ds.group[dev]))
    tr, va = np.sort(dev[tr_i]), np.sort(dev[va_i])
    te = np.sort(te)
    g_tr, g_va, g_te = (set(np.unique(ds.group[r]).tolist()) for r in (tr, va, te))
    assert not (g_tr & g_va or g_tr & g_te or g_va & g_te), "a stay is in two folds"
    pos = max(int(ds.y[tr].sum()), 1)
    params = {
        "objective": "binary:logistic", "eval_metric": ["logloss", "auc"], "tree_method": "hist",
        "max_depth": 4 if quick else 6, "eta": 0.1 if quick else 0.05, "subsample": 0.8,
        "colsample_bytree": 0.8, "min_child_weight": 5, "scale_pos_weight": (len(tr) - pos) / pos,
        "nthread": os.cpu_count() or 1, "seed": seed,
    }
    names = F.feature_names()
    dtr = xgb.DMatrix(ds.x[tr], label=ds.y[tr], missing=np.nan, feature_names=names)
    dva = xgb.DMatrix(ds.x[va], label=ds.y[va], missing=np.nan, feature_names=names)
    dte = xgb.DMatrix(ds.x[te], label=ds.y[te], missing=np.nan, feature_names=names)
    # Early stopping watches the last metric (validation AUROC).
    booster = xgb.train(params, dtr, num_boost_round=200 if quick else 1000, evals=[(dva, "valid")],
                        early_stopping_rounds=20 if quick else 50, verbose_eval=False)
    best_it = int(booster.best_iteration)
    booster = booster[: best_it + 1]  # keep only the trees up to the best validation round

    def auc(y, p):
        return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")

    s_va, s_te = booster.predict(dva), booster.predict(dte)
    threshold, valid_utility = choose_threshold(ds, va, s_va)
    te_scores, te_labels = whole_stay_scores(ds, te, s_te)
    utility = UtilityEvaluator(te_labels).score(te_scores >= threshold)
    auroc, valid_auroc = auc(ds.y[te], s_te), auc(ds.y[va], s_va)
    seconds = time.monotonic() - t_start
    progress(f"best iteration {best_it}; valid AUROC {valid_auroc:.3f}, utility {valid_utility:.3f} at "
             f"threshold {threshold:.4f}; held-out test ({len(g_te)} stays) AUROC {auroc:.3f}, "
             f"utility {utility:.3f} ({seconds:.1f}s)")

    tag, out_path = "", ""
    if save:
        meta = {
            "threshold": threshold, "feature_names": names, "auroc": auroc, "utility": utility,
            "valid_auroc": valid_auroc, "valid_utility": valid_utility,
            "n_stays": n_stays, "n_train_stays": len(g_tr), "n_valid_stays": len(g_va),
            "n_test_stays": len(g_te), "n_rows": len(ds.y), "best_iteration": best_it,
            "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "dataset": path.name, "limit": "all" if limit is None else limit, "seed": seed, "xgboost": xgb.__version__,
            "params": {k: v for k, v in params.items() if k != "nthread"},
            "features_module": "vigil_inference.features",
        }
        with bentoml.models.create(MODEL_NAME, metadata=meta,
                                   labels={"task": "sepsis-early-warning", "framework": "xgboost",
                                           "quick": str(quick).lower()}) as m:
            booster.save_model(os.path.join(m.path, MODEL_FILE))
        tag = str(m.tag)
        out_path = bentoml.models.get(tag).path
        progress(f"saved {tag} to {out_path}")
    return TrainResult(tag=tag, threshold=threshold, auroc=auroc, utility=utility, valid_auroc=valid_auroc,
                       valid_utility=valid_utility, n_stays=n_stays, n_train_stays=len(g_tr),
                       n_valid_stays=len(g_va), n_test_stays=len(g_te), n_rows=len(ds.y),
                       best_iteration=best_it, seconds=seconds, path=str(out_path))
