"""No deployment file holds a credential: AWS key ids, literal secret keys, private keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.deploy_helpers import (
    CLUSTER_YAML,
    COMPOSE,
    DOCKERFILE,
    DOCKERIGNORE,
    ENV_EXAMPLE,
    RAYCLUSTER,
    RAYJOB,
    RUNBOOK,
)

DEPLOY_FILES = [
    DOCKERFILE,
    DOCKERIGNORE,
    CLUSTER_YAML,
    COMPOSE,
    ENV_EXAMPLE,
    RAYCLUSTER,
    RAYJOB,
    RUNBOOK,
]


def secrets_in(text: str) -> list[str]:
    """Credential-looking strings: AWS key ids, literal AWS secret keys, private keys."""
    found = re.findall(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", text)
    for match in re.finditer(
        r"aws_secret_access_key\s*[:=]\s*[\"']?([^\s\"']+)", text, re.IGNORECASE
    ):
        if not match.group(1).startswith("${"):
            found.append(match.group(0))
    found += re.findall(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text)
    return found


@pytest.mark.parametrize(
    "planted",
    [
        "image: x\nkey: AKIA" + "Q" * 16 + "\n",
        "[default]\naws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY\n",
        "AWS_SECRET_ACCESS_KEY: " + "abcdEFGH1234" * 3 + "\n",
        "-----BEGIN OPENSSH " + "PRIVATE KEY-----\n",
    ],
)
def test_the_secret_scan_finds_planted_credentials(planted: str) -> None:
    assert secrets_in(planted)


def test_the_secret_scan_accepts_references() -> None:
    assert secrets_in("AWS_SECRET_ACCESS_KEY: ${CHESTXPERT_S3_SECRET_KEY:?set it}\n") == []


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_deployment_file_holds_a_credential(path: Path) -> None:
    assert path.is_file(), f"{path} is missing"
    assert secrets_in(path.read_text()) == []
