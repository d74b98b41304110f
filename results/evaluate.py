"""Test-split evaluation of a trained model: AUC with patient-bootstrap CIs, operating points, calibration, curves.

Thresholds are chosen on the validation split (`choose_thresholds`) and only applied to the test split
(`evaluate`); a label without both classes has no AUC (None), never 0.5, as in `trainable.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from chestxpert.cluster.errors import UserError

# CheXNet's per-class test AUROCs (Rajpurkar et al. 2017, arXiv:1711.05225, the 14-pathology
# comparison with Wang et al. and Yao et al.: Table 2 in v3, "CheXNet" column). They were measured on
# CheXNet's own random 70/10/20 patient split, not on NIH's official test list nor on our split, so
# they are a point of reference, not a like-for-like comparison.
CHEXNET_REFERENCE_AUROC: dict[str, float] = {
    "Atelectasis": 0.8094,
    "Cardiomegaly": 0.9248,
    "Effusion": 0.8638,
    "Infiltration": 0.7345,
    "Mass": 0.8676,
    "Nodule": 0.7802,
    "Pneumonia": 0.7680,
    "Pneumothorax": 0.8887,
    "Consolidation": 0.7901,
    "Edema": 0.8878,
    "Emphysema": 0.9371,
    "Fibrosis": 0.8047,
    "Pleural_Thickening": 0.8062,
    "Hernia": 0.9164,
}

THRESHOLD_METHODS = ("youden", "sensitivity")
DEFAULT_THRESHOLD = 0.5
CURVE_POINTS = 200
# Bootstrap replicates are processed in chunks so that a chunk's image-weight matrix stays near this
# many entries (~40 MB of float64), whatever the size of the test split.
_BOOT_CHUNK_ENTRIES = 5_000_000


class EvaluationError(UserError, ValueError):
    """Predictions, labels or thresholds that do not fit together; the message says which and how."""


@dataclass
class ThresholdChoice:
    """Per-label operating thresholds chosen on the validation split.

    `thresholds` maps every label to a probability: an image is called positive when its predicted
    probability is >= the threshold. `defaulted` lists the labels that had no positives or no
    negatives among their known validation values; they got DEFAULT_THRESHOLD (0.5) instead.
    """

    thresholds: dict[str, float]
    defaulted: list[str] = field(default_factory=list)
    method: str = "youden"
    target_sensitivity: float | None = None


class AucInterval(NamedTuple):
    """A label's AUC on the whole split and its bootstrap percentile interval.

    All three are None when the label has no positives or no negatives; `low`/`high` are None when no
    resample had both classes. `n_used` is how many resamples had both classes and entered the interval.
    """

    auc: float | None
    low: float | None
    high: float | None
    n_used: int


def choose_thresholds(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    labels: Sequence[str],
    method: str = "youden",
    target_sensitivity: float | None = None,
) -> ThresholdChoice:
    """Choose one operating threshold per label from VALIDATION predictions only.

    `y_true` is N×L of 1/0/NaN (NaN = unknown, ignored), `y_prob` N×L probabilities in [0, 1].
    method="youden" takes the ROC threshold maximising sensitivity + specificity - 1 (the highest
    such threshold on ties); method="sensitivity" takes the highest threshold whose validation
    sensitivity is >= `target_sensitivity` (in (0, 1]), i.e. the one that costs the least specificity.
    Thresholds are predicted probabilities, compared with >=. Labels with no positives or no negatives
    get 0.5 and are listed in `defaulted`.
    """
    y_true, y_prob = _check_arrays(y_true, y_prob, labels)
    if method not in THRESHOLD_METHODS:
        raise EvaluationError(
            f"threshold method {method!r} is unknown; use one of {THRESHOLD_METHODS}"
        )
    if method == "sensitivity":
        if target_sensitivity is None or not 0.0 < target_sensitivity <= 1.0:
            raise EvaluationError(
                f"method='sensitivity' needs target_sensitivity in (0, 1], got {target_sensitivity!r}"
            )
    elif target_sensitivity is not None:
        raise EvaluationError(
            f"target_sensitivity={target_sensitivity} only applies to method='sensitivity'; "
            "pass method='sensitivity' or drop target_sensitivity"
        )

    choice = ThresholdChoice(thresholds={}, method=method, target_sensitivity=target_sensitivity)
    for column, name in enumerate(labels):
        truth, scores = _known(y_true, y_prob, column)
        if not _has_both_classes(truth):
            choice.thresholds[name] = DEFAULT_THRESHOLD
            choice.defaulted.append(name)
            continue
        fpr, tpr, candidates = roc_curve(truth, scores, drop_intermediate=False)
        # candidates[0] is +inf (nobody positive); it is never a useful operating point.
        fpr, tpr, candidates = fpr[1:], tpr[1:], candidates[1:]
        if method == "youden":
            best = int(np.argmax(tpr - fpr))
        else:
            # tpr rises as the threshold falls; the first index reaching the target has the lowest fpr.
            best = int(np.argmax(tpr >= target_sensitivity - 1e-12))
        choice.thresholds[name] = float(candidates[best])
    return choice


def operating_point_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    thresholds: Mapping[str, float] | ThresholdChoice,
    labels: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Confusion counts and rates per label at the given thresholds (positive when prob >= threshold).

    Returns {label: {sensitivity, specificity, ppv, npv, f1, tp, fp, tn, fn, threshold}} over the
    label's known values; counts are ints, a rate whose denominator is zero is NaN.
    """
    y_true, y_prob = _check_arrays(y_true, y_prob, labels)
    threshold_of = _threshold_map(thresholds, labels)
    out: dict[str, dict[str, Any]] = {}
    for column, name in enumerate(labels):
        truth, scores = _known(y_true, y_prob, column)
        called = scores >= threshold_of[name]
        positive = truth == 1
        tp = int(np.sum(called & positive))
        fp = int(np.sum(called & ~positive))
        tn = int(np.sum(~called & ~positive))
        fn = int(np.sum(~called & positive))
        out[name] = {
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp),
            "npv": _ratio(tn, tn + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "tp": tp,
            "fp": fp,
            "tn": tn,
            "fn": fn,
            "threshold": float(threshold_of[name]),
        }
    return out


def patient_bootstrap_weights(patient_ids: Sequence[Any], n_boot: int, seed: int = 0) -> np.ndarray:
    """How many times each image appears in each patient-level bootstrap resample (n_boot × N ints).

    Each resample draws as many patients as there are, with replacement, and takes all images of every
    drawn patient: all images of one patient share one count (0 when the patient was not drawn).
    `bootstrap_auc_ci` uses exactly these draws for the same seed.
    """
    patient_codes, patient_counts = _draw_patients(patient_ids, n_boot, np.random.default_rng(seed))
    return patient_counts[:, patient_codes]


def bootstrap_auc_ci(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    patient_ids: Sequence[Any],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    *,
    labels: Sequence[str] | None = None,
) -> dict[Any, AucInterval]:
    """ROC AUC per label with a (1 - alpha) percentile interval from a patient-level (cluster) bootstrap.

    Resamples patients, not images (see `patient_bootstrap_weights`), so images of one patient move
    together. The point estimate is sklearn's roc_auc_score on the whole split; resample AUCs are the
    same statistic with each image weighted by its resample count, computed with ranks in numpy.
    A resample where a label has only one class is skipped for that label (`n_used` counts the rest).
    Keys are `labels` when given, else column indices.
    """
    y_true, y_prob = _check_arrays(y_true, y_prob, labels)
    names: Sequence[Any] = labels if labels is not None else range(y_true.shape[1])
    _check_patients(patient_ids, len(y_true))
    if n_boot < 1:
        raise EvaluationError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise EvaluationError(f"alpha must be in (0, 1), e.g. 0.05 for a 95% interval; got {alpha}")

    patient_codes, patient_counts = _draw_patients(patient_ids, n_boot, np.random.default_rng(seed))
    boot_aucs = np.full((n_boot, len(names)), np.nan)
    chunk = max(1, _BOOT_CHUNK_ENTRIES // max(1, len(y_true)))
    for start in range(0, n_boot, chunk):
        image_weights = patient_counts[start : start + chunk][:, patient_codes].astype(np.float64)
        for column in range(len(names)):
            known = ~np.isnan(y_true[:, column])
            boot_aucs[start : start + chunk, column] = _weighted_auc(
                y_true[known, column], y_prob[known, column], image_weights[:, known]
            )

    out: dict[Any, AucInterval] = {}
    for column, name in enumerate(names):
        truth, scores = _known(y_true, y_prob, column)
        if not _has_both_classes(truth):
            out[name] = AucInterval(None, None, None, 0)
            continue
        usable = boot_aucs[:, column][~np.isnan(boot_aucs[:, column])]
        low = high = None
        if usable.size:
            low, high = (float(q) for q in np.quantile(usable, [alpha / 2, 1 - alpha / 2]))
        out[name] = AucInterval(float(roc_auc_score(truth, scores)), low, high, int(usable.size))
    return out


def calibration(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    n_bins: int = 10,
    *,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Reliability bins and expected calibration error, per label and pooled over all known entries.

    Bins are `n_bins` equal-width probability intervals on [0, 1] (the last one closed); ECE is the
    count-weighted mean of |frac_pos - mean_pred| over non-empty bins. Returns
    {"labels": {label: {ece, bins}}, "pooled": {ece, bins}} with bins [{low, high, mean_pred,
    frac_pos, count}]; an empty bin has NaN mean_pred/frac_pos, a label with no known values NaN ece.
    Keys are `labels` when given, else column indices.
    """
    y_true, y_prob = _check_arrays(y_true, y_prob, labels)
    names: Sequence[Any] = labels if labels is not None else range(y_true.shape[1])
    if n_bins < 1:
        raise EvaluationError(f"n_bins must be at least 1, got {n_bins}")
    per_label = {
        name: _reliability(*_known(y_true, y_prob, column), n_bins)
        for column, name in enumerate(names)
    }
    known = ~np.isnan(y_true)
    return {"labels": per_label, "pooled": _reliability(y_true[known], y_prob[known], n_bins)}


def curves(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    labels: Sequence[str],
    max_points: int = CURVE_POINTS,
) -> dict[str, dict[str, Any]]:
    """ROC and precision-recall curves per label, each thinned to at most `max_points` points.

    Returns {label: {"roc": {"fpr", "tpr"}, "pr": {"precision", "recall"}}} as lists of floats (first
    and last points always kept); both are None for a label without positives and negatives.
    """
    y_true, y_prob = _check_arrays(y_true, y_prob, labels)
    out: dict[str, dict[str, Any]] = {}
    for column, name in enumerate(labels):
        truth, scores = _known(y_true, y_prob, column)
        if not _has_both_classes(truth):
            out[name] = {"roc": None, "pr": None}
            continue
        fpr, tpr, _ = roc_curve(truth, scores)
        precision, recall, _ = precision_recall_curve(truth, scores)
        roc_keep = _thin(len(fpr), max_points)
        pr_keep = _thin(len(precision), max_points)
        out[name] = {
            "roc": {"fpr": fpr[roc_keep].tolist(), "tpr": tpr[roc_keep].tolist()},
            "pr": {"precision": precision[pr_keep].tolist(), "recall": recall[pr_keep].tolist()},
        }
    return out


def evaluate(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    patient_ids: Sequence[Any],
    labels: Sequence[str],
    thresholds: Mapping[str, float] | ThresholdChoice,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the report needs about the TEST split, as plain JSON-ready Python (NaN → None).

    `thresholds` come from `choose_thresholds` on the validation split and are used as given, never
    re-fitted here. Returns "counts" (images, patients, positives/negatives per label),
    "auc_macro" (mean over labels with both classes), "auc_micro" (one AUC over all known label
    entries pooled), "pr_auc_macro", "scorable_labels", "per_label" {label: {auc, auc_low, auc_high,
    auc_boot_used, pr_auc, chexnet_reference_auc, operating_point}}, "calibration", "curves",
    "bootstrap" (settings) and "thresholds".
    """
    y_true, y_prob = _check_arrays(y_true, y_prob, labels)
    _check_patients(patient_ids, len(y_true))
    alpha = 0.05
    intervals = bootstrap_auc_ci(y_true, y_prob, patient_ids, n_boot, seed, alpha, labels=labels)
    operating = operating_point_metrics(y_true, y_prob, thresholds, labels)

    per_label: dict[str, dict[str, Any]] = {}
    positives: dict[str, int] = {}
    negatives: dict[str, int] = {}
    for column, name in enumerate(labels):
        truth, scores = _known(y_true, y_prob, column)
        positives[name] = int(np.sum(truth == 1))
        negatives[name] = int(np.sum(truth == 0))
        interval = intervals[name]
        scorable = interval.auc is not None
        per_label[name] = {
            "auc": interval.auc,
            "auc_low": interval.low,
            "auc_high": interval.high,
            "auc_boot_used": interval.n_used,
            "pr_auc": float(average_precision_score(truth, scores)) if scorable else None,
            "chexnet_reference_auc": CHEXNET_REFERENCE_AUROC.get(name),
            "operating_point": operating[name],
        }

    scorable_labels = [name for name in labels if per_label[name]["auc"] is not None]
    known = ~np.isnan(y_true)
    pooled_truth = y_true[known]
    result = {
        "counts": {
            "images": int(len(y_true)),
            "patients": int(len(np.unique(np.asarray(patient_ids)))),
            "positives": positives,
            "negatives": negatives,
        },
        "auc_macro": _mean_or_none([per_label[name]["auc"] for name in scorable_labels]),
        "auc_micro": (
            float(roc_auc_score(pooled_truth, y_prob[known]))
            if _has_both_classes(pooled_truth)
            else None
        ),
        "pr_auc_macro": _mean_or_none([per_label[name]["pr_auc"] for name in scorable_labels]),
        "scorable_labels": scorable_labels,
        "per_label": per_label,
        "calibration": calibration(y_true, y_prob, labels=labels),
        "curves": curves(y_true, y_prob, labels),
        "bootstrap": {"unit": "patient", "n_boot": n_boot, "seed": seed, "alpha": alpha},
        "thresholds": {name: operating[name]["threshold"] for name in labels},
    }
    return to_json_ready(result)


def to_json_ready(value: Any) -> Any:
    """`value` with numpy scalars/arrays turned into Python ones and NaN/±inf into None, recursively."""
    if isinstance(value, Mapping):
        return {str(key): to_json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [to_json_ready(item) for item in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def reliability_figure(calib: Mapping[str, Any], path: str | Path) -> Path:
    """Save a PNG of reliability diagrams (pooled first, then each label) from `calibration()` output.

    Accepts the output either as returned or after `evaluate`'s JSON conversion (None for NaN).
    """
    panels = [("pooled", calib["pooled"]), *calib["labels"].items()]
    fig, axes = _panel_grid(len(panels))
    for ax, (name, reliability) in zip(axes, panels, strict=False):
        bins = [b for b in reliability["bins"] if b["count"] and b["mean_pred"] is not None]
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
        ax.plot([b["mean_pred"] for b in bins], [b["frac_pos"] for b in bins], "o-", markersize=2)
        ece = reliability["ece"]
        ece_text = "n/a" if ece is None or not math.isfinite(ece) else f"{ece:.3f}"
        ax.set_title(f"{name}\nECE {ece_text}", fontsize=6)
    fig.supxlabel("mean predicted probability", fontsize=7)
    fig.supylabel("fraction positive", fontsize=7)
    return _save(fig, path)


def curves_figure(curves_by_label: Mapping[str, Any], path: str | Path, kind: str = "roc") -> Path:
    """Save a PNG with one small ROC (kind="roc") or precision-recall (kind="pr") panel per label."""
    if kind not in ("roc", "pr"):
        raise EvaluationError(f"curve kind {kind!r} is unknown; use 'roc' or 'pr'")
    x_key, y_key = ("fpr", "tpr") if kind == "roc" else ("recall", "precision")
    fig, axes = _panel_grid(len(curves_by_label))
    for ax, (name, label_curves) in zip(axes, curves_by_label.items(), strict=False):
        curve = label_curves[kind]
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
        if curve is None:
            ax.text(0.5, 0.5, "not scorable", ha="center", va="center", fontsize=6)
        else:
            ax.plot(curve[x_key], curve[y_key], linewidth=1)
        ax.set_title(str(name), fontsize=6)
    x_title, y_title = (
        ("1 - specificity", "sensitivity") if kind == "roc" else ("recall", "precision")
    )
    fig.supxlabel(x_title, fontsize=7)
    fig.supylabel(y_title, fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------


def _check_arrays(
    y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[Any] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as float N×L, or an EvaluationError saying what does not match."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_prob.shape:
        raise EvaluationError(
            f"y_true {y_true.shape} and y_prob {y_prob.shape} must both be images × labels "
            "arrays of the same shape"
        )
    if labels is not None and y_true.shape[1] != len(labels):
        raise EvaluationError(
            f"arrays have {y_true.shape[1]} label columns but {len(labels)} labels were named"
        )
    known = y_true[~np.isnan(y_true)]
    if not np.all((known == 0) | (known == 1)):
        raise EvaluationError("y_true must hold 1, 0 or NaN (unknown); found other values")
    if not np.all(np.isfinite(y_prob)) or y_prob.min(initial=0) < 0 or y_prob.max(initial=1) > 1:
        raise EvaluationError(
            "y_prob must hold probabilities in [0, 1] (apply the sigmoid to logits first)"
        )
    return y_true, y_prob


def _check_patients(patient_ids: Sequence[Any], n_images: int) -> None:
    if len(patient_ids) != n_images:
        raise EvaluationError(
            f"patient_ids has {len(patient_ids)} entries but there are {n_images} images"
        )


def _threshold_map(
    thresholds: Mapping[str, float] | ThresholdChoice, labels: Sequence[str]
) -> Mapping[str, float]:
    threshold_of = thresholds.thresholds if isinstance(thresholds, ThresholdChoice) else thresholds
    missing = [name for name in labels if name not in threshold_of]
    if missing:
        raise EvaluationError(
            f"no threshold for {missing}; choose them on the validation split with choose_thresholds()"
        )
    return threshold_of


def _known(y_true: np.ndarray, y_prob: np.ndarray, column: int) -> tuple[np.ndarray, np.ndarray]:
    known = ~np.isnan(y_true[:, column])
    return y_true[known, column], y_prob[known, column]


def _has_both_classes(truth: np.ndarray) -> bool:
    return truth.size > 0 and truth.min() != truth.max()


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _draw_patients(
    patient_ids: Sequence[Any], n_boot: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's patient index (N,) and how often each patient is drawn per resample (n_boot × P)."""
    _, patient_codes = np.unique(np.asarray(patient_ids), return_inverse=True)
    n_patients = int(patient_codes.max()) + 1 if patient_codes.size else 0
    draws = rng.integers(0, n_patients, size=(n_boot, n_patients))
    offsets = np.arange(n_boot)[:, None] * n_patients
    counts = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_patients)
    return patient_codes.ravel(), counts.reshape(n_boot, n_patients)


def _weighted_auc(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of `weights` (B × n image weights): weighted Mann-Whitney, ties count half.

    NaN for a row whose positives or negatives all have zero weight.
    """
    if truth.size == 0:
        return np.full(len(weights), np.nan)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    tie_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    positive = truth[order] == 1
    weights = weights[:, order]
    pos_per_tie = np.add.reduceat(np.where(positive, weights, 0.0), tie_starts, axis=1)
    neg_per_tie = np.add.reduceat(np.where(positive, 0.0, weights), tie_starts, axis=1)
    neg_below = np.cumsum(neg_per_tie, axis=1) - neg_per_tie
    wins = np.sum(pos_per_tie * (neg_below + 0.5 * neg_per_tie), axis=1)
    pairs = pos_per_tie.sum(axis=1) * neg_per_tie.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def _reliability(truth: np.ndarray, scores: np.ndarray, n_bins: int) -> dict[str, Any]:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.floor(scores * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    pred_sum = np.bincount(which, weights=scores, minlength=n_bins)
    pos_sum = np.bincount(which, weights=truth, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = pred_sum / count
        frac_pos = pos_sum / count
    filled = count > 0
    ece = (
        float(np.sum(count[filled] * np.abs(frac_pos[filled] - mean_pred[filled])) / truth.size)
        if truth.size
        else float("nan")
    )
    bins = [
        {
            "low": float(edges[i]),
            "high": float(edges[i + 1]),
            "mean_pred": float(mean_pred[i]),
            "frac_pos": float(frac_pos[i]),
            "count": int(count[i]),
        }
        for i in range(n_bins)
    ]
    return {"ece": ece, "bins": bins}


def _thin(n_points: int, max_points: int) -> np.ndarray:
    """Indices of at most `max_points` evenly spaced points, first and last included."""
    if n_points <= max_points:
        return np.arange(n_points)
    return np.unique(np.linspace(0, n_points - 1, max_points).round().astype(int))


def _panel_grid(n_panels: int):
    """A Figure with one small square axes per panel (2 in each, at most 4 across) and its axes."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, safe in workers

    n_cols = min(4, max(1, n_panels))
    n_rows = max(1, math.ceil(n_panels / n_cols))
    fig = Figure(figsize=(2.0 * n_cols, 2.0 * n_rows), dpi=100, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=5)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
