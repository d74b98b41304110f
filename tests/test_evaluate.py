"""Test-split evaluation: validation-only thresholds, patient bootstrap, operating points.

Also calibration, the report JSON and the figures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from chestxpert.datasets.schema import NIH_LABELS
from chestxpert.results import evaluate as ev
from chestxpert.results.bootstrap import patient_bootstrap, patient_bootstrap_weights
from chestxpert.results.calibrate import CALIBRATOR_FILE, fit_platt, read_calibrator
from chestxpert.results.evaluate import (
    CHEXNET_REFERENCE_AUROC,
    ThresholdChoice,
    calibration,
    choose_thresholds,
    curves,
    evaluate,
    operating_point_metrics,
    parse_operating_point,
)
from chestxpert.results.figures import curves_figure, reliability_figure
from chestxpert.results.inputs import EvaluationError


def column(values) -> np.ndarray:
    return np.asarray(values, dtype=float).reshape(-1, 1)


def synthetic_split(n_images=300, n_labels=3, n_patients=80, seed=0):
    """Labels with some NaN, probabilities that carry signal, several images per patient."""
    rng = np.random.default_rng(seed)
    patient_ids = np.array([f"p{i}" for i in rng.integers(0, n_patients, n_images)])
    y_true = (rng.random((n_images, n_labels)) < 0.3).astype(float)
    y_prob = np.clip(0.35 * y_true + 0.65 * rng.random((n_images, n_labels)), 0, 1)
    y_true[rng.random((n_images, n_labels)) < 0.1] = np.nan
    labels = [f"L{i}" for i in range(n_labels)]
    return y_true, y_prob, patient_ids, labels


# --- thresholds (validation split only) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("negatives", "positives", "expected"),
    [
        # J at 0.8/0.7/0.6/0.5/0.4/0.3: .25/.5/.25/.5/.75/.5 → 0.4
        ([0.1, 0.2, 0.3, 0.6], [0.4, 0.5, 0.7, 0.8], 0.4),
        # perfectly separable: the highest threshold with J = 1 is the lowest positive score
        ([0.05, 0.1, 0.2], [0.6, 0.7, 0.9], 0.6),
        # tied scores across classes: J(0.5) = 1 - 1/3, better than J(0.9) = 1/3
        ([0.1, 0.2, 0.5], [0.5, 0.5, 0.9], 0.5),
    ],
)
def test_youden_threshold_has_the_known_answer(negatives, positives, expected):
    y_true = column([0] * len(negatives) + [1] * len(positives))
    y_prob = column(negatives + positives)
    choice = choose_thresholds(y_true, y_prob, ["Mass"])
    assert choice.thresholds == {"Mass": pytest.approx(expected)}
    assert choice.defaulted == [] and choice.method == "youden"


def rate_at(truth: np.ndarray, scores: np.ndarray, threshold: float, rate: str) -> float:
    if rate == "sensitivity":
        return float(np.mean(scores[truth == 1] >= threshold))
    return float(np.mean(scores[truth == 0] < threshold))


@pytest.mark.parametrize("rate", ["sensitivity", "specificity"])
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 1.0])
def test_target_rate_is_reached_at_the_least_cost_to_the_other(rate, target):
    y_true, y_prob, _, labels = synthetic_split(n_images=400, seed=1)
    choice = choose_thresholds(y_true, y_prob, labels, method=rate, **{f"target_{rate}": target})
    for column_index, name in enumerate(labels):
        known = ~np.isnan(y_true[:, column_index])
        truth, scores = y_true[known, column_index], y_prob[known, column_index]
        threshold = choice.thresholds[name]
        assert rate_at(truth, scores, threshold, rate) >= target
        # the next score towards the other rate would miss the target: no cheaper threshold
        if rate == "sensitivity":
            neighbours = np.unique(scores[scores > threshold])[:1]
        else:
            neighbours = np.unique(scores[scores < threshold])[-1:]
        for neighbour in neighbours:
            assert rate_at(truth, scores, neighbour, rate) < target


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("youden", ("youden", None)),
        ("spec=0.9", ("specificity", 0.9)),
        ("sens=0.8", ("sensitivity", 0.8)),
    ],
)
def test_operating_points_are_spelled_as_final_takes_them(text, expected):
    assert parse_operating_point(text) == expected


@pytest.mark.parametrize("text", ["spec", "spec=1.5", "specificity=0.9", "ppv=0.5", "spec=x"])
def test_an_operating_point_final_cannot_read_says_how_to_spell_it(text):
    with pytest.raises(EvaluationError, match="spec=0.9"):
        parse_operating_point(text)


def test_other_operating_points_get_intervals_from_the_same_resamples():
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=200, seed=14)
    youden = choose_thresholds(y_true, y_prob, labels)
    spec = choose_thresholds(y_true, y_prob, labels, "specificity", target_specificity=0.9)
    result = evaluate(
        y_true,
        y_prob,
        patient_ids,
        labels,
        youden,
        n_boot=40,
        other_points={"spec=0.9": spec, "same": youden},
    )
    for name in labels:
        main = result["per_label"][name]["operating_point"]
        # the same thresholds through the same resamples give the very same intervals
        assert result["operating_points"]["same"][name] == main
        point = result["operating_points"]["spec=0.9"][name]
        assert point["threshold"] == spec.thresholds[name]
        assert point["specificity_low"] <= point["specificity"] <= point["specificity_high"]
        assert point["specificity"] >= 0.9  # chosen on these very arrays here


@pytest.mark.parametrize("method", ["youden", "sensitivity"])
@pytest.mark.parametrize(
    "truth",
    [[0, 0, 0, 0], [1, 1, 1, 1], [np.nan] * 4, [0, np.nan, 0, np.nan]],
    ids=["no-positives", "no-negatives", "all-unknown", "known-negatives-only"],
)
def test_label_without_both_classes_gets_default_threshold_and_is_flagged(method, truth):
    y_true = np.column_stack([truth, [0, 1, 0, 1]]).astype(float)
    y_prob = np.array([[0.2, 0.1], [0.9, 0.8], [0.4, 0.3], [0.7, 0.9]])
    target = 0.9 if method == "sensitivity" else None
    choice = choose_thresholds(y_true, y_prob, ["Hernia", "Edema"], method, target)
    assert choice.thresholds["Hernia"] == 0.5
    assert choice.defaulted == ["Hernia"]
    assert choice.thresholds["Edema"] != 0.5


@pytest.mark.parametrize(
    ("method", "target", "message"),
    [
        ("f1", None, "unknown"),
        ("sensitivity", None, "target_sensitivity"),
        ("sensitivity", 1.5, "target_sensitivity"),
        ("youden", 0.9, "method='sensitivity'"),
    ],
)
def test_threshold_options_that_do_not_fit_say_what_to_pass(method, target, message):
    y_true, y_prob, _, labels = synthetic_split(n_images=40)
    with pytest.raises(EvaluationError, match=message):
        choose_thresholds(y_true, y_prob, labels, method, target)


def test_evaluate_applies_the_given_thresholds_and_never_refits_them(monkeypatch):
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=200)

    def refit(*args, **kwargs):
        raise AssertionError("evaluate() must not choose thresholds on the test split")

    monkeypatch.setattr(ev, "choose_thresholds", refit)
    results = {
        cut: evaluate(y_true, y_prob, patient_ids, labels, dict.fromkeys(labels, cut), n_boot=20)
        for cut in (0.5, 0.99)
    }
    for column_index, name in enumerate(labels):
        positives = y_prob[y_true[:, column_index] == 1, column_index]
        for cut, result in results.items():
            point = result["per_label"][name]["operating_point"]
            assert point["threshold"] == cut and result["thresholds"][name] == cut
            assert point["sensitivity"] == pytest.approx(np.mean(positives >= cut))
        assert (
            results[0.99]["per_label"][name]["operating_point"]["sensitivity"]
            < results[0.5]["per_label"][name]["operating_point"]["sensitivity"]
        )


def test_evaluate_accepts_a_threshold_choice_and_rejects_missing_labels():
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=100)
    choice = ThresholdChoice(thresholds=dict.fromkeys(labels, 0.3))
    result = evaluate(y_true, y_prob, patient_ids, labels, choice, n_boot=10)
    assert result["thresholds"] == dict.fromkeys(labels, 0.3)
    with pytest.raises(EvaluationError, match="no threshold for \\['L2'\\]"):
        evaluate(y_true, y_prob, patient_ids, labels, {"L0": 0.5, "L1": 0.5}, n_boot=10)


# --- patient bootstrap ----------------------------------------------------------------------------


def test_resamples_hold_every_image_of_each_drawn_patient():
    patient_ids = np.array(["a"] * 5 + ["b"] * 1 + ["c"] * 3 + ["d"] * 2 + ["e"] * 4)
    weights = patient_bootstrap_weights(patient_ids, n_boot=200, seed=3)
    assert weights.shape == (200, len(patient_ids))
    for row in weights:
        sample = np.repeat(np.arange(len(patient_ids)), row)
        drawn = set(patient_ids[sample])
        for patient in drawn:
            images = np.flatnonzero(patient_ids == patient)
            # all of the patient's images, each as many times as the patient was drawn
            assert set(images) <= set(sample)
            assert len(set(row[images])) == 1
        times_drawn = [row[patient_ids == patient][0] for patient in set(patient_ids)]
        assert sum(times_drawn) == 5  # five patients drawn per resample
    assert not np.all(weights == weights[0])  # resamples differ


def test_patient_bootstrap_is_wider_than_image_bootstrap_when_images_cluster():
    rng = np.random.default_rng(4)
    # 30 patients with one label and one score each; one of them has 150 images, the others 5.
    patient_label = rng.random(30) < 0.4
    patient_score = np.clip(0.25 * patient_label + 0.75 * rng.random(30), 0, 1)
    images_per_patient = np.r_[150, np.full(29, 5)]
    codes = np.repeat(np.arange(30), images_per_patient)
    y_true = column(patient_label[codes])
    y_prob = column(patient_score[codes] + rng.normal(0, 1e-3, codes.size)).clip(0, 1)

    by_patient = patient_bootstrap(y_true, y_prob, codes, n_boot=400, seed=0).auc[0]
    by_image = patient_bootstrap(y_true, y_prob, np.arange(codes.size), n_boot=400, seed=0).auc[0]
    assert by_patient.auc == by_image.auc
    assert (by_patient.high - by_patient.low) > 2 * (by_image.high - by_image.low)


def test_bootstrap_interval_equals_sklearn_on_the_same_patient_resamples():
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=150, n_labels=2, n_patients=25)
    n_boot, seed, alpha = 120, 7, 0.1
    got = patient_bootstrap(y_true, y_prob, patient_ids, n_boot, seed, alpha, labels=labels).auc
    weights = patient_bootstrap_weights(patient_ids, n_boot, seed)
    for column_index, name in enumerate(labels):
        known = ~np.isnan(y_true[:, column_index])
        truth, scores = y_true[known, column_index], y_prob[known, column_index]
        reference = [
            roc_auc_score(truth, scores, sample_weight=row[known])
            for row in weights
            if len(set(truth[row[known] > 0])) == 2
        ]
        low, high = np.quantile(reference, [alpha / 2, 1 - alpha / 2])
        assert got[name].n_used == len(reference)
        assert got[name].low == pytest.approx(low, abs=1e-12)
        assert got[name].high == pytest.approx(high, abs=1e-12)


def test_point_auc_equals_sklearn_on_known_entries():
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=250, seed=5)
    got = patient_bootstrap(y_true, y_prob, patient_ids, n_boot=10, labels=labels).auc
    for column_index, name in enumerate(labels):
        known = ~np.isnan(y_true[:, column_index])
        expected = roc_auc_score(y_true[known, column_index], y_prob[known, column_index])
        assert got[name].auc == expected


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_interval_contains_point_and_narrows_with_alpha(alpha):
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=300, seed=6)
    wide = patient_bootstrap(y_true, y_prob, patient_ids, 300, 0, 0.01, labels=labels).auc
    got = patient_bootstrap(y_true, y_prob, patient_ids, 300, 0, alpha, labels=labels).auc
    for name in labels:
        assert got[name].low < got[name].auc < got[name].high
        assert wide[name].low <= got[name].low and got[name].high <= wide[name].high
        assert got[name].n_used == 300


def test_resamples_with_one_class_are_skipped_and_counted():
    # one positive patient among ten: absent from about a third of the resamples
    patient_ids = np.repeat(np.arange(10), 3)
    y_true = column(patient_ids == 0)
    y_prob = column(np.linspace(0.1, 0.9, 30))
    n_boot = 200
    got = patient_bootstrap(y_true, y_prob, patient_ids, n_boot, seed=2).auc[0]
    drawn_positive = patient_bootstrap_weights(patient_ids, n_boot, seed=2)[:, 0] > 0
    assert got.n_used == int(drawn_positive.sum())
    assert 0 < got.n_used < n_boot


def test_rate_and_pooled_intervals_come_from_the_same_patient_resamples():
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=150, n_labels=2, n_patients=30)
    n_boot, seed, alpha = 80, 5, 0.1
    thresholds = {"L0": 0.5, "L1": 0.4}
    got = patient_bootstrap(
        y_true, y_prob, patient_ids, n_boot, seed, alpha, labels=labels, thresholds=thresholds
    )
    weights = patient_bootstrap_weights(patient_ids, n_boot, seed)
    for column_index, name in enumerate(labels):
        known = ~np.isnan(y_true[:, column_index])
        positive = y_true[known, column_index] == 1
        called = y_prob[known, column_index] >= thresholds[name]
        w = weights[:, known]
        by_hand = {
            "sensitivity": (w @ (positive & called)) / (w @ positive),
            "specificity": (w @ (~positive & ~called)) / (w @ ~positive),
            "ppv": (w @ (positive & called)) / (w @ called),
            "npv": (w @ (~positive & ~called)) / (w @ ~called),
        }
        for rate, values in by_hand.items():
            values = values[np.isfinite(values)]
            interval = got.rates[name][rate]
            assert (interval.low, interval.high) == pytest.approx(
                tuple(np.quantile(values, [alpha / 2, 1 - alpha / 2])), abs=1e-12
            )
            assert interval.n_used == values.size
        point = operating_point_metrics(y_true, y_prob, thresholds, labels)[name]
        assert got.rates[name]["sensitivity"].value == point["sensitivity"]
    # micro: one AUC over every known entry, each weighted by its image's resample count
    known = ~np.isnan(y_true)
    entry_images = np.nonzero(known)[0]
    micro = [
        roc_auc_score(y_true[known], y_prob[known], sample_weight=row[entry_images])
        for row in weights
    ]
    assert (got.auc_micro.low, got.auc_micro.high) == pytest.approx(
        tuple(np.quantile(micro, [alpha / 2, 1 - alpha / 2])), abs=1e-12
    )
    assert got.auc_micro.value == roc_auc_score(y_true[known], y_prob[known])
    assert got.auc_macro.low < got.auc_macro.value < got.auc_macro.high
    assert got.auc_macro.value == pytest.approx(np.mean([got.auc[n].auc for n in labels]))


def test_evaluate_reports_every_interval_prevalence_and_brier():
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=200, seed=12)
    result = evaluate(y_true, y_prob, patient_ids, labels, dict.fromkeys(labels, 0.5), n_boot=50)
    for key in ("auc_macro", "auc_micro"):
        assert result[f"{key}_low"] <= result[key] <= result[f"{key}_high"]
    for column_index, name in enumerate(labels):
        op = result["per_label"][name]["operating_point"]
        for rate in ("sensitivity", "specificity", "ppv", "npv"):
            assert op[f"{rate}_low"] <= op[rate] <= op[f"{rate}_high"], (name, rate)
        known = ~np.isnan(y_true[:, column_index])
        truth, scores = y_true[known, column_index], y_prob[known, column_index]
        assert result["counts"]["prevalence"][name] == pytest.approx(truth.mean())
        brier = result["calibration"]["labels"][name]["brier"]
        assert brier == pytest.approx(np.mean((scores - truth) ** 2))
        assert result["per_label"][name]["scorable"] == "yes"


@pytest.mark.parametrize(
    ("truth", "expected"),
    [
        ([0, 0, 0, 0], "no positives in test"),
        ([1, 1, 1, 1], "no negatives in test"),
        ([np.nan] * 4, "no known labels in test"),
    ],
)
def test_no_positives_and_no_negatives_are_told_apart(truth, expected):
    y_true = np.column_stack([truth, [0, 1, 0, 1]]).astype(float)
    y_prob = np.array([[0.2, 0.1], [0.9, 0.8], [0.4, 0.3], [0.7, 0.9]])
    result = evaluate(
        y_true,
        y_prob,
        ["a", "b", "c", "d"],
        ["Hernia", "Edema"],
        dict.fromkeys(["Hernia", "Edema"], 0.5),
        n_boot=10,
    )
    assert result["per_label"]["Hernia"]["scorable"] == expected
    assert result["per_label"]["Hernia"]["auc"] is None
    assert result["per_label"]["Edema"]["scorable"] == "yes"


# --- per-label metrics ----------------------------------------------------------------------------


def test_label_without_positives_has_no_auc_and_stays_out_of_the_macro_mean():
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=200)
    y_true[:, 1] = np.where(np.isnan(y_true[:, 1]), np.nan, 0.0)
    result = evaluate(y_true, y_prob, patient_ids, labels, dict.fromkeys(labels, 0.5), n_boot=20)
    hollow = result["per_label"]["L1"]
    assert hollow["auc"] is None and hollow["auc_low"] is None and hollow["auc_high"] is None
    assert hollow["pr_auc"] is None and hollow["auc_boot_used"] == 0
    assert result["curves"]["L1"] == {"roc": None, "pr": None}
    assert result["scorable_labels"] == ["L0", "L2"]
    scored = [result["per_label"][name]["auc"] for name in ("L0", "L2")]
    assert result["auc_macro"] == pytest.approx(np.mean(scored))
    assert result["counts"]["positives"]["L1"] == 0
    known = ~np.isnan(y_true[:, 0])
    assert result["per_label"]["L0"]["pr_auc"] == pytest.approx(
        average_precision_score(y_true[known, 0], y_prob[known, 0])
    )


def test_operating_point_counts_match_a_hand_count():
    y_true = np.array([[1, 0], [1, 1], [0, np.nan], [0, 0], [1, 0], [0, 1]], dtype=float)
    y_prob = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.9], [0.1, 0.6], [0.7, 0.1], [0.3, 0.2]])
    got = operating_point_metrics(y_true, y_prob, {"A": 0.5, "B": 0.6}, ["A", "B"])
    # A: called at >= 0.5 → rows 0, 2, 4; positives rows 0, 1, 4
    assert [got["A"][k] for k in ("tp", "fp", "tn", "fn")] == [2, 1, 2, 1]
    assert got["A"]["sensitivity"] == pytest.approx(2 / 3)
    assert got["A"]["specificity"] == pytest.approx(2 / 3)
    assert got["A"]["ppv"] == pytest.approx(2 / 3) and got["A"]["npv"] == pytest.approx(2 / 3)
    assert got["A"]["f1"] == pytest.approx(2 / 3)
    # B: row 2 unknown; called at >= 0.6 → rows 1, 3 (0.6 counts as called); positives rows 1, 5
    assert [got["B"][k] for k in ("tp", "fp", "tn", "fn")] == [1, 1, 2, 1]
    assert got["B"]["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert got["B"]["threshold"] == 0.6
    assert all(type(got[name][k]) is int for name in "AB" for k in ("tp", "fp", "tn", "fn"))


def test_undefined_rates_are_nan_not_zero():
    y_true = column([0, 0, 0])
    got = operating_point_metrics(y_true, column([0.1, 0.2, 0.3]), {"Hernia": 0.5}, ["Hernia"])
    got = got["Hernia"]
    assert np.isnan(got["sensitivity"]) and np.isnan(got["ppv"]) and np.isnan(got["f1"])
    assert got["specificity"] == 1.0 and got["npv"] == 1.0


# --- calibration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sharpen", "low", "high"),
    [(1.0, 0.0, 0.02), (4.0, 0.15, 1.0)],
    ids=["calibrated", "overconfident"],
)
def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident(sharpen, low, high):
    rng = np.random.default_rng(8)
    truth_prob = rng.uniform(0.02, 0.98, size=(20_000, 2))
    y_true = (rng.random(truth_prob.shape) < truth_prob).astype(float)
    logit = np.log(truth_prob / (1 - truth_prob))
    y_prob = 1 / (1 + np.exp(-sharpen * logit))
    got = calibration(y_true, y_prob, labels=["A", "B"])
    for reliability in [got["pooled"], *got["labels"].values()]:
        assert low <= reliability["ece"] <= high
        assert sum(b["count"] for b in reliability["bins"]) == len(y_true) * (
            2 if reliability is got["pooled"] else 1
        )


def test_calibration_bins_match_a_hand_count():
    y_true = np.array([[1], [0], [1], [np.nan], [1]], dtype=float)
    y_prob = column([0.05, 0.15, 0.95, 0.5, 1.0])
    got = calibration(y_true, y_prob, n_bins=2)["labels"][0]
    first, second = got["bins"]
    assert (first["low"], first["high"], first["count"]) == (0.0, 0.5, 2)
    assert first["mean_pred"] == pytest.approx(0.1) and first["frac_pos"] == 0.5
    assert (second["count"], second["frac_pos"]) == (2, 1.0)
    assert second["mean_pred"] == pytest.approx(0.975)
    assert got["ece"] == pytest.approx((2 * 0.4 + 2 * 0.025) / 4)


def overconfident_scores(n_images: int, seed: int, sharpen: float = 4.0, shift: float = 1.0):
    """Truth drawn from known probabilities and scores that exaggerate them (sharpened logits,
    shifted up, as a weighted loss does): an over-confident model, constructed, not trained."""
    rng = np.random.default_rng(seed)
    truth_prob = rng.uniform(0.02, 0.6, size=(n_images, 3))
    y_true = (rng.random(truth_prob.shape) < truth_prob).astype(float)
    logit = np.log(truth_prob / (1 - truth_prob))
    return y_true, 1 / (1 + np.exp(-(sharpen * logit + shift)))


def test_platt_scaling_fitted_on_validation_lowers_ece_and_brier_on_test(tmp_path):
    labels = ["A", "B", "C"]
    val_true, val_prob = overconfident_scores(4000, seed=1)
    test_true, test_prob = overconfident_scores(4000, seed=2)
    calibrator = fit_platt(val_true, val_prob, labels)
    calibrated = calibrator.apply(test_prob)
    before = calibration(test_true, test_prob, labels=labels)
    after = calibration(test_true, calibrated, labels=labels)
    assert before["pooled"]["ece"] > 0.1 and after["pooled"]["ece"] < 0.03
    for name in labels:
        assert after["labels"][name]["ece"] < before["labels"][name]["ece"] / 3
        assert after["labels"][name]["brier"] < before["labels"][name]["brier"]
    # monotone: the order of the scores, so every AUC and every call at a threshold, is kept
    assert np.array_equal(np.argsort(calibrated, axis=0), np.argsort(test_prob, axis=0))
    thresholds = {"A": 0.3, "B": 0.5, "C": 0.9}
    on_calibrated_scale = calibrator.apply_thresholds(thresholds)
    for column_index, name in enumerate(labels):
        raw_calls = test_prob[:, column_index] >= thresholds[name]
        assert np.array_equal(raw_calls, calibrated[:, column_index] >= on_calibrated_scale[name])
    # stored with the model and read back the same
    calibrator.write(tmp_path)
    assert read_calibrator(tmp_path) == calibrator
    assert read_calibrator(tmp_path / "elsewhere") is None


@pytest.mark.parametrize(
    "truth", [[0, 0, 0, 0], [np.nan] * 4, [1, 1, 0, 0]], ids=["one-class", "unknown", "backwards"]
)
def test_labels_the_calibrator_cannot_fit_keep_their_probabilities(truth):
    y_true = np.column_stack([truth, [0, 1, 0, 1]]).astype(float)
    y_prob = np.array([[0.2, 0.1], [0.3, 0.8], [0.8, 0.3], [0.9, 0.9]])
    calibrator = fit_platt(y_true, y_prob, ["Hernia", "Edema"])
    assert calibrator.identity == ["Hernia"]
    assert np.array_equal(calibrator.apply(y_prob)[:, 0], y_prob[:, 0])


def test_a_damaged_calibrator_file_says_what_to_do(tmp_path):
    (tmp_path / CALIBRATOR_FILE).write_text("{not json")
    with pytest.raises(EvaluationError, match="delete it to use uncalibrated"):
        read_calibrator(tmp_path)


# --- pooled results -------------------------------------------------------------------------------


def test_micro_auc_pools_entries_while_macro_averages_labels():
    n = 20
    # Each label separates perfectly (macro 1.0), but label B's positives (0.3) sit below label A's
    # negatives (0.6) once pooled: micro = (n·2n + n·n) / (2n·2n) = 0.75.
    y_true = np.column_stack([np.r_[np.ones(n), np.zeros(n)]] * 2)
    y_prob = np.column_stack(
        [np.r_[np.full(n, 0.9), np.full(n, 0.6)], np.r_[np.full(n, 0.3), np.full(n, 0.1)]]
    )
    result = evaluate(y_true, y_prob, np.arange(2 * n), ["A", "B"], {"A": 0.5, "B": 0.5}, n_boot=20)
    assert result["auc_macro"] == 1.0
    assert result["auc_micro"] == pytest.approx(0.75)


def test_evaluate_output_is_plain_json_without_nan():
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=200, seed=9)
    y_true[:, 2] = np.where(np.isnan(y_true[:, 2]), np.nan, 0.0)  # unscorable → None fields
    result = evaluate(y_true, y_prob, patient_ids, labels, dict.fromkeys(labels, 0.99), n_boot=20)
    text = json.dumps(result, allow_nan=False)  # raises on NaN/inf and on numpy ints
    assert "NaN" not in text and json.loads(text) == result
    assert result["counts"]["images"] == 200
    assert result["counts"]["patients"] == len(set(patient_ids))
    assert result["bootstrap"] == {"unit": "patient", "n_boot": 20, "seed": 0, "alpha": 0.05}


def test_curves_are_thinned_and_keep_their_ends():
    y_true, y_prob, _, labels = synthetic_split(n_images=2000, n_labels=1, seed=10)
    got = curves(y_true, y_prob, labels, max_points=50)["L0"]
    assert 2 < len(got["roc"]["fpr"]) <= 50 and len(got["pr"]["recall"]) <= 50
    assert (got["roc"]["fpr"][0], got["roc"]["tpr"][-1]) == (0.0, 1.0)
    assert got["pr"]["recall"][0] == 1.0 and got["pr"]["recall"][-1] == 0.0


def test_chexnet_reference_covers_the_nih_labels():
    assert list(CHEXNET_REFERENCE_AUROC) == list(NIH_LABELS)
    assert CHEXNET_REFERENCE_AUROC["Pleural_Thickening"] == 0.8062
    assert all(0.7 < auc < 0.95 for auc in CHEXNET_REFERENCE_AUROC.values())


@pytest.mark.parametrize(
    ("y_true", "y_prob", "message"),
    [
        (np.zeros((4, 2)), np.zeros((4, 3)), "same shape"),
        (np.full((4, 3), 2.0), np.zeros((4, 3)), "1, 0 or NaN"),
        (np.zeros((4, 3)), np.full((4, 3), 3.0), "sigmoid"),
    ],
)
def test_inputs_that_do_not_fit_are_user_errors(y_true, y_prob, message):
    with pytest.raises(EvaluationError, match=message):
        operating_point_metrics(y_true, y_prob, dict.fromkeys("abc", 0.5), list("abc"))


# --- figures --------------------------------------------------------------------------------------


def test_roc_panels_mark_the_operating_points_and_carry_the_auc(tmp_path):
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=150, n_labels=1, seed=15)
    result = evaluate(
        y_true,
        y_prob,
        patient_ids,
        labels,
        dict.fromkeys(labels, 0.5),
        n_boot=10,
        other_points={"spec=0.9": dict.fromkeys(labels, 0.8)},
    )
    points = {
        "youden": {n: result["per_label"][n]["operating_point"] for n in labels},
        **result["operating_points"],
    }
    subtitles = {n: f"AUC {result['per_label'][n]['auc']:.2f}" for n in labels}
    plain = curves_figure(result["curves"], tmp_path / "plain.png")
    marked = curves_figure(
        result["curves"], tmp_path / "marked.png", points=points, subtitles=subtitles
    )
    assert marked.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert marked.read_bytes() != plain.read_bytes()


@pytest.mark.parametrize("figure", ["reliability", "roc", "pr"])
def test_figures_are_small_pngs_even_with_an_unscorable_label(figure, tmp_path):
    y_true, y_prob, patient_ids, labels = synthetic_split(n_images=150, seed=11)
    y_true[:, 1] = np.where(np.isnan(y_true[:, 1]), np.nan, 0.0)
    result = evaluate(y_true, y_prob, patient_ids, labels, dict.fromkeys(labels, 0.5), n_boot=10)
    path = tmp_path / "figures" / f"{figure}.png"
    if figure == "reliability":
        written = reliability_figure(result["calibration"], path)
    else:
        written = curves_figure(result["curves"], path, kind=figure)
    assert written == path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
