"""What the Makefile's housekeeping targets would run (make's own dry run): `clean` never
deletes the workspace, and deleting the workspace needs an explicit confirmation."""

from __future__ import annotations

import subprocess

from tests.conftest import REPO


def make_dry_run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-n", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=60
    )


def test_clean_leaves_the_workspace_alone() -> None:
    commands = make_dry_run("clean")
    assert commands.returncode == 0, commands.stderr
    assert "rm -rf .venv" in commands.stdout
    assert ".chestxpert" not in commands.stdout


def test_deleting_the_workspace_needs_confirmation() -> None:
    refused = subprocess.run(
        ["make", "-C", str(REPO), "clean-workspace"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0
    assert "make clean-workspace CONFIRM=yes" in refused.stdout
    confirmed = make_dry_run("clean-workspace", "CONFIRM=yes")
    assert "chestxpert down" in confirmed.stdout and "rm -rf .chestxpert" in confirmed.stdout
