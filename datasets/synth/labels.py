"""NIH label statistics for the phantoms: the shipped table `nih_label_rates.json` and label sets
drawn from it, so that synthetic labels occur and co-occur as often as in NIH ChestX-ray14.

The table was computed once from the real label file Data_Entry_2017_v2020.csv.gz (112,120
images, 30,805 patients) with pandas, rows sorted by (Patient ID, Follow-up #): per-label
prevalence and the 14x14 co-occurrence counts of the one-hot labels; the 100 most frequent
"Finding Labels" strings with their counts ("No Finding" first; they cover 96.6% of images) and,
for the remaining 3.4% ("tail"), each label's rate and the histogram of label-set sizes; the
share of consecutive follow-ups with an identical label string (0.41) and, from it, the
probability that our generator copies the previous label set (`followup_keep_labels` =
(0.41 - sum p_k^2) / (1 - sum p_k^2), with p_k the frequency of each label string, so that
copying plus independent draws repeats labels as often as NIH does); images per patient (mean,
share of single-image patients, quantiles, and the shape r of a negative binomial for the extra
images fitted so that P(1 image) matches at the real mean); ages at the first image (every 5th
percentile); the mean age gain between consecutive follow-ups; the share of male patients and
of PA images.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from chestxpert.datasets.schema import NIH_LABELS, DatasetError

# Package data of chestxpert.datasets, one folder up from this subpackage.
LABEL_RATES_PATH = Path(__file__).parent.parent / "nih_label_rates.json"


@lru_cache(maxsize=4)
def load_label_rates(path: Path = LABEL_RATES_PATH) -> dict:
    """Read the NIH label statistics table (see the module docstring for how it was computed).

    Returns the parsed JSON: `prevalence` (fraction of images per label, 0..1),
    `no_finding_fraction`, `cooccurrence` (14x14 image counts in NIH_LABELS order),
    `top_combinations`, `tail`, `images_per_patient`, `age_years_first_image`, and the sex, view
    and follow-up rates. Raises DatasetError if the file is missing or lacks a key.
    """
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read label rates {path}: {err}; reinstall chestxpert") from err
    required = (
        "labels",
        "prevalence",
        "top_combinations",
        "tail",
        "images_per_patient",
        "age_years_first_image",
        "male_fraction_patients",
        "pa_fraction_images",
        "followup_keep_labels",
        "age_years_step_per_followup_mean",
    )
    missing = [key for key in required if key not in table]
    if missing or tuple(table["labels"]) != NIH_LABELS:
        raise DatasetError(f"{path} lacks keys {missing} or has labels not in NIH order")
    return table


def sample_label_sets(
    rng: np.random.Generator, count: int, rates: dict | None = None
) -> list[tuple[str, ...]]:
    """Draw `count` label sets (tuples in NIH_LABELS order; empty = "No Finding") like NIH's.

    A set is one of the 100 most frequent NIH label strings with its empirical frequency or,
    with the remaining probability (3.4%), a "tail" set: a size from the tail's size histogram
    and that many distinct labels drawn with the tail's per-label rates as weights. This keeps
    each label's prevalence and the common co-occurrences of the real file.
    """
    rates = rates or load_label_rates()
    combos = [
        tuple(label for label in NIH_LABELS if label in text.split("|"))
        for text, _ in rates["top_combinations"]
    ]
    weights = np.array([count for _, count in rates["top_combinations"]], dtype=np.float64)
    tail = rates["tail"]
    weights = weights / weights.sum() * (1.0 - tail["fraction"])
    choice = rng.choice(len(combos) + 1, size=count, p=np.append(weights, tail["fraction"]))
    tail_sizes = np.array([int(k) for k in tail["size_counts"]])
    tail_size_p = np.array(list(tail["size_counts"].values()), dtype=np.float64)
    tail_label_p = np.array([tail["label_rates"][label] for label in NIH_LABELS])
    sets: list[tuple[str, ...]] = []
    for pick in choice:
        if pick < len(combos):
            sets.append(combos[pick])
            continue
        size = int(rng.choice(tail_sizes, p=tail_size_p / tail_size_p.sum()))
        chosen = rng.choice(
            len(NIH_LABELS), size=size, replace=False, p=tail_label_p / tail_label_p.sum()
        )
        sets.append(tuple(NIH_LABELS[i] for i in sorted(chosen)))
    return sets
