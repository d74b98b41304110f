"""How sweep spec problems are reported: unknown and missing keys with suggestions, top-level
values, every problem at once in line order, YAML errors, files and recorded specs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from chestxpert.cluster.errors import UserError
from chestxpert.sweeps.spec import MAX_REPORTED, SpecError, load_spec, parse_spec, spec_from_dict
from tests.spec_helpers import HEADER, only_problem, problems_of

# --- unknown and missing keys, top-level values -------------------------------------------


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
        "sweep.yaml: missing required key 'name' (the sweep's name, "
        "e.g. `name: nih-densenet121-224`)",
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
        (
            "trial: {shard_cache: cache}",
            "sweep.yaml line 3: trial.shard_cache: shard_cache 'cache' must be an absolute "
            "folder (or ~/...), or off: trials run in other working directories, on other "
            "machines",
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
        "relative-shard-cache",
    ],
)
def test_other_top_level_mistakes(line: str, expected: str) -> None:
    assert problems_of(f"name: t\ndataset: s3://b/p\n{line}\n") == [expected]


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


# --- every problem at once; YAML, files and recorded specs --------------------------------


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


# --- values no sweep can run with, and documents no spec needs ------------------------------


def test_nan_and_infinite_numbers_are_refused_where_they_stand() -> None:
    problems = problems_of(
        HEADER
        + "  learning_rate: .nan\n"
        + "space:\n  weight_decay: {type: loguniform, low: .nan, high: 1.0e-3}\n"
        + "search:\n  time_budget_s: .inf\n"
    )
    assert problems == [
        "sweep.yaml line 5: trial.learning_rate: learning_rate must be a finite number, got nan",
        "sweep.yaml line 7: space.weight_decay.low must be a finite number (got nan)",
        "sweep.yaml line 9: search.time_budget_s must be a finite number (got inf)",
    ]


def test_an_alias_bomb_is_refused_before_it_expands() -> None:
    """Nine aliases of nine aliases, twelve deep, would expand to 9**12 values."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    with pytest.raises(SpecError) as raised:
        parse_spec(HEADER + "\n".join(lines) + "\n", source="sweep.yaml")
    assert str(raised.value).startswith(
        "sweep.yaml: the YAML expands to more than 10,000 values through anchors and aliases"
    )


def test_an_anchor_used_a_few_times_is_fine() -> None:
    spec = parse_spec(
        HEADER + "  dropout: &low 0.001\nsearch:\n  points_to_evaluate:\n"
        "    - {learning_rate: *low}\nspace:\n"
        "  learning_rate: {type: loguniform, low: *low, high: 1.0e-2}\n"
    )
    assert spec.search.points_to_evaluate == [{"learning_rate": 0.001}]
    assert spec.trial["dropout"] == 0.001
