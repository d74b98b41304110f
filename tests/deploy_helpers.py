"""Paths and readers shared by the tests of the deployment files (tests/test_deploy_*.py):
the Dockerfile's instructions, cluster.yaml, the KubeRay manifests and Ray's own CLI parser.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CLUSTER_YAML = REPO / "cluster.yaml"
COMPOSE = REPO / "cluster" / "compose.yaml"
ENV_EXAMPLE = REPO / "cluster" / ".env.example"
RAYCLUSTER = REPO / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob.yaml"
RUNBOOK = REPO / "cluster" / "README.md"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|_KEY$", re.IGNORECASE)


def pyproject_requirement(name: str) -> Requirement:
    """The dependency `name` as pyproject.toml declares it."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(req for req in map(Requirement, deps) if req.name == name)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def load_cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_cli_context(argv: list[str]) -> Any:
    """Parse `ray ARGV...` with Ray's own click commands (nothing runs); return the context."""
    from ray.scripts.scripts import cli

    command = cli.commands[argv[0]]
    return command.make_context(argv[0], list(argv[1:]))


def kuberay_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    return None
