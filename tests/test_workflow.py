"""The users' whole day on a real multi-node cluster through the CLI only, against the central
MLflow as production runs it, and what must never leak.

Prepare into the S3 bucket → `sweep submit` through the Jobs API (trials visible in the
dashboard's API while running) → `sweep status` → `final` on the cluster → `pull-best` from the
bucket → `predict` with the pulled model and from the registry. Tracking goes to the central
MLflow of cluster/compose.yaml (PostgreSQL store, basic-auth login, artifacts proxied to S3).
The cluster's nodes carry fake AWS credentials and the MLflow login, as a real cluster's do
(instance profile, mounted secret). Afterwards no credential (AWS keys, MLflow logins, the
PostgreSQL password, Basic headers, the Ray token) may be in any S3 object, the MLflow
database, a CLI output, Ray's job list or logs, or a file of the workspace, Ray, MLflow or
PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.conftest import CentralMlflow, S3Endpoint, SyntheticDataset, start_cluster, stop_cluster
from tests.test_sweeps import write_spec
from tests.workflow_helpers import (
    bucket_keys,
    cli,
    found_in_places,
    found_in_trees,
    mlflow_get,
    needles_of,
    read_object,
    runs_of_experiment,
    tag,
)

pytestmark = pytest.mark.services

# Made at run time: the job uploads the chestxpert package to every node, never the keys.
FAKE_KEY_ID = "AKIA" + uuid.uuid4().hex[:16].upper()
FAKE_SECRET = "fake-secret-" + uuid.uuid4().hex


def test_submit_watch_final_pull_predict_on_the_central_mlflow_and_nothing_leaks(
    s3_endpoint: S3Endpoint,
    s3_client,
    central_mlflow: CentralMlflow,
    synthetic_dataset: SyntheticDataset,
    tmp_path: Path,
) -> None:
    name, model = "workflow", "workflow-model"
    aws = {
        **s3_endpoint.env(),
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
    }
    login = central_mlflow.login_env()
    node_login = {k: v for k, v in login.items() if k != "MLFLOW_TRACKING_URI"}
    cluster, records = start_cluster({**aws, **node_login})
    try:
        env = {
            **cluster.client_env(),
            **aws,
            **login,
            "CHESTXPERT_STORAGE": f"s3://{s3_endpoint.bucket}/{name}",
            "CHESTXPERT_WORKSPACE": str(tmp_path / "ws"),
        }
        outputs: list[subprocess.CompletedProcess] = []

        def run(*args: str) -> subprocess.CompletedProcess:
            outputs.append(cli(*args, env=env, cwd=tmp_path))
            return outputs[-1]

        dataset = f"s3://{s3_endpoint.bucket}/data/{name}-64"
        source = ["--source", "nih", "--input", str(synthetic_dataset.raw), "--split", "official"]
        run("data", "prepare", *source, "--out", dataset, "--image-size", "64")
        spec = write_spec(
            tmp_path / "spec.yaml",
            name,
            dataset,
            model_name=model,
            resources={"cpus": 1, "gpus": 1},
            search__num_samples=2,
            search__max_concurrent=2,
        )

        # --- the sweep runs as a Ray job; its trials show in the dashboard's API ---
        submitted = run("sweep", "submit", str(spec), "--address", cluster.dashboard_url)
        job_id = submitted.stdout.split("submitted ", 1)[1].split(":", 1)[0]
        ray_token = cluster.token_path.read_text().strip()
        auth = {"Authorization": f"Bearer {ray_token}"}
        job_url = f"{cluster.dashboard_url}/api/jobs/{job_id}"
        assert requests.get(job_url, timeout=10).status_code == 401
        seen_trial_actor, status = False, None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = requests.get(job_url, headers=auth, timeout=10).json()["status"]
            actors = requests.get(
                f"{cluster.dashboard_url}/api/v0/actors?limit=200", headers=auth, timeout=30
            ).text
            seen_trial_actor |= "ImplicitFunc" in actors and "ALIVE" in actors
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(2)
        logs = requests.get(f"{job_url}/logs", headers=auth, timeout=30).json()["logs"]
        assert status == "SUCCEEDED", logs[-3000:]
        assert seen_trial_actor, "no trial was visible in the dashboard's API while the job ran"

        status_json = json.loads(run("sweep", "status", name, "--json").stdout)
        assert len(status_json["trials"]) == 2
        assert status_json["summary"]["best_checkpoint"].startswith("s3://")

        # --- final on the cluster, pull-best from the bucket, predict two ways ---
        final = run("final", name, "--address", cluster.address, "--bootstrap", "100")
        assert f"registered: models:/{model}@champion" in final.stdout
        pulled = run("pull-best", name, "--final", "--to", str(tmp_path / "models"))
        model_dir = tmp_path / "models" / "model"
        assert "load_model" in pulled.stdout and (model_dir / "model.keras").exists()
        film = next(synthetic_dataset.raw.rglob("*.png"))
        predicted = run("predict", str(model_dir), str(film), "--json")
        findings = json.loads(predicted.stdout)[0]["findings"]
        assert len(findings) == 14 and all(
            f["positive"] == (f["probability"] >= f["threshold"]) for f in findings
        )
        from_registry = run("predict", f"models:/{model}@champion", str(film), "--json")
        assert json.loads(from_registry.stdout)[0]["findings"] == findings

        # --- what the run wrote to the central MLflow, read back with the client login ---
        runs = runs_of_experiment(central_mlflow, name)
        roles = {tag(r, "chestxpert.role"): r for r in runs}
        assert sorted(roles) == ["final", "sweep", "trial"]
        assert [tag(r, "chestxpert.role") for r in runs].count("trial") == 2
        assert "val_auc_macro" in {m["key"] for m in roles["trial"]["data"]["metrics"]}
        assert "test_auc_macro" in {m["key"] for m in roles["final"]["data"]["metrics"]}
        final_id = roles["final"]["info"]["run_id"]
        champion = mlflow_get(
            central_mlflow,
            "/api/2.0/mlflow/registered-models/alias",
            name=model,
            alias="champion",
        )["model_version"]
        assert champion["run_id"] == final_id
        # The store is the PostgreSQL database, the artifacts are in the bucket (proxied).
        with central_mlflow.postgres.connect() as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs")
            assert cursor.fetchone()[0] >= len(runs) >= 4
        keys = bucket_keys(s3_client, s3_endpoint.bucket)
        assert any(k.startswith("mlflow/") and final_id in k and "report" in k for k in keys)
        jobs = requests.get(f"{cluster.dashboard_url}/api/jobs/", headers=auth, timeout=30)
        assert jobs.status_code == 200 and job_id in jobs.text
    finally:
        stop_cluster(records)

    # --- no credential in anything the run wrote (the cluster is stopped: its logs are whole) ---
    needles = {
        **needles_of(central_mlflow, ray_token),
        "AWS access key id": FAKE_KEY_ID.encode(),
        "AWS secret key": FAKE_SECRET.encode(),
    }
    places = {f"S3 object {k}": read_object(s3_client, s3_endpoint.bucket, k) for k in keys}
    places["pg_dump of the MLflow database"] = central_mlflow.postgres.dump()
    for result in outputs:
        command = " ".join(result.args[1:3])
        places[f"output of chestxpert {command}"] = (result.stdout + result.stderr).encode()
    places["Ray's job list (runtime envs, entrypoints)"] = jobs.content
    places["the job's logs"] = logs.encode()
    trees = [
        tmp_path,  # the workspace, its reports and pulled models, the spec
        cluster.workspace,  # Ray's session folders and logs on all three nodes
        central_mlflow.workspace,  # the MLflow server's log, auth config and user store
        central_mlflow.postgres.root,  # PostgreSQL's data folder and log
    ]
    leaks = found_in_places(places, needles) + found_in_trees(trees, needles)
    # The search bites: the token's own file is found, and is the one place allowed to hold it.
    assert leaks == [f"Ray token in {cluster.token_path}"], "\n".join(leaks)


def test_lambda_layer_checkpoint_is_refused(tmp_path: Path) -> None:
    import keras

    from chestxpert.trainable.checkpoint import CheckpointError, load_model

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="Lambda"):
        load_model(tmp_path, compile=False)
