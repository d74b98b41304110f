"""The sweep's MLflow callback never holds up Tune's event loop, and keeps what a server refuses.

The end-to-end behaviour (nested runs on a real MLflow server, an outage mid-sweep,
`mlflow-sync`) is in test_sweeps.py; this checks the callback's threading against a
server that accepts connections and never answers, as a hung MLflow does.
"""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest

from chestxpert.sweeps.tracking import NestedMlflowCallback, ended_reason
from chestxpert.trainable.system_metrics import enabled, visible_gpus


class HungServer:
    """A TCP server on 127.0.0.1 that accepts connections and answers nothing until released."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connected = threading.Event()
        self.released = threading.Event()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.released.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            self.connected.set()

    def release(self) -> None:
        """Drop every connection (the client sees a reset) and stop listening."""
        self.released.set()
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for connection in self.connections:
            connection.shutdown(socket.SHUT_RDWR)
            connection.close()


def test_results_are_queued_while_a_hung_server_holds_the_sender(capsys) -> None:
    server = HungServer()
    callback = NestedMlflowCallback(
        f"http://127.0.0.1:{server.port}", "exp", "sweep", "parent", max_epochs=3
    )
    trial = SimpleNamespace(
        trial_id="t1", config={"learning_rate": 0.001}, last_result={"epoch": 1}
    )
    try:
        callback.on_trial_result(1, [], trial, {"epoch": 1, "val_auc_macro": 0.7, "node_id": "n"})
        # The event returned; the sender is now inside a request the server never answers.
        assert server.connected.wait(30), "the sender never reached the server"
        callback.on_trial_result(2, [], trial, {"epoch": 2, "val_auc_macro": 0.8})
        assert len(callback.pending) == 2, (
            "nothing can have been sent to a server that answers nothing"
        )
    finally:
        server.release()
    callback.close(attempts=1)
    output = capsys.readouterr().out
    assert f"MLflow at http://127.0.0.1:{server.port} does not answer" in output
    assert (
        "2 tracking event(s) not yet in MLflow are kept in this driver's memory; "
        "run `chestxpert sweep mlflow-sync sweep`"
    ) in output
    first = dict(callback.pending[0])
    assert first.pop("timestamp") > 0
    assert first == {
        "kind": "metrics",
        "trial_id": "t1",
        "config": {"learning_rate": 0.001},
        "metrics": {"epoch": 1, "val_auc_macro": 0.7},
        "step": 1,
    }


def test_the_callback_pickles_with_its_settings_only() -> None:
    """Tune pickles callbacks into the experiment folder; the journal, not a pickled queue,
    is what outlives the driver, and a restored sweep gets this driver's callback anyway."""
    import pickle

    server = HungServer()
    callback = NestedMlflowCallback(f"http://127.0.0.1:{server.port}", "exp", "sweep", "p", 3)
    trial = SimpleNamespace(trial_id="t1", config={}, last_result={"epoch": 3})
    try:
        callback.on_trial_complete(3, [], trial)
        assert server.connected.wait(30)
        copy = pickle.loads(pickle.dumps(callback))
    finally:
        server.release()
        callback.close(attempts=1)
    assert copy._sender is None and copy.journal is None and not copy.pending
    assert (copy.tracking_uri, copy.parent_run_id, copy.max_epochs) == (
        f"http://127.0.0.1:{server.port}",
        "p",
        3,
    )


def test_how_a_trial_ended_reads_as_users_expect() -> None:
    assert ended_reason(3, 3, errored=False) == "completed"
    assert ended_reason(1, 3, errored=False) == "stopped by ASHA at epoch 1"
    assert ended_reason(2, 3, errored=True) == "errored"


def test_a_local_store_keeps_artifacts_next_to_its_database(tmp_path, monkeypatch) -> None:
    import mlflow

    from chestxpert.cluster.mlflow_runs import experiment_id as mlflow_experiment_id

    monkeypatch.chdir(tmp_path)
    database = tmp_path / "ws" / "mlflow.db"
    database.parent.mkdir()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{database}")
    experiment = mlflow_experiment_id(client, "local")
    assert mlflow_experiment_id(client, "local") == experiment
    run = client.create_run(experiment)
    (tmp_path / "note.txt").write_text("report")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    assert not (tmp_path / "mlruns").exists(), "artifacts landed in the working directory"
    stored = list((tmp_path / "ws" / "mlflow-artifacts").rglob("note.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "report"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", []), ("1", ["1"]), ("0, 2", ["0", "2"]), ("GPU-5eed", ["GPU-5eed"])],
)
def test_a_trial_monitors_only_the_gpus_ray_gave_it(value, expected) -> None:
    assert visible_gpus(value) == expected


def test_trials_log_system_metrics_to_an_mlflow_server_unless_switched_off() -> None:
    assert enabled("http://127.0.0.1:5000", {})
    assert enabled("https://mlflow.example", {"MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true"})
    assert not enabled("http://127.0.0.1:5000", {"MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"})
    assert not enabled("sqlite:////tmp/mlflow.db", {})  # the driver's own store: not shared


@pytest.mark.services
def test_queued_reports_go_in_one_call_per_trial_and_a_resumed_driver_adds_no_run(
    mlflow_server,
) -> None:
    """Reports that queued up while the sender was busy reach MLflow in one `log_batch` per
    trial, each value once; sending them again adds nothing; a second driver of the same
    sweep (a resume) finds the trial's run instead of making another."""
    from chestxpert.cluster.mlflow_runs import client, experiment_id, trial_run_ids

    def driver() -> NestedMlflowCallback:
        callback = NestedMlflowCallback(mlflow_server.url, "coalesce", "sweep-c", None, 3)
        calls = []
        real = callback.runs.client.log_batch
        callback.runs.client.log_batch = lambda run_id, **kw: (
            calls.append(run_id) or real(run_id, **kw)
        )
        callback.log_batch_calls = calls
        return callback

    first = driver()
    trials = [SimpleNamespace(trial_id=f"t{n}", config={"lr": n}, last_result={}) for n in (1, 2)]
    reports = [
        {"kind": "metrics", "trial_id": t.trial_id, "config": t.config, "step": epoch,
         "timestamp": 1_000 * epoch, "metrics": {"val_auc_macro": 0.5 + epoch / 10 + n / 100}}
        for epoch in (1, 2, 3)
        for n, t in enumerate(trials)
    ]  # fmt: skip
    starts = [{"kind": "start", "trial_id": t.trial_id, "config": t.config} for t in trials]
    first.pending.extend(starts)
    first.pending.extend(reports)
    assert first.flush() and not first.pending
    # the two starts log the params (one call each); the six reports, one call per trial
    assert len(first.log_batch_calls) == 2 + 2, first.log_batch_calls
    first.pending.extend(reports)  # as a replay would send them again
    assert first.flush()
    assert len(first.log_batch_calls) == 4, "values MLflow has are not sent again"

    mlflow = client(mlflow_server.url)
    runs = trial_run_ids(mlflow, experiment_id(mlflow, "coalesce"), "sweep-c")
    assert sorted(runs) == ["t1", "t2"]
    for n, trial in enumerate(trials):
        history = mlflow.get_metric_history(runs[trial.trial_id], "val_auc_macro")
        assert sorted((m.step, round(m.value, 4)) for m in history) == [
            (epoch, round(0.5 + epoch / 10 + n / 100, 4)) for epoch in (1, 2, 3)
        ]

    resumed = driver()
    resumed.pending.append({"kind": "start", "trial_id": "t1", "config": {"lr": 1}})
    resumed.pending.append({"kind": "start", "trial_id": "t3", "config": {"lr": 3}})
    assert resumed.flush()
    again = trial_run_ids(mlflow, experiment_id(mlflow, "coalesce"), "sweep-c")
    assert again["t1"] == runs["t1"] and sorted(again) == ["t1", "t2", "t3"]


class _SearchLog:
    """A meta path finder that records each module the import system searches for."""

    def __init__(self) -> None:
        self.searched: list[str] = []

    def find_spec(self, name, path=None, target=None):
        self.searched.append(name)
        return None  # the real finders after it decide


@pytest.mark.services
def test_mlflow_requests_do_not_search_for_databricks_packages_this_machine_lacks(
    mlflow_server, monkeypatch
) -> None:
    """MLflow's Databricks request-header provider imports Databricks' packages on every request
    to ask whether it runs there; `client()` drops it where none is installed, so no request
    searches sys.path for them, and nothing marks them absent in sys.modules."""
    import importlib
    import sys

    from chestxpert.cluster.mlflow_runs import client, experiment_id

    mlflow = client(mlflow_server.url)
    run_id = mlflow.create_run(experiment_id(mlflow, "probes")).info.run_id
    log = _SearchLog()
    monkeypatch.setattr(sys, "meta_path", [log, *sys.meta_path])
    with pytest.raises(ImportError):
        importlib.import_module("chestxpert_no_such_package")  # the log sees searches
    for _ in range(3):
        mlflow.set_tag(run_id, "probe", "x")
    probes = {"dbruntime", "dbruntime.databricks_repl_context", "pyspark", "pyspark.sql", "IPython"}
    assert "chestxpert_no_such_package" in log.searched
    assert not probes & set(log.searched), log.searched
    assert mlflow.get_run(run_id).data.tags["probe"] == "x"
    # libraries read `"IPython" in sys.modules` as "imported": nothing may stand in for it
    assert not probes & set(sys.modules)


def test_the_databricks_headers_stay_where_databricks_may_run() -> None:
    from mlflow.tracking.request_header.databricks_request_header_provider import (
        DatabricksRequestHeaderProvider,
    )
    from mlflow.tracking.request_header.registry import _request_header_provider_registry

    before = list(_request_header_provider_registry)
    from chestxpert.cluster.mlflow_runs import skip_databricks_headers

    assert not skip_databricks_headers({"DATABRICKS_RUNTIME_VERSION": "15.4"})
    assert list(_request_header_provider_registry) == before
    assert skip_databricks_headers({})  # here: no dbruntime, no pyspark
    kept = list(_request_header_provider_registry)
    assert kept and not any(isinstance(p, DatabricksRequestHeaderProvider) for p in kept)
