"""The sweep spec reference in the README and the JSON Schema in sweeps/spec.schema.json are
generated from the spec's models: they fail here when a model changed and they were not
regenerated, and the schema accepts and refuses what the model does."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from typing import Any

import jsonschema  # a dependency of Ray's
import pytest
import yaml

from chestxpert.sweeps.spec import SpecError, SweepSpec, spec_from_dict
from chestxpert.sweeps.spec import reference as spec_reference
from chestxpert.trainable.config import TrialConfig
from tests.conftest import REPO
from tests.test_spec_model import EXAMPLES

SCHEMA_FILE = REPO / "sweeps" / "spec.schema.json"
REGENERATE = f"run `{spec_reference.REGENERATE}` in the repository root and commit the result"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_readme_reference_is_the_models() -> None:
    readme = (REPO / "README.md").read_text()
    assert spec_reference.START in readme and spec_reference.END in readme
    assert spec_reference.readme_with_reference(readme) == readme, (
        f"README.md's sweep spec reference differs from the spec's models: {REGENERATE}"
    )


def test_the_schema_file_is_the_models() -> None:
    assert spec_reference.SCHEMA_FILE == SCHEMA_FILE
    assert SCHEMA_FILE.read_text() == spec_reference.schema_text(), (
        f"sweeps/spec.schema.json differs from the spec's models: {REGENERATE}"
    )


def test_the_reference_has_a_row_for_every_key() -> None:
    table = spec_reference.reference_table()
    rows = re.findall(r"^\| `([\w.]+)` \|", table, flags=re.MULTILINE)
    expected = list(SweepSpec.model_fields)
    for key, field in SweepSpec.model_fields.items():
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            expected += [f"{key}.{inner}" for inner in field.annotation.model_fields]
    expected += [item.name for item in fields(TrialConfig) if not item.name.startswith("dataset")]
    expected += ["loguniform", "uniform", "quniform", "randint", "choice"]
    assert sorted(rows) == sorted(expected)
    undescribed = re.findall(r"^\| `([\w.]+)` \|.*\|\s+\|$", table, flags=re.MULTILINE)
    assert not undescribed, f"give each a docstring under its field (or a # note): {undescribed}"
    assert "| `search.num_samples` | integer > 0 | `32` |" in table
    assert "| `learning_rate` | number | `0.001` | yes |" in table
    assert "| `epochs` | integer | `10` | no: fixed for the sweep |" in table


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_example_specs_name_the_schema_and_pass_it(
    path, validator: jsonschema.Draft202012Validator
) -> None:
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=../spec.schema.json\n")
    assert (path.parent / "../spec.schema.json").resolve() == SCHEMA_FILE
    validator.validate(yaml.safe_load(text))


BASE: dict[str, Any] = {
    "name": "ok",
    "dataset": "/data/prepared",
    "trial": {"backbone": "convnet_small", "epochs": 3},
    "space": {"learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
}


@pytest.mark.parametrize(
    "change",
    [
        {"scheduler": None, "search": None, "mlflow": None},  # empty sections: their defaults
        {"trial": {"batch_size": 32.0, "dropout": 0, "weights": None, "epochs": 3}},
        {"resources": {"cpus": 0.5, "gpus": 1}, "search": {"seed": None, "num_samples": 2}},
        {"metric": "val_auc_Pleural_Thickening"},
        {"resources": {"gpus": 0.5}, "trial": {"mixed_precision": True}},
        {"resources": {"gpus": 2}, "trial": {"mixed_precision": "bfloat16", "cpu_devices": 2}},
    ],
    ids=[
        "null-sections",
        "coerced-trial-values",
        "fractions-and-nulls",
        "label-metric",
        "shared-gpu-and-yaml-on",
        "two-gpus",
    ],
)
def test_the_schema_accepts_what_the_model_accepts(
    change: dict[str, Any], validator: jsonschema.Draft202012Validator
) -> None:
    spec = BASE | change
    spec_from_dict(spec)
    validator.validate(spec)


@pytest.mark.parametrize(
    "change",
    [
        {"schedular": {"type": "asha"}},
        {"name": "my sweep"},
        {"trial": {"learning_rte": 1e-3}},
        {"trial": {"backbone": "densenet12"}},
        {"trial": {"batch_size": "16"}},
        {"trial": {"dataset": "/elsewhere"}},
        {"space": {"epochs": {"type": "randint", "low": 1, "high": 3}}},
        {"space": {"dropout": {"type": "normal", "low": 0.0, "high": 0.5}}},
        {"space": {"dropout": {"type": "uniform", "low": 0.0}}},
        {"search": {"num_samples": 0}},
        {"search": {"algorithm": "bayes"}},
        {"resources": {"gpus": -1}},
        {"resources": {"gpus": 1.5}},
        {"scheduler": {"reduction_factor": 1}},
        {"mode": "maximize"},
    ],
    ids=lambda change: json.dumps(change),
)
def test_the_schema_refuses_what_the_model_refuses(
    change: dict[str, Any], validator: jsonschema.Draft202012Validator
) -> None:
    spec = BASE | change
    with pytest.raises(SpecError):
        spec_from_dict(spec)
    assert list(validator.iter_errors(spec)), f"the schema lets {change} through"
