"""One sweep's runs on one MLflow server, written so that sending an event twice changes nothing:
runs are found by their tags, a metric is skipped where its run already has that step.

Both the live sender (sweeps/tracking.py) and replay (sweeps/replay.py) write through this.
"""

from __future__ import annotations

import json
import time
from typing import Any

from chestxpert.cluster import mlflow_runs
from chestxpert.cluster.mlflow_runs import (
    ENDED_TAG,
    ensure_parent_run,
    ensure_trial_run,
    log_dataset,
    trial_run_ids,
)

TERMINAL = ("FINISHED", "KILLED", "FAILED")
BATCH = 500  # metrics per log_batch call (MLflow takes at most 1000)

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


def is_metric(key: str, value: Any) -> bool:
    """True for a reported value MLflow should chart: a number that is not Tune's bookkeeping."""
    return (
        key not in _NOT_METRICS and isinstance(value, int | float) and not isinstance(value, bool)
    )


def ended_reason(last_epoch: int, max_epochs: int, errored: bool) -> str:
    """How a trial ended, as users read it in MLflow and `sweep status`."""
    if errored:
        return "errored"
    if last_epoch >= max_epochs:
        return "completed"
    return f"stopped by ASHA at epoch {last_epoch}"


def terminal_status(reason: str) -> str:
    """The MLflow run status for an `ended_reason`: FINISHED, KILLED or FAILED."""
    if reason == "errored":
        return "FAILED"
    return "FINISHED" if reason == "completed" else "KILLED"


def dataset_input(uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The prepared dataset as MLflow shows it in its Datasets column, as a plain dict for the
    journal: named by its folder, its generation as the digest, the manifest's counts as the
    profile (see `mlflow_runs.log_dataset`)."""
    from chestxpert.datasets.schema import generation_of

    name = uri.rstrip("/").rsplit("/", 1)[-1] or uri
    splits = manifest.get("splits", {})
    profile = {
        "digest": manifest.get("digest"),
        "source": manifest.get("source"),
        "synthetic": bool(manifest.get("synthetic")),
        "image_size": manifest.get("image_size"),
        "labels": len(manifest.get("labels", [])),
        "images": {split: part.get("images") for split, part in splits.items()},
    }
    return {"name": name, "uri": uri, "digest": generation_of(manifest), "profile": profile}


def metric_rows(results: list[dict[str, Any]]) -> list[tuple[int, int, dict[str, float]]]:
    """Tune results as `(step = epoch, timestamp in ms, metrics)` rows."""
    rows = []
    for result in results:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        stamp = int(float(result.get("timestamp", time.time())) * 1000)
        rows.append((step, stamp, {k: v for k, v in result.items() if is_metric(k, v)}))
    return rows


def event_row(event: dict[str, Any]) -> tuple[int, int, dict[str, float]]:
    """A journal `metrics` event as a `(step, timestamp in ms, metrics)` row."""
    return int(event.get("step", 0)), int(event["timestamp"]), event.get("metrics", {})


class SweepRuns:
    """The parent run and the trial runs of sweep `sweep` on the server at `tracking_uri`.

    Remembers which steps each run has (asked once per run and metric, or known because
    this object made the run); forgets a run's steps when a call fails, since the server
    may have taken the call before the answer was lost. `sole_writer` (the driver holding
    the sweep's lease) lists the sweep's trial runs once, and then makes a new trial's run
    without first searching for it.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        sweep: str,
        storage_uri: str | None = None,
        parent_run_id: str | None = None,
        sole_writer: bool = False,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep = sweep
        self.storage_uri = storage_uri
        self.parent_run_id = parent_run_id
        self._client = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._status: dict[str, str] = {}  # run id -> status as last seen or set
        self._ended: dict[str, str | None] = {}  # run id -> its chestxpert.ended tag
        self._steps: dict[str, dict[str, set[int]]] = {}  # run id -> metric -> steps it has
        self._fresh: set[str] = set()  # runs made here: every step they have is in _steps
        self._inputs: dict[str, set[tuple[str, str]]] = {}  # run id -> its (dataset, digest)s
        self._sole_writer = sole_writer
        self._listed: set[str] | None = None  # trial ids that have (or may have) a run

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_runs.client(self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = mlflow_runs.experiment_id(self.client, self.experiment)
        return self._experiment_id

    def ensure_parent(
        self,
        params: dict[str, Any],
        tags: dict[str, str],
        reuse: str | None = None,
        reopen: bool = False,
        dataset: dict[str, Any] | None = None,
    ) -> str:
        """Find or create the parent run and return its id; `reopen` marks it RUNNING again
        (a resumed sweep); `dataset` (see `dataset_input`) is logged as its input if missing."""
        run, created = ensure_parent_run(
            self.client,
            self.experiment_id,
            self.sweep,
            params,
            tags,
            reuse or self.parent_run_id,
            self.storage_uri,
        )
        if reopen and not created and run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.parent_run_id = run.info.run_id
        if dataset:
            self._log_dataset(run, dataset)
        return self.parent_run_id

    def trial(
        self, trial_id: str, config: dict[str, Any], dataset: dict[str, Any] | None = None
    ) -> str:
        """The id of the trial's run, found or created under the parent run; `dataset` is
        logged as its input if missing."""
        run = None
        if trial_id not in self._runs:
            surely_new = self._surely_new(trial_id)
            if surely_new:
                self._listed.add(trial_id)  # a failed call may have made it: search next time
            run, created = ensure_trial_run(
                self.client,
                self.experiment_id,
                self.sweep,
                self.parent_run_id,
                trial_id,
                config,
                surely_new=surely_new,
            )
            run_id = run.info.run_id
            self._runs[trial_id] = run_id
            self._status[run_id] = run.info.status
            self._ended[run_id] = run.data.tags.get(ENDED_TAG)
            if created:
                self._fresh.add(run_id)
        run_id = self._runs[trial_id]
        if dataset and (dataset["name"], dataset["digest"]) not in self._inputs.get(run_id, ()):
            self._log_dataset(run or self.client.get_run(run_id), dataset)
        return run_id

    def _surely_new(self, trial_id: str) -> bool:
        # One search per driver instead of one per trial: the driver is the sweep's only writer
        if not self._sole_writer:
            return False
        if self._listed is None:
            self._listed = set(trial_run_ids(self.client, self.experiment_id, self.sweep))
        return trial_id not in self._listed

    def _log_dataset(self, run, dataset: dict[str, Any]) -> None:
        log_dataset(self.client, run, dataset)
        held = self._inputs.setdefault(run.info.run_id, set())
        held.add((dataset["name"], dataset["digest"]))

    def log_metrics(
        self,
        trial_id: str,
        config: dict[str, Any],
        rows: list[tuple[int, int, dict[str, float]]],
        reopen: bool = False,
    ) -> int:
        """Log `(step, timestamp ms, metrics)` rows the trial's run lacks; return how many values.

        `reopen` (the live driver) marks an ended run RUNNING again when it gets new values:
        a trial continued by `sweep resume` after `mlflow-sync` marked it interrupted.
        """
        from mlflow.entities import Metric

        run_id = self.trial(trial_id, config)
        steps = self._steps.setdefault(run_id, {})
        batch = []
        try:
            for step, stamp, metrics in rows:
                for key, value in metrics.items():
                    if key not in steps:
                        steps[key] = (
                            set()
                            if run_id in self._fresh
                            else {m.step for m in self.client.get_metric_history(run_id, key)}
                        )
                    if step not in steps[key]:
                        batch.append(Metric(key, float(value), stamp, step))
                        steps[key].add(step)
            if reopen and batch and self._status.get(run_id) in TERMINAL:
                self.client.update_run(run_id, status="RUNNING")
                self._status[run_id] = "RUNNING"
            for start in range(0, len(batch), BATCH):
                self.client.log_batch(run_id, metrics=batch[start : start + BATCH])
        except Exception:
            self._forget(run_id)
            raise
        return len(batch)

    def end_trial(self, trial_id: str, config: dict[str, Any], reason: str, status: str) -> bool:
        """Give the trial's run its `chestxpert.ended` tag and terminal status; True if changed."""
        run_id = self.trial(trial_id, config)
        changed = False
        try:
            if self._ended.get(run_id) != reason:
                self.client.set_tag(run_id, ENDED_TAG, reason)
                self._ended[run_id] = reason
                changed = True
            if self._status.get(run_id) != status:
                self.client.set_terminated(run_id, status=status)
                self._status[run_id] = status
                changed = True
        except Exception:
            self._forget(run_id)
            raise
        return changed

    def _forget(self, run_id: str) -> None:
        # The failed call may have reached the server: ask it again before the next write.
        self._steps.pop(run_id, None)
        self._fresh.discard(run_id)
        self._status.pop(run_id, None)
        self._ended.pop(run_id, None)

    def apply(self, event: dict[str, Any], live: bool = False) -> int:
        """Send one journal event; returns the metric values added (0 for parent, start, end).

        `live` (the driver sending its own events) marks a resumed parent or trial RUNNING.
        """
        kind = event["kind"]
        if kind == "parent":
            self.ensure_parent(
                event.get("config", {}),
                event.get("tags", {}),
                event.get("run_id"),
                reopen=live,
                dataset=event.get("dataset"),
            )
            return 0
        trial_id, config = event["trial_id"], event.get("config", {})
        if kind == "start":
            run_id = self.trial(trial_id, config, event.get("dataset"))
            if live and self._status.get(run_id) in TERMINAL:  # continued by `sweep resume`
                try:
                    self.client.update_run(run_id, status="RUNNING")
                except Exception:
                    self._forget(run_id)
                    raise
                self._status[run_id] = "RUNNING"
            return 0
        if kind == "metrics":
            return self.apply_metrics([event], live=live)
        if kind == "end":
            self.end_trial(trial_id, config, event["reason"], event["status"])
            return 0
        raise ValueError(f"unknown journal event kind {kind!r}")

    def apply_metrics(self, events: list[dict[str, Any]], live: bool = False) -> int:
        """Send journal `metrics` events in one `log_batch` per trial (`apply` sends one);
        returns the metric values added. Sending one again changes nothing."""
        rows: dict[str, list[tuple[int, int, dict[str, float]]]] = {}
        configs: dict[str, dict[str, Any]] = {}
        for event in events:
            rows.setdefault(event["trial_id"], []).append(event_row(event))
            configs[event["trial_id"]] = event.get("config", {})
        return sum(
            self.log_metrics(trial_id, configs[trial_id], trial_rows, reopen=live)
            for trial_id, trial_rows in rows.items()
        )

    def end_parent(self, status: str, summary: dict[str, Any] | None = None) -> bool:
        """Record the sweep's summary (best metric, trial, checkpoint, config) on the parent run
        and give it `status`; True if anything changed. Needs the parent id known."""
        assert self.parent_run_id, "ensure_parent first"
        run = self.client.get_run(self.parent_run_id)
        changed = False
        if summary and summary.get("best_trial_id"):
            key = f"best_{summary['metric']}"
            if run.data.metrics.get(key) != summary["best_metric"]:
                self.client.log_metric(self.parent_run_id, key, float(summary["best_metric"]))
                changed = True
            tags = {
                "chestxpert.best_trial_id": str(summary["best_trial_id"]),
                "chestxpert.best_checkpoint": str(summary.get("best_checkpoint")),
            }
            if any(run.data.tags.get(k) != v for k, v in tags.items()):
                for tag, value in tags.items():
                    self.client.set_tag(self.parent_run_id, tag, value)
                text = json.dumps(summary.get("best_config"), indent=2, default=str)
                self.client.log_text(self.parent_run_id, text, "best_config.json")
                changed = True
        if run.info.status != status:
            self.client.set_terminated(self.parent_run_id, status=status)
            changed = True
        return changed
