"""Benchmarks (`make bench`): each compares two ways of doing one thing, side by side in one run.

Not tests: numbers vary ±20% run to run on a shared 2-core machine, so they
are printed with their ratio, never asserted.
"""

from __future__ import annotations

import time
from pathlib import Path

from cluster.processes import free_port, session_members, stop_group
from cluster.stack import StackOptions, start_mlflow, start_s3
from tests.conftest import short_tmpdir


def _session_rss_mb(sid: int) -> float:
    total_kb = 0
    for pid in session_members(sid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total_kb / 1024


def bench_mlflow_job_runner() -> None:
    """MLflow server as `up` starts it (job runner off) versus MLflow's default (job runner on)."""
    results = {}
    for label, job_runner in (("job runner off (ours)", False), ("job runner on (default)", True)):
        ws = short_tmpdir("cxb")
        started = time.monotonic()
        opts = StackOptions(workspace=ws, mlflow_port=free_port())
        record = start_mlflow(opts, (ws / "s").as_uri(), job_runner=job_runner)
        seconds = time.monotonic() - started
        time.sleep(5)  # let worker processes settle before measuring memory
        rss = _session_rss_mb(record["pid"])
        stop_group(record["pid"], record["start_time"])
        results[label] = (seconds, rss)
        print(f"  mlflow {label:24s} start {seconds:5.1f} s   RSS {rss:7.0f} MB", flush=True)
    ours, default = results["job runner off (ours)"], results["job runner on (default)"]
    print(
        f"  ratio default/ours: memory {default[1] / ours[1]:.1f}x, start-up {default[0] / ours[0]:.1f}x"
    )


def bench_s3_startup() -> None:
    """The in-memory S3 endpoint's start-up (with bucket creation) versus MLflow's, for scale."""
    ws = short_tmpdir("cxb")
    started = time.monotonic()
    record = start_s3(StackOptions(workspace=ws, s3_port=free_port()))
    s3_seconds = time.monotonic() - started
    stop_group(record["pid"], record["start_time"])
    started = time.monotonic()
    record = start_mlflow(StackOptions(workspace=ws, mlflow_port=free_port()), (ws / "s").as_uri())
    mlflow_seconds = time.monotonic() - started
    stop_group(record["pid"], record["start_time"])
    print(
        f"  s3 endpoint {s3_seconds:.1f} s, mlflow {mlflow_seconds:.1f} s, ratio {mlflow_seconds / s3_seconds:.1f}x"
    )


BENCHMARKS = [bench_mlflow_job_runner, bench_s3_startup]


def main() -> None:
    for bench in BENCHMARKS:
        print(f"{bench.__name__}: {bench.__doc__.splitlines()[0]}", flush=True)
        bench()


if __name__ == "__main__":
    main()
