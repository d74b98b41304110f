"""A trial's training step, in a fresh process each, after one pass of nothing, of a
`tf.data.Dataset.from_generator` pipeline (the input pipeline before issue 13 section 4, and
`make_tf_dataset`'s pass counter until this benchmark found it), and of `make_tf_dataset` now.

Found while profiling trials (TF 2.21, 2 cores): once a process had iterated a `from_generator`
dataset, its later training steps took about 2.5 times the CPU and the wall time (DenseNet121 at
64 px). Each step here is `train_on_batch` of the trial's own model (augmentation, loss,
optimizer built first) on one batch held in memory, so the input itself costs nothing; only what
the pass left behind can differ. The sides alternate over rounds, so a neighbour's load falls on
all of them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.runner import run_child, scratch_dir

SIDES = ("none", "from_generator", "make_tf_dataset")


@dataclass(frozen=True)
class Size:
    images: int
    side: int
    backbone: str
    steps: int  # timed steps per process, after one untimed
    rounds: int  # fresh processes per side


FULL = Size(images=300, side=64, backbone="densenet121", steps=8, rounds=3)
SMOKE = Size(images=60, side=32, backbone="convnet_small", steps=2, rounds=1)
BATCH = 32


def steps_after_a_pass(spec: dict[str, Any]) -> dict[str, float]:
    """Child: one pass of `spec["side"]`'s pipeline, then the median wall and CPU seconds of
    `spec["steps"]` training steps on a batch in memory."""
    import numpy as np

    from benchmarks.input_pipeline import todays_make_tf_dataset
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.reader import make_tf_dataset
    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.train import _build_or_restore, _Data, configure_runtime

    config = TrialConfig.from_dict(
        {"dataset": spec["dataset"], "backbone": spec["backbone"], "batch_size": BATCH, "seed": 0}
    )
    cpus = configure_runtime(config, spec["cpus"])["cpus"]
    data = _Data(config, resolve(workspace=Path(spec["workspace"]), environ={}))
    model, _ = _build_or_restore(config, data, None)
    dataset = data.dataset  # opened once, by the trial's own data
    if spec["side"] == "from_generator":
        pipeline = todays_make_tf_dataset(dataset, "train", BATCH, shuffle=True, seed=0)
    elif spec["side"] == "make_tf_dataset":
        pipeline = make_tf_dataset(
            dataset, "train", BATCH, shuffle=True, seed=0, parallel_reads=cpus
        )
    else:
        pipeline = []
    for _ in pipeline:
        pass
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, data.image_size, data.image_size, 1), dtype=np.uint8)
    labels = (rng.random((BATCH, len(data.labels))) < 0.3).astype(np.float32)
    targets = np.concatenate([labels, np.ones_like(labels)], axis=1)
    model.train_on_batch(images, targets)  # traces
    walls, cpus_used = [], []
    for _ in range(spec["steps"]):
        wall, cpu = time.monotonic(), time.process_time()
        model.train_on_batch(images, targets)
        walls.append(time.monotonic() - wall)
        cpus_used.append(time.process_time() - cpu)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus_used)}


def run(smoke: bool = False) -> None:
    import os

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.synth import generate

    size = SMOKE if smoke else FULL
    cpus = min(2, len(os.sched_getaffinity(0)))
    with scratch_dir() as work:
        generate(work / "raw", size.images, size.side, seed=0, workers=1, progress=False)
        opts = PrepareOptions(source="nih", image_size=size.side, workers=1, progress=False)
        endpoints = resolve(workspace=work / "ws", environ={})
        prepare(str(work / "raw"), str(work / "prepared"), opts, endpoints)
        spec = {
            "dataset": str(work / "prepared"),
            "workspace": str(work / "ws"),
            "backbone": size.backbone,
            "cpus": cpus,
            "steps": size.steps,
        }
        print(
            f"  {size.backbone} at {size.side} px, batch {BATCH}, {cpus} CPUs: median of "
            f"{size.steps} steps per process, {size.rounds} fresh processes per side, alternating",
            flush=True,
        )
        runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for _ in range(size.rounds):
            for side in SIDES:
                runs[side].append(run_child(steps_after_a_pass, {**spec, "side": side}))
    medians = {}
    for side in SIDES:
        walls = [run["wall"] for run in runs[side]]
        cpu = [run["cpu"] for run in runs[side]]
        medians[side] = (statistics.median(walls), statistics.median(cpu))
        print(
            f"  after a pass of {side:15s}: step {medians[side][0]:.3f} s wall, "
            f"{medians[side][1]:.3f} CPU-s; each process: "
            f"{', '.join(f'{w:.3f}/{c:.3f}' for w, c in zip(walls, cpu, strict=True))}"
        )
    base_wall, base_cpu = medians["none"]
    for side in SIDES[1:]:
        wall, cpu = medians[side]
        print(
            f"  ratio step after {side}/none: wall {wall / base_wall:.2f}x, CPU "
            f"{cpu / base_cpu:.2f}x (target for make_tf_dataset: <= 1.1x)"
        )
