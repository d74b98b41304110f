"""Images per second into the model: the prepared Parquet shards through `make_tf_dataset` versus
decoding and resizing the original PNGs every epoch, as `flow_from_dataframe` does.

Also prints the synthetic generator's and `prepare`'s own rates, since both set how long
a dataset takes to make. The target for the ratio is 5x.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from benchmarks.runner import scratch_dir


@dataclass(frozen=True)
class Size:
    images: int
    original: int  # side of the generated PNGs; NIH's originals are 1024×1024
    image_size: int  # side of the prepared images the model reads


FULL = Size(images=400, original=1024, image_size=224)
SMOKE = Size(images=24, original=128, image_size=64)
BATCH_SIZE = 16
TARGET_RATIO = 5


def run(smoke: bool = False) -> None:
    import numpy as np
    import tensorflow as tf

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.nih import read_nih
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.reader import make_tf_dataset, open_dataset, read_split
    from chestxpert.datasets.synth import generate

    size = SMOKE if smoke else FULL
    side = size.image_size
    with scratch_dir() as work:
        started = time.monotonic()
        generate(work / "raw", images=size.images, size=size.original, seed=0, progress=False)
        rate = size.images / (time.monotonic() - started)
        print(f"  synthetic generation: {rate:.1f} images/s at {size.original}×{size.original}")
        started = time.monotonic()
        endpoints = resolve(workspace=work / "ws", environ={})
        opts = PrepareOptions(source="nih", image_size=side, split="patient", progress=False)
        manifest = prepare(str(work / "raw"), str(work / "prepared"), opts, endpoints)
        rate = size.images / (time.monotonic() - started)
        print(f"  prepare: {rate:.1f} images/s ({size.original}px PNG -> {side}px shards)")

        dataset = open_dataset(str(work / "prepared"), endpoints)
        train_ids = set(read_split(dataset, "train", columns=("image_id",))["image_id"])
        table = read_nih(work / "raw").images
        paths = [
            path
            for image_id, path in zip(table["image_id"], table["path"], strict=True)
            if image_id in train_ids
        ]

        def load(path):
            pixels = tf.io.decode_png(tf.io.read_file(path), channels=1)
            return tf.cast(tf.image.resize(pixels, (side, side), antialias=True), tf.uint8)

        def png_pipeline():
            files = tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths), seed=0)
            return (
                files.map(load, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(BATCH_SIZE)
                .prefetch(tf.data.AUTOTUNE)
            )

        def parquet_pipeline():
            return make_tf_dataset(dataset, "train", batch_size=BATCH_SIZE, shuffle=True, seed=0)

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
        f"  ratio parquet/png: {rates['parquet'] / rates['png']:.1f}x "
        f"(target >= {TARGET_RATIO}x); digest {manifest['digest'][:8]}"
    )
