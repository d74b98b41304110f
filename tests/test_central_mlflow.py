"""The central MLflow as production runs it (cluster/compose.yaml): PostgreSQL store, basic-auth
login, artifacts proxied to S3, all real processes; a sweep, its final job, pull-best and predict
against it with MLFLOW_TRACKING_USERNAME/PASSWORD, and no credential in anything the run wrote.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from tests.conftest import CentralMlflow, RayCluster, S3Endpoint
from tests.postgres_helpers import SOURCES, postgres_bin_dir, start_postgres, stop_postgres
from tests.test_sweeps import write_spec
from tests.test_workflow import cli, grep_tree

pytestmark = pytest.mark.services

SEARCH_RUNS = "/api/2.0/mlflow/runs/search"


def test_the_server_refuses_requests_without_a_valid_login(central_mlflow: CentralMlflow) -> None:
    url = f"{central_mlflow.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, timeout=30).status_code == 401
    wrong = (central_mlflow.username, central_mlflow.password + "x")
    assert requests.get(url, auth=wrong, timeout=30).status_code == 401
    login = (central_mlflow.username, central_mlflow.password)
    assert requests.get(url, auth=login, timeout=30).status_code == 200
    # The health check stays open: load balancers and compose's healthcheck have no login.
    assert requests.get(f"{central_mlflow.url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize("source", SOURCES)
def test_postgres_starts_from_each_binary_source(source: str) -> None:
    """The system's PostgreSQL and pgserver's (the dev extra's, for machines without one) both
    start, take the password login and hold a table."""
    from chestxpert.cluster.processes import free_port

    if postgres_bin_dir(source) is None:
        pytest.skip(f"no {source} PostgreSQL here")
    server = start_postgres(free_port(), "pg-password-with/@:", source)
    try:
        assert server.source == source
        connection = server.connect()
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE probe (value text); INSERT INTO probe VALUES ('kept')")
        connection.commit()
        connection.close()
        assert b"kept" in server.dump()
    finally:
        stop_postgres(server)
    assert not server.root.exists()


def needles_of(central: CentralMlflow, ray_token: str) -> dict[str, bytes]:
    """Every credential of the run, as it could appear: raw, URL-quoted, in a Basic header."""
    needles = {name: value.encode() for name, value in central.credentials.items()}
    needles["PostgreSQL password, URL-quoted"] = quote(central.postgres.password, safe="").encode()
    for user, password in (
        (central.username, central.password),
        (central.admin_username, central.admin_password),
    ):
        needles[f"Basic header of {user}"] = base64.b64encode(f"{user}:{password}".encode())
    needles["Ray token"] = ray_token.encode()
    return needles


def test_sweep_final_pull_predict_on_the_central_mlflow_and_no_credential_leaks(
    ray_cluster: RayCluster,
    s3_endpoint: S3Endpoint,
    s3_client,
    central_mlflow: CentralMlflow,
    synthetic_dataset,
    tmp_path: Path,
) -> None:
    name, model = "central", "central-model"
    env = {
        **ray_cluster.client_env(),
        **s3_endpoint.env(),
        **central_mlflow.login_env(),
        "CHESTXPERT_STORAGE": f"s3://{s3_endpoint.bucket}/central",
        "CHESTXPERT_WORKSPACE": str(tmp_path / "ws"),
    }
    outputs: list[subprocess.CompletedProcess] = []

    def run(*args: str) -> subprocess.CompletedProcess:
        outputs.append(cli(*args, env=env, cwd=tmp_path))
        return outputs[-1]

    dataset = f"s3://{s3_endpoint.bucket}/data/central-64"
    source = ["--source", "nih", "--input", str(synthetic_dataset.raw), "--split", "official"]
    run("data", "prepare", *source, "--out", dataset, "--image-size", "64")
    spec = write_spec(
        tmp_path / "spec.yaml",
        name,
        dataset,
        model_name=model,
        trial={"backbone": "convnet_small", "image_size": 64, "epochs": 1, "batch_size": 32},
        resources={"cpus": 1, "gpus": 1},
        search__num_samples=1,
        search__max_concurrent=1,
        scheduler={"type": "none"},
    )
    run("sweep", "run", str(spec))
    final = run("final", name, "--address", ray_cluster.address, "--bootstrap", "50")
    assert f"registered: models:/{model}@champion" in final.stdout
    run("pull-best", name, "--final", "--to", str(tmp_path / "models"))
    film = next(synthetic_dataset.raw.rglob("*.png"))
    predicted = run("predict", f"models:/{model}@champion", str(film), "--json")
    assert len(json.loads(predicted.stdout)[0]["findings"]) == 14

    # --- what the run wrote, read back with the client login ---
    login = (central_mlflow.username, central_mlflow.password)
    runs = requests.post(
        central_mlflow.url + SEARCH_RUNS,
        json={"experiment_ids": [experiment_id(central_mlflow, name)], "max_results": 50},
        auth=login,
        timeout=30,
    ).json()["runs"]
    roles = {tag(r, "chestxpert.role"): r for r in runs}
    assert sorted(roles) == ["final", "sweep", "trial"]
    assert "val_auc_macro" in {m["key"] for m in roles["trial"]["data"]["metrics"]}
    assert "test_auc_macro" in {m["key"] for m in roles["final"]["data"]["metrics"]}
    champion = requests.get(
        f"{central_mlflow.url}/api/2.0/mlflow/registered-models/alias",
        params={"name": model, "alias": "champion"},
        auth=login,
        timeout=30,
    ).json()["model_version"]
    assert champion["run_id"] == roles["final"]["info"]["run_id"]
    # The store is the PostgreSQL database, the artifacts are in the bucket (proxied).
    with central_mlflow.postgres.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs")
        assert cursor.fetchone()[0] >= 3
    keys = bucket_keys(s3_client, s3_endpoint.bucket)
    final_id = roles["final"]["info"]["run_id"]
    assert any(k.startswith("mlflow/") and final_id in k and "report" in k for k in keys)

    # --- no credential in anything the run wrote ---
    ray_token = ray_cluster.token_path.read_text().strip()
    needles = needles_of(central_mlflow, ray_token)
    places: dict[str, bytes] = {
        f"S3 object {k}": read_object(s3_client, s3_endpoint.bucket, k) for k in keys
    }
    places["pg_dump of the MLflow database"] = central_mlflow.postgres.dump()
    for result in outputs:
        places[f"output of chestxpert {' '.join(result.args[1:3])}"] = (
            result.stdout + result.stderr
        ).encode()
    jobs = requests.get(
        f"{ray_cluster.dashboard_url}/api/jobs/",
        headers={"Authorization": f"Bearer {ray_token}"},
        timeout=30,
    )
    assert jobs.status_code == 200
    places["Ray's job list (runtime envs, entrypoints)"] = jobs.content
    trees = [
        tmp_path,  # the workspace, its reports and pulled models, the spec
        ray_cluster.workspace,  # Ray's session folders and logs on all three nodes
        central_mlflow.workspace,  # the MLflow server's log, auth config and user store
        central_mlflow.postgres.root,  # PostgreSQL's data folder and log
    ]
    # The search bites: the token's own file is found, and is the one place allowed to hold it.
    assert grep_tree(ray_cluster.workspace, needles["Ray token"]) == [str(ray_cluster.token_path)]
    leaks = []
    for what, needle in needles.items():
        leaks += [f"{what} in {place}" for place, text in places.items() if needle in text]
        for tree in trees:
            found = grep_tree(tree, needle)
            leaks += [f"{what} in {path}" for path in found if path != str(ray_cluster.token_path)]
    assert leaks == []


def experiment_id(central: CentralMlflow, name: str) -> str:
    found = requests.get(
        f"{central.url}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": name},
        auth=(central.username, central.password),
        timeout=30,
    )
    assert found.status_code == 200, found.text
    return found.json()["experiment"]["experiment_id"]


def tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)


def bucket_keys(s3_client, bucket: str) -> list[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def read_object(s3_client, bucket: str, key: str) -> bytes:
    return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
