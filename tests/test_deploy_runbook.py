"""The cluster runbook (cluster/README.md): every step is there, and every command in it
parses with the real `chestxpert` and `ray` command-line parsers.
"""

from __future__ import annotations

import re
import shlex

import pytest

from tests.conftest import REPO
from tests.deploy_helpers import (
    RUNBOOK,
    ray_cli_context,
)

RUNBOOK_STEPS = [
    "docker build",
    "docker push",
    "ray get-auth-token --generate",
    "file_mounts",
    "docker compose -f cluster/compose.yaml",
    "ray up cluster.yaml",
    "ray dashboard cluster.yaml",
    "http://127.0.0.1:8265",
    "RAY_AUTH_MODE=token",
    "RAY_AUTH_TOKEN_PATH",
    "MLFLOW_TRACKING_URI",
    "CHESTXPERT_STORAGE",
    "chestxpert sweep submit sweeps/examples/nih-densenet121-gpu.yaml --address http://127.0.0.1:8265",
    "--follow",
    "chestxpert sweep status nih-densenet121-224 --storage s3://",
    "chestxpert final",
    "chestxpert pull-best nih-densenet121-224 --final --to models/",
    "chestxpert predict models:/",
    "@champion",
    "ray down cluster.yaml",
    "kubectl apply -f cluster/kuberay/raycluster.yaml",
    "kubectl apply -f cluster/kuberay/rayjob.yaml",
    "## What was tested here and what was not",
]


@pytest.mark.parametrize("step", RUNBOOK_STEPS)
def test_the_runbook_has_every_step(step: str) -> None:
    assert step in RUNBOOK.read_text()


def runbook_command_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", RUNBOOK.read_text(), flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def test_every_runbook_command_parses_with_the_real_parsers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from chestxpert.cli import build_parser

    monkeypatch.chdir(REPO)  # `ray up cluster.yaml` checks that the file exists
    parsed: list[str] = []

    def check(argv: list[str]) -> None:
        if argv[0] == "chestxpert":
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit as exit_:
                pytest.fail(f"`{shlex.join(argv)}` does not parse (exit {exit_.code})")
            parsed.append(" ".join(argv[1:3]))
        elif argv[0] == "ray":
            context = ray_cli_context(argv[1:])
            parsed.append(f"ray {argv[1]}")
            if argv[1] == "exec":
                check(shlex.split(context.params["cmd"]))

    for line in runbook_command_lines():
        if line.startswith(("chestxpert ", "ray ")):
            check(shlex.split(line, comments=True))
    for expected in [
        "sweep submit",
        "sweep status",
        "sweep resume",
        "final nih-densenet121-224",
        "pull-best nih-densenet121-224",
        "predict models:/chestxpert-nih-densenet121@champion",
        "ray up",
        "ray dashboard",
        "ray exec",
        "ray down",
        "ray get-auth-token",
    ]:
        assert expected in parsed, f"the runbook runs no `{expected}` ({parsed})"
