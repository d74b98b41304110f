"""The in-memory S3 endpoint's start-up (moto, bucket created) versus the MLflow server's, for
scale: what `chestxpert up --s3` adds to `chestxpert up`."""

from __future__ import annotations

import time

from benchmarks.runner import scratch_dir, services, stop_all
from chestxpert.cluster.processes import free_port
from chestxpert.cluster.stack import StackOptions, start_mlflow, start_s3


def run(smoke: bool = False) -> None:
    # Nothing to shrink: two service start-ups are the whole benchmark.
    with scratch_dir() as ws, services() as records:
        started = time.monotonic()
        records.append(start_s3(StackOptions(workspace=ws, s3_port=free_port())))
        s3_seconds = time.monotonic() - started
        stop_all(records)  # each service starts alone
        started = time.monotonic()
        opts = StackOptions(workspace=ws, mlflow_port=free_port())
        records.append(start_mlflow(opts, (ws / "s").as_uri()))
        mlflow_seconds = time.monotonic() - started
    print(
        f"  s3 endpoint {s3_seconds:.1f} s, mlflow {mlflow_seconds:.1f} s, "
        f"ratio mlflow/s3 {mlflow_seconds / s3_seconds:.1f}x"
    )
