"""The plan of a synthetic dataset: every image's patient, follow-up, labels, view and random
seeds, decided before anything is drawn so the files do not depend on how drawing is split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from chestxpert.datasets.schema import NIH_LABELS
from chestxpert.datasets.synth.anatomy import Anatomy, sample_anatomy
from chestxpert.datasets.synth.labels import load_label_rates, sample_label_sets

IMAGES_PER_FOLDER = 10_000  # NIH ships images_002.. with 10,000 files each
TEST_PATIENT_FRACTION = 0.2
FALSE_POSITIVE_SHARE = 0.1  # per image, P(one spurious label) = label_noise * this

# SeedSequence spawn keys: one random stream plans the dataset, one per image draws it
_PLAN_STREAM = 0
_IMAGE_STREAM = 1


@dataclass(frozen=True)
class PlannedImage:
    """Everything needed to draw and list one image; `drawn` are the findings painted on it,
    `written` the (noisy) labels written to Data_Entry_2017.csv, both in NIH_LABELS order."""

    index: int
    name: str
    folder: str
    patient_id: int
    follow_up: int
    age_years: int
    sex: str
    view: str
    anatomy: Anatomy
    drawn: tuple[str, ...]
    written: tuple[str, ...]
    lesion_seed: int
    rgba: bool
    test: bool


def plan_dataset(
    images: int,
    seed: int = 0,
    label_noise: float = 0.1,
    images_per_patient: float = 3.0,
    rgba_fraction: float = 0.02,
    rates: dict | None = None,
) -> list[PlannedImage]:
    """Decide every image's patient, labels, view and seeds without drawing anything.

    Patients get 1 + NegBin(r, mean images_per_patient - 1) images (r from the NIH table, so most
    patients have one image and a few have many; no patient takes more than max(3 x mean, 5% of
    the images)); a follow-up repeats the previous image's findings (same lesions) with NIH's
    repeat probability, else draws a new label set; with probability `label_noise` each drawn
    finding is left out of the written labels (text-mined reports miss findings) and with
    probability label_noise x FALSE_POSITIVE_SHARE an undrawn label is added; ~20% of patients
    form the test list. Deterministic in `seed`.
    """
    rates = rates or load_label_rates()
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PLAN_STREAM,)))
    fresh_sets = sample_label_sets(rng, images, rates)
    per_patient = rates["images_per_patient"]
    shape = per_patient["extra_images_negbin_shape"]
    extra_mean = max(images_per_patient - 1.0, 0.0)
    cap = max(math.ceil(3 * images_per_patient), math.ceil(0.05 * images))
    age_quantiles = rates["age_years_first_image"]["quantiles"]
    age_step = rates["age_years_step_per_followup_mean"]
    prevalence = np.array([rates["prevalence"][label] for label in NIH_LABELS])

    plans: list[PlannedImage] = []
    patient_id = 0
    while len(plans) < images:
        patient_id += 1
        extra = rng.negative_binomial(shape, shape / (shape + extra_mean)) if extra_mean > 0 else 0
        count = min(1 + int(extra), cap, images - len(plans))
        sex = "M" if rng.uniform() < rates["male_fraction_patients"] else "F"
        anatomy = sample_anatomy(rng, sex)
        age = float(
            np.interp(rng.uniform(), np.linspace(0.0, 1.0, len(age_quantiles)), age_quantiles)
        )
        drawn: tuple[str, ...] = ()
        lesion_seed = 0
        for follow_up in range(count):
            index = len(plans)
            if follow_up:
                age = min(age + rng.poisson(age_step), 95.0)
            if follow_up == 0 or rng.uniform() >= rates["followup_keep_labels"]:
                drawn, lesion_seed = fresh_sets[index], int(rng.integers(0, 2**63))
            kept = [label for label in drawn if rng.uniform() >= label_noise]
            if rng.uniform() < label_noise * FALSE_POSITIVE_SHARE:
                weights = np.where(np.isin(NIH_LABELS, drawn), 0.0, prevalence)
                kept.append(NIH_LABELS[int(rng.choice(len(NIH_LABELS), p=weights / weights.sum()))])
            plans.append(
                PlannedImage(
                    index=index,
                    name=f"{patient_id:08d}_{follow_up:03d}.png",
                    folder=f"images_{index // IMAGES_PER_FOLDER + 1:03d}",
                    patient_id=patient_id,
                    follow_up=follow_up,
                    age_years=int(round(age)),
                    sex=sex,
                    view="PA" if rng.uniform() < rates["pa_fraction_images"] else "AP",
                    anatomy=anatomy,
                    drawn=drawn,
                    written=tuple(label for label in NIH_LABELS if label in kept),
                    lesion_seed=lesion_seed,
                    rgba=bool(rng.uniform() < rgba_fraction),
                    test=False,
                )
            )
    test_count = round(TEST_PATIENT_FRACTION * patient_id) if patient_id > 1 else 0
    test_patients = set((rng.permutation(patient_id)[:test_count] + 1).tolist())
    return [replace(plan, test=plan.patient_id in test_patients) for plan in plans]


def image_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The random stream that draws image `index` of the dataset planned with `seed`."""
    return np.random.SeedSequence(seed, spawn_key=(_IMAGE_STREAM, index))
