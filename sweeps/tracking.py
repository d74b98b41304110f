"""MLflow for sweeps: one parent run per sweep, one nested run per trial, nothing lost on outages.

Ray's stock MLflowLoggerCallback does not nest runs; this callback does, and
queues what the server refused so it is sent once the server answers again.
`sync_from_storage` re-logs every trial from the results in storage.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from ray.tune import Callback

from chestxpert.cluster import mlflow_runs
from chestxpert.cluster.mlflow_runs import ENDED_TAG, experiment_id, trial_run


def ended_reason(last_epoch: int, max_epochs: int, errored: bool) -> str:
    """How a trial ended, as users read it in MLflow and `sweep status`."""
    if errored:
        return "errored"
    if last_epoch >= max_epochs:
        return "completed"
    return f"stopped by ASHA at epoch {last_epoch}"


class NestedMlflowCallback(Callback):
    """Tune callback: a nested MLflow run per trial, its config as params, metrics at step = epoch.

    Tune's events only queue the calls; a background thread sends them, so a slow
    or absent server never holds up the driver's event loop (and the trials'
    reports). What the server refuses stays queued and is retried every
    RETRY_SECONDS; while the server is away the sweep goes on.
    """

    RETRY_SECONDS = 30.0

    def __init__(
        self, tracking_uri: str, experiment: str, sweep: str, parent_run_id: str, max_epochs: int
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep = sweep
        self.parent_run_id = parent_run_id
        self.max_epochs = max_epochs
        self.pending: deque[tuple[str, tuple]] = deque()
        self.run_ids: dict[str, str] = {}
        self.ended: set[str] = set()
        self.warned = False
        self._exp: str | None = None
        self._mlflow = None
        self._sender: threading.Thread | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its callbacks with the experiment state: no client, thread or events.
        state = {**self.__dict__, "pending": deque(self.pending), "_mlflow": None, "_sender": None}
        del state["_wake"], state["_closing"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _wake=threading.Event(), _closing=threading.Event())

    # --- plumbing -------------------------------------------------------------------------

    @property
    def client(self):
        if self._mlflow is None:
            self._mlflow = mlflow_runs.client(self.tracking_uri)
        return self._mlflow

    def _run_for(self, trial_id: str, config: dict) -> str:
        if trial_id not in self.run_ids:
            if self._exp is None:
                self._exp = experiment_id(self.client, self.experiment)
            self.run_ids[trial_id] = trial_run(
                self.client, self._exp, self.sweep, self.parent_run_id, trial_id, config
            )
        return self.run_ids[trial_id]

    def _do(self, action: str, args: tuple) -> None:
        if action == "metrics":
            trial_id, config, metrics, step, stamp = args
            from mlflow.entities import Metric

            batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
            self.client.log_batch(self._run_for(trial_id, config), metrics=batch)
        elif action == "end":
            trial_id, config, reason, status = args
            run_id = self._run_for(trial_id, config)
            self.client.set_tag(run_id, ENDED_TAG, reason)
            self.client.set_terminated(run_id, status=status)

    def _submit(self, action: str, args: tuple) -> None:
        self.pending.append((action, args))
        if self._sender is None:
            self._sender = threading.Thread(
                target=self._send_loop, name="mlflow-sender", daemon=True
            )
            self._sender.start()
        self._wake.set()

    def _send_loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait()
            self._wake.clear()
            while not self.flush():  # refused: try again later, or stop when the sweep ends
                if self._closing.wait(self.RETRY_SECONDS):
                    return

    def flush(self) -> bool:
        """Send the queue oldest first, stopping at the first refusal; True when it is empty."""
        while self.pending:
            action, args = self.pending[0]
            try:
                self._do(action, args)
            except Exception as err:
                if not self.warned:
                    print(
                        f"MLflow at {self.tracking_uri} did not answer ({type(err).__name__}); "
                        "queueing metrics and retrying (or run `chestxpert sweep mlflow-sync`)",
                        flush=True,
                    )
                    self.warned = True
                return False
            self.pending.popleft()
        if self.warned:
            print(f"MLflow at {self.tracking_uri} answers again; queued metrics sent", flush=True)
            self.warned = False
        return True

    # --- Tune events ----------------------------------------------------------------------

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        metrics = {k: v for k, v in result.items() if _is_metric(k, v)}
        stamp = int(float(result.get("timestamp", time.time())) * 1000)
        self._submit("metrics", (trial.trial_id, dict(trial.config), metrics, epoch, stamp))

    def _end(self, trial, errored: bool) -> None:
        # last_result survives a driver restart (this callback's own memory does not)
        epoch = int((trial.last_result or {}).get("epoch", 0))
        reason = ended_reason(epoch, self.max_epochs, errored=errored)
        status = "FAILED" if errored else ("FINISHED" if reason == "completed" else "KILLED")
        self.ended.add(trial.trial_id)
        self._submit("end", (trial.trial_id, dict(trial.config), reason, status))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, errored=True)

    def on_experiment_end(self, trials, **info) -> None:
        # trials stopped by the time budget end without on_trial_complete
        for trial in trials:
            if trial.trial_id not in self.ended and trial.last_result:
                self._end(trial, errored=trial.status == "ERROR")
        self.close()

    def close(self, attempts: int = 5, pause: float = 2.0) -> None:
        """Stop the sender once it has sent what it can, then make a few last attempts here."""
        self._closing.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join()
            self._sender = None
        self._closing.clear()  # a later event starts a new sender
        for attempt in range(attempts):
            if self.flush():
                return
            if attempt + 1 < attempts:
                time.sleep(pause)
        print(
            f"{len(self.pending)} MLflow call(s) could not be sent; "
            f"run `chestxpert sweep mlflow-sync {self.sweep}`"
        )


_NOT_METRICS = {
    "training_iteration",
    "timestamp",
    "time_this_iter_s",
    "time_total_s",
    "time_since_restore",
    "iterations_since_restore",
    "pid",
    "done",
    "timesteps_total",
    "episodes_total",
}


def _is_metric(key: str, value: Any) -> bool:
    return (
        key not in _NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool)
    )


def sync_trial(
    client,
    experiment: str,
    sweep: str,
    parent_run_id: str,
    trial_id: str,
    config: dict,
    results: list[dict],
    reason: str | None,
) -> int:
    """Make one trial's MLflow run hold every result from storage.

    Returns how many metric values were added.
    """
    from mlflow.entities import Metric

    run_id = trial_run(
        client, experiment_id(client, experiment), sweep, parent_run_id, trial_id, config
    )
    have: dict[str, set[int]] = {}
    added = []
    for result in results:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        stamp = int(float(result.get("timestamp", time.time())) * 1000)
        for key, value in result.items():
            if not _is_metric(key, value):
                continue
            if key not in have:
                have[key] = {m.step for m in client.get_metric_history(run_id, key)}
            if step not in have[key]:
                added.append(Metric(key, float(value), stamp, step))
                have[key].add(step)
    for start in range(0, len(added), 500):
        client.log_batch(run_id, metrics=added[start : start + 500])
    if reason:
        client.set_tag(run_id, ENDED_TAG, reason)
    return len(added)
