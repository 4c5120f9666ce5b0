"""The model card: Markdown plus ROC and calibration plots (PNG), written by `vigil train`."""
from __future__ import annotations

import json
import pathlib

import numpy as np


def _plots(out: pathlib.Path, labels: np.ndarray, scores: np.ndarray, baselines: dict | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    files = []
    fig, ax = plt.subplots(figsize=(5, 5))
    fpr, tpr, _ = roc_curve(labels, scores)
    ax.plot(fpr, tpr, label="vigil-sepsis (out-of-fold)")
    for name, s in (baselines or {}).items():
        f2, t2, _ = roc_curve(labels, s)
        ax.plot(f2, t2, label=name, lw=1)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate (rows)", ylabel="true positive rate (rows)", title="ROC, SepsisLabel")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)
    files.append("roc.png")

    fig, ax = plt.subplots(figsize=(5, 5))
    frac, mean_p = calibration_curve(labels, scores, n_bins=15, strategy="quantile")
    ax.plot(mean_p, frac, "o-", label="vigil-sepsis")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction SepsisLabel=1",
           title="Calibration (out-of-fold, quantile bins)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=100)
    plt.close(fig)
    files.append("calibration.png")
    return files


def write_card(directory, *, meta: dict, tag: str, evaluation: dict, labels: np.ndarray, scores: np.ndarray,
               booster=None) -> pathlib.Path:
    from vigil_inference.evaluate import format_table

    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _plots(out, labels, scores)
    top = ""
    if booster is not None:
        gain = booster.get_score(importance_type="gain")
        best = sorted(gain.items(), key=lambda kv: -kv[1])[:15]
        top = "\n".join(f"| {k} | {v:.1f} |" for k, v in best)
    m = evaluation["model"]
    bd = m.get("auroc_breakdown") or {}
    timing = ""
    if bd:
        timing = (f"""
- The ranking mostly tells septic patients from the others, less *when* they turn: AUROC
  {bd['vs_non_septic']:.3f} against rows of never-septic stays, {bd['within_septic']:.3f} against the
  rows of septic stays before their label ({100 * bd['septic_stay_negative_share']:.1f} % of the negative
  rows), and {bd['within_stay_mean']:.3f} on average within one septic stay. A high score marks a patient
  to watch; the alert is not a clock for the onset.""")
    text = f"""# Model card: {tag}

## Model
XGBoost gradient-boosted trees (`binary:logistic`), {meta['best_iteration'] + 1} trees, parameters
`{json.dumps(meta['params'])}`. Input: {len(meta['feature_names'])} features computed per patient and
hourly interval by `vigil_inference.features` (the same code online and offline): last value, hours
since last, change since the previous measurement, measurement counts for the 34 vitals and labs;
6 h and 24 h windows, 24 h change and 12 h least-squares slope of the main vitals; shock index,
BUN/creatinine, partial NEWS2, SIRS, qSOFA and a partial SOFA (platelets, bilirubin, creatinine,
MAP < 70, SaO2 or SpO2 / FiO2) with its rise over 24 h and since the first measurement; demographics from the EHR's Patient and Encounters (age, sex, hospital-to-ICU admission time, unit);
hours in ICU. Output: probability that the row is labelled septic (SepsisLabel, i.e. onset within
6 h or already septic); alert (qualitativeRisk `high`) when probability >= {meta['threshold']:.4f}.
Class imbalance is handled with `scale_pos_weight`; so the probabilities are *not* calibrated
event rates (see the calibration plot): use them as a ranking score and the alert threshold.

## Data
PhysioNet/CinC Challenge 2019 training set A (Beth Israel Deaconess, {meta['n_stays']} ICU stays,
{meta['n_septic_stays']} septic, {meta['n_rows']} scored hourly rows; dataset `{meta['dataset']}`,
limit {meta['limit']}). CC BY 4.0; Reyna et al., Crit Care Med 2020, doi:10.1097/CCM.0000000000004145.

## Training and evaluation protocol
{meta['cv_folds']}-fold cross-validation grouped by patient and stratified by septic stay; inside each
training fold 10 % of stays are held out for early stopping (patience {meta.get('early_stopping_rounds', 50)} rounds on its
AUROC). Configuration(s) `{json.dumps(meta['search'])}` (with several, each is screened on the
first fold by AUROC and the best is cross-validated on all folds). The alert threshold maximises the challenge's
normalized utility over all out-of-fold predictions; the utility below is cross-fitted (each fold at the
threshold picked on the other folds). 95 % confidence intervals: percentile bootstrap over stays.
The final model is refit on all stays with the median number of rounds. Wall time of the whole
`vigil train` run (features, CV, bootstrap, final fit): {meta['train_seconds']:.0f} s.

## Metrics (out-of-fold, set A)
Normalized utility (cross-fitted): **{m['utility_cross_fitted']:.3f}**; at the deployed threshold on
pooled out-of-fold scores: {m['utility']:.3f} [{m['ci']['utility'][0]:.3f}, {m['ci']['utility'][1]:.3f}].
AUROC **{m['auroc']:.3f}** [{m['ci']['auroc'][0]:.3f}, {m['ci']['auroc'][1]:.3f}], AUPRC {m['auprc']:.3f}
[{m['ci']['auprc'][0]:.3f}, {m['ci']['auprc'][1]:.3f}].

{format_table(evaluation)}

NEWS2 here lacks consciousness (not in the data) and uses FiO2 > 21 % as "supplemental oxygen";
qSOFA lacks mental status (maximum 2). A missing parameter scores 0.

![ROC](roc.png) ![Calibration](calibration.png)

## Most important features (gain)
| feature | gain |
| --- | --- |
{top}

## Limitations
- Trained on one hospital system. Performance on another (e.g. the challenge's set B, Emory) is
  expected to be lower; the challenge's best entries lost about 0.1 utility on a hospital they had not
  seen. Re-check the threshold on local data before use.
- Labels are the challenge's Sepsis-3 derived SepsisLabel (onset shifted 6 h earlier), not chart review.
- Measurement counts and timing features partly reflect the hospital's ordering practice, which may
  differ elsewhere.
- Probabilities are not calibrated (class weighting); not a diagnostic device; research use only.{timing}
"""
    p = out / "MODEL_CARD.md"
    p.write_text(text)
    (out / "metrics.json").write_text(json.dumps({"tag": tag, "evaluation": evaluation, "meta": {
        k: v for k, v in meta.items() if k != "feature_names"}}, indent=1, default=float))
    return p
