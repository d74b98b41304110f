"""ROC AUC per label with a percentile interval from a patient-level (cluster) bootstrap.

Patients, not images, are resampled, so all images of one patient move together; resample AUCs
are computed with ranks in numpy, a chunk of resamples at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def patient_bootstrap_weights(patient_ids: Sequence[Any], n_boot: int, seed: int = 0) -> np.ndarray:
    """How many times each image appears in each patient-level bootstrap resample (n_boot × N ints).

    Each resample draws as many patients as there are, with replacement, and takes all images of
    every drawn patient: all images of one patient share one count (0 when the patient was not
    drawn). `bootstrap_auc_ci` uses exactly these draws for the same seed.
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
    """ROC AUC per label with a (1 - alpha) percentile interval from a patient (cluster) bootstrap.

    Resamples patients, not images (see `patient_bootstrap_weights`), so images of one patient
    move together. The point estimate is sklearn's roc_auc_score on the whole split; resample
    AUCs are the same statistic with each image weighted by its resample count, computed with
    ranks in numpy. A resample where a label has only one class is skipped for that label
    (`n_used` counts the rest). Keys are `labels` when given, else column indices.
    """
    y_true, y_prob = check_arrays(y_true, y_prob, labels)
    names: Sequence[Any] = labels if labels is not None else range(y_true.shape[1])
    check_patients(patient_ids, len(y_true))
    check_bootstrap(n_boot, alpha)

    boot_aucs = np.full((n_boot, len(names)), np.nan)
    for rows, image_weights in patient_weight_chunks(patient_ids, n_boot, seed):
        for column in range(len(names)):
            known = ~np.isnan(y_true[:, column])
            boot_aucs[rows, column] = weighted_auc(
                y_true[known, column], y_prob[known, column], image_weights[:, known]
            )

    out: dict[Any, AucInterval] = {}
    for column, name in enumerate(names):
        truth, scores = known_values(y_true, y_prob, column)
        if not has_both_classes(truth):
            out[name] = AucInterval(None, None, None, 0)
            continue
        usable = boot_aucs[:, column][~np.isnan(boot_aucs[:, column])]
        low = high = None
        if usable.size:
            low, high = (float(q) for q in np.quantile(usable, [alpha / 2, 1 - alpha / 2]))
        out[name] = AucInterval(float(roc_auc_score(truth, scores)), low, high, int(usable.size))
    return out


def patient_weight_chunks(
    patient_ids: Sequence[Any], n_boot: int, seed: int = 0
) -> Iterator[tuple[slice, np.ndarray]]:
    """The rows of `patient_bootstrap_weights` as float64, a chunk of resamples at a time.

    Yields (which resamples, their image weights) with chunks kept near _BOOT_CHUNK_ENTRIES
    entries, so a large test split never needs the whole n_boot × N matrix in memory.
    """
    patient_codes, patient_counts = _draw_patients(patient_ids, n_boot, np.random.default_rng(seed))
    chunk = max(1, _BOOT_CHUNK_ENTRIES // max(1, len(patient_codes)))
    for start in range(0, n_boot, chunk):
        rows = slice(start, min(start + chunk, n_boot))
        yield rows, patient_counts[rows][:, patient_codes].astype(np.float64)


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


def weighted_auc(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of `weights` (B × n image weights) by weighted Mann-Whitney.

    Ties count half; NaN for a row whose positives or negatives all have zero weight.
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
