"""The sweep spec: example specs load, dimensions become the right Ray Tune objects, and every
mistake a user can make is reported at its YAML line with a suggestion, before anything starts."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized, Uniform

from chestxpert.cluster.errors import UserError
from chestxpert.sweeps.spec import (
    MAX_REPORTED,
    SpecError,
    SweepSpec,
    load_spec,
    parse_spec,
    spec_from_dict,
)
from chestxpert.trainable.config import TrialConfig

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "sweeps" / "examples").glob("*.yaml"))

# Four lines, so a `space:` block appended to it starts on line 5 and its first key on line 6.
HEADER = """\
name: test-sweep
dataset: s3://bucket/prepared/nih-64
trial:
  epochs: 4
"""


def problems_of(text: str, **overrides) -> list[str]:
    """The problems parse_spec reports for `text` (read as sweep.yaml), one string each."""
    with pytest.raises(SpecError) as caught:
        parse_spec(textwrap.dedent(text), source="sweep.yaml", overrides=overrides or None)
    return caught.value.problems


def only_problem(text: str) -> str:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


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
        assert (spec.resources.gpus, spec.resources.cpus) == (1, 8)
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
    assert spec.dataset == (tmp_path / ".chestxpert" / "data" / "synth-128").as_uri()
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

    spec = parse_spec(
        HEADER + "search:\n  num_samples: 12\n  seed: 3\nspace:\n"
        "  learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
    )
    endpoints = resolve(workspace=tmp_path, storage=str(tmp_path / "storage"), environ={})
    _, tune_config, _ = _tuner_parts(spec, endpoints, locate(endpoints, spec.name), "parent-run")
    sampler = tune_config.search_alg.searcher._sampler
    assert type(sampler).__name__ == "TPESampler"
    assert sampler._n_startup_trials == 4
    first = [sampler._random_sampler._rng.rng.random() for _ in range(3)]
    again = _tuner_parts(spec, endpoints, locate(endpoints, spec.name), "parent-run")[1]
    assert [
        again.search_alg.searcher._sampler._random_sampler._rng.rng.random() for _ in range(3)
    ] == first


# --- mistakes, each at its line with a suggestion -----------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: t\ndataset: s3://b/p\nschedular:\n  type: asha\n",
            "sweep.yaml line 3: unknown key 'schedular'; did you mean 'scheduler'?",
        ),
        (
            "name: t\ndataset: s3://b/p\nserach: {num_samples: 3}\n",
            "sweep.yaml line 3: unknown key 'serach'; did you mean 'search'?",
        ),
        (
            "name: t\ndataset: s3://b/p\nscheduler:\n  grace: 1\n",
            "sweep.yaml line 4: unknown key 'grace' in scheduler; did you mean 'grace_period'?",
        ),
        (
            "name: t\ndataset: s3://b/p\nresources:\n  gpu: 1\n",
            "sweep.yaml line 4: unknown key 'gpu' in resources; did you mean 'gpus'?",
        ),
        (
            "name: t\ndataset: s3://b/p\nspace:\n  dropout:\n    type: uniform\n    lo: 0.0\n"
            "    high: 0.5\n",
            "sweep.yaml line 6: unknown key 'lo' in space.dropout; did you mean 'low'?",
        ),
    ],
    ids=["top-level", "top-level-2", "scheduler", "resources", "dimension"],
)
def test_unknown_keys_are_named_with_line_and_suggestion(text: str, expected: str) -> None:
    assert expected in problems_of(text)


def test_a_space_key_that_is_not_a_trial_setting() -> None:
    text = HEADER + textwrap.dedent("""\
        space:
          dropout: {type: uniform, low: 0.0, high: 0.5}
          learnig_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-2}
        """)
    assert only_problem(text) == (
        "sweep.yaml line 7: space key 'learnig_rate' is not a trial setting; "
        "did you mean 'learning_rate'?"
    )


def test_a_trial_key_that_is_not_a_trial_setting() -> None:
    assert only_problem(HEADER + "  dropuot: 0.3\n") == (
        "sweep.yaml line 5: trial key 'dropuot' is not a trial setting; did you mean 'dropout'?"
    )


@pytest.mark.parametrize(
    ("dimension", "expected"),
    [
        (
            "learning_rate: {type: loguniform, low: 1.0e-2, high: 1.0e-3}",
            "space.learning_rate: low must be < high (got 0.01 >= 0.001)",
        ),
        (
            "learning_rate: {type: loguniform, low: 0.0, high: 1.0e-3}",
            "space.learning_rate: loguniform needs low > 0 (got 0.0); use uniform or quniform",
        ),
        (
            "dropout: {type: uniform, low: 0.0, high: 1.0}",
            "space.dropout high: dropout must be in [0, 1), got 1.0",
        ),
        (
            "weight_decay: {type: uniform, low: -0.1, high: 0.1}",
            "space.weight_decay low: weight_decay must be >= 0, got -0.1",
        ),
        (
            "batch_size: {type: randint, low: 0, high: 64}",
            "space.batch_size low: batch_size must be > 0, got 0",
        ),
        (
            "batch_size: {type: uniform, low: 8, high: 64}",
            "space.batch_size: batch_size is a whole number; search it with randint, choice or "
            "quniform with a whole q, not uniform",
        ),
        (
            "batch_size: {type: quniform, low: 8, high: 64, q: 2.5}",
            "space.batch_size: batch_size is a whole number, so low, high and q must be whole "
            "numbers (got low 8, high 64, q 2.5)",
        ),
        (
            "weight_decay: {type: quniform, low: 0.00005, high: 0.001, q: 0.0001}",
            "space.weight_decay: low must be a multiple of q 0.0001 (got low 5e-05, high 0.001)",
        ),
        (
            "weight_decay: {type: quniform, low: 0.0, high: 0.001, q: 0}",
            "space.weight_decay: q must be > 0 (got 0.0)",
        ),
        (
            "rotation_deg: {type: randint, low: 5, high: 5}",
            "space.rotation_deg: low must be < high (high is exclusive) (got 5 >= 5)",
        ),
        (
            "rotation_deg: {type: randint, low: 0, high: 10.5}",
            "space.rotation_deg.high must be a valid integer (got 10.5)",
        ),
        (
            "optimizer: {type: uniform, low: 0, high: 1}",
            "space.optimizer: optimizer is a text setting, so it is searched with "
            "{type: choice, values: [...]}, not uniform",
        ),
        (
            "epochs: {type: randint, low: 2, high: 10}",
            "space.epochs: epochs is every trial's training budget",
        ),
        (
            "dataset: {type: choice, values: [a, b]}",
            "space.dataset: dataset is the sweep's prepared dataset; set it with the top-level",
        ),
        (
            "zoom: {type: logunifrom, low: 0.1, high: 0.2}",
            "space.zoom: type 'logunifrom' is not one of loguniform, uniform, quniform, randint, "
            "choice; did you mean 'loguniform'?",
        ),
        ("zoom: {type: uniform, low: 0.1}", "space.zoom: uniform needs 'high'"),
    ],
    ids=[
        "lo>=hi",
        "log-zero",
        "dropout-1",
        "negative",
        "batch-0",
        "int-uniform",
        "int-grid",
        "off-grid",
        "q-zero",
        "empty-randint",
        "float-randint",
        "text-range",
        "epochs",
        "dataset",
        "type-typo",
        "missing-high",
    ],
)
def test_impossible_ranges_are_refused_at_their_line(dimension: str, expected: str) -> None:
    problem = only_problem(
        HEADER + f"space:\n  shift: {{type: uniform, low: 0, high: 0.1}}\n  {dimension}\n"
    )
    assert problem.startswith("sweep.yaml line 7: ")
    assert expected in problem


@pytest.mark.parametrize(
    ("key", "values", "expected"),
    [
        (
            "optimizer",
            "[adam, rmsprop]",
            "space.optimizer: optimizer 'rmsprop' is not one of adam, adamw, sgd",
        ),
        (
            "loss",
            "[focal, hinge]",
            "space.loss: loss 'hinge' is not one of weighted_bce, bce, focal",
        ),
        ("batch_size", "[16, 0]", "space.batch_size: batch_size must be > 0, got 0"),
        ("augment", "[true, 'no']", "space.augment: augment must be true or false, got 'no'"),
        ("batch_size", "[16, 16]", "space.batch_size: value 16 is listed twice"),
        ("dropout", "[]", "space.dropout: choice needs at least one value"),
    ],
    ids=["optimizer", "loss", "batch-size", "bool", "duplicate", "empty"],
)
def test_illegal_choice_values_are_named(key: str, values: str, expected: str) -> None:
    assert only_problem(HEADER + f"space:\n  {key}: {{type: choice, values: {values}}}\n") == (
        f"sweep.yaml line 6: {expected}"
    )


def test_an_unknown_backbone_in_a_choice_gets_the_closest_registered_name() -> None:
    problem = only_problem(
        HEADER + "space:\n  backbone: {type: choice, values: [densenet121, densnet169]}\n"
    )
    assert problem.startswith(
        "sweep.yaml line 6: space.backbone: backbone 'densnet169' is not registered; "
        "did you mean 'densenet169'?"
    )
    assert "densenet_tiny" in problem  # the known names are listed


def test_an_unknown_fixed_backbone_is_refused_too() -> None:
    assert only_problem(HEADER + "  backbone: DenseNet121\n").startswith(
        "sweep.yaml line 5: trial.backbone: backbone 'DenseNet121' is not registered; "
        "did you mean 'densenet121'?"
    )


def test_an_image_size_below_the_backbones_minimum_is_refused() -> None:
    problem = only_problem(HEADER + "  image_size: 16\n")
    assert (
        problem
        == "sweep.yaml line 5: trial.image_size: densenet121 needs images of at least 32 px, got 16"
    )


def test_a_key_in_both_trial_and_space_says_which_to_remove() -> None:
    text = HEADER + "  dropout: 0.2\nspace:\n  dropout: {type: uniform, low: 0.0, high: 0.5}\n"
    assert only_problem(text) == (
        "sweep.yaml line 7: dropout is set in both trial (0.2) and space: remove it from trial "
        "to search it, or from space to keep it fixed"
    )


@pytest.mark.parametrize(
    ("trial_epochs", "scheduler", "expected"),
    [
        (
            "  epochs: 20\n",
            "  max_t: 30\n",
            "sweep.yaml line 7: scheduler.max_t 30 is more than trial.epochs 20",
        ),
        (
            "",
            "  max_t: 30\n",
            "sweep.yaml line 6: scheduler.max_t 30 is more than the default trial.epochs 10",
        ),
        (
            "  epochs: 20\n",
            "  max_t: 5\n  grace_period: 5\n",
            "sweep.yaml line 8: scheduler.grace_period must be < max_t 5 (got 5)",
        ),
        (
            "  epochs: 3\n",
            "  grace_period: 3\n",
            "sweep.yaml line 7: scheduler.grace_period must be < max_t 3 (trial.epochs) (got 3)",
        ),
        # `scheduler:` left empty: the default grace period 1 leaves no room in 1 epoch
        (
            "  epochs: 1\n",
            "",
            "sweep.yaml line 6: scheduler.grace_period must be < max_t 1 (trial.epochs) (got 1)",
        ),
    ],
    ids=["max_t>epochs", "max_t>default", "grace=max_t", "grace=epochs", "default-grace"],
)
def test_the_scheduler_must_fit_the_trials_epochs(
    trial_epochs: str, scheduler: str, expected: str
) -> None:
    text = (
        f"name: t\ndataset: s3://b/p\ntrial:\n{trial_epochs}  dropout: 0.1\nscheduler:\n{scheduler}"
    )
    assert only_problem(text).startswith(expected)


def test_a_default_scheduler_problem_points_at_the_epochs_line() -> None:
    assert only_problem("name: t\ndataset: s3://b/p\ntrial:\n  epochs: 1\n").startswith(
        "sweep.yaml line 4: scheduler.grace_period must be < max_t 1 (trial.epochs) (got 1)"
    )


def test_without_asha_the_epochs_need_no_room() -> None:
    spec = parse_spec("name: t\ndataset: s3://b/p\ntrial: {epochs: 1}\nscheduler: {type: none}\n")
    assert spec.scheduler.type == "none" and spec.epochs() == 1


SPACE_FOR_POINTS = HEADER + textwrap.dedent("""\
    space:
      learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
      rotation_deg: {type: randint, low: 0, high: 10}
      weight_decay: {type: quniform, low: 0.0, high: 0.001, q: 0.0001}
      batch_size: {type: choice, values: [16, 32]}
    search:
      points_to_evaluate:
        - learning_rate: 1.0e-3
    """)  # line 12 is the point's first key, a following key is on line 13


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "dropout: 0.1",
            "search.points_to_evaluate[0]: 'dropout' is not in space; a starting "
            "point sets searched keys only (add dropout to space or drop it from "
            "the point)",
        ),
        (
            "learnig_rate: 0.001",
            "search.points_to_evaluate[0]: 'learnig_rate' is not a "
            "search-space key; did you mean 'learning_rate'?",
        ),
        (
            "rotation_deg: 10",
            "search.points_to_evaluate[0].rotation_deg: 10 is outside [0, 10) "
            "(randint's high is exclusive)",
        ),
        (
            "batch_size: 64",
            "search.points_to_evaluate[0].batch_size: 64 is not one of the choices [16, 32]",
        ),
        (
            "weight_decay: 0.00015",
            "search.points_to_evaluate[0].weight_decay: 0.00015 is not a multiple of q 0.0001",
        ),
        (
            "learning_rate: 0.5",
            "search.points_to_evaluate[0].learning_rate: 0.5 is outside [0.0001, 0.01]",
        ),
    ],
    ids=["not-in-space", "typo", "randint-high", "not-a-choice", "off-grid", "out-of-range"],
)
def test_starting_points_must_lie_in_the_space(entry: str, expected: str) -> None:
    text = SPACE_FOR_POINTS
    if entry.startswith("learning_rate"):
        text = text.replace("- learning_rate: 1.0e-3", f"- {entry}")
        line = 12
    else:
        text += f"      {entry}\n"
        line = 13
    assert only_problem(text) == f"sweep.yaml line {line}: {expected}"


def test_starting_points_inside_the_space_pass() -> None:
    spec = parse_spec(SPACE_FOR_POINTS + "      rotation_deg: 9\n      batch_size: 32\n")
    assert spec.search.points_to_evaluate == [
        {"learning_rate": 0.001, "rotation_deg": 9, "batch_size": 32}
    ]


def test_more_starting_points_than_trials_is_refused() -> None:
    text = HEADER + textwrap.dedent("""\
        space:
          dropout: {type: uniform, low: 0.0, high: 0.5}
        search:
          num_samples: 1
          points_to_evaluate: [{dropout: 0.1}, {dropout: 0.2}]
        """)
    assert only_problem(text).startswith(
        "sweep.yaml line 9: search.points_to_evaluate has 2 points but num_samples is 1"
    )


@pytest.mark.parametrize(
    ("name", "suggested"),
    [("my sweep!", "my-sweep"), ("nih/densenet", "nih-densenet"), ("-leading", "leading")],
)
def test_a_name_that_cannot_be_a_folder_name(name: str, suggested: str) -> None:
    problem = only_problem(f"dataset: s3://b/p\nname: '{name}'\n")
    assert problem.startswith(f"sweep.yaml line 2: name {name!r} may only hold letters, digits")
    assert problem.endswith(f"try {suggested!r}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "dataset: s3://b/p\n",
            "sweep.yaml: missing required key 'name' (the sweep's name, "
            "e.g. `name: nih-densenet121-224`)",
        ),
        ("name: t\n", "sweep.yaml: missing required key 'dataset' (a prepared dataset"),
        ("", "sweep.yaml: missing required key 'name'"),
    ],
    ids=["name", "dataset", "empty-file"],
)
def test_missing_required_keys(text: str, expected: str) -> None:
    assert any(problem.startswith(expected) for problem in problems_of(text))


def test_a_misspelt_required_key_gets_both_the_suggestion_and_the_missing_key() -> None:
    problems = problems_of("nmae: t\ndataset: s3://b/p\n")
    assert problems == [
        "sweep.yaml: missing required key 'name' (the sweep's name, e.g. `name: nih-densenet121-224`)",
        "sweep.yaml line 1: unknown key 'nmae'; did you mean 'name'?",
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "metric: val_auc_marco",
            "sweep.yaml line 3: metric 'val_auc_marco' is not one trials "
            "report; did you mean 'val_auc_macro'?",
        ),
        (
            "metric: val_loss",
            "sweep.yaml line 3: mode 'max' would pick the worst trial: val_loss "
            "is better when lower; use mode: min",
        ),
        (
            "mode: maximum",
            "sweep.yaml line 3: mode 'maximum' is not one of max, min; did you mean 'max'?",
        ),
        (
            "storage: s3:///no-bucket",
            "sweep.yaml line 3: storage 's3:///no-bucket' names no "
            "bucket; expected s3://BUCKET/PREFIX",
        ),
        (
            "max_retries: -1",
            "sweep.yaml line 3: max_retries must be greater than or equal to 0 (got -1)",
        ),
        (
            "resources: {cpus: 0}",
            "sweep.yaml line 3: resources.cpus must be greater than 0 (got 0)",
        ),
        (
            "search: {algorithm: hyperopt}",
            "sweep.yaml line 3: search.algorithm 'hyperopt' is not one of optuna, random",
        ),
        (
            "scheduler: asha",
            "sweep.yaml line 3: scheduler must be a mapping of key: value, got 'asha'",
        ),
    ],
    ids=[
        "metric-typo",
        "mode-vs-metric",
        "mode",
        "storage",
        "retries",
        "cpus",
        "algorithm",
        "section-not-mapping",
    ],
)
def test_other_top_level_mistakes(line: str, expected: str) -> None:
    assert problems_of(f"name: t\ndataset: s3://b/p\n{line}\n") == [expected]


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


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "gs://b/p",
            "dataset 'gs://b/p' has scheme 'gs'; expected a local folder, file:// or s3://",
        ),
        ("s3://", "dataset 's3://' names no bucket; expected s3://BUCKET/PREFIX"),
        ("' '", "dataset is blank; give a local folder or an s3://bucket/prefix URI"),
    ],
    ids=["other-scheme", "no-bucket", "blank"],
)
def test_a_dataset_that_is_neither_a_folder_nor_an_s3_uri(value: str, expected: str) -> None:
    assert problems_of(f"name: t\ndataset: {value}\n") == [f"sweep.yaml line 2: {expected}"]


def test_a_label_auc_is_a_valid_metric() -> None:
    assert (
        parse_spec("name: t\ndataset: s3://b/p\nmetric: val_auc_Pleural_Effusion\n").mode == "max"
    )


def test_dataset_under_trial_is_refused() -> None:
    assert only_problem(HEADER + "  dataset: s3://b/other\n") == (
        "sweep.yaml line 5: trial.dataset: set the dataset with the top-level `dataset` key"
    )


def test_all_problems_are_reported_together_in_line_order() -> None:
    text = textwrap.dedent("""\
        name: t
        dataset: s3://b/p
        trial:
          epochs: 5
          dropout: 1.5
        space:
          learnig_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-2}
          optimizer: {type: choice, values: [adam, rmsprop]}
        schedular: {type: asha}
        """)
    with pytest.raises(SpecError) as caught:
        parse_spec(text, source="sweep.yaml")
    lines = str(caught.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "sweep.yaml line 5",
        "sweep.yaml line 7",
        "sweep.yaml line 8",
        "sweep.yaml line 9",
    ]
    assert "trial.dropout: dropout must be in [0, 1), got 1.5" in lines[0]


def test_a_broken_dimension_does_not_hide_the_others() -> None:
    text = HEADER + textwrap.dedent("""\
        space:
          zoom: {type: uniform, low: 0.1}
          dropout: {type: uniform, low: 0.0, high: 1.0}
        """)
    assert problems_of(text) == [
        "sweep.yaml line 6: space.zoom: uniform needs 'high'",
        "sweep.yaml line 7: space.dropout high: dropout must be in [0, 1), got 1.0",
    ]


def test_at_most_ten_problems_are_shown_and_the_rest_counted() -> None:
    keys = "".join(f"  setting{i}: 1\n" for i in range(MAX_REPORTED + 3))
    with pytest.raises(SpecError) as caught:
        parse_spec("name: t\ndataset: s3://b/p\ntrial:\n" + keys, source="sweep.yaml")
    lines = str(caught.value).splitlines()
    assert len(lines) == MAX_REPORTED + 1
    assert lines[-1] == "... and 3 more; fix these first"
    assert len(caught.value.problems) == MAX_REPORTED + 3


def test_invalid_yaml_is_reported_at_its_line() -> None:
    with pytest.raises(SpecError, match=r"^sweep\.yaml line 3: not valid YAML: mapping values"):
        parse_spec("name: t\ndataset: s3://b/p\nmetric: val: loss\n", source="sweep.yaml")


def test_a_duplicate_key_is_reported_with_both_lines() -> None:
    assert problems_of("name: t\ndataset: s3://b/p\nname: u\n") == [
        "sweep.yaml line 3: duplicate key 'name' (first on line 1); keep one"
    ]


def test_a_spec_that_is_not_a_mapping() -> None:
    with pytest.raises(SpecError, match="expected a mapping of spec keys"):
        parse_spec("- name: t\n", source="sweep.yaml")


def test_load_spec_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("name: t\ndataset: s3://b/p\nschedular: {}\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == f"{path} line 3: unknown key 'schedular'; did you mean 'scheduler'?"
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")


def test_a_recorded_spec_is_validated_with_the_same_messages() -> None:
    recorded = parse_spec(HEADER).model_dump(mode="json")
    assert spec_from_dict(recorded) == parse_spec(HEADER)
    recorded["scheduler"]["max_t"] = 9
    with pytest.raises(SpecError) as caught:
        spec_from_dict(recorded, source="recorded spec")
    assert str(caught.value).startswith(
        "recorded spec: scheduler.max_t 9 is more than trial.epochs 4"
    )


def test_spec_errors_are_user_errors() -> None:
    # the CLI prints a UserError as its message, without a traceback
    assert issubclass(SpecError, UserError) and issubclass(SpecError, ValueError)
