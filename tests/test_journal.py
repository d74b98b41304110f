"""The tracking journal: written before anything is sent, whole after a SIGKILL, uploaded from a
killed driver's buffer, and replayed into a real MLflow server once per value, however often.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from chestxpert.cluster.endpoints import resolve
from chestxpert.cluster.processes import free_port
from chestxpert.sweeps.journal import Journal, read_segments, upload_leftovers
from chestxpert.sweeps.layout import acked_name, journal_name, locate
from chestxpert.sweeps.replay import sync_sweep
from chestxpert.sweeps.sweep_runs import SweepRuns, dataset_input
from chestxpert.sweeps.tracking import NestedMlflowCallback


def local_location(tmp_path: Path, name: str = "sweep"):
    return locate(resolve(storage=str(tmp_path / "storage"), workspace=tmp_path, environ={}), name)


def test_each_report_is_in_the_journal_before_it_is_sent(tmp_path: Path, capsys) -> None:
    location = local_location(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: every send is refused
    callback = NestedMlflowCallback(dead, "exp", "sweep", None, max_epochs=3)
    journal = Journal(location, "s1", tmp_path)
    callback.attach(journal)
    trial = SimpleNamespace(trial_id="t1", config={"learning_rate": 0.001}, last_result={})
    segment = Path(location.path) / journal_name("s1")

    callback.on_trial_result(1, [], trial, {"epoch": 1, "val_auc_macro": 0.7, "node_id": "n"})
    # on disk as soon as the event returns, whatever the sender is doing
    first = json.loads(segment.read_text().splitlines()[0])
    assert {k: first[k] for k in ("seq", "kind", "trial_id", "config", "metrics", "step")} == {
        "seq": 1,
        "kind": "metrics",
        "trial_id": "t1",
        "config": {"learning_rate": 0.001},
        "metrics": {"epoch": 1, "val_auc_macro": 0.7},
        "step": 1,
    }
    trial.last_result = {"epoch": 1}
    callback.on_trial_complete(2, [], trial)
    last = json.loads(segment.read_text().splitlines()[-1])
    assert (last["seq"], last["kind"], last["reason"], last["status"]) == (
        2,
        "end",
        "stopped by ASHA at epoch 1",
        "KILLED",
    )
    callback.close(attempts=1)
    output = capsys.readouterr().out
    assert f"MLflow at {dead} does not answer" in output
    assert f"tracking is journalled in {location.uri}/tracking" in output
    assert "2 tracking event(s) not yet in MLflow are kept in" in output
    assert [e["seq"] for e in read_segments(location)[0].events] == [1, 2]


APPENDER = """
import sys
from pathlib import Path
from chestxpert.cluster.endpoints import resolve
from chestxpert.sweeps.journal import Journal
from chestxpert.sweeps.layout import locate

storage, workspace, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
location = locate(resolve(storage=storage, workspace=workspace), "sweep")
journal = Journal(location, "doomed", workspace)
config = {f"key_{i}": "x" * 40 for i in range(20)}


def append(count):
    for _ in range(count):
        journal.append("metrics", trial_id="t1", config=config, metrics={"val_loss": 0.5}, step=1)


if mode == "parts":  # a first part uploaded and closed, as the uploader does every 5 s
    append(300)
    journal.sync()
append(5)
print("appended", flush=True)
while mode == "forever":
    append(1)
input()
"""


def _appender(storage: str, workspace: Path, mode: str, env: dict | None = None):
    return subprocess.Popen(
        [sys.executable, "-c", APPENDER, storage, str(workspace), mode],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
        text=True,
        env=env or os.environ,
    )


def test_a_driver_killed_while_appending_leaves_every_whole_line(tmp_path: Path) -> None:
    location = local_location(tmp_path)
    segment = Path(location.path) / journal_name("doomed")
    process = _appender(str(tmp_path / "storage"), tmp_path, "forever")
    try:
        assert process.stdout.readline().strip() == "appended"
        while segment.stat().st_size < 2_000_000:  # killed mid-stream, somewhere in a line
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    whole_lines = segment.read_bytes().count(b"\n")
    (found,) = read_segments(location)
    seqs = [event["seq"] for event in found.events]
    # Every line the kill left whole is read, in order: 2 MB holds about 1,900 of these events.
    assert seqs == list(range(1, whole_lines + 1)) and whole_lines > 1500
    assert found.torn <= 1  # only the line the kill cut, if any


def test_a_killed_drivers_s3_buffer_is_uploaded_by_the_next_command(
    s3_endpoint, tmp_path: Path, monkeypatch
) -> None:
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    storage = f"s3://{s3_endpoint.bucket}/journal-{uuid.uuid4().hex[:8]}"
    endpoints = resolve(
        storage=storage, s3_endpoint_url=s3_endpoint.url, workspace=tmp_path, environ={}
    )
    location = locate(endpoints, "sweep")
    process = _appender(storage, tmp_path, "parts", env={**os.environ})
    try:
        assert process.stdout.readline().strip() == "appended"
    finally:
        process.send_signal(signal.SIGKILL)  # 5 events after the last upload
        process.wait(timeout=30)
    (uploaded,) = read_segments(location)
    assert [e["seq"] for e in uploaded.events] == list(range(1, 301))
    assert location.list_files("tracking") == ["journal-doomed-p00001.jsonl"]
    assert upload_leftovers(location, tmp_path) == ["doomed"]
    (found,) = read_segments(location)
    assert [event["seq"] for event in found.events] == list(range(1, 306))
    assert location.list_files("tracking")[-1] == "journal-doomed-p00002.jsonl"
    assert upload_leftovers(location, tmp_path) == []  # storage has it all now


def _history(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.services
def test_replay_sends_each_journalled_value_once(mlflow_server, tmp_path: Path) -> None:
    import mlflow

    sweep = f"replay-{uuid.uuid4().hex[:8]}"
    location = local_location(tmp_path, sweep)
    journal = Journal(location, "s1", tmp_path)
    manifest = {"digest": "5eed" * 16, "generation": "5eed" * 4, "source": "nih", "labels": ["a"]}
    manifest["splits"] = {"train": {"images": 40}, "val": {"images": 10}}
    dataset = dataset_input("s3://bucket/data/synth-64", manifest)
    journal.append(
        "parent",
        config={"trial.epochs": 3},
        tags={"chestxpert.git_commit": "abc"},
        dataset=dataset,
    )
    # t1 began under a driver that journals trial starts; t2's journal has none (older drivers)
    journal.append("start", trial_id="t1", config={"learning_rate": 0.001}, dataset=dataset)
    for trial_id, epochs in (("t1", 3), ("t2", 2)):
        for epoch in range(1, epochs + 1):
            metrics = {"val_auc_macro": 0.5 + epoch / 10, "val_loss": 1.0 / epoch}
            journal.append(
                "metrics",
                trial_id=trial_id,
                config={"learning_rate": 0.001},
                metrics=metrics,
                step=epoch,
                timestamp=1_700_000_000_000 + epoch,
            )
    journal.append("end", trial_id="t1", config={}, reason="completed", status="FINISHED")
    journal.append(
        "end", trial_id="t2", config={}, reason="stopped by ASHA at epoch 2", status="KILLED"
    )
    journal.close()

    batches: list[str] = []  # runs given metrics, one entry per call

    def sync():
        runs = SweepRuns(mlflow_server.url, sweep, sweep, location.uri)
        send = runs.client.log_batch  # counted, and still sent to the server
        runs.client.log_batch = lambda run_id, **kw: (
            batches.extend([run_id] if kw.get("metrics") else []),
            send(run_id, **kw),
        )
        return sync_sweep(runs, location, "val_auc_macro", "max", 3, {"trial.epochs": 3})

    first = sync()
    assert (first.values, first.events) == (10, 9)
    assert len(batches) == 2, "the 5 consecutive metric events go in one call per trial"
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name(sweep).experiment_id])
    (parent,) = [r for r in runs if r.data.tags["chestxpert.role"] == "sweep"]
    assert parent.data.tags["chestxpert.git_commit"] == "abc"
    trials = {
        r.data.tags["chestxpert.trial_id"]: r
        for r in runs
        if r.data.tags["chestxpert.role"] == "trial"
    }
    assert set(trials) == {"t1", "t2"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials.values())
    assert trials["t1"].info.status == "FINISHED" and trials["t2"].info.status == "KILLED"
    assert trials["t2"].data.tags["chestxpert.ended"] == "stopped by ASHA at epoch 2"
    assert location.read_json(acked_name("s1")) == {"acked": {mlflow_server.url: 9}}
    # MLflow's UI opens the experiment on its runs, and shows the dataset the journal carried
    experiment = client.get_experiment_by_name(sweep)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    def inputs(run_id: str) -> list:
        return client.get_run(run_id).inputs.dataset_inputs

    for run_id in (parent.info.run_id, trials["t1"].info.run_id):
        (held,) = inputs(run_id)
        assert (held.dataset.name, held.dataset.digest) == ("synth-64", "5eed" * 4)
        assert json.loads(held.dataset.source) == {"uri": "s3://bucket/data/synth-64"}
        assert json.loads(held.dataset.profile)["images"] == {"train": 40, "val": 10}
        assert [(t.key, t.value) for t in held.tags] == [("mlflow.data.context", "training")]
    assert inputs(trials["t2"].info.run_id) == []

    again = sync()  # acknowledged: nothing to replay
    assert (again.values, again.events) == (0, 0)
    os.remove(Path(location.path) / acked_name("s1"))  # the marker lost: replay checks MLflow
    replayed = sync()
    assert (replayed.values, replayed.events) == (0, 9)
    assert len(inputs(parent.info.run_id)) == len(inputs(trials["t1"].info.run_id)) == 1
    for trial_id, epochs in (("t1", [1, 2, 3]), ("t2", [1, 2])):
        for key in ("val_auc_macro", "val_loss"):
            assert _history(client, trials[trial_id].info.run_id, key) == epochs


def test_a_resume_ends_the_run_of_a_trial_tune_never_recorded(mlflow_server, tmp_path) -> None:
    """A driver killed between starting a trial and Tune's next snapshot: the resume runs that
    slot as a new trial, so the old one's run is ended KILLED (abandoned) rather than left
    RUNNING; a trial Tune's snapshot has, with no results yet, is the resume's to continue."""
    import mlflow

    from chestxpert.sweeps.replay import ABANDONED

    sweep = f"abandoned-{uuid.uuid4().hex[:8]}"
    location = local_location(tmp_path, sweep)
    journal = Journal(location, "dead", tmp_path)
    journal.append("parent", config={"trial.epochs": 3}, tags={})
    for trial_id in ("kept", "lost"):
        journal.append("start", trial_id=trial_id, config={"learning_rate": 0.001})
    journal.close()
    # Tune's snapshot, in its own format: one entry per trial it will restore
    kept = [json.dumps({"trial_id": "kept", "status": "RUNNING"}), "{}"]
    state = Path(location.path) / "experiment_state-2026-12-03_10-00-00.json"
    state.write_text(json.dumps({"trial_data": [kept]}))

    runs = SweepRuns(mlflow_server.url, sweep, sweep, location.uri)
    counts = sync_sweep(runs, location, "val_auc_macro", "max", 3, {"trial.epochs": 3})
    assert counts.ended == 1
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    found = client.search_runs([client.get_experiment_by_name(sweep).experiment_id])
    trials = {
        r.data.tags["chestxpert.trial_id"]: r
        for r in found
        if r.data.tags["chestxpert.role"] == "trial"
    }
    assert trials["lost"].info.status == "KILLED"
    assert trials["lost"].data.tags["chestxpert.ended"] == ABANDONED
    assert trials["kept"].info.status == "RUNNING"
