"""The arrays every evaluation function takes, checked, and the error raised when they do not fit.

`y_true` is images × labels of 1/0/NaN (NaN = unknown), `y_prob` the same shape of probabilities
in [0, 1], `patient_ids` one entry per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from chestxpert.cluster.errors import UserError


class EvaluationError(UserError, ValueError):
    """Predictions, labels or thresholds that do not match; the message says which and how."""


def check_arrays(
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


def check_bootstrap(n_boot: int, alpha: float) -> None:
    """An EvaluationError unless there is at least one resample and alpha lies in (0, 1)."""
    if n_boot < 1:
        raise EvaluationError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise EvaluationError(f"alpha must be in (0, 1), e.g. 0.05 for a 95% interval; got {alpha}")


def check_patients(patient_ids: Sequence[Any], n_images: int) -> None:
    """An EvaluationError unless there is one patient id per image."""
    if len(patient_ids) != n_images:
        raise EvaluationError(
            f"patient_ids has {len(patient_ids)} entries but there are {n_images} images"
        )


def known_values(
    y_true: np.ndarray, y_prob: np.ndarray, column: int
) -> tuple[np.ndarray, np.ndarray]:
    """One label's truth and probabilities over the images whose truth is known (not NaN)."""
    known = ~np.isnan(y_true[:, column])
    return y_true[known, column], y_prob[known, column]


def has_both_classes(truth: np.ndarray) -> bool:
    """Whether `truth` (known values only) holds at least one positive and one negative."""
    return truth.size > 0 and truth.min() != truth.max()
