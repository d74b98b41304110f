"""Valid sweep specs: the examples load, dimensions become the right Ray Tune objects, and
defaults, overrides and storage locations come out the same for every reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized, Uniform

from chestxpert.sweeps.spec import SweepSpec, load_spec, parse_spec, spec_from_dict
from chestxpert.trainable.config import TrialConfig
from tests.spec_helpers import HEADER, problems_of

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "sweeps" / "examples").glob("*.yaml"))


# --- the example specs --------------------------------------------------------------------


def test_the_examples_are_all_here() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"nih-densenet121-gpu.yaml", "chexpert-densenet121-gpu.yaml", "demo-cpu.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_spec_loads_and_round_trips(path: Path) -> None:
    spec = load_spec(path)
    space = spec.param_space()
    assert set(space) == set(spec.trial) | {"dataset"} | set(spec.space)
    assert spec.scheduler.max_t is not None and spec.scheduler.max_t <= spec.epochs()
    assert spec.scheduler.grace_period < spec.scheduler.max_t
    TrialConfig.from_dict(spec.trial_config_base())
    # what the driver records in storage is what `sweep resume` validates again
    assert SweepSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_space_converts_for_optuna_and_starts_at_its_points(path: Path) -> None:
    from ray.tune.search.optuna import OptunaSearch

    spec = load_spec(path)
    searched = {key: value for key, value in spec.param_space().items() if key in spec.space}
    points = spec.search.points_to_evaluate
    searcher = OptunaSearch(
        space=searched,
        metric=spec.metric,
        mode=spec.mode,
        seed=spec.search.seed,
        points_to_evaluate=points or None,
    )
    for index in range(len(points) + 3):
        config = searcher.suggest(f"trial_{index}")
        if index < len(points):
            assert config == pytest.approx(points[index])
        TrialConfig.from_dict({**spec.trial_config_base(), **config})


def test_the_gpu_examples_are_real_gpu_sweeps() -> None:
    for name in ("nih-densenet121-gpu.yaml", "chexpert-densenet121-gpu.yaml"):
        spec = load_spec(EXAMPLES[0].parent / name)
        assert spec.trial["backbone"] == "densenet121" and spec.trial["image_size"] == 224
        assert spec.trial["weights"] == ""  # from scratch
        # 2 CPUs: what `python -m benchmarks input_pipeline` works out for one GPU's input
        assert (spec.resources.gpus, spec.resources.cpus) == (1, 2)
        assert spec.dataset.startswith("s3://") and spec.storage.startswith("s3://")
        assert {"learning_rate", "weight_decay", "dropout", "batch_size", "lr_schedule"} <= set(
            spec.space
        )
        assert spec.space["learning_rate"].type == "loguniform"
        assert spec.search.num_samples == 40


def test_the_cpu_demo_is_sized_for_two_cores(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    spec = load_spec(EXAMPLES[0].parent / "demo-cpu.yaml")
    # a relative dataset becomes a file:// URI, absolute against the directory the spec is
    # read in, because trials run in other working directories
    assert spec.dataset == (tmp_path / "data" / "prepared-128").as_uri()
    assert spec.trial == {
        "backbone": "densenet121",
        "image_size": 128,
        "epochs": 3,
        "batch_size": 16,
    }
    assert (spec.resources.cpus, spec.resources.gpus) == (1, 0)
    assert (spec.search.seed, spec.search.num_samples, spec.search.max_concurrent) == (0, 4, 2)
    assert (spec.scheduler.max_t, spec.scheduler.grace_period) == (3, 1)
    assert spec.scheduler.reduction_factor == 2
    assert (spec.space["learning_rate"].low, spec.space["learning_rate"].high) == (1e-4, 3e-3)
    assert (spec.space["dropout"].low, spec.space["dropout"].high) == (0.0, 0.4)


# --- search-space dimensions --------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "yaml_dim", "domain", "sampler", "bounds", "every_value"),
    [
        (
            "learning_rate",
            "{type: loguniform, low: 1.0e-5, high: 1.0e-2}",
            Float,
            LogUniform,
            (1e-5, 1e-2),
            None,
        ),
        ("dropout", "{type: uniform, low: 0.0, high: 0.5}", Float, Uniform, (0.0, 0.5), None),
        # quniform includes high; randint excludes it
        (
            "weight_decay",
            "{type: quniform, low: 0.0, high: 0.001, q: 0.0001}",
            Float,
            Quantized,
            (0.0, 0.001),
            {round(step * 1e-4, 10) for step in range(11)},
        ),
        (
            "rotation_deg",
            "{type: randint, low: 0, high: 10}",
            Integer,
            Uniform,
            (0, 10),
            set(range(10)),
        ),
        (
            "batch_size",
            "{type: choice, values: [16, 32, 64]}",
            Categorical,
            Uniform,
            None,
            {16, 32, 64},
        ),
    ],
    ids=["loguniform", "uniform", "quniform", "randint", "choice"],
)
def test_each_dimension_type_becomes_its_ray_tune_object_and_samples_in_range(
    key: str,
    yaml_dim: str,
    domain: type,
    sampler: type,
    bounds: tuple | None,
    every_value: set | None,
) -> None:
    spec = parse_spec(HEADER + f"space:\n  {key}: {yaml_dim}\n")
    tune_object = spec.param_space()[key]
    assert isinstance(tune_object, domain)
    assert isinstance(tune_object.get_sampler(), sampler)
    drawn = tune_object.sample(size=2000, random_state=np.random.default_rng(0))
    values = [value.item() if hasattr(value, "item") else value for value in drawn]
    if bounds is not None:
        assert (tune_object.lower, tune_object.upper) == bounds
        assert all(bounds[0] <= value <= bounds[1] for value in values)
    if every_value is not None:  # a discrete dimension draws each of its values, and only those
        assert {round(v, 10) if isinstance(v, float) else v for v in values} == every_value
    if sampler is LogUniform:  # even in log space: half the draws below the geometric mean
        assert np.median(np.log10(values)) == pytest.approx(-3.5, abs=0.15)
    for value in values[:100]:  # every value drawn is one the trial accepts
        TrialConfig.from_dict({key: value})


def test_fixed_settings_come_through_as_plain_values_with_the_dataset() -> None:
    spec = parse_spec(HEADER + "  learning_rate: 1e-3\n  optimizer: sgd\n")
    # `1e-3` (no dot) is a float here, as in YAML 1.2, not the string PyYAML would give
    assert spec.trial_config_base() == {
        "epochs": 4,
        "learning_rate": 0.001,
        "optimizer": "sgd",
        "dataset": "s3://bucket/prepared/nih-64",
    }
    assert spec.param_space() == spec.trial_config_base()  # nothing searched


# --- defaults, overrides and the TPE sampler ----------------------------------------------


def test_defaults_are_filled_in_so_every_reader_sees_the_same_values() -> None:
    spec = parse_spec(HEADER)
    assert spec.mlflow.experiment == "test-sweep" and spec.model_name == "test-sweep"
    assert spec.scheduler.max_t == spec.epochs() == 4
    assert parse_spec("name: a\ndataset: s3://b/p\n").epochs() == TrialConfig.epochs
    assert (spec.metric, spec.mode, spec.max_retries, spec.checkpoints_to_keep) == (
        "val_auc_macro",
        "max",
        2,
        2,
    )


def test_to_plain_dict_is_flat_for_mlflow_params() -> None:
    spec = parse_spec(HEADER + "space:\n  dropout: {type: uniform, low: 0.0, high: 0.5}\n")
    flat = spec.to_plain_dict()
    assert flat["trial.epochs"] == 4
    assert flat["space.dropout.type"] == "uniform" and flat["space.dropout.high"] == 0.5
    assert flat["scheduler.max_t"] == 4 and flat["mlflow.experiment"] == "test-sweep"
    assert all(not isinstance(value, dict) for value in flat.values())


def test_overrides_replace_values_by_dotted_key() -> None:
    spec = parse_spec(
        HEADER, overrides={"name": "other", "search.num_samples": 8, "trial.epochs": 6}
    )
    assert (spec.name, spec.search.num_samples, spec.epochs()) == ("other", 8, 6)


def test_a_bad_override_is_named_as_an_override() -> None:
    problems = problems_of(HEADER + "scheduler:\n  max_t: 4\n", **{"trial.epochs": 2})
    assert problems == [
        "sweep.yaml line 6: scheduler.max_t 4 is more than trial.epochs 2: no trial trains past "
        "its epochs; lower max_t or raise trial.epochs"
    ]
    problems = problems_of(HEADER, **{"search.num_samples": 0})
    assert problems == [
        "sweep.yaml (override search.num_samples): search.num_samples must be "
        "greater than 0 (got 0)"
    ]


@pytest.mark.parametrize(
    ("samples", "given", "expected"), [(4, None, 1), (12, None, 4), (60, None, 10), (12, 2, 2)]
)
def test_tpe_models_after_a_third_of_a_small_sweep_unless_told(samples, given, expected) -> None:
    extra = f"search:\n  num_samples: {samples}\n" + (
        f"  startup_trials: {given}\n" if given else ""
    )
    assert parse_spec(HEADER + extra).search.tpe_startup_trials() == expected


def test_the_sweep_gives_optuna_a_seeded_tpe_sampler_with_those_startup_trials(
    tmp_path: Path,
) -> None:
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.sweeps.layout import locate
    from chestxpert.sweeps.run import _tuner_parts
    from chestxpert.sweeps.study import plan_study

    spec = parse_spec(
        HEADER + "search:\n  num_samples: 12\n  seed: 3\nspace:\n"
        "  learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
    )
    endpoints = resolve(workspace=tmp_path, storage=str(tmp_path / "storage"), environ={})
    study = plan_study(spec, endpoints.workspace, None)
    where = locate(endpoints, spec.name)
    _, tune_config, _ = _tuner_parts(spec, endpoints, where, "parent-run", study=study)
    sampler = tune_config.search_alg.searcher._sampler
    assert type(sampler).__name__ == "TPESampler"
    assert sampler._n_startup_trials == 4
    first = [sampler._random_sampler._rng.rng.random() for _ in range(3)]
    again = _tuner_parts(spec, endpoints, where, "parent-run", study=study)[1]
    assert [
        again.search_alg.searcher._sampler._random_sampler._rng.rng.random() for _ in range(3)
    ] == first


# --- storage locations and metrics --------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("prepared/nih-64", "file://{here}/prepared/nih-64"),
        ("{here}/prepared/nih-64/", "file://{here}/prepared/nih-64"),
        ("file://{here}/prepared/../prepared/nih-64", "file://{here}/prepared/nih-64"),
        ("s3://bucket/prepared/nih-64/", "s3://bucket/prepared/nih-64"),
    ],
    ids=["relative", "absolute", "file-uri", "s3"],
)
def test_dataset_and_storage_are_spelt_as_storage_uris(
    given: str, expected: str, monkeypatch, tmp_path: Path
) -> None:
    # the spelling cluster.endpoints gives every storage location, so a spec read back
    # (`sweep resume`) or compared with a flag names the same place the same way
    monkeypatch.chdir(tmp_path)
    given, expected = (text.format(here=Path.cwd()) for text in (given, expected))
    spec = parse_spec(f"name: t\ndataset: {given}\nstorage: {given}\n")
    assert spec.dataset == spec.storage == expected
    assert spec_from_dict(spec.model_dump(mode="json")) == spec


def test_a_label_auc_is_a_valid_metric() -> None:
    assert (
        parse_spec("name: t\ndataset: s3://b/p\nmetric: val_auc_Pleural_Effusion\n").mode == "max"
    )


# --- the GPU settings: shared GPUs, mixed precision as YAML writes it ---------------------


@pytest.mark.parametrize(("word", "setting"), [("on", "on"), ("off", "off"), ("auto", "auto")])
def test_mixed_precision_on_and_off_read_as_written(word: str, setting: str) -> None:
    spec = parse_spec(HEADER + f"  mixed_precision: {word}\nresources:\n  gpus: 0.5\n")
    assert TrialConfig.from_dict(spec.trial_config_base()).mixed_precision == setting
    assert spec.resources.gpus == 0.5


@pytest.mark.parametrize(
    ("setting", "gpu", "policy"),
    [
        ("on", False, "mixed_float16"),
        ("mixed_float16", False, "mixed_float16"),
        ("auto", True, "mixed_float16"),
        ("auto", False, "float32"),
        ("off", True, "float32"),
        ("bfloat16", True, "mixed_bfloat16"),
    ],
)
def test_each_mixed_precision_setting_is_one_keras_policy(
    setting: str, gpu: bool, policy: str
) -> None:
    config = TrialConfig.from_dict({"mixed_precision": setting})
    assert config.precision_policy(has_gpu=gpu) == policy


def test_a_gpu_count_above_one_must_be_whole() -> None:
    problems = problems_of(HEADER + "resources:\n  gpus: 1.5\n")
    assert problems == [
        "sweep.yaml line 6: resources.gpus: 1.5 is neither a share of one GPU (at most 1, "
        "e.g. 0.5) nor a whole number of GPUs; use 1 or 2"
    ]
    assert parse_spec(HEADER + "resources:\n  gpus: 2\n").resources.gpus == 2
