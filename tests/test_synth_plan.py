"""Tests of the synthetic dataset's plan: label sets drawn like NIH's, label noise, patients and
their follow-ups, all decided before any image is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from chestxpert.datasets import synth
from chestxpert.datasets.schema import NIH_LABELS

# --------------------------------------------------------------------------- label statistics


def test_sampled_label_sets_reproduce_nih_prevalence():
    rates = synth.load_label_rates()
    sets = synth.sample_label_sets(np.random.default_rng(0), 3000)
    for label in NIH_LABELS:
        expected = rates["prevalence"][label]
        observed = sum(label in labels for labels in sets) / len(sets)
        assert abs(observed - expected) <= 4 * np.sqrt(expected * (1 - expected) / 3000) + 0.003, (
            label
        )
    no_finding = sum(not labels for labels in sets) / len(sets)
    assert abs(no_finding - rates["no_finding_fraction"]) < 0.03
    both = sum({"Effusion", "Infiltration"} <= set(labels) for labels in sets) / len(sets)
    expected_both = rates["cooccurrence"][2][3] / rates["images"]
    assert (
        abs(both - expected_both) < 0.012
    )  # co-occurrence, not independent draws (0.021 if independent)
    assert all(list(labels) == [name for name in NIH_LABELS if name in labels] for labels in sets)


def test_label_rates_table_is_small_and_consistent():
    rates = synth.load_label_rates()
    assert synth.LABEL_RATES_PATH.stat().st_size < 10_000
    assert rates["images"] == 112_120 and tuple(rates["labels"]) == NIH_LABELS
    diagonal = [rates["cooccurrence"][i][i] / rates["images"] for i in range(14)]
    assert diagonal == pytest.approx([rates["prevalence"][label] for label in NIH_LABELS], abs=1e-4)


@pytest.fixture(scope="module")
def big_plan() -> list[synth.PlannedImage]:
    return synth.plan_dataset(3000, seed=7, label_noise=0.3)


def test_label_noise_mostly_drops_drawn_findings(big_plan):
    drawn = sum(len(plan.drawn) for plan in big_plan)
    missed = sum(len(set(plan.drawn) - set(plan.written)) for plan in big_plan)
    invented = sum(len(set(plan.written) - set(plan.drawn)) for plan in big_plan)
    assert abs(missed / drawn - 0.3) < 0.04
    assert 0 < invented < missed / 3
    clean = synth.plan_dataset(500, seed=7, label_noise=0.0)
    assert all(plan.written == plan.drawn for plan in clean)


def test_patients_are_consistent_across_follow_ups(big_plan):
    by_patient: dict[int, list[synth.PlannedImage]] = {}
    for plan in big_plan:
        by_patient.setdefault(plan.patient_id, []).append(plan)
    assert list(by_patient) == list(range(1, len(by_patient) + 1))
    for plans in by_patient.values():
        assert [plan.follow_up for plan in plans] == list(range(len(plans)))
        assert len({(plan.sex, plan.anatomy, plan.test) for plan in plans}) == 1
        ages = [plan.age_years for plan in plans]
        assert ages == sorted(ages)
    mean_images = len(big_plan) / len(by_patient)
    assert 2.3 < mean_images < 3.6
    single = sum(len(plans) == 1 for plans in by_patient.values()) / len(by_patient)
    assert single > 0.4  # as in NIH, most patients have one image


def test_findings_sometimes_persist_across_follow_ups(big_plan):
    rates = synth.load_label_rates()
    follow_ups = [
        (before, after)
        for before, after in zip(big_plan[:-1], big_plan[1:], strict=True)
        if after.follow_up > 0
    ]
    same = sum(before.drawn == after.drawn for before, after in follow_ups) / len(follow_ups)
    assert abs(same - rates["followup_same_labels"]) < 0.06
    persisted = [
        after
        for before, after in follow_ups
        if before.drawn and before.lesion_seed == after.lesion_seed
    ]
    assert persisted and all(
        before.drawn == after.drawn
        for before, after in follow_ups
        if before.lesion_seed == after.lesion_seed
    )


def test_one_image_per_patient_when_asked():
    plans = synth.plan_dataset(200, seed=1, images_per_patient=1.0)
    assert [plan.follow_up for plan in plans] == [0] * 200
