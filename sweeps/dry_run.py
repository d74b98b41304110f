"""`chestxpert sweep run --dry-run`: the sweep's plan in words, after checking what a sweep would
otherwise find out late: the dataset is there and its images fit every backbone searched.

Reads only the spec, the dataset's manifest and the backbone registry's facts: no Ray, no
TensorFlow, so it answers in about a second.
"""

from __future__ import annotations

import re
from typing import Any

from chestxpert.cluster.endpoints import Endpoints
from chestxpert.datasets.reader import PreparedDataset, open_dataset
from chestxpert.sweeps.space import Choice, Dimension, QUniform, RandInt
from chestxpert.sweeps.spec import SpecError, SweepSpec
from chestxpert.trainable.backbones import BACKBONES, DEFAULT_BACKBONE


def _number(value: Any) -> str:
    """1e-05 → 1e-5, 0.0001 → 0.0001, 16.0 → 16: as a person writes it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return repr(value)
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m[1].replace('+', '')}{m[2]}", f"{value:g}")


def describe_dimension(dim: Dimension) -> str:
    """A search dimension as a distribution: `loguniform(1e-5, 1e-2)`, `randint(16, 65)`,
    `quniform(16, 64, 16)`, `choice(['adam', 'sgd'])`."""
    if isinstance(dim, Choice):
        return f"choice([{', '.join(_number(v) for v in dim.values)}])"
    bounds = [dim.low, dim.high] + ([dim.q] if isinstance(dim, QUniform) else [])
    return f"{dim.type}({', '.join(_number(b) for b in bounds)})"


def _values(spec: SweepSpec, key: str, default: Any) -> list[Any]:
    """Every value a trial setting can take in this sweep (a range by its low end, the smallest
    a trial can draw), or its fixed value, or `default`."""
    dim = spec.space.get(key)
    if isinstance(dim, Choice):
        return list(dim.values)
    if isinstance(dim, RandInt | QUniform):
        return [dim.low]
    return [spec.trial.get(key, default)]


def check_dataset(spec: SweepSpec, endpoints: Endpoints) -> PreparedDataset:
    """Open the spec's dataset and check that every backbone searched accepts the smallest image
    a trial can get (its `image_size`, or the dataset's own size where that is unset or 0).
    Raises DatasetError (no such dataset) or SpecError (images too small), both user errors."""
    dataset = open_dataset(spec.dataset, endpoints)
    sizes = [int(size) or dataset.image_size for size in _values(spec, "image_size", 0)]
    smallest = min(sizes)
    for name in _values(spec, "backbone", DEFAULT_BACKBONE):
        needed = BACKBONES[name].min_size
        if smallest < needed:
            raise SpecError(
                f"{spec.dataset} holds {dataset.image_size} px images and trials get "
                f"{smallest} px, but backbone {name} needs at least {needed} px: prepare the "
                f"dataset with `--image-size {needed}` or more, or set trial.image_size"
            )
    return dataset


def plan_lines(spec: SweepSpec, endpoints: Endpoints, dataset: PreparedDataset) -> list[str]:
    """The plan `--dry-run` prints, one line per fact."""
    search, scheduler, resources = spec.search, spec.scheduler, spec.resources
    how = f"{search.algorithm}"
    if search.algorithm == "optuna":
        how += f" ({search.sampler}, {search.tpe_startup_trials()} random first)"
    stopping = (
        f"asha (max_t {scheduler.max_t or spec.epochs()}, grace {scheduler.grace_period}, "
        f"reduction {scheduler.reduction_factor})"
        if scheduler.type == "asha"
        else "none"
    )
    counts = ", ".join(f"{split} {dataset.count(split)}" for split in ("train", "val", "test"))
    fixed = " ".join(f"{key}={value}" for key, value in spec.trial.items())
    lines = [
        f"sweep    {spec.name}: {search.num_samples} trials, {search.max_concurrent} at a time, "
        f"search {how}, early stopping {stopping}",
        f"metric   {spec.metric} ({spec.mode})",
        f"dataset  {spec.dataset}: {dataset.image_size} px, {len(dataset.labels)} labels, "
        f"images {counts}",
        f"trial    {fixed or '(TrialConfig defaults)'}",
        f"per trial {_number(resources.cpus)} CPU, {_number(resources.gpus)} GPU",
        "space    " + ("(nothing searched)" if not spec.space else ""),
    ]
    lines[-1] += "\n         ".join(
        f"{key}: {describe_dimension(dim)}" for key, dim in spec.space.items()
    )
    lines += [
        f"storage  {endpoints.storage_uri}/{spec.name}",
        f"mlflow   {endpoints.mlflow_tracking_uri} (experiment {spec.mlflow.experiment})",
        f"ray      {endpoints.ray_address or 'in-process (no cluster address found)'}",
        "dry run: checked, nothing started",
    ]
    return lines
