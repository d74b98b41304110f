"""MLflow server as `chestxpert up` starts it (job runner off) versus MLflow's default (job runner
on): start-up seconds and resident memory of the whole server session."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.runner import scratch_dir, services
from chestxpert.cluster.processes import free_port, session_members
from chestxpert.cluster.stack import StackOptions, start_mlflow

SIDES = (("job runner off (ours)", False), ("job runner on (default)", True))


def session_rss_mb(sid: int) -> float:
    """Resident memory of every live process in session `sid`, in MiB."""
    total_kb = 0
    for pid in session_members(sid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total_kb / 1024


def run(smoke: bool = False) -> None:
    # The job runner's workers start after /health answers: let them settle before measuring.
    settle_seconds = 0 if smoke else 5
    results = {}
    for label, job_runner in SIDES:
        with scratch_dir() as ws, services() as records:
            started = time.monotonic()
            # generous: with its job runner on, MLflow starts 8 processes (slow on a busy box)
            opts = StackOptions(workspace=ws, mlflow_port=free_port(), timeout_s=300)
            records.append(start_mlflow(opts, (ws / "s").as_uri(), job_runner=job_runner))
            seconds = time.monotonic() - started
            time.sleep(settle_seconds)
            rss = session_rss_mb(records[0]["pid"])
        results[label] = (seconds, rss)
        print(f"  mlflow {label:24s} start {seconds:5.1f} s   RSS {rss:7.0f} MB", flush=True)
    (ours_seconds, ours_rss), (default_seconds, default_rss) = results.values()
    print(
        f"  ratio default/ours: memory {default_rss / ours_rss:.1f}x, "
        f"start-up {default_seconds / ours_seconds:.1f}x"
    )
