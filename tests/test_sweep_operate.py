"""`sweep stop` and `sweep logs` with real processes on the shared three-node Ray cluster: a driver
stopped mid-run exits after Tune saved its state, and `sweep resume` finishes the sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import CHESTXPERT_CLI, RayCluster, SyntheticDataset
from tests.test_sweep_drills import _journalled_epochs, _start_driver, _stored_epochs
from tests.test_sweeps import chestxpert, sweep_env, write_spec

pytestmark = pytest.mark.services


@pytest.fixture
def one_trial_sweep(
    synthetic_dataset: SyntheticDataset,
    ray_cluster: RayCluster,
    s3_endpoint,
    mlflow_server,
    tmp_path: Path,
):
    """Make a one-trial convnet_small sweep at 32 px on the shared cluster: (spec, env, storage)."""

    def make(name: str, epochs: int) -> tuple[Path, dict[str, str], Path]:
        storage = tmp_path / "storage"
        spec = write_spec(
            tmp_path / "spec.yaml",
            name,
            synthetic_dataset.prepared,
            trial__image_size=32,
            trial__epochs=epochs,
            search__num_samples=1,
            scheduler={"type": "none"},
        )
        return (
            spec,
            sweep_env(ray_cluster, s3_endpoint.env(), mlflow_server.url, str(storage)),
            storage,
        )

    return make


@pytest.mark.parametrize("second_signal", [False, True])
def test_a_stop_reaches_tune_once_no_checkpoint_is_being_recorded(second_signal: bool) -> None:
    """Tune records an epoch's checkpoint a step after writing its result: a stop passed on in
    between saves results one epoch ahead of the checkpoint, and the resume trains it twice.
    (The trials here stand in for Tune's: only their `is_saving` is read.)"""
    from types import SimpleNamespace

    from chestxpert.sweeps.graceful import GracefulStop

    passed_on: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: passed_on.append(signum))
    term_before = signal.getsignal(signal.SIGTERM)
    saving, idle = SimpleNamespace(is_saving=True), SimpleNamespace(is_saving=False)
    try:
        stop = GracefulStop("waits")
        stop.setup()
        os.kill(os.getpid(), signal.SIGTERM)
        stop.on_step_end(1, [idle, saving])
        assert stop.requested and passed_on == []
        if second_signal:  # the user insists: no more waiting
            os.kill(os.getpid(), signal.SIGINT)
        else:
            stop.on_step_end(2, [idle, saving])
            assert passed_on == []
            stop.on_step_end(3, [idle, idle])
        assert passed_on == [signal.SIGINT]
        stop.on_step_end(4, [idle])
        assert passed_on == [signal.SIGINT], "passed on once"
        assert signal.getsignal(signal.SIGTERM) is term_before
    finally:
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGTERM, term_before)


def test_stop_a_running_driver_follow_its_log_and_resume_to_the_end(
    one_trial_sweep, mlflow_server, tmp_path: Path
) -> None:
    name = "halted"
    spec, env, storage = one_trial_sweep(name, epochs=12)  # about 2 s each: stopped mid-trial
    driver = _start_driver(spec, env, tmp_path)
    follower = None
    try:
        deadline = time.monotonic() + 300
        while _journalled_epochs(storage / name) < 1:
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no epoch was reported"
            time.sleep(0.5)
        follower = subprocess.Popen(
            [CHESTXPERT_CLI, "sweep", "logs", name, "--follow"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stopped = chestxpert("sweep", "stop", name, "--timeout", "120", env=env, cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
        assert f"sent SIGINT to the driver of sweep '{name}' (pid {driver.pid}" in stopped.stdout
        assert "exited after" in stopped.stdout
        output, _ = driver.communicate(timeout=30)  # it has exited: nothing left to wait for
        followed, follow_errors = follower.communicate(timeout=30)  # ends with the driver
    finally:
        for process in (driver, follower):
            if process is not None and process.poll() is None:
                process.kill()
    assert driver.returncode == 130, output[-3000:]
    assert "stop requested (SIGINT)" in output and "stopped before its end" in output
    # the trial's own actor, killed if its epoch outlasts Tune's wait, may print one: not ours
    assert not [line for line in output.splitlines() if "Traceback" in line and "pid=" not in line]
    assert follower.returncode == 0, follow_errors[-3000:]
    log_files = list((storage / name / "logs").glob("driver-*.log"))
    assert len(log_files) == 1 and followed.startswith(f"driver log: {log_files[0]}\n")
    assert f"storage: file://{storage}/{name}" in followed
    assert "stop requested (SIGINT)" in followed and "Experiment has been interrupted" in followed
    # released, not finished: no lease, no summary, a trial left to resume
    assert not (storage / name / "chestxpert.lease").exists()
    assert not (storage / name / "chestxpert_summary.json").exists()
    assert [len(epochs) for epochs in _stored_epochs(storage / name).values()] < [12]

    again = chestxpert("sweep", "stop", name, env=env, cwd=tmp_path)
    assert again.returncode == 3 and f"sweep '{name}' is not running" in again.stderr
    assert "Traceback" not in again.stderr

    resumed = chestxpert("sweep", "resume", name, env=env, cwd=tmp_path)  # no --force needed
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((storage / name / "chestxpert_summary.json").read_text())
    assert summary["trials"] == 1 and summary["best_trial_id"]
    stored = _stored_epochs(storage / name)
    assert list(stored.values()) == [list(range(1, 13))], f"epochs lost or run twice: {stored}"

    newest = chestxpert("sweep", "logs", name, env=env, cwd=tmp_path)
    assert newest.returncode == 0, newest.stderr[-3000:]
    assert "best trial" in newest.stdout and "stop requested" not in newest.stdout
    assert len(list((storage / name / "logs").glob("driver-*.log"))) == 2

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}, [
        (r.data.tags.get("chestxpert.role"), r.info.status) for r in runs
    ]


def test_stop_a_submitted_sweep_through_the_jobs_api(
    one_trial_sweep, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    name = "submitted-stop"
    spec, env, storage = one_trial_sweep(name, epochs=2)
    address = ("--address", ray_cluster.dashboard_url)
    submitted = chestxpert("sweep", "submit", str(spec), *address, env=env, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = submitted.stdout.split("submitted ", 1)[1].split(":", 1)[0]
    deadline = time.monotonic() + 300
    while not list((storage / name).glob("train_*")):  # Tune runs, with its SIGINT handler
        assert time.monotonic() < deadline, "the job's driver never started a trial"
        time.sleep(0.5)
    lease = json.loads((storage / name / "chestxpert.lease").read_text())
    assert lease["ray_job"] == job_id

    stopped = chestxpert("sweep", "stop", name, *address, env=env, cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert f"asked Ray to stop job {job_id}" in stopped.stdout
    assert f"job {job_id} ended STOPPED" in stopped.stdout
    logs = chestxpert("sweep", "logs", name, *address, env=env, cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr[-3000:]
    # SIGINT reached the driver (not Ray's default SIGTERM and SIGKILL 3 s later): it let go
    assert "stop requested (SIGINT)" in logs.stdout, logs.stdout[-3000:]
    assert not (storage / name / "chestxpert.lease").exists()
