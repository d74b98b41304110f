"""The users' whole day on a real multi-node cluster through the CLI only, and what must never leak.

Synthetic data → prepare into the S3 bucket → `sweep submit` through the Jobs API
(trials visible in the dashboard's API while running) → `sweep status` → `final`
on the cluster → `pull-best` from the bucket → `predict` with the pulled model.
The cluster's nodes, the driver and the servers carry fake AWS credentials; after
the run no log, MLflow param or tag, stored file or report may contain them.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from chestxpert.cluster.processes import free_port, stop_group
from chestxpert.cluster.stack import StackOptions, start_mlflow
from tests.conftest import CHESTXPERT_CLI, short_tmpdir, start_cluster, stop_cluster

pytestmark = pytest.mark.services

# Made at run time: the job uploads this repository (this file too) to every node.
FAKE_KEY_ID = "AKIA" + uuid.uuid4().hex[:16].upper()
FAKE_SECRET = "fake-secret-" + uuid.uuid4().hex


def cli(*args: str, env: dict, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [CHESTXPERT_CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"chestxpert {' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def grep_tree(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:
            continue
    return hits


def test_submit_watch_final_pull_predict_and_nothing_leaks(
    s3_endpoint, s3_client, tmp_path: Path
) -> None:
    secrets_env = {
        **s3_endpoint.env(),
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
    }
    ml_ws = short_tmpdir("cxwm")
    mlflow = start_mlflow(
        StackOptions(workspace=ml_ws, mlflow_port=free_port()), (ml_ws / "artifacts").as_uri()
    )
    cluster, records = start_cluster(secrets_env)
    try:
        env = {
            **cluster.client_env(),
            **secrets_env,
            "MLFLOW_TRACKING_URI": mlflow["url"],
            "CHESTXPERT_STORAGE": f"s3://{s3_endpoint.bucket}/workflow",
            "CHESTXPERT_WORKSPACE": str(tmp_path / "ws"),
        }
        dataset = f"s3://{s3_endpoint.bucket}/data/wf-64"
        cli(
            "data",
            "synth",
            "--out",
            str(tmp_path / "raw"),
            "--images",
            "400",
            "--size",
            "128",
            "--seed",
            "1",
            env=env,
            cwd=tmp_path,
        )
        cli(
            "data",
            "prepare",
            "--source",
            "nih",
            "--input",
            str(tmp_path / "raw"),
            "--out",
            dataset,
            "--image-size",
            "64",
            "--split",
            "official",
            env=env,
            cwd=tmp_path,
        )
        spec = {
            "name": "workflow",
            "dataset": dataset,
            "model_name": "workflow-model",
            "trial": {"backbone": "convnet_small", "image_size": 64, "epochs": 2, "batch_size": 32},
            "resources": {"cpus": 1, "gpus": 1},
            "search": {"num_samples": 2, "max_concurrent": 2, "seed": 0},
            "space": {"learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 3.0e-3}},
            "scheduler": {"type": "asha", "max_t": 2, "grace_period": 1, "reduction_factor": 2},
        }
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))

        submitted = cli(
            "sweep",
            "submit",
            str(tmp_path / "spec.yaml"),
            "--address",
            cluster.dashboard_url,
            env=env,
            cwd=tmp_path,
        )
        job_id = submitted.stdout.split("submitted ", 1)[1].split(":", 1)[0]
        token = cluster.token_path.read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        assert (
            requests.get(f"{cluster.dashboard_url}/api/jobs/{job_id}", timeout=10).status_code
            == 401
        )
        seen_trial_actor, status = False, None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = requests.get(
                f"{cluster.dashboard_url}/api/jobs/{job_id}", headers=auth, timeout=10
            ).json()["status"]
            actors = requests.get(
                f"{cluster.dashboard_url}/api/v0/actors?limit=200", headers=auth, timeout=30
            ).text
            seen_trial_actor |= "ImplicitFunc" in actors and "ALIVE" in actors
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(2)
        logs = requests.get(
            f"{cluster.dashboard_url}/api/jobs/{job_id}/logs", headers=auth, timeout=30
        ).json()["logs"]
        assert status == "SUCCEEDED", logs[-3000:]
        assert seen_trial_actor, "no trial was visible in the dashboard's API while the job ran"

        status_json = json.loads(
            cli("sweep", "status", "workflow", "--json", env=env, cwd=tmp_path).stdout
        )
        assert len(status_json["trials"]) == 2 and status_json["summary"][
            "best_checkpoint"
        ].startswith("s3://")

        final = cli(
            "final",
            "workflow",
            "--address",
            cluster.address,
            "--bootstrap",
            "100",
            env=env,
            cwd=tmp_path,
        )
        assert "registered: models:/workflow-model@champion" in final.stdout

        pulled = cli(
            "pull-best",
            "workflow",
            "--final",
            "--to",
            str(tmp_path / "models"),
            env=env,
            cwd=tmp_path,
        )
        model_dir = tmp_path / "models" / "model"
        assert "load_model" in pulled.stdout and (model_dir / "model.keras").exists()
        film = next((tmp_path / "raw").rglob("*.png"))
        predicted = cli("predict", str(model_dir), str(film), "--json", env=env, cwd=tmp_path)
        findings = json.loads(predicted.stdout)[0]["findings"]
        assert len(findings) == 14 and all(
            f["positive"] == (f["probability"] >= f["threshold"]) for f in findings
        )
        from_registry = cli(
            "predict", "models:/workflow-model@champion", str(film), "--json", env=env, cwd=tmp_path
        )
        assert json.loads(from_registry.stdout)[0]["findings"] == findings

        # --- nothing leaks: logs, MLflow, storage, reports, job config ---
        needle = FAKE_SECRET.encode()
        assert grep_tree(cluster.workspace, needle) == [], (
            "a Ray log or session file holds the secret"
        )
        assert grep_tree(tmp_path / "ws", needle) == [], (
            "the workspace (reports, caches) holds the secret"
        )
        assert grep_tree(ml_ws, needle) == [], "the MLflow store or its artifacts hold the secret"
        objects = [
            o["Key"]
            for page in s3_client.get_paginator("list_objects_v2").paginate(
                Bucket=s3_endpoint.bucket
            )
            for o in page.get("Contents", [])
        ]
        leaked = [
            k
            for k in objects
            if needle in s3_client.get_object(Bucket=s3_endpoint.bucket, Key=k)["Body"].read()
        ]
        assert leaked == [], f"stored objects hold the secret: {leaked[:5]}"
        job = requests.get(
            f"{cluster.dashboard_url}/api/jobs/{job_id}", headers=auth, timeout=10
        ).text
        assert FAKE_SECRET not in job and FAKE_KEY_ID not in job, (
            "the job's runtime env carries credentials"
        )
        assert FAKE_SECRET not in logs
    finally:
        stop_cluster(records)
        stop_group(mlflow["pid"], mlflow["start_time"])


def test_lambda_layer_checkpoint_is_refused(tmp_path: Path) -> None:
    import keras

    from chestxpert.trainable.checkpoint import CheckpointError, load_model

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="Lambda"):
        load_model(tmp_path, compile=False)
