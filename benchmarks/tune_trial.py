"""densenet_tiny: epoch seconds in a Ray Tune trial (report, checkpoint, MLflow) versus a bare
`model.fit` of the same model, loss, optimizer, threads and pipeline.

Each side runs alone in a fresh process that sizes TF's thread pools with
`configure_runtime` from the same CPU count before TF starts, as the trial does, and
has OMP_NUM_THREADS as Ray gives the trial. The bare fit runs with no service up,
before and after Tune, to show drift; `run_trial` without Ray splits the trial's cost
between the loop and Ray. Epoch 1 (tracing) is left out of every comparison. The
target is a whole Tune iteration within 1.05x of a bare epoch.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.runner import run_child, scratch_dir, services
from chestxpert.cluster.processes import free_port
from chestxpert.cluster.stack import StackOptions, start_mlflow, start_ray_head


@dataclass(frozen=True)
class Size:
    # Enough images that an epoch is long enough to time against the trial's fixed
    # per-epoch costs (report, checkpoint), yet far shorter than a real epoch.
    images: int
    epochs: int  # epoch 1 carries tracing; epochs 2..N are compared
    image_size: int
    repeat_bare_fit: bool  # the bare fit again after Tune, to show drift
    # smoke mode checks the harness, not the figures: the quickest backbone to build
    backbone: str = "densenet_tiny"


FULL = Size(images=6000, epochs=8, image_size=64, repeat_bare_fit=True)
SMOKE = Size(images=64, epochs=2, image_size=32, repeat_bare_fit=False, backbone="convnet_small")
CPUS = 2
BATCH_SIZE = 16
TARGET_RATIO = 1.05


def bare_fit(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: the trial's model, loss, optimizer, threads and pipeline under a bare `model.fit`
    with `validation_data`; epoch seconds (training and Keras' validation pass)."""
    import math
    import time

    import numpy as np

    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.train import _process_age_seconds, build_optimizer, configure_runtime

    config = TrialConfig.from_dict(spec["config"])
    runtime = configure_runtime(config, spec["cpus"])  # the trial's threads, precision and seeds
    import keras
    import tensorflow as tf

    from chestxpert.datasets.reader import make_tf_dataset, open_dataset, read_split
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
    build_optimizer(model)  # as the trial does

    def pack(images, labels, mask):
        return images, tf.concat([labels, mask], axis=-1)

    pipeline = (
        make_tf_dataset(dataset, "train", config.batch_size, shuffle=True, seed=config.seed)
        .map(pack, num_parallel_calls=tf.data.AUTOTUNE)
        .apply(tf.data.experimental.assert_cardinality(steps))
    )
    # Keras' own validation pass over the same whole validation split, as a user's fit has.
    val = read_split(dataset, "val")
    mask = (~np.isnan(val["labels"])).astype(np.float32)
    val_targets = np.concatenate([np.nan_to_num(val["labels"], nan=0.0), mask], axis=1)

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self.startup_seconds = 0.0  # as the trial reports it: process age after step 1

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            if not self.startup_seconds:
                self.startup_seconds = _process_age_seconds()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.monotonic() - self.started)

    timer = EpochTimer()
    model.fit(
        pipeline,
        epochs=config.epochs,
        callbacks=[timer],
        verbose=0,
        shuffle=False,
        validation_data=(val["image"], val_targets),
        validation_batch_size=max(32, config.batch_size),
    )
    return {
        "epoch_seconds": timer.seconds,
        "startup_seconds": timer.startup_seconds,
        "runtime": runtime,
    }


def trial_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: `run_trial` itself without Ray (validation and checkpoint every epoch, reports
    kept here); epoch seconds and the seconds between two reports."""
    import time

    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.train import run_trial

    config = TrialConfig.from_dict({**spec["config"], "cpus": spec["cpus"]})
    epoch_seconds: list[float] = []
    between_reports: list[float] = []
    last = time.monotonic()

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        nonlocal last
        now = time.monotonic()
        epoch_seconds.append(metrics["epoch_seconds"])
        between_reports.append(now - last)
        last = now

    run_trial(config, report)
    return {"epoch_seconds": epoch_seconds, "iteration_seconds": between_reports}


def tune_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """Child (a Ray client with the token): one Tune trial of `trainable.train.train`, every
    result to MLflow through the sweeps' own NestedMlflowCallback, as a sweep does."""
    import json
    import time

    from ray import tune

    from chestxpert.cluster.mlflow_runs import TRIAL_TAG, find_run, parent_run
    from chestxpert.cluster.mlflow_runs import client as mlflow_client
    from chestxpert.sweeps.tracking import NestedMlflowCallback
    from chestxpert.trainable.train import train

    url, epochs = spec["mlflow_url"], spec["config"]["epochs"]
    parent = parent_run(url, "bench", "bench", {"backbone": spec["config"]["backbone"]}, {})
    logger = NestedMlflowCallback(url, "bench", "bench", parent, epochs)
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
    client = mlflow_client(url)
    experiment = client.get_experiment_by_name("bench").experiment_id
    run = find_run(client, experiment, {TRIAL_TAG: result.metrics["trial_id"]})
    logged = sum(len(client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics)
    state = json.loads((Path(result.checkpoint.path) / "state.json").read_text())
    return {
        "epoch_seconds": rows["epoch_seconds"].tolist(),
        "iteration_seconds": rows["time_this_iter_s"].tolist(),
        "startup_seconds": float(rows["startup_seconds"].iloc[0]),
        "fit_seconds": fit_seconds,
        "mlflow_values": logged,
        "mlflow_epochs": len(client.get_metric_history(run.info.run_id, "epoch_seconds")),
        "runtime": state["runtime"],
    }


def run(smoke: bool = False) -> None:
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.synth import generate

    size = SMOKE if smoke else FULL
    with scratch_dir() as work:
        side = size.image_size
        generate(work / "raw", images=size.images, size=side, seed=0, progress=False)
        opts = PrepareOptions(source="nih", image_size=side, progress=False)
        endpoints = resolve(workspace=work / "ws", environ={})
        manifest = prepare(str(work / "raw"), str(work / "prepared"), opts, endpoints)
        config = {
            "dataset": str(work / "prepared"),
            "backbone": size.backbone,
            "image_size": side,
            "epochs": size.epochs,
            "batch_size": BATCH_SIZE,
            "seed": 0,
        }
        print(
            f"  {manifest['splits']['train']['images']} training images at {side} px, batch "
            f"{BATCH_SIZE}, {size.epochs} epochs, {CPUS} CPUs; epoch 1 (tracing) left out",
            flush=True,
        )
        bare_spec = {"config": config, "cpus": CPUS}
        bare_env = {"OMP_NUM_THREADS": str(CPUS)}
        bare_before = run_child(bare_fit, bare_spec, env=bare_env)
        loop = run_child(trial_loop, bare_spec, env=bare_env)
        with services() as records:
            ray_options = StackOptions(
                workspace=work / "stack",
                ray_port=free_port(),
                dashboard_port=free_port(),
                num_cpus=CPUS,
                object_store_memory=200 * 1024**2,
            )
            ray_head = start_ray_head(ray_options)
            records.append(ray_head)
            mlflow_options = StackOptions(workspace=work / "stack", mlflow_port=free_port())
            mlflow = start_mlflow(mlflow_options, (work / "s").as_uri())
            records.append(mlflow)
            client_env = {
                "RAY_ADDRESS": ray_head["address"],
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": ray_head["auth_token_path"],
                "RAY_USAGE_STATS_ENABLED": "0",
            }
            tune_spec = {**bare_spec, "mlflow_url": mlflow["url"], "storage": str(work / "tune")}
            trial = run_child(tune_trial, tune_spec, env=client_env, timeout=900)
        bare_after = run_child(bare_fit, bare_spec, env=bare_env) if size.repeat_bare_fit else None
    report(trial, loop, bare_before, bare_after)


def line(label: str, seconds: list[float], note: str = "") -> None:
    each = " ".join(f"{s:.2f}" for s in seconds)
    print(
        f"  {label:26s} mean {statistics.mean(seconds):5.2f} s  median "
        f"{statistics.median(seconds):5.2f} s  ({each}){note}"
    )


def report(trial: dict, loop: dict, bare_before: dict, bare_after: dict | None) -> None:
    """Print each side's epochs after the first, start-up, drift and the ratios."""
    before = bare_before["epoch_seconds"][1:]
    after = bare_after["epoch_seconds"][1:] if bare_after else []
    bare = before + after
    tune_epochs, tune_iterations = trial["epoch_seconds"][1:], trial["iteration_seconds"][1:]
    loop_epochs, loop_iterations = loop["epoch_seconds"][1:], loop["iteration_seconds"][1:]
    line("bare fit, before Tune", before, "  <- train + Keras validation pass")
    if after:
        line("bare fit, after Tune", after)
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
        f"{runtime['inter_op_threads']}, OMP_NUM_THREADS={CPUS}, trial niceness "
        f"{runtime['niceness']}, same model/loss/optimizer/augmentation/pipeline/seed/"
        "validation split; each alone in a fresh process"
    )
    bare_startups = " / ".join(
        f"{side['startup_seconds']:.1f}" for side in (bare_before, bare_after) if side
    )
    print(
        f"  start-up (process age at the end of step 1): trial {trial['startup_seconds']:.1f} s, "
        f"bare {bare_startups} s; tuner.fit {trial['fit_seconds']:.1f} s; MLflow holds "
        f"{trial['mlflow_values']} values ({trial['mlflow_epochs']} epochs) of the trial's "
        "nested run"
    )
    if after:
        drift = abs(statistics.median(before) / statistics.median(after) - 1)
        print(
            f"  the two bare fits differ by {drift:.0%} (median): a ratio closer to 1 than that "
            "is noise"
        )
    for label, average in (("median", statistics.median), ("mean", statistics.mean)):
        print(
            f"  ratio tune/bare ({label}): whole iteration "
            f"{average(tune_iterations) / average(bare):.2f}x (target <= {TARGET_RATIO}); "
            f"training part {average(tune_epochs) / average(bare):.2f}x; "
            f"no-Ray loop/bare {average(loop_iterations) / average(bare):.2f}x"
        )
