"""A trial's system metrics (CPU, memory, disk, network, the trial's own GPUs) sampled in the
trial's process by MLflow's system-metrics monitor and logged to the trial's MLflow run.

The sweep driver makes the run (sweeps/tracking.py, at the trial's start); the trial finds it by
its tags and monitors it until the trial function returns. Nothing here may fail a trial.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

# One point every 10 s (MLflow's default): 6 per minute-long epoch, 360 per hour-long one.
# Nodes may set MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL and
# MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING (samples averaged per point) instead.
SAMPLING_SECONDS = 10.0
FIND_SECONDS = 3.0  # how often the trial looks for its run until the driver has made it
_OFF = ("0", "false", "no", "off")


@dataclass(frozen=True)
class SystemMetricsTarget:
    """Where a sweep's trial runs are: the MLflow server, the experiment and the sweep's name.

    `tracking_uri` carries no password: trial processes log in with their node's
    MLFLOW_TRACKING_USERNAME/PASSWORD, as they take S3 credentials from their node.
    """

    tracking_uri: str
    experiment: str
    sweep: str
    sampling_seconds: float = SAMPLING_SECONDS


def enabled(tracking_uri: str, environ: dict[str, str] | None = None) -> bool:
    """True when trials should log system metrics to `tracking_uri`: an MLflow server (http or
    https; a local SQLite or file store is the driver's alone) and not switched off with
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false."""
    environ = os.environ if environ is None else environ
    switch = environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower()
    return tracking_uri.startswith(("http://", "https://")) and switch not in _OFF


def visible_gpus(value: str | None) -> list[str] | None:
    """The GPUs a process may use, from CUDA_VISIBLE_DEVICES as Ray sets it per trial: indices
    or UUIDs; [] for none (a CPU trial); None when unset (every GPU of the node)."""
    if value is None:
        return None
    return [device.strip() for device in value.split(",") if device.strip()]


def _monitor_class():
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class TrialProcessMonitor(BaseMetricsMonitor):
        """The trial's own process: CPU (100 = one core busy) and resident memory."""

        def __init__(self) -> None:
            import psutil

            super().__init__()
            self.process = psutil.Process()
            self.process.cpu_percent(None)  # the first call only starts the measurement

        def collect_metrics(self) -> None:
            self._metrics["trial_cpu_utilization_percentage"].append(self.process.cpu_percent())
            rss = self.process.memory_info().rss
            self._metrics["trial_memory_rss_megabytes"].append(rss / 1e6)

        def aggregate_metrics(self) -> dict[str, float]:
            return {k: round(sum(v) / len(v), 1) for k, v in self._metrics.items()}

    class TrialGPUMonitor(GPUMonitor):
        """MLflow's NVIDIA monitor, narrowed to the GPUs Ray gave the trial (numbered as the
        trial sees them: gpu_0 is its first); NVML itself sees every GPU of the node."""

        def __init__(self) -> None:
            import pynvml

            super().__init__()
            chosen = visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"))
            if chosen is not None:
                self.gpu_handles = [
                    pynvml.nvmlDeviceGetHandleByIndex(int(device))
                    if device.isdigit()
                    else pynvml.nvmlDeviceGetHandleByUUID(device)
                    for device in chosen
                ]
                self.num_gpus = len(self.gpu_handles)
            if not self.gpu_handles:
                raise RuntimeError("this trial has no GPU")

    class TrialMonitor(SystemMetricsMonitor):
        """MLflow's monitor with the trial's process and GPUs; `ended` is set when its loop
        returns by itself (its run is not RUNNING, or MLflow did not answer)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.monitors.append(TrialProcessMonitor())
            self.ended = threading.Event()

        def _initialize_gpu_monitor(self):
            try:
                return TrialGPUMonitor()
            except Exception:  # no NVML, no GPU on the node, or none given to this trial
                return None

        def monitor(self) -> None:
            try:
                super().monitor()
            finally:
                self.ended.set()

    return TrialMonitor


class TrialSystemMetrics:
    """A background thread that finds trial `trial_id`'s run and keeps MLflow's monitor on it
    (started again, continuing its steps, if it stops while the trial still runs)."""

    def __init__(self, target: SystemMetricsTarget, trial_id: str) -> None:
        self.target = target
        self.trial_id = trial_id
        self.run_id: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="system-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and send what was sampled; waits for the thread."""
        self._stop.set()
        self._thread.join(timeout=60)

    def _find_run(self, client) -> str | None:
        from chestxpert.cluster.mlflow_runs import SWEEP_TAG, TRIAL_TAG, find_run

        experiment = client.get_experiment_by_name(self.target.experiment)
        if experiment is None:
            return None
        tags = {SWEEP_TAG: self.target.sweep, TRIAL_TAG: self.trial_id}
        run = find_run(client, experiment.experiment_id, tags)
        return run.info.run_id if run is not None and run.info.status == "RUNNING" else None

    def _watch(self) -> None:
        try:
            from chestxpert.cluster import mlflow_runs

            client = mlflow_runs.client(self.target.tracking_uri)
            # MLflow says "Started monitoring" at every (re)start: noise in the trial's log.
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            monitor_class = _monitor_class()
        except Exception as err:  # MLflow not importable here: train without the metrics
            print(f"system metrics off: {type(err).__name__}: {err}", flush=True)
            return
        while not self._stop.is_set():
            try:
                self.run_id = self._find_run(client)
                if self.run_id:
                    self._monitor(monitor_class)
            except Exception:  # MLflow away or refusing: look again later
                pass
            self._stop.wait(FIND_SECONDS)

    def _monitor(self, monitor_class) -> None:
        monitor = monitor_class(
            self.run_id,
            sampling_interval=self.target.sampling_seconds,
            resume_logging=True,  # a resumed or restarted trial continues its steps
            tracking_uri=self.target.tracking_uri,
        )
        monitor.start()
        try:
            while not self._stop.is_set() and not monitor.ended.is_set():
                self._stop.wait(1.0)
        finally:
            monitor.finish()


@contextlib.contextmanager
def trial_system_metrics(
    target: SystemMetricsTarget | None, trial_id: str | None
) -> Iterator[TrialSystemMetrics | None]:
    """Log the trial's system metrics to its MLflow run while the block runs (nothing when
    `target` is None or `enabled` says no)."""
    if target is None or not trial_id or not enabled(target.tracking_uri):
        yield None
        return
    watcher = TrialSystemMetrics(target, trial_id)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()
