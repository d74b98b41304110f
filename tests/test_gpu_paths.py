"""The GPU code paths run on CPU: a mixed_float16 trial (float32 outputs and loss, a loss-scaled
optimizer, a checkpoint that reloads and resumes) and a trial data-parallel over two logical
CPU devices under MirroredStrategy (the global batch split, metrics as on one device).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SyntheticDataset, python_json

TINY_TRIAL = {"backbone": "convnet_small", "image_size": 32, "batch_size": 32, "seed": 3}


def test_a_mixed_precision_trial_trains_loss_scaled_and_its_checkpoint_reloads(
    synthetic_dataset: SyntheticDataset, tmp_path: Path
) -> None:
    import keras

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.trainable.checkpoint import load_model, read_state
    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.local import load_config_file
    from chestxpert.trainable.train import run_trial, weights_digest

    # `on` as a YAML file says it (YAML 1.1 reads it as true)
    (tmp_path / "trial.yaml").write_text(
        f"dataset: {synthetic_dataset.prepared}\nepochs: 1\nmixed_precision: on\n"
    )
    config = load_config_file(tmp_path / "trial.yaml", [f"{k}={v}" for k, v in TINY_TRIAL.items()])
    assert config.mixed_precision == "on"
    endpoints = resolve(workspace=tmp_path / "ws", environ={})
    checkpoint = tmp_path / "checkpoint"
    reports: list[dict] = []
    trained: list = []

    def keep(metrics: dict, checkpoint_dir: Path | None) -> None:
        reports.append(metrics)
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, checkpoint)

    try:
        run_trial(config, keep, endpoints=endpoints, trained=trained.append)
        model = trained[0]
        assert model.dtype_policy.name == "mixed_float16"
        assert model.get_layer("conv2").compute_dtype == "float16"
        assert model.get_layer("conv2").variable_dtype == "float32"
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert type(model.optimizer.inner_optimizer).__name__ == "Adam"
        scale = float(model.optimizer.dynamic_scale)  # the loss is scaled by this, 2**15 at first
        assert 0 < scale <= model.optimizer.initial_scale
        images = np.zeros((2, 32, 32, 1), np.uint8)
        outputs = model(images, training=False)
        assert outputs.dtype == "float32"
        targets = np.concatenate([np.ones((2, 14)), np.ones((2, 14))], axis=1).astype("float32")
        assert model.loss(targets, outputs).dtype == "float32"
        assert len(reports) == 1 and np.isfinite(reports[0]["train_loss"])
        assert np.isfinite(reports[0]["val_loss"])

        state = read_state(checkpoint)
        assert state["runtime"]["precision"] == "mixed_float16"
        keras.mixed_precision.set_global_policy("float32")  # reloading needs no global policy
        reloaded = load_model(checkpoint)
        assert isinstance(reloaded.optimizer, keras.optimizers.LossScaleOptimizer)
        assert reloaded.get_layer("conv2").compute_dtype == "float16"
        assert weights_digest(reloaded) == state["weights_sha256"] == weights_digest(model)
        assert int(reloaded.optimizer.iterations) == int(model.optimizer.iterations) > 0
        assert float(reloaded.optimizer.dynamic_scale) == scale
        np.testing.assert_array_equal(reloaded(images, training=False), outputs)

        resumed = TrialConfig.from_dict({**config.to_dict(), "epochs": 2})
        last = run_trial(resumed, lambda metrics, _: reports.append(metrics), checkpoint, endpoints)
        assert [r["epoch"] for r in reports] == [1.0, 2.0] and np.isfinite(last["val_loss"])
    finally:
        keras.mixed_precision.set_global_policy("float32")


# Run in a new interpreter: TensorFlow splits the CPU into logical devices only before it
# starts its devices, which an earlier test in this process has done.
MIRRORED_SCRIPT = """
import json, sys
import tensorflow as tf
from chestxpert.cluster.endpoints import resolve
from chestxpert.trainable.config import TrialConfig
from chestxpert.trainable.train import run_trial

values, workspace = json.loads(sys.argv[1]), sys.argv[2]
endpoints = resolve(workspace=workspace, environ={})
out = {}
for devices in (2, 1):
    config = TrialConfig.from_dict({**values, "cpu_devices": devices})
    models = []
    metrics = run_trial(config, lambda m, c: None, endpoints=endpoints, trained=models.append)
    strategy = models[0].distribute_strategy
    # the batch each replica's step gets, through the same split Keras's fit uses
    images = tf.zeros((config.batch_size, 32, 32, 1), tf.uint8)
    batch = tf.data.Dataset.from_tensors(images)
    sizes = strategy.run(lambda x: tf.shape(x)[0], args=(next(iter(
        strategy.experimental_distribute_dataset(batch))),))
    out[devices] = {
        "metrics": metrics,
        "replicas": strategy.num_replicas_in_sync,
        "steps": int(models[0].optimizer.iterations.numpy()),
        "strategy": type(strategy).__name__,
        "devices": list(strategy.extended.worker_devices) if devices > 1 else [],
        "per_replica_batch": [int(s) for s in strategy.experimental_local_results(sizes)],
    }
print(json.dumps(out))
"""


def test_a_trial_on_two_cpu_devices_splits_the_batch_and_matches_one_device(
    synthetic_dataset: SyntheticDataset, tmp_path: Path
) -> None:
    values = {
        **TINY_TRIAL,
        "dataset": str(synthetic_dataset.prepared),
        "epochs": 2,
        "cpus": 1,
        # randomness a replica draws on its own (augmentation, dropout) would differ from one
        # device's by design; without it the two runs compute the same sums
        "augment": False,
        "dropout": 0.0,
    }
    runs = python_json(["-c", MIRRORED_SCRIPT, json.dumps(values), str(tmp_path / "ws")])
    two, one = runs["2"], runs["1"]
    assert two["strategy"] == "MirroredStrategy" and two["replicas"] == 2
    assert len(two["devices"]) == 2 and all("CPU" in d for d in two["devices"])
    assert two["per_replica_batch"] == [16, 16]
    assert one["replicas"] == 1 and one["per_replica_batch"] == [32]
    # batch_size stays the global batch: as many steps per epoch as on one device
    train_images = synthetic_dataset.manifest["splits"]["train"]["images"]
    assert two["steps"] == one["steps"] == 2 * math.ceil(train_images / 32)
    # Not equal: each replica normalises its 16 images with their own BatchNorm statistics,
    # which moves a near-random model's AUC on 77 validation images by a few hundredths.
    for key in ("train_loss", "val_loss"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=0.05), key
    assert two["metrics"]["val_auc_macro"] == pytest.approx(
        one["metrics"]["val_auc_macro"], abs=0.06
    )
