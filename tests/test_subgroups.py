"""Subgroup AUCs from constructed truth, scores and manifest columns: rows only where counts
allow, the rest listed as skipped, the largest gap per label found."""

from __future__ import annotations

import numpy as np
import pytest

from chestxpert.results.subgroups import subgroup_aucs, subgroup_masks


def test_masks_follow_the_manifest_columns_and_leave_unknowns_out():
    masks = subgroup_masks(["F", "M", None, "F"], ["PA", "AP", "LL", None], [25, 45.5, np.nan, 60])
    assert masks["sex"]["female"].tolist() == [True, False, False, True]
    assert masks["sex"]["male"].tolist() == [False, True, False, False]
    assert masks["view"]["PA"].tolist() == [True, False, False, False]
    assert masks["view"]["AP"].tolist() == [False, True, False, False]
    assert [m.tolist() for m in masks["age"].values()] == [
        [True, False, False, False],
        [False, True, False, False],
        [False, False, False, True],
    ]


def constructed(n_per_group: int = 200, seed: int = 0):
    """Women: label A separates perfectly; men: label A is noise. Label B has two positives
    among the men only (too few), and none among the women."""
    rng = np.random.default_rng(seed)
    n = 2 * n_per_group
    sex = np.array(["F"] * n_per_group + ["M"] * n_per_group)
    truth_a = (rng.random(n) < 0.4).astype(float)
    score_a = np.where(sex == "F", 0.5 * truth_a + 0.4 * rng.random(n), rng.random(n))
    truth_b = np.zeros(n)
    truth_b[n_per_group : n_per_group + 2] = 1.0
    y_true = np.column_stack([truth_a, truth_b])
    y_prob = np.column_stack([score_a, rng.random(n)])
    masks = {"sex": subgroup_masks(sex, [None] * n, [np.nan] * n)["sex"]}
    return y_true, y_prob, np.arange(n) // 2, masks


def test_rows_appear_only_where_counts_allow_and_the_rest_is_said():
    y_true, y_prob, patients, masks = constructed()
    got = subgroup_aucs(y_true, y_prob, patients, ["A", "B"], masks, n_boot=50)
    assert {(r["group"], r["label"]) for r in got["rows"]} == {("female", "A"), ("male", "A")}
    assert got["skipped"] == [
        {"attribute": "sex", "group": "female", "label": "B", "positives": 0, "negatives": 200},
        {"attribute": "sex", "group": "male", "label": "B", "positives": 2, "negatives": 198},
    ]
    women = next(r for r in got["rows"] if r["group"] == "female")
    assert women["auc"] == 1.0 and women["positives"] + women["negatives"] == 200
    men = next(r for r in got["rows"] if r["group"] == "male")
    assert men["auc_low"] < men["auc"] < men["auc_high"] < 1.0
    gap = got["largest_gap"]["A"]
    assert gap["attribute"] == "sex" and gap["groups"] == ["female", "male"]
    assert gap["gap"] == pytest.approx(1.0 - men["auc"])
    assert "B" not in got["largest_gap"]


def test_a_lower_minimum_lets_the_small_subgroup_in():
    y_true, y_prob, patients, masks = constructed()
    got = subgroup_aucs(y_true, y_prob, patients, ["A", "B"], masks, n_boot=20, min_positives=2)
    assert ("male", "B") in {(r["group"], r["label"]) for r in got["rows"]}
    assert [(s["group"], s["label"]) for s in got["skipped"]] == [("female", "B")]
