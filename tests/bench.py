"""Benchmarks (`make bench`): each compares two ways of doing one thing, side by side in one run.

Not tests: numbers vary ±20% run to run on a shared 2-core machine, so they
are printed with their ratio, never asserted.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from chestxpert.cluster.processes import free_port, session_members, stop_group
from chestxpert.cluster.stack import StackOptions, start_mlflow, start_s3
from tests.conftest import CHESTXPERT_CLI, short_tmpdir, stack_port_flags


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
        try:
            started = time.monotonic()
            opts = StackOptions(workspace=ws, mlflow_port=free_port())
            record = start_mlflow(opts, (ws / "s").as_uri(), job_runner=job_runner)
            seconds = time.monotonic() - started
            time.sleep(5)  # let worker processes settle before measuring memory
            rss = _session_rss_mb(record["pid"])
            stop_group(record["pid"], record["start_time"])
        finally:
            shutil.rmtree(ws, ignore_errors=True)
        results[label] = (seconds, rss)
        print(f"  mlflow {label:24s} start {seconds:5.1f} s   RSS {rss:7.0f} MB", flush=True)
    ours, default = results["job runner off (ours)"], results["job runner on (default)"]
    print(
        f"  ratio default/ours: memory {default[1] / ours[1]:.1f}x, start-up {default[0] / ours[0]:.1f}x"
    )


def bench_s3_startup() -> None:
    """The in-memory S3 endpoint's start-up (with bucket creation) versus MLflow's, for scale."""
    ws = short_tmpdir("cxb")
    try:
        started = time.monotonic()
        record = start_s3(StackOptions(workspace=ws, s3_port=free_port()))
        s3_seconds = time.monotonic() - started
        stop_group(record["pid"], record["start_time"])
        started = time.monotonic()
        record = start_mlflow(
            StackOptions(workspace=ws, mlflow_port=free_port()), (ws / "s").as_uri()
        )
        mlflow_seconds = time.monotonic() - started
        stop_group(record["pid"], record["start_time"])
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    print(
        f"  s3 endpoint {s3_seconds:.1f} s, mlflow {mlflow_seconds:.1f} s, ratio {mlflow_seconds / s3_seconds:.1f}x"
    )


def bench_parquet_pipeline_vs_png_decode() -> None:
    """Images/s into the model at 224×224: prepared Parquet shards versus decoding+resizing PNGs each epoch."""
    import tempfile

    import numpy as np
    import tensorflow as tf

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.nih import read_nih
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.reader import make_tf_dataset, open_dataset
    from chestxpert.datasets.synth import generate

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
    from chestxpert.datasets.reader import read_split

    return list(read_split(dataset, "train", columns=("image_id",))["image_id"])


# --- a Ray Tune trial's epoch versus a bare model.fit -------------------------------------

REPO = Path(__file__).resolve().parent.parent
TUNE_BENCH_EPOCHS = 8  # epoch 1 carries tracing; epochs 2..N are compared
TUNE_BENCH_CPUS = 2
# About 10 s of training per epoch for densenet_tiny on 2 cores: a trial's fixed per-epoch
# costs (report, checkpoint) against a short epoch, still far shorter than a real one.
TUNE_BENCH_IMAGES = 6000


def _child(
    function: str, spec: dict, env: dict[str, str] | None = None, timeout: float = 600
) -> dict:
    """Run `tests.bench.<function>(spec)` in a fresh interpreter and return the JSON it prints last."""
    import json
    import os
    import subprocess
    import sys

    code = (
        f"import json, sys; from tests.bench import {function}; {function}(json.loads(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{function} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _bare_fit(spec: dict) -> None:
    """Child: the trial's model, loss, optimizer, threads and pipeline under a bare model.fit with
    validation_data; print epoch seconds (training and Keras' validation pass)."""
    import json
    import math
    import time

    import numpy as np

    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.train import _process_age_seconds, configure_runtime

    config = TrialConfig.from_dict(spec["config"])
    runtime = configure_runtime(config, spec["cpus"])  # the trial's threads, precision and seeds
    import keras
    import tensorflow as tf

    from chestxpert.datasets.reader import make_tf_dataset, open_dataset
    from chestxpert.trainable.augment import make_augmentation
    from chestxpert.trainable.backbones import build_model
    from chestxpert.trainable.losses import make_loss
    from chestxpert.trainable.optim import make_optimizer

    dataset = open_dataset(config.dataset)
    labels, manifest = dataset.labels, dataset.manifest
    steps = math.ceil(dataset.count("train") / config.batch_size)
    model = build_model(
        config.backbone,
        config.image_size,
        len(labels),
        dropout=config.dropout,
        augmentation=make_augmentation(config),
    )
    loss = make_loss(
        config.loss,
        len(labels),
        manifest.get("pos_weight"),
        manifest.get("neg_weight"),
        gamma=config.focal_gamma,
    )
    model.compile(optimizer=make_optimizer(config, steps), loss=loss, jit_compile=config.xla)

    def pack(images, labels, mask):
        return images, tf.concat([labels, mask], axis=-1)

    pipeline = (
        make_tf_dataset(dataset, "train", config.batch_size, shuffle=True, seed=config.seed)
        .map(pack, num_parallel_calls=tf.data.AUTOTUNE)
        .apply(tf.data.experimental.assert_cardinality(steps))
    )
    # Keras' own validation pass over the same whole validation split, as a user's fit has.
    from chestxpert.datasets.reader import read_split

    val = read_split(dataset, "val")
    mask = (~np.isnan(val["labels"])).astype(np.float32)
    val_targets = np.concatenate([np.nan_to_num(val["labels"], nan=0.0), mask], axis=1)

    class EpochTimer(keras.callbacks.Callback):
        seconds: list[float] = []
        startup_seconds = 0.0  # as the trial reports it: process age at the end of step 1

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            if not EpochTimer.startup_seconds:
                EpochTimer.startup_seconds = _process_age_seconds()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.monotonic() - self.started)

    model.fit(
        pipeline,
        epochs=config.epochs,
        callbacks=[EpochTimer()],
        verbose=0,
        shuffle=False,
        validation_data=(val["image"], val_targets),
        validation_batch_size=max(32, config.batch_size),
    )
    print(
        json.dumps(
            {
                "epoch_seconds": EpochTimer.seconds,
                "startup_seconds": EpochTimer.startup_seconds,
                "runtime": runtime,
            }
        )
    )


def _trial_loop(spec: dict) -> None:
    """Child: `run_trial` itself without Ray (validation and checkpoint every epoch, reports kept here)."""
    import json
    import time

    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.train import run_trial

    config = TrialConfig.from_dict({**spec["config"], "cpus": spec["cpus"]})
    epoch_seconds, between_reports, last = [], [], [time.monotonic()]

    def report(metrics, checkpoint_dir):
        now = time.monotonic()
        epoch_seconds.append(metrics["epoch_seconds"])
        between_reports.append(now - last[0])
        last[0] = now

    run_trial(config, report)
    print(json.dumps({"epoch_seconds": epoch_seconds, "iteration_seconds": between_reports}))


def _tune_trial(spec: dict) -> None:
    """Child (a Ray client with the token): one Tune trial of `trainable.train.train`, every result
    to MLflow through the sweeps' own NestedMlflowCallback, as a sweep does."""
    import json
    import time

    from ray import tune

    from chestxpert.sweeps.tracking import (
        TRIAL_TAG,
        NestedMlflowCallback,
        _client,
        find_run,
        parent_run,
    )
    from chestxpert.trainable.train import train

    parent = parent_run(spec["mlflow_url"], "bench", "bench", {"backbone": "densenet_tiny"}, {})
    logger = NestedMlflowCallback(
        spec["mlflow_url"], "bench", "bench", parent, spec["config"]["epochs"]
    )
    tuner = tune.Tuner(
        tune.with_resources(train, {"cpu": spec["cpus"]}),
        param_space=spec["config"],
        run_config=tune.RunConfig(
            name="bench", storage_path=spec["storage"], callbacks=[logger], verbose=0
        ),
    )
    started = time.monotonic()
    result = tuner.fit()[0]
    fit_seconds = time.monotonic() - started
    if result.error is not None:
        raise RuntimeError(f"the trial failed: {result.error}")
    rows = result.metrics_dataframe.sort_values("epoch")
    client = _client(spec["mlflow_url"])
    experiment = client.get_experiment_by_name("bench").experiment_id
    run = find_run(client, experiment, {TRIAL_TAG: result.metrics["trial_id"]})
    logged = sum(len(client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics)
    state = json.loads((Path(result.checkpoint.path) / "state.json").read_text())
    print(
        json.dumps(
            {
                "epoch_seconds": rows["epoch_seconds"].tolist(),
                "iteration_seconds": rows["time_this_iter_s"].tolist(),
                "startup_seconds": float(rows["startup_seconds"].iloc[0]),
                "fit_seconds": fit_seconds,
                "mlflow_values": logged,
                "mlflow_epochs": len(client.get_metric_history(run.info.run_id, "epoch_seconds")),
                "runtime": state["runtime"],
            }
        )
    )


def bench_tune_trial_vs_bare_fit() -> None:
    """densenet_tiny at 64 px: epoch seconds in a Ray Tune trial (report, checkpoint, MLflow) versus a bare model.fit."""
    import statistics
    import tempfile

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.cluster.stack import start_ray_head
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.synth import generate

    work = Path(tempfile.mkdtemp(prefix="cx-bench-"))
    ws = short_tmpdir("cxb")  # Ray's socket paths must stay short
    records: list[dict] = []
    try:
        generate(work / "raw", images=TUNE_BENCH_IMAGES, size=64, seed=0, progress=False)
        opts = PrepareOptions(source="nih", image_size=64, progress=False)
        endpoints = resolve(workspace=work / "ws", environ={})
        manifest = prepare(str(work / "raw"), str(work / "prepared"), opts, endpoints)
        config = {
            "dataset": str(work / "prepared"),
            "backbone": "densenet_tiny",
            "image_size": 64,
            "epochs": TUNE_BENCH_EPOCHS,
            "batch_size": 16,
            "seed": 0,
        }
        print(
            f"  {manifest['splits']['train']['images']} training images, batch 16, "
            f"{TUNE_BENCH_EPOCHS} epochs, {TUNE_BENCH_CPUS} CPUs; epoch 1 (tracing) left out",
            flush=True,
        )
        # Fairness: each side runs alone in a fresh process that sizes TF's thread
        # pools with configure_runtime from the same CPU count before TF starts, as
        # the trial does, and has OMP_NUM_THREADS as Ray gives the trial. The bare
        # fit runs with no service up, before and after Tune, to show drift; the
        # trial loop without Ray splits the trial's cost between the loop and Ray.
        bare_spec = {"config": config, "cpus": TUNE_BENCH_CPUS}
        bare_env = {"OMP_NUM_THREADS": str(TUNE_BENCH_CPUS)}
        bare_before = _child("_bare_fit", bare_spec, env=bare_env)
        loop = _child("_trial_loop", bare_spec, env=bare_env)

        ray_head = start_ray_head(
            StackOptions(
                workspace=ws,
                ray_port=free_port(),
                dashboard_port=free_port(),
                num_cpus=TUNE_BENCH_CPUS,
                object_store_memory=200 * 1024**2,
            )
        )
        records.append(ray_head)
        mlflow = start_mlflow(
            StackOptions(workspace=ws, mlflow_port=free_port()), (ws / "s").as_uri()
        )
        records.append(mlflow)
        client_env = {
            "RAY_ADDRESS": ray_head["address"],
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": ray_head["auth_token_path"],
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        tune_spec = {
            "config": config,
            "cpus": TUNE_BENCH_CPUS,
            "mlflow_url": mlflow["url"],
            "storage": str(work / "tune"),
        }
        trial = _child("_tune_trial", tune_spec, env=client_env, timeout=900)
        while records:
            record = records.pop()
            stop_group(record["pid"], record["start_time"])

        bare_after = _child("_bare_fit", bare_spec, env=bare_env)
    finally:
        for record in reversed(records):
            stop_group(record["pid"], record["start_time"])
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ws, ignore_errors=True)

    def line(label: str, seconds: list[float], note: str = "") -> None:
        each = " ".join(f"{s:.2f}" for s in seconds)
        print(
            f"  {label:26s} mean {statistics.mean(seconds):5.2f} s  median "
            f"{statistics.median(seconds):5.2f} s  ({each}){note}"
        )

    before, after = bare_before["epoch_seconds"][1:], bare_after["epoch_seconds"][1:]
    bare = before + after
    tune_epochs, tune_iterations = trial["epoch_seconds"][1:], trial["iteration_seconds"][1:]
    line("bare fit, before Tune", before, "  <- train + Keras validation pass")
    line("bare fit, after Tune", after)
    loop_epochs, loop_iterations = loop["epoch_seconds"][1:], loop["iteration_seconds"][1:]
    line("run_trial no Ray, train", loop_epochs)
    line("run_trial no Ray, report", loop_iterations, "  <- between reports")
    line("Tune trial, train", tune_epochs, "  <- epoch_seconds")
    line(
        "Tune trial, iteration",
        tune_iterations,
        "  <- time_this_iter_s: + validation, AUC, checkpoint, report",
    )
    runtime = trial["runtime"]
    print(
        f"  both sides: TF intra-op threads {runtime['intra_op_threads']}, inter-op "
        f"{runtime['inter_op_threads']}, OMP_NUM_THREADS={TUNE_BENCH_CPUS}, trial niceness "
        f"{runtime['niceness']}, same model/loss/optimizer/"
        "augmentation/pipeline/seed/validation split; each alone in a fresh process"
    )
    print(
        f"  start-up (process age at the end of step 1): trial {trial['startup_seconds']:.1f} s, bare "
        f"{bare_before['startup_seconds']:.1f} / {bare_after['startup_seconds']:.1f} s; "
        f"tuner.fit {trial['fit_seconds']:.1f} s; MLflow holds {trial['mlflow_values']} values "
        f"({trial['mlflow_epochs']} epochs) of the trial's nested run"
    )
    drift = abs(statistics.median(before) / statistics.median(after) - 1)
    print(
        f"  the two bare fits differ by {drift:.0%} (median): a ratio closer to 1 than that is noise"
    )
    for label, average in (("median", statistics.median), ("mean", statistics.mean)):
        print(
            f"  ratio tune/bare ({label}): whole iteration {average(tune_iterations) / average(bare):.2f}x "
            f"(target <= 1.05); training part {average(tune_epochs) / average(bare):.2f}x; "
            f"no-Ray loop/bare {average(loop_iterations) / average(bare):.2f}x"
        )


# --- start-up cost of each backbone, each in a fresh process ------------------------------

# Runs as `python -c _STARTUP_PROBE <backbone>`: what a new trial process pays before its
# first step, with the trial's threads, augmentation, loss and optimizer.
_STARTUP_PROBE = """
import json, os, resource, sys, time
started = time.monotonic()
import tensorflow, keras
imported = time.monotonic()
import numpy as np
from chestxpert.trainable.augment import make_augmentation
from chestxpert.trainable.backbones import build_model, get_backbone
from chestxpert.trainable.config import TrialConfig
from chestxpert.trainable.losses import make_loss
from chestxpert.trainable.train import configure_runtime
config = TrialConfig(backbone=sys.argv[1])
configure_runtime(config, os.cpu_count() or 1)
size = max(get_backbone(config.backbone).min_size, 64)
model = build_model(config.backbone, size, 14, augmentation=make_augmentation(config))
built = time.monotonic()
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (8, size, size, 1), dtype=np.uint8)
labels = (rng.random((8, 14)) < 0.3).astype(np.float32)
targets = np.concatenate([labels, np.ones_like(labels)], axis=1)
loss = make_loss("weighted_bce", 14, [2.0] * 14, [0.5] * 14)
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=False)
model.train_on_batch(images, targets)
first = time.monotonic()
model.train_on_batch(images, targets)
second = time.monotonic()
print(json.dumps({"size": size, "import": imported - started, "build": built - imported,
                  "first_step": first - built, "second_step": second - first,
                  "params_m": model.count_params() / 1e6,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))
"""


def bench_startup_per_backbone() -> None:
    """Per backbone, each in a fresh process: TF+Keras import, model build, first and second train step (batch 8)."""
    import json
    import subprocess
    import sys

    from chestxpert.trainable.backbones import BACKBONES

    reference = "densenet121"
    reference_step = None
    started = time.monotonic()
    print(
        f"  {'backbone':18s} {'size':>4s} {'params':>6s} {'import':>6s} {'build':>6s} "
        f"{'step 1':>6s} {'step 2':>6s} {'RSS':>6s}  step 1 / {reference}'s",
        flush=True,
    )
    measured = 0
    for name in sorted(BACKBONES, key=lambda n: n != reference):  # the reference first
        result = subprocess.run(
            [sys.executable, "-c", _STARTUP_PROBE, name],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            print(f"  {name:18s} failed: {result.stderr.strip().splitlines()[-1]}", flush=True)
            continue
        measured += 1
        row = json.loads(result.stdout.strip().splitlines()[-1])
        if name == reference:
            reference_step = row["first_step"]
        ratio = f"{row['first_step'] / reference_step:5.2f}x" if reference_step else "    -"
        print(
            f"  {name:18s} {row['size']:4d} {row['params_m']:5.1f}M {row['import']:5.1f}s "
            f"{row['build']:5.1f}s {row['first_step']:5.1f}s {row['second_step']:5.2f}s "
            f"{row['peak_rss_gb']:4.1f}GB  {ratio}",
            flush=True,
        )
    print(
        f"  {measured} backbones in {time.monotonic() - started:.0f} s. Size: max(min_size, 64); "
        "import is the same for every row (its spread is noise); step 1 is tracing + graph "
        "optimisation; RSS is the child's peak"
    )


# --- sweeps: ASHA + Optuna versus random search at full length; the driver's own cost -------

# CHESTXPERT_BENCH_SMOKE=1 shrinks the two benchmarks below to a quick check that they run.
BENCH_SMOKE = os.environ.get("CHESTXPERT_BENCH_SMOKE") == "1"
# Sized so the targets can be judged: ASHA promotes the first trial to reach each rung
# unconditionally, so with few trials it cannot cut to a third; and a small validation
# split makes 0.01 AUC noise.
ASHA_IMAGES = 200 if BENCH_SMOKE else 1500  # synthetic films, generated and prepared at 64 px
ASHA_TRIALS = 2 if BENCH_SMOKE else 24
ASHA_EPOCHS = 2 if BENCH_SMOKE else 9  # rungs at epochs 1, 3 and 9 (grace 1, reduction factor 3)
DRIVER_TRIALS = 20 if BENCH_SMOKE else 200
DRIVER_REPORTS = 10  # per trial
DRIVER_TRIAL_CPUS = 1  # as a sweep's `resources.cpus` default: 2 trials at a time on 2 cores

_ASHA_SPEC = """
name: {name}
dataset: {dataset}
trial: {{backbone: densenet_tiny, image_size: 64, epochs: {epochs}, batch_size: 16, seed: 0}}
resources: {{cpus: 1, gpus: 0}}
search: {{algorithm: {algorithm}, seed: 0, num_samples: {trials}, max_concurrent: 2}}
space:
  learning_rate: {{type: loguniform, low: 1.0e-4, high: 1.0e-2}}
  dropout: {{type: uniform, low: 0.0, high: 0.5}}
scheduler: {scheduler}
metric: val_auc_macro
mode: max
max_retries: 0
"""


def _two_sweeps(spec: dict) -> None:
    """Child: both sweeps, one after the other, with run_sweep against an in-process Ray; print JSON per sweep."""
    import json
    import os
    import time

    from chestxpert.cluster.endpoints import prepare_ray_environment, resolve

    work = Path(spec["work"])
    # Ray fixes its auth mode at import and caches the token for the process: one
    # workspace (one token) serves both sweeps; storage and MLflow are per sweep.
    prepare_ray_environment(work / "ws")
    from ray import tune  # noqa: F401  # imported before the clocks start: both sweeps find it loaded
    from ray.tune.search.optuna import OptunaSearch  # noqa: F401

    from chestxpert.sweeps.layout import locate
    from chestxpert.sweeps.run import run_sweep
    from chestxpert.sweeps.spec import parse_spec
    from chestxpert.sweeps.status import read_trials

    out = {}
    for label, algorithm, scheduler in spec["sides"]:
        endpoints = resolve(
            workspace=work / "ws",
            storage=str(work / f"storage-{label}"),
            mlflow_tracking_uri=f"sqlite:///{work / f'mlflow-{label}.db'}",
            environ={},
        )
        text = _ASHA_SPEC.format(
            name=f"bench-{label}",
            dataset=spec["dataset"],
            epochs=spec["epochs"],
            algorithm=algorithm,
            trials=spec["trials"],
            scheduler=scheduler,
        )
        sweep = parse_spec(text, source=f"bench-{label}")
        cpu = os.times()
        started = time.monotonic()
        summary = run_sweep(sweep, endpoints)
        wall = time.monotonic() - started
        driver_cpu = sum(os.times()[:2]) - sum(cpu[:2])
        rows = read_trials(locate(endpoints, sweep.name), sweep.metric, sweep.mode, spec["epochs"])
        out[label] = {
            "wall": wall,
            "driver_cpu": driver_cpu,
            "trials": len(rows),
            "errors": summary["errors"],
            "epochs": [row.epochs for row in rows],
            "best": [row.best for row in rows],
            "ended": [row.ended for row in rows],
            "best_metric": summary.get("best_metric"),
            "best_config": summary.get("best_config"),
        }
    print(json.dumps(out, default=str))


def bench_asha_vs_random_full_length() -> None:
    """densenet_tiny sweep at 64 px: Optuna + ASHA versus random search with every trial at full length."""

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.synth import generate

    work = short_tmpdir("cxb")  # the workspace's Ray folder must stay short
    try:
        generate(work / "raw", images=ASHA_IMAGES, size=64, seed=0, progress=False)
        # A third of the patients for validation: every trial's metric comes from it, and a
        # 0.01 AUC target needs a few hundred images (the test split is not used here).
        opts = PrepareOptions(
            source="nih", image_size=64, val_fraction=0.3, test_fraction=0.05, progress=False
        )
        endpoints = resolve(workspace=work / "ws", environ={})
        manifest = prepare(str(work / "raw"), str(work / "prepared"), opts, endpoints)
        scheduler = f"{{type: asha, max_t: {ASHA_EPOCHS}, grace_period: 1, reduction_factor: 3}}"
        sides = [("asha", "optuna", scheduler), ("random", "random", "{type: none}")]
        print(
            f"  {ASHA_IMAGES} images ({manifest['splits']['train']['images']} train, "
            f"{manifest['splits']['val']['images']} val), {ASHA_TRIALS} trials x up to {ASHA_EPOCHS} "
            f"epochs, 1 CPU per trial, 2 at a time; (a) optuna + {scheduler}, (b) random + none"
            + (" [SMOKE]" if BENCH_SMOKE else ""),
            flush=True,
        )
        # Both sweeps in one child process (a fresh driver whatever ran before in this one);
        # ASHA first, so any warm-cache advantage goes to the random side.
        spec = {
            "work": str(work),
            "dataset": str(work / "prepared"),
            "epochs": ASHA_EPOCHS,
            "trials": ASHA_TRIALS,
            "sides": sides,
        }
        result = _child("_two_sweeps", spec, timeout=3 * 3600)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for label, name in (("asha", "(a) optuna + ASHA"), ("random", "(b) random, full length")):
        side = result[label]
        best = f"{side['best_metric']:.4f}" if side["best_metric"] is not None else "none"
        print(
            f"  {name:24s} trial-epochs {sum(side['epochs']):3d} (per trial "
            f"{' '.join(str(e) for e in side['epochs'])})  wall {side['wall']:6.1f} s  "
            f"best val_auc_macro {best}  errors {side['errors']}  driver CPU {side['driver_cpu']:.1f} s"
        )
        print(
            f"  {'':24s} best config: lr {side['best_config'].get('learning_rate', 0):.2e}, "
            f"dropout {side['best_config'].get('dropout', 0):.3f}"
        )
    a, b = result["asha"], result["random"]
    if a["best_metric"] is None or b["best_metric"] is None:
        print("  a side reported no val_auc_macro: no ratio")
        return
    epoch_ratio = sum(a["epochs"]) / max(sum(b["epochs"]), 1)
    auc_gap = a["best_metric"] - b["best_metric"]
    print(
        f"  ratio a/b: trial-epochs {epoch_ratio:.2f} (target <= 0.33), wall {a['wall'] / b['wall']:.2f}; "
        f"AUC a-b {auc_gap:+.4f} (target >= -0.01); "
        f"{'both targets met' if epoch_ratio <= 1 / 3 + 1e-9 and auc_gap >= -0.01 else 'target missed'}"
    )
    print(
        "  the two sides sample different configurations (TPE versus random, same seed): with "
        f"{ASHA_TRIALS} trials the AUC gap holds sampling luck as well as ASHA's early stops"
    )


def _driver_fits(spec: dict) -> None:
    """Child (the driver): an in-process Ray with token auth; instant trials with and without NestedMlflowCallback."""
    import json
    import os
    import resource
    import time

    from chestxpert.cluster.endpoints import apply_client_environment, resolve
    from chestxpert.cluster.processes import session_members
    from chestxpert.cluster.stack import ensure_ray_token, ray_temp_dir

    ws = Path(spec["workspace"])
    endpoints = resolve(workspace=ws, mlflow_tracking_uri=spec["mlflow_url"], environ={})
    apply_client_environment(endpoints)  # RAY_AUTH_MODE=token, as connect() sets it
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(ensure_ray_token(ws))  # before Ray is imported
    import ray
    from ray import tune

    from chestxpert.sweeps.tracking import NestedMlflowCallback, _client, parent_run

    ray.init(
        include_dashboard=False,
        logging_level="WARNING",
        configure_logging=False,
        _temp_dir=str(ray_temp_dir(ws)),
        log_to_driver=False,
    )
    reports = spec["reports"]

    def instant(config):
        # No work: every cost between two reports is Tune's and the callbacks'.
        for step in range(reports):
            tune.report({"epoch": step + 1, "val_auc_macro": config["x"] * (step + 1) / reports})

    class Count(tune.Callback):
        """On both sides: the results the driver handled, and trials that errored."""

        def __init__(self) -> None:
            self.results = self.errors = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.results += 1

        def on_trial_error(self, iteration, trials, trial, **info):
            self.errors += 1

    def server_cpu() -> float:
        ticks = 0
        for pid in session_members(spec["mlflow_pid"]):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def fit(name: str, trials: int, mlflow: bool) -> dict:
        count = Count()
        callbacks: list = [count]
        if mlflow:
            parent = parent_run(spec["mlflow_url"], "bench-driver", name, {"trials": trials}, {})
            callbacks.append(
                NestedMlflowCallback(spec["mlflow_url"], "bench-driver", name, parent, reports)
            )
        tuner = tune.Tuner(
            tune.with_resources(instant, {"cpu": spec["cpus"]}),
            param_space={"x": tune.uniform(0.5, 1.0)},
            tune_config=tune.TuneConfig(num_samples=trials, metric="val_auc_macro", mode="max"),
            run_config=tune.RunConfig(
                name=name, storage_path=str(ws / "storage"), callbacks=callbacks, verbose=0
            ),
        )
        usage, server = resource.getrusage(resource.RUSAGE_SELF), server_cpu()
        started = time.monotonic()
        tuner.fit()
        seconds = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        row = {
            "seconds": seconds,
            "cpu": cpu,
            "server_cpu": server_cpu() - server,
            "results": count.results,
            "errors": count.errors,
            "trials": trials,
        }
        if mlflow:
            client = _client(spec["mlflow_url"])
            experiment = client.get_experiment_by_name("bench-driver").experiment_id
            runs = client.search_runs(
                [experiment],
                f"tags.`chestxpert.sweep` = '{name}' and tags.`chestxpert.role` = 'trial'",
                max_results=1000,
            )
            row["mlflow_runs"] = len(runs)
            row["mlflow_values"] = sum(
                len(client.get_metric_history(run.info.run_id, "val_auc_macro")) for run in runs
            )
            row["pending"] = len(callbacks[1].pending)
        return row

    # Warm-up (not measured): Ray's worker pool and the imports every trial process pays.
    fit("warmup", spec["warmup"], mlflow=False)
    out = {"without": fit("without", spec["trials"], mlflow=False)}
    out["with"] = fit("with", spec["trials"], mlflow=True)
    ray.shutdown()
    print(json.dumps(out))


def bench_driver_overhead() -> None:
    """Instant trials on an in-process Ray: the sweep driver with NestedMlflowCallback to an MLflow server versus without."""

    ws = short_tmpdir("cxb")  # Ray's socket paths must stay short
    record = None
    try:
        record = start_mlflow(
            StackOptions(workspace=ws / "mlflow", mlflow_port=free_port()),
            (ws / "mlflow" / "s").as_uri(),
        )
        spec = {
            "workspace": str(ws),
            "mlflow_url": record["url"],
            "mlflow_pid": record["pid"],
            "trials": DRIVER_TRIALS,
            "reports": DRIVER_REPORTS,
            "cpus": DRIVER_TRIAL_CPUS,
            "warmup": 4,
        }
        print(
            f"  {DRIVER_TRIALS} trials x {DRIVER_REPORTS} reports, {DRIVER_TRIAL_CPUS} CPU per trial "
            f"(Tune's default: a new actor per trial), MLflow server at {record['url']} "
            "(SQLite, 2 workers); 4 warm-up trials first; 'without' runs first"
            + (" [SMOKE]" if BENCH_SMOKE else ""),
            flush=True,
        )
        result = _child("_driver_fits", spec, timeout=3 * 3600)
    finally:
        if record is not None:
            stop_group(record["pid"], record["start_time"])
        shutil.rmtree(ws, ignore_errors=True)

    rates = {}
    for label in ("without", "with"):
        side = result[label]
        per_minute = side["trials"] / side["seconds"] * 60
        per_report = side["cpu"] / max(side["results"], 1)
        rates[label] = (per_minute, per_report)
        extra = (
            f"; MLflow holds {side['mlflow_runs']} trial runs, {side['mlflow_values']} val_auc_macro "
            f"values, {side['pending']} calls still queued"
            if label == "with"
            else ""
        )
        print(
            f"  {label + ' callback':16s} {side['seconds']:6.1f} s  {per_minute:6.1f} trials/min  "
            f"driver CPU {side['cpu']:6.1f} s = {per_report * 1000:5.1f} ms/report "
            f"({side['results']} reports, {side['errors']} errored)  MLflow server CPU "
            f"{side['server_cpu']:5.1f} s{extra}"
        )
    (rate_without, cpu_without), (rate_with, cpu_with) = rates["without"], rates["with"]
    print(
        f"  ratio with/without: trials/min {rate_with / rate_without:.2f}x, driver CPU per report "
        f"{cpu_with / cpu_without:.2f}x (+{(cpu_with - cpu_without) * 1000:.1f} ms per report for MLflow)"
    )


def bench_demo_report() -> None:
    """The demo's test macro AUC, and Grad-CAM's pointing-game hit rate per label beside the centre baseline."""
    import json
    import os
    import subprocess

    reports = sorted(
        Path(".chestxpert/reports").glob("demo-*/metrics.json"), key=lambda p: p.stat().st_mtime
    )
    if reports:
        source = f"the newest `make demo` report ({reports[-1].parent})"
    else:  # no demo has run here: a scaled-down one in a scratch workspace
        ws = short_tmpdir("cxbd")
        ports = stack_port_flags()
        subprocess.run(
            [
                CHESTXPERT_CLI,
                "--workspace",
                str(ws),
                "demo",
                "--images",
                "800",
                "--samples",
                "2",
                "--epochs",
                "2",
                "--stop",
                *ports,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        reports = sorted(ws.glob("reports/demo-*/metrics.json"))
        source = f"a scaled-down demo (800 images, 2 trials, 2 epochs) in {ws}"
    metrics = json.loads(reports[-1].read_text())
    evaluation = metrics["evaluation"]
    print(f"  from {source}")
    layer = metrics["gradcam_layer"]
    print(
        f"  {metrics['image_size']} px; test macro AUC {evaluation['auc_macro']:.3f} (micro "
        f"{evaluation['auc_micro']:.3f}) on {evaluation['counts']['images']} images; Grad-CAM layer {layer}"
    )
    print(
        f"  {'finding':20s} {'boxes':>5s} {'pointing':>9s} {'baseline':>9s} {'IoU':>6s} {'baseline':>9s}"
    )
    localization = sorted(metrics["localization"].items())
    for label, item in localization:
        print(
            f"  {label:20s} {item['n']:5d} {item['pointing_hit_rate']:9.2f} "
            f"{item['baseline_pointing_hit_rate']:9.2f} {item['mean_iou']:6.2f} {item['baseline_mean_iou']:9.2f}"
        )
    better = [
        label
        for label, item in localization
        if item["pointing_hit_rate"] > item["baseline_pointing_hit_rate"]
    ]
    worse = [
        label
        for label, item in localization
        if item["pointing_hit_rate"] < item["baseline_pointing_hit_rate"]
    ]
    print(
        f"  pointing game above the centre baseline for {len(better)} of {len(localization)} findings"
        f"{', below for ' + ', '.join(worse) if worse else ''}"
    )


BENCHMARKS = [
    bench_parquet_pipeline_vs_png_decode,
    bench_mlflow_job_runner,
    bench_s3_startup,
    bench_tune_trial_vs_bare_fit,
    bench_startup_per_backbone,
    bench_asha_vs_random_full_length,
    bench_driver_overhead,
    bench_demo_report,
]


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
