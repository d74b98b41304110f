"""Test-split evaluation of a trained model: AUCs with CIs, operating points, calibration, curves.

Thresholds are chosen on the validation split (`choose_thresholds`) and only applied to the test
split (`evaluate`); a label without both classes has no AUC (None), never 0.5, as in
`trainable.metrics`. The patient-bootstrap intervals are in `results.bootstrap`, the figures in
`results.figures`, the checks on the input arrays in `results.inputs`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_curve,
)

from chestxpert.results.bootstrap import RATES, Interval, patient_bootstrap
from chestxpert.results.inputs import (
    EvaluationError,
    check_arrays,
    check_patients,
    has_both_classes,
    known_values,
)

# CheXNet's per-class test AUROCs (Rajpurkar et al. 2017, arXiv:1711.05225, the 14-pathology
# comparison with Wang et al. and Yao et al.: Table 2 in v3, "CheXNet" column). They were measured
# on CheXNet's own random 70/10/20 patient split, not on NIH's official test list nor on our split,
# so they are a point of reference, not a like-for-like comparison.
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

THRESHOLD_METHODS = ("youden", "sensitivity", "specificity")
# `final --operating-point` spellings: "youden", "sens=0.8" (sensitivity at least 0.8), "spec=0.9"
# (specificity at least 0.9, i.e. sensitivity at fixed specificity).
OPERATING_POINT_PREFIXES = {"sens": "sensitivity", "spec": "specificity"}
DEFAULT_THRESHOLD = 0.5
CURVE_POINTS = 200


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
    target_specificity: float | None = None


def parse_operating_point(text: str) -> tuple[str, float | None]:
    """ "youden", "sens=0.8" or "spec=0.9" as (method, target) for `choose_thresholds`."""
    if text.strip() == "youden":
        return "youden", None
    prefix, _, value = text.strip().partition("=")
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    if prefix not in OPERATING_POINT_PREFIXES or not 0.0 < target <= 1.0:
        raise EvaluationError(
            f"operating point {text!r} is not one of youden, sens=T or spec=T with T in (0, 1]; "
            "e.g. spec=0.9 for the sensitivity at a specificity of 0.9"
        )
    return OPERATING_POINT_PREFIXES[prefix], target


def choose_thresholds(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    labels: Sequence[str],
    method: str = "youden",
    target_sensitivity: float | None = None,
    target_specificity: float | None = None,
) -> ThresholdChoice:
    """Choose one operating threshold per label from VALIDATION predictions only.

    `y_true` is N×L of 1/0/NaN (NaN = unknown, ignored), `y_prob` N×L probabilities in [0, 1].
    method="youden" takes the ROC threshold maximising sensitivity + specificity - 1 (the highest
    such threshold on ties); method="sensitivity" takes the highest threshold whose validation
    sensitivity is >= `target_sensitivity` (in (0, 1]), i.e. the one that costs the least
    specificity; method="specificity" takes the lowest threshold whose validation specificity is
    >= `target_specificity` (the most sensitive such one; the highest threshold when none
    reaches it). Thresholds are predicted probabilities, compared with >=. Labels with no
    positives or no negatives get 0.5 and are listed in `defaulted`.
    """
    y_true, y_prob = check_arrays(y_true, y_prob, labels)
    if method not in THRESHOLD_METHODS:
        raise EvaluationError(
            f"threshold method {method!r} is unknown; use one of {THRESHOLD_METHODS}"
        )
    for rate, target in (("sensitivity", target_sensitivity), ("specificity", target_specificity)):
        if method == rate and (target is None or not 0.0 < target <= 1.0):
            raise EvaluationError(f"method='{rate}' needs target_{rate} in (0, 1], got {target!r}")
        if method != rate and target is not None:
            raise EvaluationError(
                f"target_{rate}={target} only applies to method='{rate}'; "
                f"pass method='{rate}' or drop target_{rate}"
            )

    choice = ThresholdChoice(
        thresholds={},
        method=method,
        target_sensitivity=target_sensitivity,
        target_specificity=target_specificity,
    )
    for column, name in enumerate(labels):
        truth, scores = known_values(y_true, y_prob, column)
        if not has_both_classes(truth):
            choice.thresholds[name] = DEFAULT_THRESHOLD
            choice.defaulted.append(name)
            continue
        fpr, tpr, candidates = roc_curve(truth, scores, drop_intermediate=False)
        # candidates[0] is +inf (nobody positive); it is never a useful operating point.
        fpr, tpr, candidates = fpr[1:], tpr[1:], candidates[1:]
        if method == "youden":
            best = int(np.argmax(tpr - fpr))
        elif method == "specificity":
            # fpr rises as the threshold falls; the last index within the budget is the most
            # sensitive one.
            within = np.flatnonzero(fpr <= 1.0 - target_specificity + 1e-12)
            best = int(within[-1]) if within.size else 0
        else:
            # tpr rises as the threshold falls; the first index reaching the target has the
            # lowest fpr.
            best = int(np.argmax(tpr >= target_sensitivity - 1e-12))
        choice.thresholds[name] = float(candidates[best])
    return choice


def operating_point_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    thresholds: Mapping[str, float] | ThresholdChoice,
    labels: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Confusion counts and rates per label at given thresholds (positive when prob >= threshold).

    Returns {label: {sensitivity, specificity, ppv, npv, f1, tp, fp, tn, fn, threshold}} over the
    label's known values; counts are ints, a rate whose denominator is zero is NaN.
    """
    y_true, y_prob = check_arrays(y_true, y_prob, labels)
    threshold_of = _threshold_map(thresholds, labels)
    out: dict[str, dict[str, Any]] = {}
    for column, name in enumerate(labels):
        truth, scores = known_values(y_true, y_prob, column)
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


def calibration(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    n_bins: int = 10,
    *,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Reliability bins, expected calibration error and Brier score, per label and pooled.

    Bins are `n_bins` equal-width probability intervals on [0, 1] (the last one closed); ECE is the
    count-weighted mean of |frac_pos - mean_pred| over non-empty bins; Brier is the mean squared
    difference between probability and 0/1 truth. "pooled" is over all known entries. Returns
    {"labels": {label: {ece, brier, bins}}, "pooled": {ece, brier, bins}} with bins [{low, high,
    mean_pred, frac_pos, count}]; an empty bin has NaN mean_pred/frac_pos, a label with no known
    values NaN ece and brier. Keys are `labels` when given, else column indices.
    """
    y_true, y_prob = check_arrays(y_true, y_prob, labels)
    names: Sequence[Any] = labels if labels is not None else range(y_true.shape[1])
    if n_bins < 1:
        raise EvaluationError(f"n_bins must be at least 1, got {n_bins}")
    per_label = {
        name: _reliability(*known_values(y_true, y_prob, column), n_bins)
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

    Returns {label: {"roc": {"fpr", "tpr"}, "pr": {"precision", "recall"}}} as lists of floats
    (first and last points always kept); both are None for a label without positives and negatives.
    """
    y_true, y_prob = check_arrays(y_true, y_prob, labels)
    out: dict[str, dict[str, Any]] = {}
    for column, name in enumerate(labels):
        truth, scores = known_values(y_true, y_prob, column)
        if not has_both_classes(truth):
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
    y_prob_calibrated: np.ndarray | None = None,
    other_points: Mapping[str, Mapping[str, float] | ThresholdChoice] | None = None,
) -> dict[str, Any]:
    """Everything the report needs about the TEST split, as plain JSON-ready Python (NaN → None).

    `thresholds` come from `choose_thresholds` on the validation split and are used as given, never
    re-fitted here. Returns "counts" (images, patients, positives/negatives/prevalence per
    label), "auc_macro" (mean over labels with both classes) and "auc_micro" (one AUC over all
    known label entries pooled), each with "_low"/"_high", "pr_auc_macro", "scorable_labels",
    "per_label" {label: {auc, auc_low, auc_high, auc_boot_used, pr_auc, chexnet_reference_auc,
    operating_point, scorable}}, "calibration" (ECE and Brier), "curves", "bootstrap" (settings)
    and "thresholds". Every interval comes from the same patient resamples (see
    `bootstrap.patient_bootstrap`); the operating point's sensitivity, specificity, ppv and npv
    carry "_low"/"_high". `scorable` says "yes", "no positives in test", "no negatives in test"
    or "no known labels in test". With `y_prob_calibrated` (the same images through a calibrator
    fitted on validation), "calibration_calibrated" holds their ECE and Brier. `other_points`
    (name → thresholds, e.g. {"spec=0.9": …} chosen on validation) add "operating_points"
    {name: {label: operating point with CIs}}, from the same resamples.
    """
    y_true, y_prob = check_arrays(y_true, y_prob, labels)
    check_patients(patient_ids, len(y_true))
    alpha = 0.05
    operating = operating_point_metrics(y_true, y_prob, thresholds, labels)
    other_points = dict(other_points or {})
    others = {
        name: operating_point_metrics(y_true, y_prob, chosen, labels)
        for name, chosen in other_points.items()
    }
    boot = patient_bootstrap(
        y_true,
        y_prob,
        patient_ids,
        n_boot,
        seed,
        alpha,
        labels=labels,
        thresholds={name: operating[name]["threshold"] for name in labels},
        more_thresholds=[
            {name: point[name]["threshold"] for name in labels} for point in others.values()
        ],
    )
    for point, rates in zip(others.values(), boot.more_rates, strict=True):
        _add_rate_intervals(point, rates)
    _add_rate_intervals(operating, boot.rates)

    per_label: dict[str, dict[str, Any]] = {}
    positives: dict[str, int] = {}
    negatives: dict[str, int] = {}
    prevalence: dict[str, float] = {}
    for column, name in enumerate(labels):
        truth, scores = known_values(y_true, y_prob, column)
        positives[name] = int(np.sum(truth == 1))
        negatives[name] = int(np.sum(truth == 0))
        prevalence[name] = _ratio(positives[name], truth.size)
        interval = boot.auc[name]
        scorable = interval.auc is not None
        per_label[name] = {
            "auc": interval.auc,
            "auc_low": interval.low,
            "auc_high": interval.high,
            "auc_boot_used": interval.n_used,
            "pr_auc": float(average_precision_score(truth, scores)) if scorable else None,
            "chexnet_reference_auc": CHEXNET_REFERENCE_AUROC.get(name),
            "operating_point": operating[name],
            "scorable": _scorability(positives[name], negatives[name]),
        }

    scorable_labels = [name for name in labels if per_label[name]["auc"] is not None]
    result = {
        "counts": {
            "images": int(len(y_true)),
            "patients": int(len(np.unique(np.asarray(patient_ids)))),
            "positives": positives,
            "negatives": negatives,
            "prevalence": prevalence,
        },
        "auc_macro": boot.auc_macro.value,
        **_interval_fields("auc_macro", boot.auc_macro),
        "auc_micro": boot.auc_micro.value,
        **_interval_fields("auc_micro", boot.auc_micro),
        "pr_auc_macro": _mean_or_none([per_label[name]["pr_auc"] for name in scorable_labels]),
        "scorable_labels": scorable_labels,
        "per_label": per_label,
        "calibration": calibration(y_true, y_prob, labels=labels),
        "curves": curves(y_true, y_prob, labels),
        "bootstrap": {"unit": "patient", "n_boot": n_boot, "seed": seed, "alpha": alpha},
        "thresholds": {name: operating[name]["threshold"] for name in labels},
    }
    if others:
        result["operating_points"] = others
    if y_prob_calibrated is not None:
        result["calibration_calibrated"] = calibration(y_true, y_prob_calibrated, labels=labels)
    return to_json_ready(result)


def to_json_ready(value: Any) -> Any:
    """`value`, recursively, with numpy scalars/arrays as Python ones and NaN/±inf as None."""
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


# --------------------------------------------------------------------------------------------------


def _threshold_map(
    thresholds: Mapping[str, float] | ThresholdChoice, labels: Sequence[str]
) -> Mapping[str, float]:
    threshold_of = thresholds.thresholds if isinstance(thresholds, ThresholdChoice) else thresholds
    missing = [name for name in labels if name not in threshold_of]
    if missing:
        raise EvaluationError(
            f"no threshold for {missing}; "
            "choose them on the validation split with choose_thresholds()"
        )
    return threshold_of


def _add_rate_intervals(
    operating: dict[str, dict[str, Any]], rates: Mapping[str, Mapping[str, Interval]]
) -> None:
    """Each label's sensitivity/specificity/ppv/npv gain "_low" and "_high" from the bootstrap."""
    for name, by_rate in rates.items():
        for rate in RATES:
            operating[name][f"{rate}_low"] = by_rate[rate].low
            operating[name][f"{rate}_high"] = by_rate[rate].high


def _scorability(positives: int, negatives: int) -> str:
    if positives and negatives:
        return "yes"
    if not positives and not negatives:
        return "no known labels in test"
    return "no positives in test" if not positives else "no negatives in test"


def _interval_fields(key: str, interval: Interval) -> dict[str, float | None]:
    return {f"{key}_low": interval.low, f"{key}_high": interval.high}


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


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
    brier = float(np.mean((scores - truth) ** 2)) if truth.size else float("nan")
    return {"ece": ece, "brier": brier, "bins": bins}


def _thin(n_points: int, max_points: int) -> np.ndarray:
    """Indices of at most `max_points` evenly spaced points, first and last included."""
    if n_points <= max_points:
        return np.arange(n_points)
    return np.unique(np.linspace(0, n_points - 1, max_points).round().astype(int))
