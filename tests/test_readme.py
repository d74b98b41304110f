"""The README is the user's manual: its commands run, and every command it lists exists.

Blocks run here: datasets and training (verbatim, in a scratch folder). The
stack commands run in test_cluster (with free ports instead of the defaults),
`make demo` in test_demo, sweeps in test_sweeps.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import CHESTXPERT_CLI, REPO

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.DOTALL)


def commands(block: str) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith(".venv/bin/chestxpert")]


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = command.split()
    result = subprocess.run(
        [CHESTXPERT_CLI, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def test_readme_opens_with_the_two_commands() -> None:
    first_block = BLOCKS[0][1]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == [
        "make demo",
        "make test",
    ]


def test_dataset_and_training_blocks_run_verbatim(tmp_path: Path) -> None:
    data_block = next(body for lang, body in BLOCKS if lang == "bash" and "data synth" in body)
    train_yaml = next(
        body for lang, body in BLOCKS if lang == "yaml" and body.startswith("# tiny.yaml")
    )
    train_block = next(
        body for lang, body in BLOCKS if lang == "bash" and "chestxpert train" in body
    )
    (tmp_path / "tiny.yaml").write_text(train_yaml)
    for command in commands(data_block) + commands(train_block):
        run(command, tmp_path)
    assert (tmp_path / "data" / "prepared-64" / "manifest.json").exists()
    # the sweep example trains on what the Datasets steps made
    from chestxpert.sweeps.spec import load_spec

    demo_dataset = load_spec(REPO / "sweeps" / "examples" / "demo-cpu.yaml").dataset
    assert (tmp_path / "data" / "prepared-128" / "manifest.json").exists()
    relative = yaml.safe_load((REPO / "sweeps/examples/demo-cpu.yaml").read_text())["dataset"]
    assert relative == "data/prepared-128" and demo_dataset.endswith("/data/prepared-128")
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert checkpoints[-1] == "checkpoint_0003", checkpoints


@pytest.mark.parametrize(
    "command",
    sorted(set(re.findall(r"`chestxpert ((?:data |sweep )?[a-z][a-z-]*)", README))),
)
def test_every_listed_command_exists(command: str) -> None:
    result = subprocess.run(
        [CHESTXPERT_CLI, *command.split(), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"chestxpert {command}: {result.stderr[-1000:]}"
