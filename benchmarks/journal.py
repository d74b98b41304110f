"""Driver CPU per Tune report in NestedMlflowCallback, with the tracking journal on a local
storage folder versus without it (issue #12 asks for <= 1 ms per report).

The MLflow URI refuses connections and the sender has already given up (it retries only after
RETRY_SECONDS), so what is measured is the event path: journal append + flush, and the queue.
Runs alternate sides; every run is printed, then each side's median and spread.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.runner import scratch_dir
from chestxpert.cluster.endpoints import resolve
from chestxpert.cluster.processes import free_port

LABELS = 14  # NIH ChestX-ray14: one AUC per finding, as a trial reports them


def _result(epoch: int) -> dict:
    """A result as Tune hands it to callbacks: the trial's metrics and Tune's bookkeeping."""
    metrics = {f"val_auc_finding_{i}": 0.7 + i / 100 for i in range(LABELS)}
    metrics.update(
        epoch=float(epoch),
        train_loss=0.41,
        val_loss=0.43,
        val_auc_macro=0.74,
        val_auc_micro=0.81,
        epoch_seconds=312.5,
        images_per_second=288.0,
        startup_seconds=47.0,
        learning_rate=3e-4,
        node_id="a" * 56,
    )
    bookkeeping = {
        "timestamp": int(time.time()),
        "training_iteration": epoch,
        "time_this_iter_s": 312.5,
        "time_total_s": 312.5 * epoch,
        "pid": 1234,
        "hostname": "gpu-node-1",
        "done": False,
        "trial_id": "3f9c2_00007",
    }
    return {**metrics, **bookkeeping}


def _config() -> dict:
    """A trial config as the sweeps build it (about 20 keys, a dataset URI among them)."""
    config = {f"trial.option_{i}": f"value-{i}" for i in range(16)}
    config.update(
        dataset="s3://chest-xrays/prepared/nih-224-official",
        backbone="densenet121",
        learning_rate=3.2e-4,
        batch_size=32,
    )
    return config


def measure(reports: int, with_journal: bool, workspace: Path) -> tuple[float, float]:
    """(process CPU, calling-thread CPU) in ms per report over `reports` on_trial_result calls."""
    # Imported here: the tracking module imports Ray, and every benchmark's child process
    # imports this package before it sets Ray's token variables.
    from chestxpert.sweeps.journal import Journal
    from chestxpert.sweeps.layout import locate
    from chestxpert.sweeps.tracking import NestedMlflowCallback

    callback = NestedMlflowCallback(
        f"http://127.0.0.1:{free_port()}", "bench", "bench", None, max_epochs=reports
    )
    callback.runs.client  # noqa: B018 (imports mlflow now, not inside the measurement)
    journal = None
    if with_journal:
        location = locate(resolve(storage=str(workspace / "storage"), environ={}), "bench")
        journal = Journal(location, f"bench-{time.monotonic_ns()}", workspace)
    callback.attach(journal, warned=True)
    trial = SimpleNamespace(trial_id="3f9c2_00007", config=_config(), last_result={})
    callback.on_trial_result(0, [], trial, _result(0))  # the sender starts, fails, waits 30 s
    time.sleep(1)
    results = [_result(epoch) for epoch in range(1, reports + 1)]
    process, thread = time.process_time(), time.thread_time()
    for epoch, result in enumerate(results, start=1):
        callback.on_trial_result(epoch, [], trial, result)
    per_process = (time.process_time() - process) / reports * 1000
    per_thread = (time.thread_time() - thread) / reports * 1000
    callback.pending.clear()  # nothing will be sent: no "not yet in MLflow" line
    callback.close(attempts=0)
    return per_process, per_thread


def run(smoke: bool = False) -> None:
    reports, runs = (50, 1) if smoke else (2000, 5)
    print(f"  {reports} reports per run, {runs} runs per side, alternating; ms of CPU per report")
    sides: dict[str, list[tuple[float, float]]] = {"without journal": [], "with journal": []}
    with scratch_dir() as folder:
        for number in range(runs):
            for label in sides:
                cpu = measure(reports, label == "with journal", folder / f"{label}-{number}")
                sides[label].append(cpu)
                print(
                    f"  run {number + 1} {label:16s} process {cpu[0]:.3f}  "
                    f"event thread {cpu[1]:.3f}"
                )
    for label, values in sides.items():
        process = [v[0] for v in values]
        thread = [v[1] for v in values]
        print(
            f"  {label:16s} process median {statistics.median(process):.3f} "
            f"(min {min(process):.3f}, max {max(process):.3f}); event thread median "
            f"{statistics.median(thread):.3f} (min {min(thread):.3f}, max {max(thread):.3f})"
        )
    extra = statistics.median(v[0] for v in sides["with journal"]) - statistics.median(
        v[0] for v in sides["without journal"]
    )
    print(f"  the journal adds {extra:.3f} ms of driver CPU per report (median, process CPU)")
