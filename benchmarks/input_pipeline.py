"""Training input: today's pipeline (one Python generator, per-example unbatch and shuffle) on
today's zstd shards against the row-group pipeline of `make_tf_dataset` on the lz4 shards `data
prepare` now writes (and, to tell the two changes apart, on zstd shards), in img/s at 224 px on 1
and on 2 pinned CPUs;
`model.fit` img/s fed by the pipeline against the same model fed from memory; and how many CPUs
a GPU trial needs to be fed.

Each side runs in a fresh process pinned to its CPUs (`os.sched_setaffinity` before TensorFlow
starts, TF's thread pools and the pipeline's reads set to the same count), on phantoms made by
`data synth` and `data prepare`. Each input pipeline gets processes of its own: a pass of
today's `from_generator` slows every later TensorFlow op in its process (step_after_pipeline),
which in a shared process counted against the new pipeline too. Their processes alternate over
rounds, and fit's two sides alternate epoch by epoch in one process, so a neighbour's load
falls on all of them. Each rate is printed as wall-clock img/s and as img per
CPU-second of this process (steadier on a shared machine). Targets: the new pipeline >= 2x
today's per CPU at 224 px, and fit with it >= 0.95 of fit fed from memory (densenet_tiny at 64
px, a model fast enough that a slow input would show).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.runner import REPO, run_child, scratch_dir

# A GPU trial's appetite. NVIDIA's DeepLearningExamples, TensorFlow ResNet-50 v1.5 README,
# "Training performance: NVIDIA DGX A100 (8x A100 40GB)": 1 GPU, batch 256, mixed precision + XLA,
# 2,375 img/s. No comparable published figure for DenseNet121 was found; it has fewer FLOPs than
# ResNet-50 (2.9 vs 4.1 GFLOPs at 224 px) but its concatenations make it memory-bound, and it is
# usually no faster, so 2,375 img/s stands in for DenseNet121 at 224 px on an A100: an estimate.
GPU_IMAGES_PER_SECOND = 2375
GPU_FIGURE_SOURCE = (
    "NVIDIA DeepLearningExamples, TensorFlow/Classification/ConvNets/resnet50v1.5/README.md, "
    "'Training performance: NVIDIA DGX A100 (8x A100 40GB)', 1 GPU, mixed precision + XLA: "
    "2375 img/s (ResNet-50 standing in for DenseNet121)"
)
# Input CPUs are doubled for what this machine's figures do not cover (real films, a busier
# node, the spread between runs); one more runs the training loop itself (Keras, Tune, logging).
HEADROOM = 2
TRAINING_LOOP_CPUS = 1
GPU_SPECS = ("nih-densenet121-gpu.yaml", "chexpert-densenet121-gpu.yaml")


@dataclass(frozen=True)
class Size:
    images: int  # phantoms drawn; about 70% land in the training split
    original: int  # side of the drawn PNGs
    input_side: int  # side of the shards the input rates read (224 in a full run)
    fit_side: int  # side of the shards fit reads
    fit_backbone: str
    cpu_counts: tuple[int, ...]
    passes: int  # epochs timed per process (after one untimed)
    rounds: int  # processes per input pipeline, alternating with the others'


FULL = Size(8000, 256, 224, 64, "densenet_tiny", (1, 2), passes=3, rounds=3)
SMOKE = Size(80, 64, 32, 32, "convnet_small", (1,), passes=1, rounds=1)
INPUTS = ("today", "new", "new on zstd")
BATCH = 32


def todays_make_tf_dataset(dataset, split: str, batch_size: int, shuffle: bool, seed: int):
    """The baseline: `make_tf_dataset` as it was before issue 13 section 4 (commit 2ea28c8), one
    Python generator over `iter_batches`, then per-example unbatch, shuffle and batch."""
    import numpy as np
    import tensorflow as tf

    from chestxpert.datasets.reader import iter_batches

    size = dataset.image_size
    num_labels = len(dataset.labels)
    epoch = {"n": 0}

    def generate():
        file_seed = seed + epoch["n"] if shuffle else None
        epoch["n"] += 1
        for batch in iter_batches(dataset, split, shuffle_seed=file_seed):
            labels = batch["labels"]
            mask = (~np.isnan(labels)).astype(np.float32)
            yield batch["image"], np.nan_to_num(labels, nan=0.0), mask

    signature = (
        tf.TensorSpec((None, size, size, 1), tf.uint8),
        tf.TensorSpec((None, num_labels), tf.float32),
        tf.TensorSpec((None, num_labels), tf.float32),
    )
    data = tf.data.Dataset.from_generator(generate, output_signature=signature).unbatch()
    if shuffle:
        data = data.shuffle(2048, seed=seed, reshuffle_each_iteration=True)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _pin(cpus: int) -> None:
    """Run this process (and the threads it starts later) on `cpus` of the CPUs it may use."""
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:cpus])


def _timed(run) -> tuple[float, float]:
    """(img per wall-second, img per CPU-second of this process) of `run()`, which returns the
    images it passed."""
    wall, cpu = time.monotonic(), time.process_time()
    images = run()
    return images / (time.monotonic() - wall), images / (time.process_time() - cpu)


def input_rates(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: one pipeline's (`spec["side"]`, of INPUTS) training-input rates on `spec["cpus"]`
    pinned CPUs, one untimed pass, then `spec["passes"]` timed."""
    _pin(spec["cpus"])
    import tensorflow as tf

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.reader import make_tf_dataset, open_dataset

    cpus = spec["cpus"]
    tf.config.threading.set_intra_op_parallelism_threads(cpus)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, cpus))
    endpoints = resolve(workspace=Path(spec["workspace"]), environ={})
    if spec["side"] == "today":
        zstd = open_dataset(spec["zstd_dataset"], endpoints)
        pipeline = todays_make_tf_dataset(zstd, "train", BATCH, shuffle=True, seed=0)
    else:
        source = spec["dataset"] if spec["side"] == "new" else spec["zstd_dataset"]
        pipeline = make_tf_dataset(
            open_dataset(source, endpoints),
            "train",
            BATCH,
            shuffle=True,
            seed=0,
            parallel_reads=cpus,
        )

    def one_pass() -> int:
        return sum(int(images.shape[0]) for images, _, _ in pipeline)

    one_pass()  # warm-up: tracing, file cache
    rates = [_timed(one_pass) for _ in range(spec["passes"])]
    return {"cpus": len(os.sched_getaffinity(0)), "rates": rates}


def fit_rates(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: `model.fit` img/s of one trial's model fed by its real pipeline, and fed one batch
    held in memory (the model's own speed), epochs alternating."""
    _pin(spec["cpus"])
    import tensorflow as tf

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.train import _build_or_restore, _Data, configure_runtime

    config = TrialConfig.from_dict(
        {"dataset": spec["dataset"], "backbone": spec["backbone"], "batch_size": BATCH, "seed": 0}
    )
    runtime = configure_runtime(config, spec["cpus"])
    data = _Data(config, resolve(workspace=Path(spec["workspace"]), environ={}))
    model, _ = _build_or_restore(config, data, None)
    pipeline = data.train_pipeline(0, runtime["cpus"])
    images, targets = next(iter(pipeline))
    # The same tf.data options as the pipeline (its threads; the autotuner off, whose model
    # thread held up freeing each epoch's iterator), so the sides differ only in their input.
    in_memory = (
        tf.data.Dataset.from_tensors((images, targets))
        .repeat(data.steps_per_epoch)
        .with_options(pipeline.options())
    )
    sides = {
        "in_memory": (in_memory, data.steps_per_epoch * BATCH),
        "pipeline": (pipeline, data.train_count),
    }

    def fit(side: str) -> int:
        source, count = sides[side]
        model.fit(source, epochs=1, verbose=0, shuffle=False)
        return count

    for side in sides:
        fit(side)  # warm-up: each input signature traces the train step once
    rates: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    for _ in range(spec["passes"]):
        for side in sides:
            rates[side].append(_timed(lambda s=side: fit(s)))
    return {"cpus": runtime["cpus"], "rates": rates}


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):7.0f} (min {min(values):.0f}, max {max(values):.0f})"


def _prepare(work: Path, side: int, workers: int | None, compression: str = "lz4") -> str:
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare

    endpoints = resolve(workspace=work / "ws", environ={})
    opts = PrepareOptions(
        source="nih",
        image_size=side,
        split="patient",
        workers=workers,
        progress=False,
        compression=compression,
    )
    out = work / f"prepared-{side}-{compression}"
    if not out.exists():
        prepare(str(work / "raw"), str(out), opts, endpoints)
    return str(out)


def _example_spec_cpus() -> dict[str, int]:
    import yaml

    folder = REPO / "sweeps" / "examples"
    return {
        name: int(yaml.safe_load((folder / name).read_text())["resources"]["cpus"])
        for name in GPU_SPECS
    }


def run(smoke: bool = False) -> None:
    from chestxpert.datasets.synth import generate

    size = SMOKE if smoke else FULL
    workers = 1 if smoke else None  # starting worker processes costs more than a smoke run's work
    per_cpu_new: list[float] = []
    with scratch_dir() as work:
        generate(work / "raw", size.images, size.original, seed=0, workers=workers, progress=False)
        common = {"workspace": str(work / "ws"), "passes": size.passes}
        dataset = _prepare(work, size.input_side, workers)
        zstd_dataset = _prepare(work, size.input_side, workers, "zstd")
        manifest = json.loads((Path(dataset) / "manifest.json").read_text())
        print(
            f"  training input: {manifest['splits']['train']['images']} images at "
            f"{size.input_side} px, batch {BATCH}, {size.passes} timed epochs in each of "
            f"{size.rounds} processes per pipeline:"
        )
        for cpus in size.cpu_counts:
            if cpus > len(os.sched_getaffinity(0)):
                print(f"  {cpus} CPUs: this machine lets us use fewer; not measured")
                continue
            spec = {**common, "dataset": dataset, "zstd_dataset": zstd_dataset, "cpus": cpus}
            rates: dict[str, list[list[float]]] = {name: [] for name in INPUTS}
            for _ in range(size.rounds):
                for name in INPUTS:
                    rates[name] += run_child(input_rates, {**spec, "side": name})["rates"]
            medians = {}
            for name, pairs in rates.items():
                wall, cpu = [w for w, _ in pairs], [c for _, c in pairs]
                medians[name] = (statistics.median(wall), statistics.median(cpu))
                print(
                    f"  {cpus} CPU {name:11s}: img/s {_spread(wall)}; img per CPU-second "
                    f"{_spread(cpu)}; each: {', '.join(f'{w:.0f}' for w in wall)}"
                )
            per_cpu_new.append(medians["new"][1])
            (new_wall, new_cpu), (today_wall, today_cpu) = medians["new"], medians["today"]
            zstd_wall, zstd_cpu = medians["new on zstd"]
            print(
                f"  {cpus} CPU ratio new/today: img/s {new_wall / today_wall:.2f}x, img per "
                f"CPU-second {new_cpu / today_cpu:.2f}x (target >= 2x per CPU); new per CPU: "
                f"{new_wall / cpus:.0f} img/s; the pipeline alone (new on zstd/today): img/s "
                f"{zstd_wall / today_wall:.2f}x, img per CPU-second {zstd_cpu / today_cpu:.2f}x"
            )
        fit_dataset = _prepare(work, size.fit_side, workers)
        cpus = min(2, len(os.sched_getaffinity(0)))
        result = run_child(
            fit_rates,
            {
                **common,
                "passes": size.passes * size.rounds,  # as many epochs as the inputs timed
                "dataset": fit_dataset,
                "cpus": cpus,
                "backbone": size.fit_backbone,
            },
            # 20 epochs of about 5,500 images, 15-30 s each here: past run_child's 600 s
            timeout=1800,
        )
    where = f"{size.fit_backbone} at {size.fit_side} px on {cpus} CPUs"
    medians = {}
    for side, pairs in result["rates"].items():
        wall, cpu = [w for w, _ in pairs], [c for _, c in pairs]
        medians[side] = (statistics.median(wall), statistics.median(cpu))
        print(f"  fit {where}, {side:9s}: img/s {_spread(wall)}; img per CPU-second {_spread(cpu)}")
    pipeline_wall, pipeline_cpu = medians["pipeline"]
    memory_wall, memory_cpu = medians["in_memory"]
    print(
        f"  ratio fit pipeline/in-memory: img/s {pipeline_wall / memory_wall:.3f}, img per "
        f"CPU-second {pipeline_cpu / memory_cpu:.3f} (target >= 0.95)"
    )
    _gpu_arithmetic(min(per_cpu_new))


def _gpu_arithmetic(per_cpu: float) -> None:
    """Print the CPUs a GPU trial needs at `per_cpu` images per CPU-second, and what the specs
    say. CPU-seconds, not wall-clock img/s over pinned CPUs: on a shared machine a neighbour
    takes part of the pinned CPUs, which wall-clock rates count against the pipeline."""
    needed = GPU_IMAGES_PER_SECOND / per_cpu
    cpus = math.ceil(needed * HEADROOM) + TRAINING_LOOP_CPUS
    print(f"  GPU node (an estimate): {GPU_FIGURE_SOURCE}.")
    print(
        f"  {GPU_IMAGES_PER_SECOND} img/s / {per_cpu:.0f} img per CPU-second (the new pipeline's "
        f"lowest median above) = {needed:.2f} CPUs of input; x{HEADROOM} headroom, "
        f"rounded up, + {TRAINING_LOOP_CPUS} for the training loop = {cpus} CPUs per trial"
    )
    for name, spec_cpus in _example_spec_cpus().items():
        verdict = "matches" if spec_cpus == cpus else f"differs from the {cpus} computed here"
        print(f"  sweeps/examples/{name}: resources.cpus {spec_cpus} ({verdict})")
