"""Sweeps on real services: a multi-node Ray cluster, the S3 test endpoint and an MLflow server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from chestxpert.cluster.processes import free_port, stop_group
from chestxpert.cluster.stack import StackOptions, start_mlflow
from tests.conftest import CHESTXPERT_CLI, REPO, RayCluster, SyntheticDataset, short_tmpdir

pytestmark = pytest.mark.services


def write_spec(path: Path, name: str, dataset: Path, **changes) -> Path:
    spec = {
        "name": name,
        "dataset": str(dataset),
        "trial": {"backbone": "convnet_small", "image_size": 64, "epochs": 2, "batch_size": 32},
        "resources": {"cpus": 1, "gpus": 0},
        "search": {"algorithm": "optuna", "seed": 0, "num_samples": 3, "max_concurrent": 2},
        "space": {"learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 3.0e-3}},
        "scheduler": {"type": "asha", "max_t": 2, "grace_period": 1, "reduction_factor": 2},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            spec[section][field] = value
        else:
            spec[section] = value
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_env(
    cluster: RayCluster, s3_env: dict[str, str], mlflow_url: str, storage: str
) -> dict[str, str]:
    return {
        **cluster.client_env(),
        **s3_env,
        "MLFLOW_TRACKING_URI": mlflow_url,
        "CHESTXPERT_STORAGE": storage,
    }


def chestxpert(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 900
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHESTXPERT_CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def status_json(name: str, env: dict[str, str], cwd: Path) -> dict:
    result = chestxpert("sweep", "status", name, "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def study_json(name: str, env: dict[str, str], cwd: Path) -> dict:
    """`chestxpert sweep study NAME --json`: the sweep's persisted Optuna study."""
    result = chestxpert("sweep", "study", name, "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


# How each way a trial ends is recorded in the Optuna study.
STUDY_STATE = {"completed": "COMPLETE", "errored": "FAIL"}  # stopped by ASHA: PRUNED


def test_gpu_sweep_on_three_nodes_with_s3_storage_and_nested_mlflow(
    synthetic_dataset: SyntheticDataset,
    ray_cluster: RayCluster,
    s3_endpoint,
    s3_client,
    mlflow_server,
    tmp_path: Path,
) -> None:
    name = "gpu-sweep"
    spec = write_spec(
        tmp_path / "spec.yaml",
        name,
        synthetic_dataset.prepared,
        resources={"cpus": 1, "gpus": 1},
        search__max_concurrent=3,
    )
    env = sweep_env(
        ray_cluster, s3_endpoint.env(), mlflow_server.url, f"s3://{s3_endpoint.bucket}/sweeps"
    )
    result = chestxpert("sweep", "run", str(spec), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "best trial" in result.stdout
        and f"s3://{s3_endpoint.bucket}/sweeps/{name}/" in result.stdout
    )

    # one GPU per trial and two GPUs: never more than two trials at once, on different nodes
    keys = [
        o["Key"]
        for page in s3_client.get_paginator("list_objects_v2").paginate(
            Bucket=s3_endpoint.bucket, Prefix=f"sweeps/{name}/"
        )
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("/model.keras") and "/checkpoint_" in k for k in keys), keys[:20]
    results_by_trial: dict[str, list[dict]] = {}
    for key in keys:
        if key.endswith("/result.json"):
            body = s3_client.get_object(Bucket=s3_endpoint.bucket, Key=key)["Body"].read().decode()
            rows = [json.loads(line) for line in body.splitlines() if line.strip()]
            results_by_trial[rows[0]["trial_id"]] = rows
    assert len(results_by_trial) == 3
    spans = sorted(
        (
            rows[0]["timestamp"] - rows[0]["time_this_iter_s"],
            rows[-1]["timestamp"],
            rows[0]["node_id"],
        )
        for rows in results_by_trial.values()
    )
    gpu_nodes = {rows[0]["node_id"] for rows in results_by_trial.values()}
    assert len(gpu_nodes) == 2, "trials must land on both GPU workers (the head has no GPU)"
    for start, _, _ in spans:
        # Tune's `timestamp` is whole seconds (rounded down): a trial that started within a
        # second of another's last report may have started after it (a reused worker does)
        overlapping = [s for s in spans if s[0] <= start and start + 1 < s[1]]
        assert len(overlapping) <= 2
        assert len({s[2] for s in overlapping}) == len(overlapping), (
            "two trials shared one GPU node"
        )

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get("chestxpert.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("chestxpert.role") == "trial"]
    assert len(parent) == 1 and len(trials) == 3
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in trials)
    assert parent[0].data.params["trial.backbone"] == "convnet_small"
    assert "best_val_auc_macro" in parent[0].data.metrics
    study = study_json(name, env, tmp_path)
    in_study = {row["tune_trial_id"]: row for row in study["trials"]}
    assert len(in_study) == len(study["trials"]) == 3 and study["direction"] == "maximize"
    for run in trials:
        history = sorted(
            client.get_metric_history(run.info.run_id, "val_auc_macro"), key=lambda m: m.step
        )
        epochs = [m.step for m in history]
        ended = run.data.tags["chestxpert.ended"]
        assert ended in ("completed", "stopped by ASHA at epoch 1")
        assert epochs == ([1, 2] if ended == "completed" else [1])
        assert "learning_rate" in run.data.params
        # the study has each trial once, ASHA's stops PRUNED with the value they stopped on
        row = in_study[run.data.tags["chestxpert.trial_id"]]
        assert row["state"] == STUDY_STATE.get(ended, "PRUNED"), (ended, row)
        assert row["value"] == pytest.approx(history[-1].value) and row["epochs"] == epochs[-1]
        assert row["params"]["learning_rate"] == pytest.approx(
            float(run.data.params["learning_rate"])
        )

    status = status_json(name, env, tmp_path)
    assert len(status["trials"]) == 3 and status["best_so_far"]["value"] > 0
    assert status["summary"]["best_checkpoint"].startswith(
        f"s3://{s3_endpoint.bucket}/sweeps/{name}/"
    )


def test_trials_given_half_a_gpu_share_one_two_at_a_time(
    synthetic_dataset: SyntheticDataset, ray_cluster: RayCluster, mlflow_server, tmp_path: Path
) -> None:
    """`resources.gpus: 0.5` reaches Tune: four trials run at once on the fixture's two logical
    GPUs, two on each, which whole GPUs would never allow."""
    name = "half-gpu"
    storage = tmp_path / "storage"
    spec = write_spec(
        tmp_path / "spec.yaml",
        name,
        synthetic_dataset.prepared,
        trial={"backbone": "convnet_small", "image_size": 32, "epochs": 1, "batch_size": 32},
        resources={"cpus": 0.5, "gpus": 0.5},  # a worker node has 1 CPU and 1 GPU
        search={"algorithm": "random", "seed": 0, "num_samples": 4, "max_concurrent": 4},
        scheduler={"type": "none"},
    )
    env = sweep_env(ray_cluster, {}, mlflow_server.url, str(storage))  # storage in a folder
    result = chestxpert("sweep", "run", str(spec), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = [
        json.loads(path.read_text().splitlines()[0])
        for path in (storage / name).glob("train_*/result.json")
    ]
    assert len(rows) == 4
    # Tune's timestamps are whole seconds: an interval is [start, end] at that grain
    spans = [
        (
            row["timestamp"] - row["time_this_iter_s"],
            row["timestamp"],
            row["node_id"],
            row["gpu_ids"],
        )
        for row in rows
    ]
    assert {gpu for *_, gpu in spans} == {"0"}  # each trial got one GPU's share, numbered 0
    gpu_nodes = {node for _, _, node, _ in spans}
    assert len(gpu_nodes) == 2, "trials must land on both GPU workers (the head has no GPU)"
    for node in gpu_nodes:
        pair = [(start, end) for start, end, where, _ in spans if where == node]
        assert len(pair) == 2, f"node {node} ran {len(pair)} trials"
        (start_a, end_a), (start_b, end_b) = pair
        assert start_a < end_b and start_b < end_a, f"the two trials on {node} did not overlap"


def test_mlflow_outage_loses_no_metric(
    synthetic_dataset: SyntheticDataset, ray_cluster: RayCluster, s3_endpoint, tmp_path: Path
) -> None:
    ws = short_tmpdir("cxmo")
    port = free_port()
    opts = StackOptions(workspace=ws, mlflow_port=port)
    server = start_mlflow(opts, (ws / "artifacts").as_uri())
    name = "outage"
    storage = tmp_path / "storage"
    spec = write_spec(
        tmp_path / "spec.yaml",
        name,
        synthetic_dataset.prepared,
        search__num_samples=2,
        scheduler={"type": "none"},
        trial__epochs=3,
    )
    env = sweep_env(ray_cluster, s3_endpoint.env(), server["url"], str(storage))
    try:
        driver = subprocess.Popen(
            [CHESTXPERT_CLI, "sweep", "run", str(spec)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(
            (storage / name).glob("train_*/result.json")
        ):
            time.sleep(0.5)
        stop_group(server["pid"], server["start_time"])  # the server goes away mid-sweep
        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, output[-3000:]
        assert output.count("does not answer") == 1, output[-3000:]
        server = start_mlflow(opts, (ws / "artifacts").as_uri())  # back, same store
        synced = chestxpert("sweep", "mlflow-sync", name, env=env, cwd=tmp_path)
        assert synced.returncode == 0, synced.stderr[-3000:]

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=server["url"])
        runs = client.search_runs(
            [client.get_experiment_by_name(name).experiment_id],
            filter_string="tags.`chestxpert.role` = 'trial'",
        )
        assert len(runs) == 2
        for run in runs:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
            assert steps == [1, 2, 3], f"{run.info.run_name}: {steps}"
        again = chestxpert("sweep", "mlflow-sync", name, env=env, cwd=tmp_path)
        assert "0 metric value(s) added" in again.stdout, (
            "sync must not duplicate what MLflow already has"
        )
    finally:
        stop_group(server["pid"], server["start_time"])


def test_sweep_submitted_through_the_jobs_api(
    synthetic_dataset: SyntheticDataset,
    ray_cluster: RayCluster,
    s3_endpoint,
    mlflow_server,
    tmp_path: Path,
) -> None:
    spec = write_spec(
        tmp_path / "submit.yaml",
        "submitted",
        synthetic_dataset.prepared,
        search__num_samples=1,
        trial__epochs=1,
        scheduler={"type": "none"},
    )
    env = sweep_env(ray_cluster, s3_endpoint.env(), mlflow_server.url, str(tmp_path / "storage"))
    result = chestxpert(
        "sweep",
        "submit",
        str(spec),
        "--address",
        ray_cluster.dashboard_url,
        "--follow",
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "submitted raysubmit_" in result.stdout and "SUCCEEDED" in result.stdout
    assert "best trial" in result.stdout
    # the job ran the code it shipped (Ray's py_modules copy), not the installed checkout
    shipped = re.search(r"^chestxpert \S+ \((.+)\)$", result.stdout, re.M)
    assert shipped and "py_modules" in shipped.group(1), result.stdout[-4000:]
    assert not shipped.group(1).startswith(str(REPO))
    assert (tmp_path / "storage" / "submitted" / "chestxpert_summary.json").exists()
    # `sweep logs` finds the job by the sweep's name and reads its log with the token
    logs = chestxpert(
        "sweep", "logs", "submitted", "--address", ray_cluster.dashboard_url, env=env, cwd=tmp_path
    )
    assert logs.returncode == 0, logs.stderr[-3000:]
    assert "best trial" in logs.stdout and "Running entrypoint for job raysubmit_" in logs.stdout
    assert not (tmp_path / "storage" / "submitted" / "logs").exists(), "the Jobs API keeps it"
    # without the token the Jobs API refuses
    import requests

    assert requests.get(f"{ray_cluster.dashboard_url}/api/jobs/", timeout=10).status_code == 401


def _node_of_temp_dir(cluster: RayCluster) -> dict[str, str]:
    """Ray node id -> the temp folder it was started with (which tells our node records apart)."""
    code = (
        "import json, ray; ray.init(logging_level='ERROR', log_to_driver=False);"
        "print(json.dumps({n['NodeID']: n['ObjectStoreSocketName'] "
        "for n in ray.nodes() if n['Alive']}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=cluster.client_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_worker_node_killed_mid_trial_is_retried_from_its_checkpoint(
    synthetic_dataset: SyntheticDataset, s3_endpoint, mlflow_server, tmp_path: Path
) -> None:
    from tests.conftest import start_cluster, stop_cluster

    cluster, records = start_cluster(s3_endpoint.env())
    try:
        name = "node-loss"
        storage = tmp_path / "storage"
        spec = write_spec(
            tmp_path / "spec.yaml",
            name,
            synthetic_dataset.prepared,
            resources={"cpus": 1, "gpus": 1},
            search__num_samples=1,
            trial__epochs=8,
            scheduler={"type": "none"},
        )
        # Mapped before the trial starts: asking Ray takes seconds, in which a trial whose
        # epochs take 2 s had finished before its node was killed.
        temp_dirs = _node_of_temp_dir(cluster)
        env = sweep_env(cluster, s3_endpoint.env(), mlflow_server.url, str(storage))
        driver = subprocess.Popen(
            [CHESTXPERT_CLI, "sweep", "run", str(spec)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 300
        rows: list[dict] = []
        while time.monotonic() < deadline and len(rows) < 2:
            files = list((storage / name).glob("train_*/result.json"))
            rows = [json.loads(line) for line in files[0].read_text().splitlines()] if files else []
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            time.sleep(0.5)
        assert len(rows) >= 2, "the trial did not reach epoch 2"
        doomed_node = rows[-1]["node_id"]
        temp_dir = temp_dirs[doomed_node]
        victim = next(r for r in records[1:] if f"/w{records.index(r) - 1}/" in temp_dir)
        stop_group(
            victim["pid"], victim["start_time"], timeout_s=0.1
        )  # the node dies (SIGKILL after 0.1 s)

        output, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, output[-4000:]
        rows = [json.loads(line) for line in files[0].read_text().splitlines()]
        epochs = [int(r["epoch"]) for r in rows]
        assert epochs[-1] == 8 and epochs.count(1) == 1, (
            f"the trial restarted from scratch: {epochs}"
        )
        moved = [r for r in rows if r["node_id"] != doomed_node]
        assert moved and int(moved[0]["epoch"]) >= 2, (
            f"no epoch ran on the surviving node: {epochs}"
        )
        assert epochs == sorted(epochs), f"epochs went backwards beyond the checkpoint: {epochs}"
        # checkpoints_to_keep (2): of six checkpoints, the best two by val_auc_macro and the
        # latest are left once the sweep ends, the best among them
        kept = sorted(files[0].parent.glob("checkpoint_*"))
        assert 2 <= len(kept) <= 3, kept
        best = json.loads((storage / name / "chestxpert_summary.json").read_text())
        assert Path(best["best_checkpoint"].removeprefix("file://")) in kept, (best, kept)
    finally:
        stop_cluster(records)


def test_a_python_caller_gets_a_token_protected_in_process_ray(tmp_path: Path) -> None:
    """`connect` from a script (no CLI, no RAY_* variables, no ~/.ray/auth_token) starts an
    in-process Ray with token auth on and the workspace's token, then shuts it down clean."""
    ws = short_tmpdir("cxpy")
    code = (
        "import os, sys\n"
        "from chestxpert.cluster.endpoints import resolve\n"
        "from chestxpert.cluster.ray_driver import connect\n"
        "info = connect(resolve(workspace=sys.argv[1], environ={}))\n"
        "import ray\n"
        "print(os.environ['RAY_AUTH_MODE'], os.environ['RAY_AUTH_TOKEN_PATH'], "
        "ray.cluster_resources()['CPU'])\n"
        "ray.shutdown()\n"
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RAY_", "CHESTXPERT_", "MLFLOW_", "AWS_"))
    }
    env.update(HOME=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", code, str(ws)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mode, token_path, cpus = result.stdout.split()[-3:]
    assert (mode, token_path) == ("token", str(ws / "ray_auth_token"))
    assert float(cpus) >= 1
    assert (ws / "ray_auth_token").stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / ".ray").exists(), "Ray's default token file must not be created"
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(ws) in cmdline.read_text(errors="replace"):
                leftovers.append(cmdline.parent.name)
        except OSError:
            continue
    assert not leftovers, f"processes of the in-process Ray still running: {leftovers}"
