"""Sweep spec mistakes in what trials run: trial settings, search-space ranges and choices,
the scheduler against the epochs, and starting points, each at its YAML line."""

from __future__ import annotations

import textwrap

import pytest

from chestxpert.sweeps.spec import parse_spec
from tests.spec_helpers import HEADER, only_problem

# --- trial settings and search-space dimensions -------------------------------------------


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


def test_dataset_under_trial_is_refused() -> None:
    assert only_problem(HEADER + "  dataset: s3://b/other\n") == (
        "sweep.yaml line 5: trial.dataset: set the dataset with the top-level `dataset` key"
    )


def test_dataset_generation_is_the_sweeps_choice_not_the_specs() -> None:
    assert only_problem(HEADER + "  dataset_generation: 0123abcd0123abcd\n") == (
        "sweep.yaml line 5: trial.dataset_generation: the sweep reads the dataset's version when "
        "it starts and every trial keeps it; leave this key out"
    )
    space = "space:\n  dataset_generation: {type: choice, values: [a, b]}\n"
    assert only_problem(HEADER + space) == (
        "sweep.yaml line 6: space.dataset_generation: dataset_generation is chosen by the sweep: "
        "the dataset's version when the sweep starts"
    )
