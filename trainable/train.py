"""The trial: one function of the flat config that trains, evaluates every epoch and checkpoints.

`train(config)` is the Ray Tune function trainable; `train_local` runs the same
loop outside Tune (for `chestxpert train`), reporting to MLflow and a folder.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from chestxpert.cluster.endpoints import Endpoints, worker_endpoints
from chestxpert.datasets.images import resize_uint8
from chestxpert.trainable.config import ConfigError, TrialConfig
from chestxpert.trainable.system_metrics import SystemMetricsTarget, trial_system_metrics

# report(metrics, checkpoint_dir or None): where a trial's per-epoch results go.
Reporter = Callable[[dict[str, float], Path | None], None]


_PROCESS_HAS_RUN_A_TRIAL = False


def _process_age_seconds() -> float:
    """Seconds since this process started, from the kernel's start time (0 if unreadable)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def configure_runtime(config: TrialConfig, cpus: int) -> dict[str, Any]:
    """Threads, devices, GPU memory growth, precision policy and seeds; must run before TF
    builds anything.

    Ray gives a trial CPUs but does not limit TensorFlow's thread pools, so they
    are sized from the allocation here. Memory growth lets trials that share a GPU
    (`resources.gpus: 0.5`) each take only what they use. `cpu_devices` > 1 splits the
    CPU into logical devices, which only a process whose TensorFlow has not started its
    devices yet can do. Returns what was chosen, for the log and the checkpoint.
    """
    import keras
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, cpus))
    except RuntimeError:
        pass  # the runtime is already up (a second trial in this process): its pools stay
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised by an earlier trial in this process, which set it too
    if config.cpu_devices > 1 and not gpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * config.cpu_devices
            )
        except RuntimeError:
            pass  # too late in this process: training_devices says so if there are too few
    policy = config.precision_policy(has_gpu=bool(gpus))
    keras.mixed_precision.set_global_policy(policy)
    random.seed(config.seed)
    np.random.seed(config.seed)
    keras.utils.set_random_seed(config.seed)
    # What TF runs with, which in a reused process may differ from what was asked
    # (0 = TF's default).
    return {
        "cpus": cpus,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "gpus": len(gpus),
        "gpu_memory_growth": [tf.config.experimental.get_memory_growth(g) for g in gpus],
        "precision": policy,
        "niceness": os.nice(0),
    }


def training_devices(config: TrialConfig) -> list[str]:
    """The devices a trial trains on, one replica each: every GPU it can see, else with
    `cpu_devices` > 1 that many logical CPUs, else the one default device ([]).

    A CPU split asked for in a process whose TensorFlow started with fewer devices is a
    ConfigError: the split needs a fresh process (a new Ray worker, not a reused one).
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [gpu.name for gpu in gpus] if len(gpus) > 1 else []
    if config.cpu_devices <= 1:
        return []
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < config.cpu_devices:
        raise ConfigError(
            f"trial config: cpu_devices {config.cpu_devices} needs a process whose TensorFlow "
            f"has not started yet; this one runs with {len(cpus)} CPU device(s). Run the trial "
            "in a new process (reuse_actors: false in a sweep)."
        )
    return [cpu.name for cpu in cpus[: config.cpu_devices]]


def _trial_cpus(config: TrialConfig) -> int:
    """Threads for TensorFlow: the config's `cpus`, else the CPUs Ray gave this trial or task
    (Ray does not limit TF's pools itself), else every core of this machine."""
    if config.cpus:
        return config.cpus
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    return os.cpu_count() or 1


class _Data:
    """The trial's prepared dataset: a shuffled training pipeline and the whole validation split."""

    def __init__(self, config: TrialConfig, endpoints: Endpoints) -> None:
        from chestxpert.datasets.reader import make_tf_dataset, open_dataset, read_split

        self.dataset = open_dataset(
            config.dataset,
            endpoints,
            config.dataset_generation,
            config.shard_cache,
            config.shard_cache_gb,
        )
        self.labels = self.dataset.labels
        self.manifest = self.dataset.manifest
        self.image_size = config.image_size or self.dataset.image_size
        self.train_count = self.dataset.count(config.train_splits)
        if self.train_count == 0 or self.dataset.count("val") == 0:
            raise ValueError(f"{config.dataset}: the train and val splits must both hold images")
        self.steps_per_epoch = math.ceil(self.train_count / config.batch_size)
        val = read_split(self.dataset, "val")
        self.val_mask = (~np.isnan(val["labels"])).astype(np.float32)
        self.val_labels = np.nan_to_num(val["labels"], nan=0.0)
        self.val_images = val["image"]
        if self.image_size != self.dataset.image_size:
            self.val_images = resize_uint8(self.val_images, self.image_size).numpy()
        self._make = make_tf_dataset
        self.config = config

    def train_pipeline(self, start_epoch: int, cpus: int):
        """The shuffled training batches from `start_epoch` on, read and resized with `cpus`
        threads (the trial's CPUs, not the machine's), as (images, labels and mask packed)."""
        import tensorflow as tf

        size = self.image_size
        resize = size != self.dataset.image_size

        def pack(images, labels, mask):
            if resize:
                images = resize_uint8(images, size)
            return images, tf.concat([labels, mask], axis=-1)

        pipeline = self._make(
            self.dataset,
            self.config.train_splits,
            self.config.batch_size,
            shuffle=True,
            seed=self.config.seed,
            start_epoch=start_epoch,
            parallel_reads=cpus,
        )
        return pipeline.map(pack, num_parallel_calls=cpus, deterministic=True)


def _build_or_restore(config: TrialConfig, data: _Data, restore: Path | None):
    import contextlib

    import tensorflow as tf

    # A trial with several devices trains data-parallel: each step splits batch_size (the
    # global batch) evenly over the replicas, each scales its loss by 1/replicas, and the
    # summed gradients are the global batch's.
    devices = training_devices(config)
    if len(devices) > config.batch_size:
        raise ConfigError(
            f"trial config: batch_size {config.batch_size} is smaller than the "
            f"{len(devices)} devices it is split over"
        )
    strategy = tf.distribute.MirroredStrategy(devices) if devices else None
    with strategy.scope() if strategy else contextlib.nullcontext():
        return _build_or_restore_here(config, data, restore)


def _build_or_restore_here(config: TrialConfig, data: _Data, restore: Path | None):
    from chestxpert.trainable.backbones import build_model, get_backbone
    from chestxpert.trainable.checkpoint import load_model, read_state
    from chestxpert.trainable.losses import make_loss
    from chestxpert.trainable.optim import make_optimizer

    get_backbone(config.backbone)  # a name typo fails here, before anything is built
    if restore is not None:
        model = load_model(restore, compile=True)
        build_optimizer(model)
        return model, read_state(restore)
    from chestxpert.trainable.augment import make_augmentation

    model = build_model(
        config.backbone,
        data.image_size,
        len(data.labels),
        dropout=config.dropout,
        weights=config.weights or None,
        augmentation=make_augmentation(config),
    )
    loss = make_loss(
        config.loss,
        len(data.labels),
        data.manifest.get("pos_weight"),
        data.manifest.get("neg_weight"),
        gamma=config.focal_gamma,
    )
    optimizer = make_optimizer(config, data.steps_per_epoch)
    if model.dtype_policy.name == "mixed_float16":
        # float16 gradients underflow unless the loss is scaled. Wrapped here, not left to
        # compile(): the saved compile config then names the LossScaleOptimizer, so a reload
        # restores it and its state (compile() would wrap the reload only under a global
        # mixed_float16 policy, and otherwise drop the optimizer state).
        import keras

        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=loss, jit_compile=config.xla)
    build_optimizer(model)
    return model, None


def build_optimizer(model) -> None:
    """Create the optimizer's variables now, eagerly, in the caller's strategy scope.

    Left to the first step, Keras creates them inside the traced train function, and
    TensorFlow then traces that function twice: DenseNet121's first step at 64 px took 45 s
    on 2 cores that way, 23 s with the variables made here first.
    """
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def run_trial(
    config: TrialConfig,
    report: Reporter,
    restore: Path | None = None,
    endpoints: Endpoints | None = None,
    trained: Callable[[Any], None] | None = None,
) -> dict[str, float]:
    """Train `config` from scratch or from the checkpoint folder `restore`; report after each epoch.

    Each report carries train/val loss, val AUC (macro, per label), PR AUC,
    epoch seconds, images per second and the start-up seconds of this process
    (interpreter, imports, model build and first step). Returns the last metrics.
    `endpoints` say where the dataset's storage is; None (a Ray trial or task) takes them
    from this process's environment, which the driver set, never from a workspace folder.
    `trained`, if given, gets the trained Keras model at the end (the final job evaluates it
    without reloading it or building its graphs again).
    """
    import keras

    from chestxpert.trainable.checkpoint import write_checkpoint
    from chestxpert.trainable.metrics import auc_metrics

    global _PROCESS_HAS_RUN_A_TRIAL
    trial_started = time.monotonic()
    # A fresh process (a new Ray trial) also paid for the interpreter and imports.
    paid_before = 0.0 if _PROCESS_HAS_RUN_A_TRIAL else _process_age_seconds()
    if _PROCESS_HAS_RUN_A_TRIAL:
        # A process that trains again (a reused Ray worker, a notebook) starts from a clean
        # Keras state: layer names and seeds as in a fresh process, the last model freed.
        keras.backend.clear_session(free_memory=True)
    _PROCESS_HAS_RUN_A_TRIAL = True
    runtime = configure_runtime(config, _trial_cpus(config))
    data = _Data(config, endpoints or worker_endpoints())
    model, state = _build_or_restore(config, data, restore)
    runtime["replicas"] = model.distribute_strategy.num_replicas_in_sync
    start_epoch = int(state["epoch"]) if state else 0
    if state:
        print(
            f"resumed at epoch {start_epoch} from {restore} "
            f"(weights sha256 {weights_digest(model)[:16]}, "
            f"optimizer step {int(model.optimizer.iterations.numpy())})",
            flush=True,
        )
    plateau = dict(state.get("plateau", {})) if state else {}
    plateau.setdefault("best", math.inf)
    plateau.setdefault("wait", 0)
    history: list[dict[str, float]] = list(state.get("history", [])) if state else []
    loss_fn = model.loss
    last: dict[str, float] = {}

    class EpochReport(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.first_step_done = False

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_started = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            if not self.first_step_done:
                self.first_step_done = True
                self.startup_seconds = paid_before + time.monotonic() - trial_started

        def on_epoch_end(self, epoch, logs=None):
            nonlocal last
            epoch_seconds = time.monotonic() - self.epoch_started
            probabilities = predict(model, data.val_images, max(32, config.batch_size))
            targets = np.concatenate([data.val_labels, data.val_mask], axis=1)
            metrics = {
                "epoch": float(epoch + 1),
                "train_loss": float(logs["loss"]),
                "val_loss": float(keras.ops.convert_to_numpy(loss_fn(targets, probabilities))),
                **auc_metrics(data.val_labels, probabilities, data.val_mask, data.labels),
                "epoch_seconds": epoch_seconds,
                "images_per_second": data.train_count / max(epoch_seconds, 1e-9),
                "startup_seconds": float(getattr(self, "startup_seconds", 0.0)),
                "learning_rate": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
            }
            if config.lr_schedule == "plateau":
                _plateau_step(model, plateau, metrics["val_loss"], config)
            history.append(metrics)
            last = metrics
            done = epoch + 1 == config.epochs
            checkpoint_dir = None
            if done or (epoch + 1) % config.checkpoint_every == 0:
                checkpoint_dir = write_checkpoint(
                    model,
                    {
                        "epoch": epoch + 1,
                        "metrics": metrics,
                        "config": config.to_dict(),
                        "labels": data.labels,
                        "preprocessing": {
                            "image_size": data.image_size,
                            "channels": 1,
                            "dtype": "uint8",
                            "gray": "PIL luminance; 16-bit min-max",
                            "square": "pad centred, Lanczos",
                        },
                        "plateau": plateau,
                        "history": history,
                        "runtime": runtime,
                        "dataset_digest": data.manifest.get("digest"),
                        "weights_sha256": weights_digest(model),
                    },
                )
            try:
                report(metrics, checkpoint_dir)
            finally:
                if checkpoint_dir is not None:
                    shutil.rmtree(checkpoint_dir, ignore_errors=True)

    if start_epoch >= config.epochs:
        return dict(state.get("metrics", {})) if state else {}
    model.fit(
        data.train_pipeline(start_epoch, runtime["cpus"]),
        epochs=config.epochs,
        initial_epoch=start_epoch,
        callbacks=[EpochReport()],
        verbose=0,
        shuffle=False,  # the reader shuffles
    )
    if trained is not None:
        trained(model)
    return last


def predict(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """`model.predict` of in-memory images, through a tf.data pipeline with the reader's options:
    given the array itself, Keras builds one with tf.data's autotuner on (`pipeline_options`)."""
    return np.asarray(model.predict(predict_batches(images, batch_size), verbose=0))


def predict_batches(images: np.ndarray, batch_size: int) -> Any:
    """The `tf.data.Dataset` that `predict` feeds: `images` in order, in batches of `batch_size`."""
    import tensorflow as tf

    from chestxpert.datasets.reader import PREFETCH_BATCHES, pipeline_options

    return (
        tf.data.Dataset.from_tensor_slices(images)
        .batch(batch_size)
        .prefetch(PREFETCH_BATCHES)
        .with_options(pipeline_options(1))
    )


def weights_digest(model) -> str:
    """SHA-256 over every weight array in order: equal digests mean identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()


def _plateau_step(model, plateau: dict, val_loss: float, config: TrialConfig) -> None:
    # Kept here rather than in keras.callbacks.ReduceLROnPlateau so its state
    # lands in the same checkpoint as the epoch it belongs to.
    if val_loss < plateau["best"] - 1e-4:
        plateau["best"], plateau["wait"] = val_loss, 0
        return
    plateau["wait"] += 1
    if plateau["wait"] >= config.plateau_patience:
        current = float(model.optimizer.learning_rate)
        model.optimizer.learning_rate = max(current * config.plateau_factor, 1e-7)
        plateau["wait"] = 0


# Tune gives a stopped trial's thread TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s by default) to end
# before it hands the worker to the next trial; past that the next trial fails ("Trainable
# runner reuse requires reset_config()…"), and Ray 2.60 never tells the searcher, so the slot
# it held under `max_concurrent` stays taken and a sweep can hang with nothing running.
# Unwinding a Keras fit and flushing the trial's system metrics to MLflow can take longer
# than 2 s on a busy node.
STOPPING_TRIAL_WAIT_SECONDS = 120


def wait_for_stopping_trials() -> None:
    """Let a reused worker wait up to STOPPING_TRIAL_WAIT_SECONDS for its stopped trial to end
    (unless the environment sets Tune's own variable); Tune reads it in this process."""
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(STOPPING_TRIAL_WAIT_SECONDS))


def train(
    config: dict[str, Any],
    dataset_generation: str = "",
    system_metrics: SystemMetricsTarget | None = None,
) -> None:
    """Ray Tune function trainable: builds from `config`, resumes from `tune.get_checkpoint()`,
    and calls `tune.report(metrics, checkpoint=…)` after every epoch.

    `dataset_generation` is the dataset version the sweep's driver chose (bound with
    `tune.with_parameters`, so a resumed trial gets the driver's current choice, not the one
    frozen in its config); it overrides the config's own. `system_metrics` names the MLflow
    server and sweep whose trial run gets this process's CPU, memory and GPU use.
    """
    from ray import tune

    wait_for_stopping_trials()  # before this trial can be stopped and its worker reused
    if dataset_generation:
        config = {**config, "dataset_generation": dataset_generation}
    trial_config = TrialConfig.from_dict(config)

    import ray

    node_id = ray.get_runtime_context().get_node_id()
    # The GPUs Ray gave this trial, as numbered on its node ("" for none): trials that share
    # one (fractional `gpus`) name the same GPU on the same node.
    gpu_ids = ",".join(str(gpu) for gpu in ray.get_gpu_ids())

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        # node_id and gpu_ids say where the epoch ran (trials move when nodes die),
        # dataset_generation which version of the dataset it read; MLflow skips text values.
        tune.report(
            {
                **metrics,
                "node_id": node_id,
                "gpu_ids": gpu_ids,
                "dataset_generation": trial_config.dataset_generation or "current",
            },
            checkpoint=checkpoint,
        )

    with trial_system_metrics(system_metrics, tune.get_context().get_trial_id()):
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            run_trial(trial_config, report)
            return
        with checkpoint.as_directory() as restore:
            run_trial(trial_config, report, restore=Path(restore))
