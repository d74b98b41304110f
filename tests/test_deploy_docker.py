"""The Dockerfile and .dockerignore: the base image and Ray pinned as pyproject.toml allows,
a non-root user, token auth, no baked credential, and a build context without local state.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex

import pytest
from packaging.version import Version

from tests.conftest import REPO
from tests.deploy_helpers import (
    DOCKERIGNORE,
    SECRET_NAME,
    dockerfile_instructions,
    load_cluster_yaml,
    pyproject_requirement,
)


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_dockerfile_base_is_the_tensorflow_gpu_image_pyproject_allows() -> None:
    froms = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) == 1, froms
    match = re.fullmatch(r"tensorflow/tensorflow:(\d+\.\d+\.\d+)-gpu", froms[0])
    assert match, f"FROM {froms[0]}: expected tensorflow/tensorflow:X.Y.Z-gpu"
    spec = pyproject_requirement("tensorflow").specifier
    assert Version(match.group(1)) in spec, (
        f"base TensorFlow {match.group(1)} is outside pyproject's {spec}"
    )


def test_dockerfile_installs_the_project_with_exactly_the_pinned_ray() -> None:
    runs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN")
    pins = re.findall(r"ray\[tune,default\]==([0-9.]+)", runs)
    assert pins, "the image must pin ray[tune,default]==X.Y.Z"
    pinned = Version(pins[0])
    assert pinned in pyproject_requirement("ray").specifier
    assert pinned == Version(importlib.metadata.version("ray")), (
        "the image's Ray differs from this virtualenv's"
    )
    install = re.search(r"pip install ([^&]*)", runs)
    assert install and " . " in f" {install.group(1)} " and "-e" not in install.group(1).split()


def dockerfile_created_user() -> tuple[str, str]:
    """(name, uid) of the user the image's `useradd` creates."""
    for keyword, args in dockerfile_instructions():
        if keyword == "RUN" and "useradd" in args:
            argv = shlex.split(re.split(r"&&|;|\|\|", args[args.index("useradd") :])[0])
            return argv[-1], argv[argv.index("--uid") + 1]
    raise AssertionError("the image creates no user")


def test_dockerfile_runs_as_the_non_root_user_1000() -> None:
    name, uid = dockerfile_created_user()
    assert (name, uid) == ("ray", "1000")
    instructions = dockerfile_instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    # The last USER wins; numeric (uid:gid) so that Kubernetes' runAsNonRoot can verify it.
    assert users and users[-1].split(":")[0] in (uid, name), users
    workdirs = [args for keyword, args in instructions if keyword == "WORKDIR"]
    assert workdirs[-1] == f"/home/{name}/chestxpert"


def test_dockerfile_environment_keeps_token_auth_and_quiet_defaults() -> None:
    env = dockerfile_env()
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2"
    # The cluster launcher places file_mounts under the image's HOME; the token path must be
    # exactly where cluster.yaml puts the token.
    assert env["HOME"] == "/home/ray"
    mounted = [
        remote for remote in load_cluster_yaml()["file_mounts"] if remote.endswith("auth_token")
    ]
    assert [remote.replace("~", env["HOME"], 1) for remote in mounted] == [
        env["RAY_AUTH_TOKEN_PATH"]
    ]
    names = [
        item.partition("=")[0]
        for keyword, args in dockerfile_instructions()
        if keyword in ("ENV", "ARG")
        for item in shlex.split(args)
    ]
    baked = [name for name in names if SECRET_NAME.search(name) and name != "RAY_AUTH_TOKEN_PATH"]
    assert baked == [], f"no credential may be baked into the image: {baked}"


def dockerignore_excludes(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context (patterns as Go's filepath.Match,
    `**` for any depth, the last matching pattern wins, an excluded folder takes its contents)."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        rules.append((re.compile(regex), negate))
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
        prefix, excluded = "/".join(parts[:depth]), False
        for regex, negate in rules:
            if regex.fullmatch(prefix):
                excluded = not negate
        if excluded:
            return True
    return False


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".chestxpert/ray_auth_token",
        ".git/HEAD",
        ".env",
        "cluster/.env",
        "cluster/.env.example",
        "data/nih/images_001/x.png",
        "mlruns/0/meta.yaml",
        "shards/train-0.parquet",
        "tests/fixtures/nih_sample/images/a.png",
        "cluster/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        "models/best/model.keras",
        "chestxpert.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert dockerignore_excludes(path)


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "LICENSE.md",
        "chestxpert/cli.py",
        "cluster/endpoints.py",
        "datasets/nih_label_rates.json",
        "sweeps/examples/nih-densenet121-gpu.yaml",
        "trainable/train.py",
        "results/report.py",
    ],
)
def test_dockerignore_keeps_what_pip_install_needs(path: str) -> None:
    assert (REPO / path).exists()
    assert not dockerignore_excludes(path)
