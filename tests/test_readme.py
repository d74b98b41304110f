"""The README is the user's manual: its commands run, and every command it lists exists.

Blocks run here: datasets and training (verbatim, in a scratch folder). The
stack commands run in test_cluster (with free ports instead of the defaults),
`make demo` in test_demo, sweeps in test_sweeps.
"""

from __future__ import annotations

import re
import shlex
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
    # what later steps read, made by these (test_each_step_uses_what_an_earlier_step_made)
    for argv in readme_commands():
        if argv[:2] == ["data", "prepare"]:
            out = argv[argv.index("--out") + 1]
            assert (tmp_path / out / "manifest.json").exists(), out
        if argv[0] == "predict":
            for image in argv[2:]:
                assert (tmp_path / image).is_file(), image
    checkpoints = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir())
    assert checkpoints[-1] == "checkpoint_0003", checkpoints


def readme_commands() -> list[list[str]]:
    """Every `chestxpert` command in the README's bash blocks, in reading order, as its
    arguments (`.venv/bin/chestxpert data synth --out X` → `["data", "synth", "--out", "X"]`),
    options' values after the first `--option` dropped for `predict`."""
    found = []
    for lang, body in BLOCKS:
        for line in body.splitlines() if lang == "bash" else []:
            argv = shlex.split(line, comments=True)
            if argv and argv[0] in (".venv/bin/chestxpert", "chestxpert"):
                found.append(argv[1:])
    return [
        argv[: next((i for i, a in enumerate(argv) if a.startswith("--")), len(argv))]
        if argv[0] == "predict"
        else argv
        for argv in found
    ]


def test_each_step_uses_what_an_earlier_step_made() -> None:
    """Read top to bottom, the README never uses a dataset, film or sweep that no earlier step
    made: every command parses, every local dataset it reads (`--input`, `--dataset`, a train
    config's or a sweep spec's `dataset`) was written by an earlier `--out`, and every sweep it
    names was started by an earlier `sweep run` or `sweep submit`. Datasets in S3 (the cluster
    section) are made by cluster/README.md's first step."""
    from chestxpert.cli import build_parser

    configs = {
        body.split(":", 1)[0].lstrip("# "): yaml.safe_load(body)
        for lang, body in BLOCKS
        if lang == "yaml" and body.startswith("# ")
    }
    made: list[str] = []
    sweeps: set[str] = set()
    parser = build_parser()

    def made_earlier(path: str, by: list[str]) -> None:
        if "://" not in path:
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in made), (
                f"`chestxpert {shlex.join(by)}` reads {path}, which no earlier README step makes"
            )

    for argv in readme_commands():
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            pytest.fail(f"`chestxpert {shlex.join(argv)}` does not parse (exit {exit_.code})")
        command = " ".join(argv[:2]) if argv[0] in ("data", "sweep") else argv[0]
        for flag in ("--input", "--dataset"):
            if flag in argv:
                made_earlier(argv[argv.index(flag) + 1], argv)
        if command == "train":
            made_earlier(configs[argv[1]]["dataset"], argv)
        elif command in ("sweep run", "sweep submit"):
            spec = yaml.safe_load((REPO / argv[2]).read_text())
            made_earlier(spec["dataset"], argv)
            sweeps.add(spec["name"])
        elif command in ("sweep status", "sweep report", "sweep resume", "final", "pull-best"):
            name = argv[2] if argv[0] == "sweep" else argv[1]
            assert name in sweeps, f"`chestxpert {shlex.join(argv)}`: no earlier step runs {name}"
        elif command == "predict":
            for image in argv[2:]:
                made_earlier(image, argv)
        for flag in ("--out", "--to"):
            if flag in argv:
                made.append(argv[argv.index(flag) + 1])
    assert "data/prepared-128" in made and {"demo-cpu", "nih-densenet121-224"} <= sweeps


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
