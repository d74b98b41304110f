"""Per-epoch evaluation metrics, computed with scikit-learn on the whole split's predictions.

A label with no positives (or no negatives) among its known values has no AUC:
it is left out of the macro mean and its own key is absent, never 0.5.
"""

from __future__ import annotations

import re

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def metric_key(label: str) -> str:
    """A label as a metric-name suffix: `Pleural Effusion` → `Pleural_Effusion`."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", label).strip("_")


def auc_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    mask: np.ndarray,
    names: list[str],
    prefix: str = "val",
) -> dict[str, float]:
    """ROC AUC and PR AUC per label and their macro means over labels that have both classes.

    Returns `{prefix}_auc_macro`, `{prefix}_pr_auc_macro`, `{prefix}_auc_<label>` for each
    scorable label, and `{prefix}_auc_labels` (how many labels the macro mean covers).
    """
    out: dict[str, float] = {}
    aucs, pr_aucs = [], []
    for column, name in enumerate(names):
        known = mask[:, column] > 0
        truth = labels[known, column]
        if truth.size == 0 or truth.min() == truth.max():
            continue
        scores = probabilities[known, column]
        auc = float(roc_auc_score(truth, scores))
        out[f"{prefix}_auc_{metric_key(name)}"] = auc
        aucs.append(auc)
        pr_aucs.append(float(average_precision_score(truth, scores)))
    out[f"{prefix}_auc_labels"] = float(len(aucs))
    if aucs:
        out[f"{prefix}_auc_macro"] = float(np.mean(aucs))
        out[f"{prefix}_pr_auc_macro"] = float(np.mean(pr_aucs))
    return out
