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


def bench_parquet_pipeline_vs_png_decode() -> None:
    """Images/s into the model at 224×224: prepared Parquet shards versus decoding+resizing PNGs each epoch."""
    import tempfile

    import numpy as np
    import tensorflow as tf

    from cluster.endpoints import resolve
    from datasets.nih import read_nih
    from datasets.prepare import PrepareOptions, prepare
    from datasets.reader import make_tf_dataset, open_dataset
    from datasets.synth import generate

    work = Path(tempfile.mkdtemp(prefix="cx-bench-"))
    images, original = 400, 1024  # NIH originals are 1024×1024 PNGs
    started = time.monotonic()
    generate(work / "raw", images=images, size=original, seed=0, progress=False)
    synth_seconds = time.monotonic() - started
    print(f"  synthetic generation: {images / synth_seconds:.1f} images/s at {original}×{original}")
    started = time.monotonic()
    endpoints = resolve(workspace=work / "ws", environ={})
    opts = PrepareOptions(source="nih", image_size=224, split="patient", progress=False)
    manifest = prepare(str(work / "raw"), str(work / "prepared"), opts, endpoints)
    prepare_seconds = time.monotonic() - started
    print(f"  prepare: {images / prepare_seconds:.1f} images/s ({original}px PNG -> 224px shards)")

    dataset = open_dataset(str(work / "prepared"), endpoints)
    train_ids = set(read_split_ids(dataset))
    table = read_nih(work / "raw").images
    paths = [p for i, p in zip(table["image_id"], table["path"], strict=True) if i in train_ids]

    def png_pipeline():
        # What flow_from_dataframe does each epoch: read, decode, resize every original file.
        def load(path):
            pixels = tf.io.decode_png(tf.io.read_file(path), channels=1)
            return tf.cast(tf.image.resize(pixels, (224, 224), antialias=True), tf.uint8)

        files = tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths), seed=0)
        return (
            files.map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(16)
            .prefetch(tf.data.AUTOTUNE)
        )

    def parquet_pipeline():
        return make_tf_dataset(dataset, "train", batch_size=16, shuffle=True, seed=0)

    rates = {}
    for name, build in (("parquet", parquet_pipeline), ("png", png_pipeline)):
        for _ in range(2):  # the first pass warms up file caches and tf.data tracing
            count, started = 0, time.monotonic()
            for batch in build():
                first = batch[0] if isinstance(batch, tuple) else batch
                count += int(np.asarray(first).shape[0])
            rates[name] = count / (time.monotonic() - started)
        print(f"  {name:8s} pipeline: {rates[name]:8.0f} images/s ({count} images/epoch)")
    print(
        f"  ratio parquet/png: {rates['parquet'] / rates['png']:.1f}x (target >= 5x); digest {manifest['digest'][:8]}"
    )


def read_split_ids(dataset) -> list[str]:
    from datasets.reader import read_split

    return list(read_split(dataset, "train", columns=("image_id",))["image_id"])


BENCHMARKS = [bench_parquet_pipeline_vs_png_decode, bench_mlflow_job_runner, bench_s3_startup]


def main() -> None:
    import sys

    wanted = sys.argv[1:]
    for bench in BENCHMARKS:
        if wanted and not any(word in bench.__name__ for word in wanted):
            continue
        print(f"{bench.__name__}: {bench.__doc__.splitlines()[0]}", flush=True)
        bench()


if __name__ == "__main__":
    main()
