"""AUC with patient-bootstrap CIs within subgroups of the test split: by sex, by view (PA/AP) and
by age band, from the columns every prepared dataset keeps; the largest gap per label flagged.

A subgroup where a label has too few positives or negatives is left out for that label and
listed as skipped, with its counts: an AUC over three positives is noise, not a finding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from chestxpert.results.bootstrap import patient_bootstrap
from chestxpert.results.inputs import EvaluationError, check_arrays, check_patients

# Age bands in years: [low, high) and the name the report shows.
AGE_BANDS: tuple[tuple[float, float, str], ...] = (
    (0, 40, "age <40"),
    (40, 60, "age 40–59"),
    (60, 200, "age ≥60"),
)
MIN_POSITIVES = 10
MIN_NEGATIVES = 10


def subgroup_masks(
    sex: Sequence[Any], view: Sequence[Any], age_years: Sequence[Any]
) -> dict[str, dict[str, np.ndarray]]:
    """{attribute: {group: boolean image mask}} for sex (F, M), view (PA, AP) and age band.

    Images whose value is unknown (None/NaN) belong to no group of that attribute.
    """
    sex = np.asarray([s if isinstance(s, str) else "" for s in sex])
    view = np.asarray([v if isinstance(v, str) else "" for v in view])
    age = np.asarray(age_years, dtype=np.float64)
    return {
        "sex": {name: sex == code for code, name in (("F", "female"), ("M", "male"))},
        "view": {code: view == code for code in ("PA", "AP")},
        "age": {name: (age >= low) & (age < high) for low, high, name in AGE_BANDS},
    }


def subgroup_aucs(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    patient_ids: Sequence[Any],
    labels: Sequence[str],
    masks: dict[str, dict[str, np.ndarray]],
    n_boot: int = 1000,
    seed: int = 0,
    min_positives: int = MIN_POSITIVES,
    min_negatives: int = MIN_NEGATIVES,
) -> dict[str, Any]:
    """Per attribute, group and label: AUC with its 95% patient-bootstrap CI, where counts allow.

    A (group, label) with fewer than `min_positives` positives or `min_negatives` negatives gets
    no row and is listed in "skipped" with its counts. Within each label, the largest AUC gap
    between two groups of one attribute is "largest_gap" {label: {attribute, groups, gap}}.
    Returns {"rows": [{attribute, group, label, images, positives, negatives, auc, auc_low,
    auc_high}], "skipped": [{attribute, group, label, positives, negatives}], "largest_gap",
    "min_positives", "min_negatives"}.
    """
    y_true, y_prob = check_arrays(y_true, y_prob, labels)
    check_patients(patient_ids, len(y_true))
    if min_positives < 1 or min_negatives < 1:
        raise EvaluationError("min_positives and min_negatives must be at least 1")
    patient_ids = np.asarray(patient_ids)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for attribute, groups in masks.items():
        for group, mask in groups.items():
            mask = np.asarray(mask, dtype=bool)
            truth = y_true[mask]
            positives = np.sum(truth == 1, axis=0)
            negatives = np.sum(truth == 0, axis=0)
            enough = (positives >= min_positives) & (negatives >= min_negatives)
            for column in np.flatnonzero(~enough):
                if positives[column] or negatives[column]:
                    skipped.append(
                        {
                            "attribute": attribute,
                            "group": group,
                            "label": labels[column],
                            "positives": int(positives[column]),
                            "negatives": int(negatives[column]),
                        }
                    )
            if not enough.any():
                continue
            columns = np.flatnonzero(enough)
            intervals = patient_bootstrap(
                truth[:, columns],
                y_prob[mask][:, columns],
                patient_ids[mask],
                n_boot,
                seed,
                micro=False,
            ).auc
            for index, column in enumerate(columns):
                interval = intervals[index]
                rows.append(
                    {
                        "attribute": attribute,
                        "group": group,
                        "label": labels[column],
                        "images": int(mask.sum()),
                        "positives": int(positives[column]),
                        "negatives": int(negatives[column]),
                        "auc": interval.auc,
                        "auc_low": interval.low,
                        "auc_high": interval.high,
                    }
                )
    return {
        "rows": rows,
        "skipped": skipped,
        "largest_gap": _largest_gaps(rows),
        "min_positives": min_positives,
        "min_negatives": min_negatives,
    }


def _largest_gaps(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per label, the attribute whose groups' AUCs differ most, and by how much."""
    gaps: dict[str, dict[str, Any]] = {}
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["label"], row["attribute"]), []).append(row)
    for (label, attribute), group_rows in by_key.items():
        if len(group_rows) < 2:
            continue
        low = min(group_rows, key=lambda r: r["auc"])
        high = max(group_rows, key=lambda r: r["auc"])
        gap = high["auc"] - low["auc"]
        if label not in gaps or gap > gaps[label]["gap"]:
            gaps[label] = {
                "attribute": attribute,
                "groups": [high["group"], low["group"]],
                "gap": gap,
            }
    return gaps
