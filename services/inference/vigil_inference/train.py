"""Offline training: PhysioNet stays -> features (vigil_inference.features) -> XGBoost -> BentoML store.

Protocol (everything patient-grouped: a stay's rows never sit in two folds):
1. K-fold cross-validation stratified by septic stay (StratifiedGroupKFold, K=5; 3 with --quick).
   Inside each training fold, 10 % of its stays are held out for early stopping only.
2. Hyperparameters: one fixed configuration (`SEARCH`; depth 5, eta 0.08, min_child_weight 20,
   early stopping patience 100 on the holdout AUROC): the configuration the former 3-configuration
   grid (depth 7 / full class weight as alternatives) chose on its fold-1 screen. One configuration
   means no tuning on the CV folds and K + 1 fits per `vigil train`. With several configurations in `SEARCH` the first fold screens
   them and the best is run on every fold.
3. Class imbalance: `scale_pos_weight` = sqrt(neg/pos).
4. Alert threshold: maximises the challenge's normalized utility on the out-of-fold predictions. The
   utility reported is cross-fitted (each fold scored at the threshold chosen on the other folds), so
   threshold selection does not inflate it. CIs: bootstrap over stays.
5. Final model: all stays, the chosen configuration, rounds = median best iteration of the folds.
   Saved as `vigil-sepsis` in the BentoML store with metadata; a model card is written (card.py).
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
from vigil_inference.evaluate import Dataset, build_dataset, choose_threshold, compare, full_scores
from vigil_inference.model import MODEL_FILE, MODEL_NAME, LoadedModel, load_model  # noqa: F401 (re-export)
from vigil_inference.utility import UtilityEvaluator

QUICK_LIMIT = 2000
BASE_PARAMS = {"objective": "binary:logistic", "eval_metric": "auc", "tree_method": "hist", "max_bin": 128,
               "subsample": 0.8, "colsample_bytree": 0.5}
SEARCH = [{"max_depth": 5, "eta": 0.08, "min_child_weight": 20, "spw": "sqrt"}]
QUICK_SEARCH = [{"max_depth": 4, "eta": 0.15, "min_child_weight": 5, "spw": "sqrt"}]


@dataclass(frozen=True)
class TrainResult:
    """auroc/utility: cross-validated (out-of-fold; utility cross-fitted); *_ci: 95 % bootstrap CIs."""

    tag: str
    threshold: float
    auroc: float
    utility: float
    auroc_ci: tuple[float, float]
    utility_ci: tuple[float, float]
    n_stays: int
    n_rows: int
    n_folds: int
    best_iteration: int
    params: dict
    seconds: float
    path: str
    evaluation: dict
    card_path: str = ""


def _params(cfg: dict, y: np.ndarray, nthread: int, seed: int) -> dict:
    pos = max(int(y.sum()), 1)
    ratio = (len(y) - pos) / pos
    p = {**BASE_PARAMS, **{k: v for k, v in cfg.items() if k != "spw"}, "nthread": nthread, "seed": seed}
    p["scale_pos_weight"] = float(np.sqrt(ratio) if cfg["spw"] == "sqrt" else ratio)
    return p


def _fit(ds: Dataset, rows: np.ndarray, cfg: dict, *, seed: int, nthread: int, max_rounds: int,
         early: int) -> tuple[object, int]:
    """Fit on `rows` with 10 % of its stays held out for early stopping; (booster, best iteration)."""
    import xgboost as xgb
    from sklearn.model_selection import GroupShuffleSplit

    tr_i, es_i = next(GroupShuffleSplit(n_splits=1, test_size=0.1, random_state=seed).split(
        rows, groups=ds.group[rows]))
    tr, es = rows[tr_i], rows[es_i]
    names = F.feature_names()
    dtr = xgb.DMatrix(ds.x[tr], label=ds.y[tr], missing=np.nan, feature_names=names)
    des = xgb.DMatrix(ds.x[es], label=ds.y[es], missing=np.nan, feature_names=names)
    b = xgb.train(_params(cfg, ds.y[tr], nthread, seed), dtr, num_boost_round=max_rounds, evals=[(des, "es")],
                  early_stopping_rounds=early, verbose_eval=False)
    best = int(b.best_iteration)
    return b[: best + 1], best


def _predict(booster, x: np.ndarray) -> np.ndarray:
    return booster.inplace_predict(x, missing=np.nan).astype(np.float64)


def train(dataset_path: str | os.PathLike | None = None, *, limit: int | None = None, quick: bool = False,
          seed: int = 0, progress: Callable[[str], None] = print, save: bool = True, folds: int | None = None,
          nthread: int | None = None, card_dir: str | os.PathLike | None = None, n_boot: int | None = None
          ) -> TrainResult:
    """Cross-validate, search, pick the threshold, train the final model and (save) store it."""
    import xgboost as xgb
    from sklearn.model_selection import StratifiedGroupKFold

    t_start = time.monotonic()
    path = pathlib.Path(dataset_path) if dataset_path else physionet.default_dataset()
    if quick and limit is None:
        limit = QUICK_LIMIT
    k = folds or (3 if quick else 5)
    search = QUICK_SEARCH if quick else SEARCH
    max_rounds, early = (150, 15) if quick else (1500, 100)
    n_boot = n_boot if n_boot is not None else (50 if quick else 200)
    progress(f"loading stays from {path} (limit={limit})")
    ds = build_dataset(physionet.iter_stays(path, limit), progress)
    n_stays = len(ds.stems)
    septic = ds.septic
    # One thread for small sets: OpenMP threads on a busy 2-core machine can be 50x slower than one.
    nthread = nthread or (1 if len(ds.y) < 200_000 else min(2, os.cpu_count() or 1))
    progress(f"{n_stays} stays ({int(septic.sum())} septic), {len(ds.y)} scored rows, {int(ds.y.sum())} positive, "
             f"{F.N_FEATURES} features ({time.monotonic() - t_start:.1f}s)")

    stay_idx = np.arange(n_stays)
    splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(
        stay_idx, septic.astype(int), groups=stay_idx))
    row_folds = [(np.flatnonzero(np.isin(ds.group, tr_s)), np.flatnonzero(np.isin(ds.group, te_s)))
                 for tr_s, te_s in splits]
    for tr, te in row_folds:
        assert not set(np.unique(ds.group[tr])) & set(np.unique(ds.group[te])), "a stay is in two folds"

    def run_fold(cfg, f):
        tr, te = row_folds[f]
        b, best = _fit(ds, tr, cfg, seed=seed + f, nthread=nthread, max_rounds=max_rounds, early=early)
        return _predict(b, ds.x[te]), best

    from sklearn.metrics import roc_auc_score

    # Screening on fold 0, then the best two (or the only one) on every fold.
    screened = []
    for i, cfg in enumerate(search):
        p0, b0 = run_fold(cfg, 0)
        auc0 = roc_auc_score(ds.y[row_folds[0][1]], p0)
        screened.append((auc0, i, p0, b0))
        progress(f"search {i + 1}/{len(search)} {cfg}: fold 1 AUROC {auc0:.4f}, {b0 + 1} rounds "
                 f"({time.monotonic() - t_start:.0f}s)")
    screened.sort(key=lambda t: -t[0])
    finalists = screened[:1]  # one finalist keeps `vigil train` to K + len(SEARCH) fits
    results = []
    for auc0, i, p0, b0 in finalists:
        cfg = search[i]
        oof = np.full(len(ds.y), np.nan)
        oof[row_folds[0][1]] = p0
        bests = [b0]
        for f in range(1, k):
            p, b = run_fold(cfg, f)
            oof[row_folds[f][1]] = p
            bests.append(b)
            progress(f"  config {i + 1}: fold {f + 1}/{k} done ({time.monotonic() - t_start:.0f}s)")
        auc = roc_auc_score(ds.y, oof)
        progress(f"config {i + 1}: out-of-fold AUROC {auc:.4f}")
        results.append((auc, i, oof, bests))
    results.sort(key=lambda t: -t[0])
    _oof_auc, best_i, oof, bests = results[0]
    cfg = search[best_i]

    # Threshold on all out-of-fold scores (the deployed one); utility reported cross-fitted.
    fs = full_scores(ds, oof)
    threshold, oof_utility = choose_threshold(ds.full_labels, fs)
    cross_pred = []
    for tr_s, te_s in splits:
        t_f, _ = choose_threshold([ds.full_labels[s] for s in tr_s], [fs[s] for s in tr_s])
        cross_pred.append((te_s, t_f))
    order = np.concatenate([te_s for te_s, _ in cross_pred])
    pred = [fs[s] >= t_f for te_s, t_f in cross_pred for s in te_s]
    cross_utility = UtilityEvaluator([ds.full_labels[s] for s in order]).score(np.concatenate(pred))
    # Time-only baseline threshold from the same data (kept in metadata for `vigil evaluate`).
    col = F.feature_names().index("icu_hours")
    time_threshold, _ = choose_threshold(ds.full_labels, full_scores(ds, ds.x[:, col]))
    evaluation = compare(ds, oof, threshold, time_threshold=time_threshold, n_boot=n_boot, seed=seed)
    evaluation["model"]["utility_cross_fitted"] = cross_utility
    evaluation["model"]["utility_oof_threshold"] = oof_utility
    m = evaluation["model"]
    progress(f"cross-validated ({k} folds): AUROC {m['auroc']:.4f} [{m['ci']['auroc'][0]:.4f}, "
             f"{m['ci']['auroc'][1]:.4f}], utility {cross_utility:.4f} cross-fitted ({oof_utility:.4f} at the "
             f"pooled threshold {threshold:.4f}, CI [{m['ci']['utility'][0]:.4f}, {m['ci']['utility'][1]:.4f}])")

    rounds = int(np.median(bests)) + 1
    names = F.feature_names()
    progress(f"final model on all {n_stays} stays, {rounds} rounds")
    dall = xgb.DMatrix(ds.x, label=ds.y, missing=np.nan, feature_names=names)
    params = _params(cfg, ds.y, nthread, seed)
    booster = xgb.train(params, dall, num_boost_round=rounds, verbose_eval=False)
    seconds = time.monotonic() - t_start

    tag, out_path, card_path = "", "", ""
    meta = {
        "threshold": threshold, "feature_names": names, "auroc": m["auroc"], "utility": cross_utility,
        "auroc_ci": list(m["ci"]["auroc"]), "utility_ci": list(m["ci"]["utility"]),
        "auprc": m["auprc"], "cv_folds": k, "n_stays": n_stays, "n_septic_stays": int(septic.sum()),
        "n_rows": len(ds.y), "best_iteration": rounds - 1, "time_only_threshold": time_threshold,
        "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "dataset": path.name,
        "limit": "all" if limit is None else limit, "seed": seed, "xgboost": xgb.__version__,
        "params": {kk: v for kk, v in params.items() if kk != "nthread"}, "search": search,
        "features_module": "vigil_inference.features", "train_seconds": round(seconds, 1),
        "early_stopping_rounds": early, "max_rounds": max_rounds,
    }
    if save:
        import bentoml

        with bentoml.models.create(MODEL_NAME, metadata=meta,
                                   labels={"task": "sepsis-early-warning", "framework": "xgboost",
                                           "quick": str(quick).lower()}) as mdl:
            booster.save_model(os.path.join(mdl.path, MODEL_FILE))
        tag = str(mdl.tag)
        out_path = bentoml.models.get(tag).path
        progress(f"saved {tag} to {out_path}")
    if card_dir is not None:
        from vigil_inference.card import write_card

        card_path = str(write_card(card_dir, meta=meta, tag=tag or f"{MODEL_NAME}:unsaved", evaluation=evaluation,
                                   labels=ds.y, scores=oof, booster=booster))
        progress(f"model card: {card_path}")
    return TrainResult(tag=tag, threshold=threshold, auroc=m["auroc"], utility=cross_utility,
                       auroc_ci=tuple(m["ci"]["auroc"]), utility_ci=tuple(m["ci"]["utility"]), n_stays=n_stays,
                       n_rows=len(ds.y), n_folds=k, best_iteration=rounds - 1, params=params,
                       seconds=seconds, path=str(out_path), evaluation=evaluation, card_path=card_path)
