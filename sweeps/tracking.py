"""MLflow for sweeps: one parent run per sweep, one nested run per trial, nothing lost on outages.

Ray's stock MLflowLoggerCallback does not nest runs; this callback does. Every event is
journalled in the sweep's storage (sweeps/journal.py) before a background thread sends it,
so neither an MLflow outage nor a killed driver loses it: `sweep resume` and
`sweep mlflow-sync` replay the journal (sweeps/replay.py).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from chestxpert.cluster.mlflow_runs import safe_uri
from chestxpert.sweeps.journal import Journal
from chestxpert.sweeps.replay import INTERRUPTED
from chestxpert.sweeps.sweep_runs import (
    SweepRuns,
    ended_reason,
    is_metric,
    terminal_status,
)

__all__ = ["NestedMlflowCallback", "ended_reason", "outage_warning"]

METRIC_EVENTS_PER_SEND = 200  # queued metric events sent together (one call per trial)


def outage_warning(tracking_uri: str, where: str, sweep: str, error: BaseException) -> str:
    """The one line a driver prints when MLflow stops answering (or never answered)."""
    return (
        f"MLflow at {safe_uri(tracking_uri)} does not answer ({type(error).__name__}); "
        f"tracking is journalled in {where} and sent when it returns "
        f"(or `chestxpert sweep mlflow-sync {sweep}`)"
    )


class NestedMlflowCallback(Callback):
    """Tune callback: a nested MLflow run per trial, its config as params, metrics at step = epoch.

    Tune's events only journal and queue the calls; a background thread sends them, so a
    slow or absent server never holds up the driver's event loop (and the trials'
    reports). What the server refuses stays queued and is retried every RETRY_SECONDS;
    while the server is away the sweep goes on. Sending is idempotent (`SweepRuns`), so a
    replay of the journal after a crash never duplicates a value.
    """

    RETRY_SECONDS = 30.0

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        sweep: str,
        parent_run_id: str | None,
        max_epochs: int,
        storage_uri: str | None = None,
        dataset: dict[str, Any] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep = sweep
        self.parent_run_id = parent_run_id
        self.max_epochs = max_epochs
        self.storage_uri = storage_uri
        self.dataset = dataset  # the prepared dataset the trials read (`sweep_runs.dataset_input`)
        self.pending: deque[dict[str, Any]] = deque()
        self.ended: set[str] = set()
        self.started: set[str] = set()  # trials this driver ran
        self.warned = False
        self.journal: Journal | None = None
        self.runs = SweepRuns(
            tracking_uri, experiment, sweep, storage_uri, parent_run_id, sole_writer=True
        )
        self._catch_up: Callable[[SweepRuns], None] | None = None
        self._on_parent: Callable[[str], None] | None = None
        self._sender: threading.Thread | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()
        self.stopped: Callable[[], bool] = lambda: False  # the driver's GracefulStop sets it

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment folder: settings only. The journal
        # in storage, not a pickled queue, is what survives the driver.
        keep = ("tracking_uri", "experiment", "sweep", "parent_run_id", "max_epochs")
        return {key: self.__dict__[key] for key in (*keep, "storage_uri", "dataset")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    # --- set-up by the driver -------------------------------------------------------------

    def attach(
        self,
        journal: Journal | None,
        catch_up: Callable[[SweepRuns], None] | None = None,
        on_parent: Callable[[str], None] | None = None,
        warned: bool = False,
    ) -> None:
        """Journal every event from now on; before anything else, the sender runs `catch_up`
        (replaying what earlier drivers left); `on_parent(run_id)` learns the parent's id.
        `warned`: the driver already said MLflow is away, so say it again only once it answered.
        """
        self.journal = journal
        self._catch_up = catch_up
        self._on_parent = on_parent
        self.warned = warned

    def start_parent(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        """Journal and queue the sweep's parent run (found, or created when MLflow answers)."""
        self._submit(
            "parent", config=params, tags=tags, run_id=self.parent_run_id, dataset=self.dataset
        )
        if self._catch_up is not None:
            self.pending.append({"kind": "catch-up"})
            self._wake.set()

    def record_parent(self, run_id: str) -> None:
        """Tell the driver's `on_parent` hook the parent run's id (it records it in storage)."""
        if self._on_parent is not None:
            self._on_parent(run_id)

    @property
    def where(self) -> str:
        """Where unsent events are kept, for messages."""
        if self.journal is None:
            return "this driver's memory"
        return f"{self.journal.location.uri}/tracking"

    # --- plumbing -------------------------------------------------------------------------

    def _submit(self, kind: str, **fields: Any) -> None:
        if self.journal is not None:
            event = self.journal.append(kind, **fields)
        else:
            event = {"kind": kind, **{k: v for k, v in fields.items() if v is not None}}
        self.pending.append(event)
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

    def _next_events(self) -> list[dict[str, Any]]:
        """The oldest event, with the metric events right after it when it is one."""
        events = [self.pending[0]]
        if events[0]["kind"] == "metrics":
            for event in itertools.islice(self.pending, 1, METRIC_EVENTS_PER_SEND):
                if event["kind"] != "metrics":
                    break
                events.append(event)
        return events

    def _send(self, event: dict[str, Any]) -> None:
        if event["kind"] == "catch-up":
            assert self._catch_up is not None
            self._catch_up(self.runs)
            return
        self.runs.apply(event, live=True)
        if event["kind"] == "parent" and self.runs.parent_run_id != self.parent_run_id:
            self.parent_run_id = self.runs.parent_run_id
            if self.parent_run_id:
                self.record_parent(self.parent_run_id)

    def flush(self) -> bool:
        """Send the queue oldest first, stopping at the first refusal; True when it is empty.

        Metric events queued one after another go in one call per trial: when reports
        arrive faster than the server answers, the queue shortens instead of growing."""
        while self.pending:
            events = self._next_events()
            try:
                if len(events) == 1:
                    self._send(events[0])
                else:
                    self.runs.apply_metrics(events, live=True)
            except Exception as err:
                if not self.warned:
                    warning = outage_warning(self.tracking_uri, self.where, self.sweep, err)
                    print(warning, flush=True)
                    self.warned = True
                return False
            for _ in events:
                self.pending.popleft()
            seqs = [event["seq"] for event in events if "seq" in event]
            if self.journal is not None and seqs:
                self.journal.acknowledge(self.tracking_uri, max(seqs))
        if self.warned:
            print(
                f"MLflow at {safe_uri(self.tracking_uri)} answers; journalled tracking sent",
                flush=True,
            )
            self.warned = False
        return True

    # --- Tune events ----------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        # The run exists (RUNNING, with its dataset) from the trial's start, not its first
        # report: the trial's process finds it there to log its system metrics.
        self.started.add(trial.trial_id)
        self._submit(
            "start", trial_id=trial.trial_id, config=dict(trial.config), dataset=self.dataset
        )

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        metrics = {k: v for k, v in result.items() if is_metric(k, v)}
        stamp = int(float(result.get("timestamp", time.time())) * 1000)
        self._submit(
            "metrics",
            trial_id=trial.trial_id,
            config=dict(trial.config),
            metrics=metrics,
            step=epoch,
            timestamp=stamp,
        )

    def _end(self, trial, errored: bool) -> None:
        # last_result survives a driver restart (this callback's own memory does not)
        epoch = int((trial.last_result or {}).get("epoch", 0))
        reason = ended_reason(epoch, self.max_epochs, errored=errored)
        self.ended.add(trial.trial_id)
        self._submit(
            "end",
            trial_id=trial.trial_id,
            config=dict(trial.config),
            reason=reason,
            status=terminal_status(reason),
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, errored=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, errored=True)

    def on_experiment_end(self, trials, **info) -> None:
        # trials stopped by the time budget end without on_trial_complete; after a graceful
        # stop (sweeps/graceful.py) those Tune left unfinished are interrupted, not ended
        for trial in trials:
            if trial.trial_id in self.ended or not trial.last_result:
                continue
            if self.stopped():  # Tune marks them TERMINATED to stop them: not finished
                if trial.trial_id in self.started:  # not the trials earlier drivers ended
                    config = dict(trial.config)
                    self._submit(
                        "end",
                        trial_id=trial.trial_id,
                        config=config,
                        reason=INTERRUPTED,
                        status="KILLED",
                    )
            else:
                self._end(trial, errored=trial.status == "ERROR")
        self.close()

    def close(self, attempts: int = 5, pause: float = 2.0) -> None:
        """Stop the sender once it has sent what it can, make a few last attempts here, and
        close the journal. Safe to call again (a driver's `finally` does)."""
        self._closing.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join()
            self._sender = None
        self._closing.clear()  # a later event starts a new sender
        for attempt in range(attempts):
            if self.flush():
                break
            if attempt + 1 < attempts:
                time.sleep(pause)
        if self.journal is not None:
            self.journal.close()
        unsent = sum(1 for event in self.pending if event["kind"] != "catch-up")
        if self.pending:
            print(
                f"{unsent} tracking event(s) not yet in MLflow are kept in {self.where}; "
                f"run `chestxpert sweep mlflow-sync {self.sweep}`",
                flush=True,
            )
