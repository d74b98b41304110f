"""Per backbone, each in a fresh process: TF+Keras import, model build, first and second train
step (batch 8), peak memory; the first step beside the reference backbone's.

What a new trial process pays before its first step, with the trial's threads,
augmentation, loss and optimizer. Image side: max(min_size, 64).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.runner import run_child

REFERENCE = "densenet121"
SMOKE_BACKBONES = ("densenet_tiny",)  # the quickest; it is also the reference in smoke mode
BATCH = 8
LABELS = 14


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: the seconds one backbone costs a fresh process, from importing TF to step 2."""
    import os
    import resource
    import sys

    if "tensorflow" in sys.modules:  # the import would be timed as free
        raise RuntimeError("TensorFlow was imported before the probe started its clock")
    started = time.monotonic()
    import keras
    import tensorflow  # noqa: F401  # timed together with keras

    imported = time.monotonic()
    import numpy as np

    from chestxpert.trainable.augment import make_augmentation
    from chestxpert.trainable.backbones import build_model
    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.losses import make_loss
    from chestxpert.trainable.train import build_optimizer, configure_runtime

    config = TrialConfig(backbone=spec["backbone"])
    configure_runtime(config, os.cpu_count() or 1)
    size = spec["size"]
    model = build_model(config.backbone, size, LABELS, augmentation=make_augmentation(config))
    built = time.monotonic()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, size, size, 1), dtype=np.uint8)
    labels = (rng.random((BATCH, LABELS)) < 0.3).astype(np.float32)
    targets = np.concatenate([labels, np.ones_like(labels)], axis=1)
    loss = make_loss("weighted_bce", LABELS, [2.0] * LABELS, [0.5] * LABELS)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=False)
    build_optimizer(model)  # as the trial does, before its first step
    model.train_on_batch(images, targets)
    first = time.monotonic()
    model.train_on_batch(images, targets)
    second = time.monotonic()
    return {
        "import": imported - started,
        "build": built - imported,
        "first_step": first - built,
        "second_step": second - first,
        "params_m": model.count_params() / 1e6,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def run(smoke: bool = False) -> None:
    from chestxpert.trainable.backbones import BACKBONES

    names = SMOKE_BACKBONES if smoke else sorted(BACKBONES, key=lambda n: n != REFERENCE)
    reference, reference_step = names[0], None  # the reference runs first
    started = time.monotonic()
    print(
        f"  {'backbone':18s} {'size':>4s} {'params':>6s} {'import':>6s} {'build':>6s} "
        f"{'step 1':>6s} {'step 2':>6s} {'RSS':>6s}  step 1 / {reference}'s",
        flush=True,
    )
    measured = 0
    for name in names:
        size = BACKBONES[name].min_size if smoke else max(BACKBONES[name].min_size, 64)
        try:
            row = run_child(probe, {"backbone": name, "size": size})
        except RuntimeError as error:  # one backbone failing leaves the others to measure
            print(f"  {name:18s} failed: {str(error).strip().splitlines()[-1]}", flush=True)
            continue
        measured += 1
        if name == reference:
            reference_step = row["first_step"]
        ratio = f"{row['first_step'] / reference_step:5.2f}x" if reference_step else "    -"
        print(
            f"  {name:18s} {size:4d} {row['params_m']:5.1f}M {row['import']:5.1f}s "
            f"{row['build']:5.1f}s {row['first_step']:5.1f}s {row['second_step']:5.2f}s "
            f"{row['peak_rss_gb']:4.1f}GB  {ratio}",
            flush=True,
        )
    print(
        f"  {measured} of {len(names)} backbones in {time.monotonic() - started:.0f} s. Size: "
        f"{'min_size' if smoke else 'max(min_size, 64)'}; import is the same for every row (its "
        "spread is noise); step 1 is tracing + graph optimisation; RSS is the child's peak"
    )
