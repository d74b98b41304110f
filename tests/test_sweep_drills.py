"""Crash drills for tracking, checkpoints and one writer per sweep, with real processes on the
3-node Ray cluster: MLflow down while the driver is SIGKILLed (drill 4), a second `sweep run` of
a running sweep (drill 5), a driver SIGKILLed after one trial finished, resumed onto the MLflow
server it is given (the finished trial is not run again; tracking moves), and a driver SIGKILLed
after a checkpoint outranked the one Tune's saved state resumes from.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chestxpert.cluster.processes import free_port, stop_group
from chestxpert.cluster.stack import StackOptions, start_mlflow
from chestxpert.sweeps.layout import SweepLocation
from chestxpert.sweeps.replay import ABANDONED
from tests.conftest import CHESTXPERT_CLI, RayCluster, SyntheticDataset, short_tmpdir
from tests.retention_drill_driver import resume_checkpoints
from tests.test_sweeps import (
    STUDY_STATE,
    chestxpert,
    status_json,
    study_json,
    sweep_env,
    write_spec,
)

pytestmark = pytest.mark.services

TERMINAL = ("FINISHED", "KILLED", "FAILED")


def _start(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A driver in its own process group, so that a SIGKILL takes all it started."""
    return subprocess.Popen(
        command,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _start_driver(spec: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return _start([CHESTXPERT_CLI, "sweep", "run", str(spec)], env, cwd)


def _stored_epochs(folder: Path) -> dict[str, list[int]]:
    """Trial id -> the epochs Tune's result.json files in storage hold (repeats included)."""
    epochs = {}
    for path in folder.glob("train_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            epochs[rows[0]["trial_id"]] = [int(row["epoch"]) for row in rows]
    return epochs


def _kill_when(driver: subprocess.Popen, ready, what: str, timeout_s: float = 300) -> str:
    """SIGKILL the driver's process group once `ready()` holds; return all it printed."""
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            assert time.monotonic() < deadline, f"{what} before the deadline"
            time.sleep(0.5)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        return driver.stdout.read()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)


def _journalled_epochs(folder: Path) -> int:
    """Epoch reports in the sweep's tracking journal: the driver writes each one as it gets it
    (Tune's result.json files reach storage later, in syncs)."""
    lines = [
        line
        for path in (folder / "tracking").glob("journal-*.jsonl")
        for line in path.read_text().splitlines()
    ]
    return sum('"kind":"metrics"' in line for line in lines)


def _runs(client, experiment: str) -> tuple[list, dict]:
    """The sweep's parent runs, and its trial runs by trial id."""
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in found if r.data.tags.get("chestxpert.role") == "sweep"]
    trial_runs = [r for r in found if r.data.tags.get("chestxpert.role") == "trial"]
    trials = {r.data.tags["chestxpert.trial_id"]: r for r in trial_runs}
    assert len(trials) == len(trial_runs), "a trial has two runs"
    return parents, trials


def _steps(client, run, key: str = "val_auc_macro") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_drill4_mlflow_down_driver_killed_then_resumed(
    synthetic_dataset: SyntheticDataset, ray_cluster: RayCluster, s3_endpoint, tmp_path: Path
) -> None:
    import mlflow

    ws = short_tmpdir("cxd4")
    opts = StackOptions(workspace=ws, mlflow_port=free_port())
    server = start_mlflow(opts, (ws / "artifacts").as_uri())
    stop_group(server["pid"], server["start_time"])  # down before the sweep starts
    name = "drill4"
    storage = tmp_path / "storage"
    spec = write_spec(
        tmp_path / "spec.yaml",
        name,
        synthetic_dataset.prepared,
        trial__epochs=3,
        scheduler={"type": "asha", "max_t": 3, "grace_period": 1, "reduction_factor": 2},
    )
    env = sweep_env(ray_cluster, s3_endpoint.env(), server["url"], str(storage))

    driver = _start_driver(spec, env, tmp_path)
    output = _kill_when(
        driver, lambda: _journalled_epochs(storage / name) >= 3, "3 epochs were not reported"
    )
    assert output.count("does not answer") == 1, output[-3000:]
    assert f"journalled in file://{storage}/{name}/tracking" in output
    assert re.search(rf"^Optuna study: {name}-\d{{8}}-\d{{6}} in sqlite:///", output, re.M), output[
        -3000:
    ]
    before = {row["tune_trial_id"]: row for row in study_json(name, env, tmp_path)["trials"]}

    server = start_mlflow(opts, (ws / "artifacts").as_uri())  # back: same port, same database
    try:
        refused = chestxpert("sweep", "resume", name, env=env, cwd=tmp_path)
        assert refused.returncode == 3, refused.stdout[-3000:] + refused.stderr[-3000:]
        assert f"pid {driver.pid} is not running on this host" in refused.stderr
        assert "Traceback" not in refused.stderr
        resumed = chestxpert("sweep", "resume", name, "--force", env=env, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

        client = mlflow.MlflowClient(tracking_uri=server["url"])
        parents, trials = _runs(client, name)
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert "best_val_auc_macro" in parents[0].data.metrics
        stored = _stored_epochs(storage / name)
        assert set(stored) <= set(trials) and len(stored) == 3
        # A trial the killed driver started after Tune's last snapshot has a run (its start
        # was journalled) and no results in storage: Tune ran that slot again under a new id.
        abandoned = set(trials) - set(stored)
        for trial_id in abandoned:
            run = trials.pop(trial_id)
            assert run.info.status == "KILLED", (trial_id, run.info.status)
            assert run.data.tags["chestxpert.ended"] == ABANDONED, trial_id
        for trial_id, run in trials.items():
            # each epoch once: none missing against storage, none twice
            assert _steps(client, run) == sorted(set(stored[trial_id])), trial_id
            assert run.info.status in TERMINAL, (trial_id, run.info.status)
            ended = run.data.tags["chestxpert.ended"]
            expected = {"completed": "FINISHED", "errored": "FAILED"}.get(ended, "KILLED")
            assert run.info.status == expected, (trial_id, ended, run.info.status)
            assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    finally:
        stop_group(server["pid"], server["start_time"])

    # The resume continued the same study: each Tune trial in it once; what a dead driver
    # started after its last snapshot is marked abandoned (Tune ran that slot again).
    status = status_json(name, env, tmp_path)
    assert abandoned.isdisjoint(t["trial_id"] for t in status["trials"]), (abandoned, status)
    rows = study_json(name, env, tmp_path)["trials"]
    assert len({row["tune_trial_id"] for row in rows}) == len(rows), rows
    kept = {
        row["tune_trial_id"]: row
        for row in rows
        if not row["abandoned"] and row["tune_trial_id"] not in status["abandoned"]
    }
    assert set(kept) == {t["trial_id"] for t in status["trials"]}, (rows, status)
    for trial in status["trials"]:
        row, earlier = kept[trial["trial_id"]], before.get(trial["trial_id"])
        if earlier and earlier["state"] in ("COMPLETE", "PRUNED", "FAIL"):
            # ended in the study before the kill: a finished Optuna trial keeps its result
            assert (row["state"], row["value"]) == (earlier["state"], earlier["value"])
        else:
            assert row["state"] == STUDY_STATE.get(trial["ended"], "PRUNED"), (trial, row)
            assert row["epochs"] == trial["epochs"], (trial, row)


def test_drill5_a_second_run_of_a_running_sweep_is_refused(
    synthetic_dataset: SyntheticDataset,
    ray_cluster: RayCluster,
    s3_endpoint,
    mlflow_server,
    tmp_path: Path,
) -> None:
    name = "drill5"
    storage = tmp_path / "storage"
    spec = write_spec(
        tmp_path / "spec.yaml",
        name,
        synthetic_dataset.prepared,
        search__num_samples=1,
        trial__epochs=1,
        scheduler={"type": "none"},
    )
    env = sweep_env(ray_cluster, s3_endpoint.env(), mlflow_server.url, str(storage))
    first = _start_driver(spec, env, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (storage / name / "chestxpert_spec.json").exists():
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the first driver never started the sweep"
            time.sleep(0.2)
        second = chestxpert("sweep", "run", str(spec), env=env, cwd=tmp_path)
        output, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert second.returncode == 3, second.stdout[-3000:] + second.stderr[-3000:]
    assert "sweep 'drill5' is being written by " in second.stderr
    assert f"(pid {first.pid} on {socket.gethostname()}, `chestxpert sweep run drill5`)" in (
        second.stderr
    )
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, output[-3000:]
    assert "best trial" in output
    status = status_json(name, env, tmp_path)
    assert len(status["trials"]) == 1 and status["summary"]["best_trial_id"]
    assert status["writer"] is None, "the first driver released its lease"


def test_resume_moves_tracking_to_the_mlflow_uri_given(
    synthetic_dataset: SyntheticDataset,
    ray_cluster: RayCluster,
    s3_endpoint,
    mlflow_server,
    tmp_path: Path,
) -> None:
    import mlflow

    name = "moved"
    storage = tmp_path / "storage"
    spec = write_spec(
        tmp_path / "spec.yaml",
        name,
        synthetic_dataset.prepared,
        search__num_samples=2,
        search__max_concurrent=1,
        scheduler={"type": "none"},
        # a new worker per trial: the second trial's first epoch comes after Tune has recorded
        # the first trial's end (a reused worker starts it before Tune's next snapshot)
        reuse_actors=False,
    )
    env = sweep_env(ray_cluster, s3_endpoint.env(), mlflow_server.url, str(storage))
    driver = _start_driver(spec, env, tmp_path)

    # one trial at a time: a third epoch report is the second trial's first, so the first trial
    # has ended, in Tune and in the journal
    _kill_when(
        driver, lambda: _journalled_epochs(storage / name) >= 3, "3 epochs were not reported"
    )

    # the sweep report builds from storage after the SIGKILL, and lists the finished trial
    report = chestxpert("sweep", "report", name, "--json", env=env, cwd=tmp_path)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    shown = json.loads(report.stdout)
    assert shown["state"] == "interrupted" and "logged to the sweep's parent run" in report.stderr
    page = (storage / name / "report" / "report.html").read_text()
    ended = {t["trial_id"]: t["ended"] for t in shown["trials"]}
    for trial_id, epochs in _stored_epochs(storage / name).items():
        if epochs == [1, 2]:  # what of the finished trial Tune had synced to storage
            assert ended[trial_id] == "completed" and f"<td>{trial_id}</td>" in page

    # mlflow-sync after a crash ends what the dead driver left RUNNING
    synced = chestxpert("sweep", "mlflow-sync", name, env=env, cwd=tmp_path)
    assert synced.returncode == 0, synced.stdout[-3000:] + synced.stderr[-3000:]
    old = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    parents, trials = _runs(old, name)
    assert [p.info.status for p in parents] == ["KILLED"]
    finished_id = next(
        t for t, r in trials.items() if r.data.tags["chestxpert.ended"] == "completed"
    )
    ended = sorted((r.data.tags["chestxpert.ended"], r.info.status) for r in trials.values())
    assert len(ended) == 2 and ended[0] == ("completed", "FINISHED"), ended
    assert ended[1][0].startswith("interrupted") and ended[1][1] == "KILLED", ended

    port = free_port()
    new_url = f"http://127.0.0.1:{port}"  # nothing there yet: the resume runs with MLflow down
    resumed = chestxpert(
        "sweep", "resume", name, "--force", "--mlflow-uri", new_url, env=env, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("does not answer") == 1
    assert f"MLflow at {new_url} does not answer" in resumed.stdout
    record = json.loads((storage / name / "chestxpert_spec.json").read_text())
    assert record["mlflow_tracking_uri"] == new_url
    status = status_json(name, env, tmp_path)
    assert len({t["trial_id"] for t in status["trials"]}) == 2
    assert all(t["ended"] == "completed" for t in status["trials"]), status["trials"]
    # the trial finished before the kill was not run again: each of its epochs once
    assert _stored_epochs(storage / name)[finished_id] == [1, 2]

    ws = short_tmpdir("cxnew")
    server = start_mlflow(StackOptions(workspace=ws, mlflow_port=port), (ws / "a").as_uri())
    try:
        synced = chestxpert("sweep", "mlflow-sync", name, env=env, cwd=tmp_path)  # no flag
        assert synced.returncode == 0, synced.stdout[-3000:] + synced.stderr[-3000:]
        assert re.search(
            rf"^MLflow {new_url}: [1-9]\d* metric value\(s\) added, 2 trial run\(s\) given",
            synced.stdout,
            re.M,
        ), synced.stdout
        new = mlflow.MlflowClient(tracking_uri=new_url)
        parents, trials = _runs(new, name)
        assert [p.info.status for p in parents] == ["FINISHED"]
        assert "best_val_auc_macro" in parents[0].data.metrics
        assert len(trials) == 2
        for run in trials.values():
            assert _steps(new, run) == [1, 2] and run.info.status == "FINISHED"
        # the old server got nothing from the resumed driver
        parents, trials = _runs(old, name)
        assert [p.info.status for p in parents] == ["KILLED"] and len(trials) == 2
    finally:
        stop_group(server["pid"], server["start_time"])


def test_a_driver_killed_after_a_better_checkpoint_resumes_from_the_one_its_state_names(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """Tune's own num_to_keep deletes the checkpoint its saved state names as soon as a better
    one registers, and the resume then fails the trial (tests/retention_drill_driver.py with
    TUNE_KEEPS=1 shows it); the sweep's retention keeps it until a newer state is saved."""
    import pyarrow.fs as pafs

    storage, marks = tmp_path / "storage", tmp_path / "marks"
    marks.mkdir()
    driver_py = Path(__file__).with_name("retention_drill_driver.py")
    env = {**ray_cluster.client_env(), "TUNE_GLOBAL_CHECKPOINT_S": "10"}
    command = [sys.executable, str(driver_py), "run", str(storage), str(marks)]
    driver = _start(command, env, tmp_path)
    _kill_when(driver, (marks / "killable").exists, "the fourth epoch was not reported", 180)

    location = SweepLocation(pafs.LocalFileSystem(), str(storage), "retention", "")
    (trial_folder,) = (storage / "retention").glob("train_*")
    # The state a resume restores names the second checkpoint (score 0.1), below the best two
    # (0.9, 0.5) since the third registered: kept, where Tune would have deleted it.
    named = resume_checkpoints(location)
    assert named is not None and list(named.values()) == ["checkpoint_000001"], named
    assert sorted(p.name for p in trial_folder.glob("checkpoint_*")) == [
        f"checkpoint_{index:06d}" for index in range(4)
    ]

    command[2] = "resume"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == [{"epoch": 5, "error": None}]
    assert (marks / "restored-2").exists()
    # Once the final state is saved: the best two by score (epochs 1 and 5), the latest among them.
    kept = [json.loads((p / "epoch.json").read_text()) for p in trial_folder.glob("checkpoint_*")]
    assert sorted(row["epoch"] for row in kept) == [1, 5]
