"""What the end-to-end workflow test reads back: the CLI run as users run it, the central
MLflow's runs through its REST API with the client login, the bucket, and the search for every
credential in every place the run wrote.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from urllib.parse import quote

import requests

from tests.conftest import CHESTXPERT_CLI, CentralMlflow


def cli(*args: str, env: dict, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """`chestxpert ARGS…` as a user runs it; fails the test, with its output, unless it succeeds."""
    result = subprocess.run(
        [CHESTXPERT_CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"chestxpert {' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def needles_of(central: CentralMlflow, ray_token: str) -> dict[str, bytes]:
    """Every credential of the central MLflow and the Ray token, as it could appear: raw,
    URL-quoted (the PostgreSQL password in a store URI), in a Basic header."""
    needles = {name: value.encode() for name, value in central.credentials.items()}
    needles["PostgreSQL password, URL-quoted"] = quote(central.postgres.password, safe="").encode()
    for user, password in (
        (central.username, central.password),
        (central.admin_username, central.admin_password),
    ):
        needles[f"Basic header of {user}"] = base64.b64encode(f"{user}:{password}".encode())
    needles["Ray token"] = ray_token.encode()
    return needles


def found_in_trees(trees: list[Path], needles: dict[str, bytes]) -> list[str]:
    """`"<needle's name> in <file>"` for every needle in every regular file under `trees`;
    each file is read once, whatever the number of needles."""
    hits = []
    for tree in trees:
        for path in tree.rglob("*"):
            try:
                if not path.is_file() or path.is_symlink():
                    continue
                text = path.read_bytes()
            except OSError:  # a file a live server removed while we walked
                continue
            hits += [f"{what} in {path}" for what, needle in needles.items() if needle in text]
    return hits


def found_in_places(places: dict[str, bytes], needles: dict[str, bytes]) -> list[str]:
    """`"<needle's name> in <place>"` for every needle in every named text."""
    return [
        f"{what} in {place}"
        for place, text in places.items()
        for what, needle in needles.items()
        if needle in text
    ]


def mlflow_get(central: CentralMlflow, path: str, **params: str) -> dict:
    """GET a REST path of the central MLflow with the client login; it must answer 200."""
    answer = requests.get(
        central.url + path, params=params, auth=(central.username, central.password), timeout=30
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def runs_of_experiment(central: CentralMlflow, name: str) -> list[dict]:
    """Every run of experiment `name` (a sweep's), with its tags and metrics."""
    get_by_name = "/api/2.0/mlflow/experiments/get-by-name"
    experiment = mlflow_get(central, get_by_name, experiment_name=name)
    searched = requests.post(
        central.url + "/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment["experiment"]["experiment_id"]], "max_results": 50},
        auth=(central.username, central.password),
        timeout=30,
    )
    assert searched.status_code == 200, searched.text
    return searched.json()["runs"]


def tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)


def bucket_keys(s3_client, bucket: str) -> list[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def read_object(s3_client, bucket: str, key: str) -> bytes:
    return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
