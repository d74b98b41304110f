"""Patient-level (cluster) bootstrap intervals: per-label AUC, sensitivity, specificity, PPV and
NPV at the operating thresholds, and macro and micro AUC, all from the same resamples.

Patients, not images, are resampled, so all images of one patient move together; every statistic
of a resample is computed in numpy with each image weighted by its draw count, a chunk of
resamples at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from sklearn.metrics import roc_auc_score

from chestxpert.results.inputs import (
    check_arrays,
    check_bootstrap,
    check_patients,
    has_both_classes,
    known_values,
)

# Bootstrap replicates are processed in chunks so that a chunk's image-weight matrix stays near this
# many entries (~40 MB of float64), whatever the size of the test split.
_BOOT_CHUNK_ENTRIES = 5_000_000

# The operating-point rates the bootstrap gives intervals for, in the order _weighted_rates returns.
RATES = ("sensitivity", "specificity", "ppv", "npv")


class AucInterval(NamedTuple):
    """A label's AUC on the whole split and its bootstrap percentile interval.

    All three are None when the label has no positives or no negatives; `low`/`high` are None
    when no resample had both classes. `n_used` is how many resamples had both classes and
    entered the interval.
    """

    auc: float | None
    low: float | None
    high: float | None
    n_used: int


class Interval(NamedTuple):
    """A statistic on the whole split and its bootstrap percentile interval.

    `value` is None when the statistic is undefined on the split (sensitivity without positives,
    PPV when nothing is called positive); `low`/`high` are None when no resample defined it.
    `n_used` counts the resamples that did, and entered the interval.
    """

    value: float | None
    low: float | None
    high: float | None
    n_used: int


NO_INTERVAL = Interval(None, None, None, 0)


@dataclass
class BootstrapIntervals:
    """What `patient_bootstrap` estimates, every interval from the same patient resamples.

    `auc` per label; `rates` per label {sensitivity, specificity, ppv, npv: Interval} at the
    given thresholds (empty without thresholds), `more_rates` the same for each further set of
    thresholds (other operating points); `auc_macro` (the mean AUC over the labels with
    both classes; in a resample, over those that have both classes in it) and `auc_micro` (one
    AUC over every known label entry pooled). `resample_auc` (n_boot × labels, NaN where a label
    lacked a class) and `resample_macro` (n_boot) are the resample values behind the AUC
    intervals: a second model bootstrapped with the same patients, n_boot and seed gets the same
    draws, so its rows pair with these row by row (`results.compare` takes paired differences).
    """

    auc: dict[Any, AucInterval]
    rates: dict[Any, dict[str, Interval]] = field(default_factory=dict)
    more_rates: list[dict[Any, dict[str, Interval]]] = field(default_factory=list)
    auc_macro: Interval = NO_INTERVAL
    auc_micro: Interval = NO_INTERVAL
    resample_auc: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))
    resample_macro: np.ndarray = field(default_factory=lambda: np.empty(0))


def patient_bootstrap_weights(patient_ids: Sequence[Any], n_boot: int, seed: int = 0) -> np.ndarray:
    """How many times each image appears in each patient-level bootstrap resample (n_boot × N ints).

    Each resample draws as many patients as there are, with replacement, and takes all images of
    every drawn patient: all images of one patient share one count (0 when the patient was not
    drawn). `patient_bootstrap` uses exactly these draws for the same seed.
    """
    patient_codes, patient_counts = _draw_patients(patient_ids, n_boot, np.random.default_rng(seed))
    return patient_counts[:, patient_codes]


def patient_bootstrap(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    patient_ids: Sequence[Any],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    *,
    labels: Sequence[str] | None = None,
    thresholds: Mapping[Any, float] | None = None,
    more_thresholds: Sequence[Mapping[Any, float]] = (),
    micro: bool = True,
) -> BootstrapIntervals:
    """(1 - alpha) percentile intervals from one patient (cluster) bootstrap of the test split.

    Resamples patients, not images (see `patient_bootstrap_weights`), so images of one patient
    move together. Point AUCs are sklearn's roc_auc_score on the whole split; resample AUCs are
    the same statistic with each image weighted by its resample count (weighted Mann-Whitney,
    ties count half). With `thresholds` (label → probability, positive when >=), sensitivity,
    specificity, PPV and NPV get intervals too, and so at every set in `more_thresholds` (other
    operating points, from the same resamples). A resample where a statistic is undefined (a
    label with one class, a rate with a zero denominator) is skipped for that statistic only
    (`n_used` counts the rest). `micro`=False skips the micro AUC, which costs about as much as
    all per-label AUCs together. Keys are `labels` when given, else column indices. The draws
    depend on `patient_ids`, `n_boot` and `seed` only, never on the scores.
    """
    y_true, y_prob = check_arrays(y_true, y_prob, labels)
    names: Sequence[Any] = labels if labels is not None else range(y_true.shape[1])
    check_patients(patient_ids, len(y_true))
    check_bootstrap(n_boot, alpha)
    n_labels = len(names)
    known = ~np.isnan(y_true)
    threshold_sets = ([thresholds] if thresholds is not None else []) + list(more_thresholds)
    called = [
        y_prob >= np.array([chosen[name] for name in names], dtype=np.float64)
        for chosen in threshold_sets
    ]
    patient_codes, patient_counts = _draw_patients(patient_ids, n_boot, np.random.default_rng(seed))
    per_label = [
        _RankedScores(*known_values(y_true, y_prob, c), patient_codes[known[:, c]])
        for c in range(n_labels)
    ]
    # each label's calls in its own score order, so they line up with its resample weights
    called_sorted = [
        [calls[known[:, c], c][per_label[c].order] for c in range(n_labels)] for calls in called
    ]
    entry_images = np.nonzero(known)[0]  # the image of each pooled entry, row-major like y[known]
    pooled = _RankedScores(y_true[known], y_prob[known], patient_codes[entry_images])

    boot_auc = np.full((n_boot, n_labels), np.nan)
    boot_micro = np.full(n_boot, np.nan)
    boot_rates = np.full((len(called), n_boot, n_labels, len(RATES)), np.nan)
    widest = entry_images.size if micro else len(y_true)
    chunk = max(1, _BOOT_CHUNK_ENTRIES // max(1, widest))
    for start in range(0, n_boot, chunk):
        rows = slice(start, start + chunk)
        counts = patient_counts[rows]
        for column, ranked in enumerate(per_label):
            weights = ranked.weights(counts)
            boot_auc[rows, column] = ranked.auc(weights)
            for which, calls in enumerate(called_sorted):
                boot_rates[which, rows, column] = _weighted_rates(
                    ranked.positive, calls[column], weights
                )
        if micro:
            boot_micro[rows] = pooled.auc(pooled.weights(counts))

    out = BootstrapIntervals(auc={}, resample_auc=boot_auc, resample_macro=np.full(n_boot, np.nan))
    rate_sets: list[dict[Any, dict[str, Interval]]] = [{} for _ in called]
    scorable = []
    for column, name in enumerate(names):
        truth, scores = known_values(y_true, y_prob, column)
        if not has_both_classes(truth):
            out.auc[name] = AucInterval(None, None, None, 0)
        else:
            scorable.append(column)
            out.auc[name] = AucInterval(
                *_interval(roc_auc_score(truth, scores), boot_auc[:, column], alpha)
            )
        for which, calls in enumerate(called):
            point = _weighted_rates(
                truth == 1, calls[known[:, column], column], np.ones((1, truth.size))
            )[0]
            rates = {
                rate: Interval(*_interval(point[i], boot_rates[which, :, column, i], alpha))
                for i, rate in enumerate(RATES)
            }
            rate_sets[which][name] = rates
    if thresholds is not None:
        out.rates = rate_sets.pop(0)
    out.more_rates = rate_sets
    if scorable:
        with warnings.catch_warnings():  # an all-NaN row's mean is NaN, as wanted
            warnings.simplefilter("ignore", RuntimeWarning)
            boot_macro = np.nanmean(boot_auc[:, scorable], axis=1)
        point_macro = float(np.mean([out.auc[names[c]].auc for c in scorable]))
        out.auc_macro = Interval(*_interval(point_macro, boot_macro, alpha))
        out.resample_macro = boot_macro
    if micro and has_both_classes(y_true[known]):
        point_micro = roc_auc_score(y_true[known], y_prob[known])
        out.auc_micro = Interval(*_interval(point_micro, boot_micro, alpha))
    return out


def _interval(
    point: float, samples: np.ndarray, alpha: float
) -> tuple[float | None, float | None, float | None, int]:
    """The point value (None if NaN) and the percentile interval of the defined samples."""
    usable = samples[~np.isnan(samples)]
    low = high = None
    if usable.size:
        low, high = (float(q) for q in np.quantile(usable, [alpha / 2, 1 - alpha / 2]))
    value = None if point is None or np.isnan(point) else float(point)
    return value, low, high, int(usable.size)


def _draw_patients(
    patient_ids: Sequence[Any], n_boot: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's patient index (N,) and each patient's draw count per resample (n_boot × P)."""
    _, patient_codes = np.unique(np.asarray(patient_ids), return_inverse=True)
    n_patients = int(patient_codes.max()) + 1 if patient_codes.size else 0
    draws = rng.integers(0, n_patients, size=(n_boot, n_patients))
    offsets = np.arange(n_boot)[:, None] * n_patients
    counts = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_patients)
    return patient_codes.ravel(), counts.reshape(n_boot, n_patients)


class _RankedScores:
    """Truth, scores and patients of one label's known entries (or of all, pooled), sorted by
    score once, so each chunk of resamples only gathers counts and sums weights."""

    def __init__(self, truth: np.ndarray, scores: np.ndarray, patients: np.ndarray) -> None:
        self.order = np.argsort(scores, kind="stable")
        sorted_scores = scores[self.order]
        self.tie_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
        self.positive = truth[self.order] == 1
        self.patients = patients[self.order]

    def weights(self, patient_counts: np.ndarray) -> np.ndarray:
        """Each entry's weight (B × n, in score order) from patient draw counts (B × P)."""
        return patient_counts[:, self.patients].astype(np.float64)

    def auc(self, weights: np.ndarray) -> np.ndarray:
        """ROC AUC of each row of `weights` (B × n, in score order) by weighted Mann-Whitney.

        Ties count half; NaN for a row whose positives or negatives all have zero weight.
        """
        if self.order.size == 0:
            return np.full(len(weights), np.nan)
        pos = np.where(self.positive, weights, 0.0)
        neg = weights - pos
        if self.tie_starts.size < self.order.size:  # tied scores are summed, and count half
            pos = np.add.reduceat(pos, self.tie_starts, axis=1)
            neg = np.add.reduceat(neg, self.tie_starts, axis=1)
        neg_below = np.cumsum(neg, axis=1) - neg
        wins = np.einsum("ij,ij->i", pos, neg_below + 0.5 * neg)
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, wins / pairs, np.nan)


def _weighted_rates(positive: np.ndarray, called: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sensitivity, specificity, PPV, NPV (B × 4, in RATES order) of each row of `weights`.

    NaN where a rate's denominator has zero weight.
    """
    tp = weights @ (positive & called).astype(np.float64)
    fn = weights @ (positive & ~called).astype(np.float64)
    fp = weights @ (~positive & called).astype(np.float64)
    tn = weights @ (~positive & ~called).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([tp / (tp + fn), tn / (tn + fp), tp / (tp + fp), tn / (tn + fn)], axis=1)
