"""Offline evaluation on any PhysioNet-format set, side by side with rule-based baselines.

Metrics (all on whole stays; leading rows without any measurement are predicted 0, as online):
normalized utility (the challenge score), AUROC and AUPRC over rows vs SepsisLabel, precision, recall,
F1 and accuracy at the alert threshold, alerts per patient-day (positive rows / (rows / 24)).
Baselines computed on the same rows from the same last-known values as the model's features:
NEWS2 (alert at >= 5), qSOFA without mental status (>= 2 of 2), SIRS (>= 2) and a time-only score
(hours in ICU; threshold chosen for utility). Confidence intervals: percentile bootstrap over stays.
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field

import numpy as np

from vigil import physionet
from vigil_inference import features as F
from vigil_inference.utility import UtilityEvaluator


@dataclass
class Dataset:
    x: np.ndarray  # kept rows x features
    y: np.ndarray  # SepsisLabel of kept rows
    group: np.ndarray  # stay index per kept row
    full_labels: list[np.ndarray]  # per stay, all rows (utility is defined on whole stays)
    dropped: np.ndarray  # per stay, leading rows without any measurement
    stems: list[str]
    iculos: list[np.ndarray] = field(default_factory=list)  # per stay, all rows

    @property
    def septic(self) -> np.ndarray:
        return np.array([lab.any() for lab in self.full_labels])


def build_dataset(stays, progress=None) -> Dataset:
    xs, ys, gs, full, dropped, stems, icu = [], [], [], [], [], [], []
    for i, stay in enumerate(stays):
        x, labels, d = F.stay_features(stay)
        xs.append(x)
        ys.append(labels)
        gs.append(np.full(len(labels), i))
        full.append(stay.labels)
        dropped.append(d)
        stems.append(stay.stem)
        icu.append(stay.iculos)
        if progress and (i + 1) % 5000 == 0:
            progress(f"  features for {i + 1} stays")
    if not xs:
        raise ValueError("no stays")
    return Dataset(np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), full, np.array(dropped), stems, icu)


def full_scores(ds: Dataset, scores: np.ndarray, stay_ids: np.ndarray | None = None) -> list[np.ndarray]:
    """Per stay (all of them, or `stay_ids` in order), scores on all rows: -inf on dropped leading rows.
    `scores` covers the kept rows of the dataset (all stays, dataset order)."""
    starts = np.concatenate([[0], np.cumsum([len(lab) - d for lab, d in zip(ds.full_labels, ds.dropped)])])
    ids = range(len(ds.stems)) if stay_ids is None else stay_ids
    return [np.concatenate([np.full(ds.dropped[s], -np.inf), scores[starts[s]:starts[s + 1]]]) for s in ids]


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else math.nan


def _ap(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, p)) if 0 < y.sum() < len(y) else math.nan


def choose_threshold(labels: list[np.ndarray], scores: list[np.ndarray], n: int = 300) -> tuple[float, float]:
    """(threshold, normalized utility) maximising the challenge utility over these stays."""
    s = np.concatenate(scores)
    ev = UtilityEvaluator(labels)
    finite = s[np.isfinite(s)]
    cands = np.unique(np.quantile(finite, np.linspace(0.5, 0.9995, n)))
    best = (float(finite.max()) + 1e-9, 0.0)
    for t in cands:
        u = ev.score(s >= t)
        if u > best[1]:
            best = (float(t), u)
    return best


def auroc_breakdown(labels: list[np.ndarray], scores: list[np.ndarray]) -> dict:
    """Where the row AUROC comes from. Its negatives are of two kinds: rows of stays that never become
    septic, and the rows of septic stays before their label starts. A score can rank well by telling
    septic patients from the others (between stays) while saying little about *when* (within a stay):

    - `vs_non_septic`: positive rows vs rows of never-septic stays;
    - `within_septic`: positive rows vs the negative rows of septic stays (pooled over those stays);
    - `within_stay_mean`: mean over septic stays with both kinds of row of the stay's own AUROC
      (0.5: the score does not rise at the label within the stay), `within_stay_n` such stays;
    - `stay_max`: stay-level AUROC of each stay's highest score vs whether the stay is septic;
    - `septic_stay_negative_share`: the share of all negative rows that come from septic stays
      (the row AUROC is about (1 - share) * vs_non_septic + share * within_septic).
    Scores of -inf (rows before the first measurement) rank lowest, as in `metrics_at`.
    """
    fin = [np.where(np.isfinite(s), s, -1e300) for s in scores]
    septic = np.array([lab.any() for lab in labels], dtype=bool)
    y = np.concatenate(labels)
    s = np.concatenate(fin)
    in_septic = np.concatenate([np.full(len(lab), sep) for lab, sep in zip(labels, septic, strict=True)])
    neg_septic = (y == 0) & in_septic
    vs_non = (y == 1) | ~in_septic
    within = (y == 1) | neg_septic
    per_stay = [_auc(lab, sc) for lab, sc, sep in zip(labels, fin, septic, strict=True) if sep and not lab.all()]
    n_neg = int((y == 0).sum())
    return {
        "vs_non_septic": _auc(y[vs_non], s[vs_non]), "within_septic": _auc(y[within], s[within]),
        "within_stay_mean": float(np.mean(per_stay)) if per_stay else math.nan, "within_stay_n": len(per_stay),
        "stay_max": _auc(septic.astype(int), np.array([sc.max() if len(sc) else -1e300 for sc in fin])),
        "septic_stay_negative_share": float(neg_septic.sum() / n_neg) if n_neg else math.nan,
    }


def metrics_at(labels: list[np.ndarray], scores: list[np.ndarray], threshold: float) -> dict:
    """Every reported metric for per-stay whole-row scores at one alert threshold."""
    y = np.concatenate(labels)
    s = np.concatenate(scores)
    fin = np.where(np.isfinite(s), s, np.nanmin(np.where(np.isfinite(s), s, np.nan)) - 1)
    pred = s >= threshold
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    fn, tn = int((~pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {
        "utility": UtilityEvaluator(labels).score(pred), "auroc": _auc(y, fin), "auprc": _ap(y, fin),
        "precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "accuracy": (tp + tn) / len(y), "alerts_per_patient_day": float(pred.sum()) / (len(y) / 24.0),
        "false_alerts": fp, "threshold": float(threshold), "rows": len(y), "stays": len(labels),
        "auroc_breakdown": auroc_breakdown(labels, scores),
    }


def bootstrap_ci(labels: list[np.ndarray], scores: list[np.ndarray], threshold: float, *, n_boot: int = 200,
                 seed: int = 0, alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs over stays (patients) of utility, AUROC and AUPRC at `threshold`."""
    rng = np.random.default_rng(seed)
    from vigil_inference.utility import best_predictions, rewards

    per = []
    for lab, sc in zip(labels, scores, strict=True):
        p, n_ = rewards(lab)
        pred = sc >= threshold
        per.append((float(np.where(pred, p, n_).sum()), float(np.where(best_predictions(lab) == 1, p, n_).sum()),
                    float(n_.sum())))
    per = np.array(per)
    y_all = np.concatenate(labels)
    s_all = np.concatenate(scores)
    s_all = np.where(np.isfinite(s_all), s_all, -1e9)
    starts = np.concatenate([[0], np.cumsum([len(lab) for lab in labels])])
    k = len(labels)
    out: dict[str, list[float]] = {"utility": [], "auroc": [], "auprc": []}
    for _ in range(n_boot):
        idx = rng.integers(0, k, k)
        o, b, i0 = per[idx].sum(axis=0)
        out["utility"].append((o - i0) / (b - i0) if b != i0 else 0.0)
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])
        out["auroc"].append(_auc(y_all[rows], s_all[rows]))
        out["auprc"].append(_ap(y_all[rows], s_all[rows]))
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    return {m: (float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi))) for m, v in out.items()}


def baseline_scores(ds: Dataset) -> dict[str, np.ndarray]:
    """Rule-based scores per kept row, from the feature columns (last-known values)."""
    col = {n: i for i, n in enumerate(F.feature_names())}
    return {
        "NEWS2": ds.x[:, col["news2_partial"]],
        "qSOFA": ds.x[:, col["qsofa_partial"]],
        "SIRS": ds.x[:, col["sirs_partial"]],
        "time-only": ds.x[:, col["icu_hours"]],
    }


BASELINE_THRESHOLDS = {"NEWS2": 5.0, "qSOFA": 2.0, "SIRS": 2.0}  # time-only: chosen for utility


def equal_sensitivity(labels, model_scores, news2_scores, news2_threshold: float = 5.0) -> dict:
    """Row-level sensitivity of NEWS2 >= 5, the model threshold with the same sensitivity, and both
    false-alert counts (positive predictions on rows with SepsisLabel 0)."""
    y = np.concatenate(labels)
    m = np.concatenate(model_scores)
    n2 = np.concatenate(news2_scores)
    n2_pred = n2 >= news2_threshold
    sens = float((n2_pred & (y == 1)).sum() / max(y.sum(), 1))
    pos_scores = np.sort(m[y == 1])[::-1]
    k = max(math.ceil(sens * len(pos_scores)), 1)
    t = float(pos_scores[k - 1])
    m_pred = m >= t
    fa_m, fa_n = int((m_pred & (y == 0)).sum()), int((n2_pred & (y == 0)).sum())
    return {"sensitivity": sens, "model_threshold": t,
            "model_sensitivity": float((m_pred & (y == 1)).sum() / max(y.sum(), 1)),
            "model_false_alerts": fa_m, "news2_false_alerts": fa_n,
            "reduction": 1 - fa_m / fa_n if fa_n else math.nan}


def compare(ds: Dataset, model_scores: np.ndarray, threshold: float, *, time_threshold: float | None = None,
            n_boot: int = 200, seed: int = 0) -> dict:
    """Model vs baselines on the same stays: {name: metrics (+ ci)}, plus the equal-sensitivity check."""
    labels = ds.full_labels
    res: dict = {}
    ms = full_scores(ds, model_scores)
    res["model"] = metrics_at(labels, ms, threshold)
    res["model"]["ci"] = bootstrap_ci(labels, ms, threshold, n_boot=n_boot, seed=seed)
    base = baseline_scores(ds)
    fulls = {}
    for name, sc in base.items():
        fs = full_scores(ds, sc)
        fulls[name] = fs
        t = BASELINE_THRESHOLDS.get(name)
        if t is None:
            t = time_threshold if time_threshold is not None else choose_threshold(labels, fs)[0]
        res[name] = metrics_at(labels, fs, t)
    res["equal_sensitivity_vs_news2"] = equal_sensitivity(labels, ms, fulls["NEWS2"])
    return res


def format_table(res: dict) -> str:
    cols = ["utility", "auroc", "auprc", "precision", "recall", "f1", "accuracy", "alerts_per_patient_day"]
    lines = ["| score | threshold | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 2)]
    for name, m in res.items():
        if name == "equal_sensitivity_vs_news2" or name.startswith("_"):
            continue
        cells = []
        for c in cols:
            v = f"{m[c]:.3f}"
            if "ci" in m and c in m["ci"]:
                v += f" [{m['ci'][c][0]:.3f}, {m['ci'][c][1]:.3f}]"
            cells.append(v)
        lines.append(f"| {name} | {m['threshold']:.4g} | " + " | ".join(cells) + " |")
    bcols = ["vs_non_septic", "within_septic", "within_stay_mean", "stay_max"]
    rows = [(name, m["auroc_breakdown"]) for name, m in res.items()
            if isinstance(m, dict) and "auroc_breakdown" in m and not name.startswith("_")]
    if rows:
        share = rows[0][1]["septic_stay_negative_share"]
        intro = ("Where the AUROC comes from (positive rows against: rows of never-septic stays; the "
                 f"{100 * share:.1f} % of negative rows that are septic stays' rows before their label; the "
                 "same within each septic stay, averaged, where the label only turns on, so that hours in ICU "
                 "alone orders every stay perfectly; and stays ranked by their highest score):")
        lines += ["", intro, "", "| score | " + " | ".join(bcols) + " |", "|" + " --- |" * (len(bcols) + 1)]
        lines += [f"| {name} | " + " | ".join(f"{b[c]:.3f}" for c in bcols) + " |" for name, b in rows]
    e = res.get("equal_sensitivity_vs_news2")
    if e:
        lines.append("")
        lines.append(f"At NEWS2 >= 5's row sensitivity ({e['sensitivity']:.3f}), the model (threshold "
                     f"{e['model_threshold']:.4f}) raises {e['model_false_alerts']} false alerts vs NEWS2's "
                     f"{e['news2_false_alerts']}: {100 * e['reduction']:.1f}% fewer.")
    return "\n".join(lines)


def evaluate(data: str | pathlib.Path, *, model_tag: str = "vigil-sepsis:latest", limit: int | None = None,
             n_boot: int = 200, progress=print) -> dict:
    """Offline evaluation of a stored model on a PhysioNet-format set."""
    from vigil_inference.model import load_model

    model = load_model(model_tag)
    progress(f"model {model.name}:{model.version}, threshold {model.threshold:.4f}; loading {data}")
    if (model.metadata or {}).get("dataset") == pathlib.Path(data).name:
        progress("WARNING: this model was trained on this data set: the figures below are in-sample and "
                 "optimistic; the cross-validated figures are in the model card")
    ds = build_dataset(physionet.iter_stays(data, limit), progress)
    progress(f"{len(ds.stems)} stays, {len(ds.y)} scored rows")
    scores = model.predict(ds.x)
    meta = model.metadata or {}
    res = compare(ds, scores, model.threshold, time_threshold=meta.get("time_only_threshold"), n_boot=n_boot)
    res["_model"] = f"{model.name}:{model.version}"
    return res


# --- live: through a running pipeline ----------------------------------------------------------


def read_live_scores(fhir_base: str, patient_ids: list[str], *, model_name: str = "vigil-sepsis",
                     token: str | None = None) -> dict[str, dict[int, float]]:
    """Per patient: {interval start epoch: probabilityDecimal} of its current RiskAssessments by
    `model_name`, read over the FHIR API (search by subject and method, following `next` links)."""
    import datetime as dt

    import httpx

    from vigil_inference.riskassessment import MODEL_SYSTEM

    headers = {"accept": "application/fhir+json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    out: dict[str, dict[int, float]] = {}
    with httpx.Client(timeout=60.0, headers=headers) as http:
        for pid in patient_ids:
            got: dict[int, float] = {}
            url: str | None = f"{fhir_base.rstrip('/')}/RiskAssessment"
            params: dict | None = {"subject": f"Patient/{pid}", "method": f"{MODEL_SYSTEM}|{model_name}",
                                   "_count": "1000"}
            while url:
                r = http.get(url, params=params)
                r.raise_for_status()
                bundle = r.json()
                for e in bundle.get("entry", []):
                    ra = e["resource"]
                    start = dt.datetime.fromisoformat(ra["occurrencePeriod"]["start"]).timestamp()
                    got[int(start)] = float(ra["prediction"][0]["probabilityDecimal"])
                url = next((lk["url"] for lk in bundle.get("link", []) if lk.get("relation") == "next"), None)
                params = None
            out[pid] = got
    return out


def live_row_scores(stay: physionet.Stay, scores: dict[int, float], t0_epoch: float) -> np.ndarray:
    """Per row of the stay, the live score of its interval; a row whose interval has no assessment
    (no new data that hour) carries the last assessment forward; -inf before the first one."""
    from vigil import timecontract

    out = np.full(len(stay.labels), -np.inf)
    last = -np.inf
    for r, k in enumerate(stay.iculos):
        start = int(timecontract.row_effective_epoch(t0_epoch, int(k)))
        last = scores.get(start, last)
        out[r] = last
    return out


def evaluate_live(data, *, fhir_base: str, target: str, limit: int | None = None,
                  model_tag: str = "vigil-sepsis:latest", n_boot: int = 200, token: str | None = None,
                  settle_seconds: float = 600.0, progress=print) -> dict:
    """Replay the stays through the running pipeline (Patient/Encounters over FHIR, readings over
    gRPC), wait until the RiskAssessments stop changing, read them back over FHIR and report the same
    metrics as `evaluate` (baselines computed offline on the same stays)."""
    import asyncio
    import time

    from vigil_ingest.replay import replay

    from vigil import timecontract
    from vigil_inference.model import load_model

    stays = list(physionet.iter_stays(data, limit))
    progress(f"replaying {len(stays)} stays to {target} (EHR writes to {fhir_base})")
    asyncio.run(replay(data, target=target, limit=limit, fhir_base=fhir_base, token=token))
    stems = [s.stem for s in stays]
    prev, deadline = None, time.monotonic() + settle_seconds
    while True:
        scores = read_live_scores(fhir_base, stems, token=token)
        snapshot = {p: dict(v) for p, v in scores.items()}
        if snapshot == prev or time.monotonic() > deadline:
            break
        prev = snapshot
        time.sleep(5.0)
    t0 = timecontract.DEFAULT_T0.timestamp()
    labels = [s.labels for s in stays]
    live = [live_row_scores(s, scores[s.stem], t0) for s in stays]
    model = load_model(model_tag)
    res: dict = {"live-model": metrics_at(labels, live, model.threshold)}
    res["live-model"]["ci"] = bootstrap_ci(labels, live, model.threshold, n_boot=n_boot)
    ds = build_dataset(stays)
    offline = compare(ds, model.predict(ds.x), model.threshold,
                      time_threshold=(model.metadata or {}).get("time_only_threshold"), n_boot=n_boot)
    res.update(offline)
    return res
