"""The training input pipeline (`make_tf_dataset`) on a prepared dataset of several shards and row
groups: the manifest's order unshuffled, epochs that depend only on seed and epoch number,
sharding, the trial's CPUs as its threads, and a damaged shard named in the error."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from chestxpert.cluster.endpoints import resolve
from chestxpert.datasets.prepare import PrepareOptions, prepare
from chestxpert.datasets.reader import PreparedDataset, make_tf_dataset, open_dataset, read_split
from chestxpert.datasets.schema import DatasetError

BATCH = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> PreparedDataset:
    """600 phantoms at 32 px; shards of 300 rows, so the training split has two shards and
    three row groups (256 + 44 rows, then the rest)."""
    from chestxpert.datasets.synth import generate

    root = tmp_path_factory.mktemp("pipeline")
    generate(root / "raw", images=600, size=64, seed=0, progress=False)
    endpoints = resolve(workspace=root / "ws", environ={})
    opts = PrepareOptions(
        source="nih", image_size=32, split="patient", shard_rows=300, workers=1, progress=False
    )
    prepare(str(root / "raw"), str(root / "prepared"), opts, endpoints)
    opened = open_dataset(str(root / "prepared"), endpoints)
    groups = sum(pq.ParquetFile(path).num_row_groups for path in opened.shard_paths("train"))
    assert len(opened.shard_paths("train")) >= 2 and groups >= 3
    return opened


def positions(dataset: PreparedDataset, passes) -> list[int]:
    """Each image of one pass as its row number in the manifest's order."""
    reference = read_split(dataset, "train")["image"]
    row_of = {image.tobytes(): row for row, image in enumerate(reference)}
    assert len(row_of) == len(reference), "phantoms must be distinct to be told apart"
    return [row_of[image.tobytes()] for images, _, _ in passes for image in images.numpy()]


def epochs(pipeline, count: int) -> list[list[int]]:
    return [positions(pipeline.dataset, pipeline.data) for _ in range(count)]


class Pipeline:
    def __init__(self, dataset: PreparedDataset, **options) -> None:
        self.dataset = dataset
        self.data = make_tf_dataset(dataset, "train", BATCH, **options)


@pytest.mark.parametrize("parallel_reads", [1, 3])
def test_unshuffled_batches_are_the_manifest_order_every_time(
    dataset: PreparedDataset, parallel_reads: int
) -> None:
    pipeline = Pipeline(dataset, parallel_reads=parallel_reads)
    count = dataset.count("train")
    assert epochs(pipeline, 2) == [list(range(count))] * 2
    assert int(pipeline.data.cardinality()) == math.ceil(count / BATCH)
    sizes = [int(images.shape[0]) for images, _, _ in pipeline.data]
    assert sizes == [BATCH] * (count // BATCH) + ([count % BATCH] if count % BATCH else [])


@pytest.mark.parametrize("shuffle_buffer", [64, 2048])  # one row group at a time, or all
def test_an_epochs_order_depends_only_on_seed_and_epoch(
    dataset: PreparedDataset, shuffle_buffer: int
) -> None:
    count = dataset.count("train")
    first, second, third = epochs(
        Pipeline(dataset, shuffle=True, seed=7, shuffle_buffer=shuffle_buffer), 3
    )
    for order in (first, second, third):
        assert sorted(order) == list(range(count))  # every image once
    assert len({tuple(first), tuple(second), tuple(third)}) == 3
    # A trial resumed at epoch 1, read with more threads, sees what the first one saw.
    resumed = Pipeline(
        dataset,
        shuffle=True,
        seed=7,
        shuffle_buffer=shuffle_buffer,
        start_epoch=1,
        parallel_reads=2,
    )
    assert epochs(resumed, 2) == [second, third]
    other_seed = Pipeline(dataset, shuffle=True, seed=8, shuffle_buffer=shuffle_buffer)
    assert epochs(other_seed, 1) != [first]


def test_a_shuffled_batch_mixes_row_groups_when_the_window_holds_several(
    dataset: PreparedDataset,
) -> None:
    (order,) = epochs(Pipeline(dataset, shuffle=True, seed=0), 1)
    first_batch = order[:BATCH]
    # rows 0-255 are the first row group; the default window holds the whole split
    assert any(row < 256 for row in first_batch) and any(row >= 256 for row in first_batch)
    (windowed,) = epochs(Pipeline(dataset, shuffle=True, seed=0, shuffle_buffer=64), 1)
    # one row group per window: its rows arrive together, in a new order
    assert windowed[:BATCH] != sorted(windowed[:BATCH])


def test_shards_split_the_rows_between_readers(dataset: PreparedDataset) -> None:
    halves = [
        epochs(Pipeline(dataset, shuffle=True, seed=1, shard_index=index, num_shards=2), 1)[0]
        for index in range(2)
    ]
    assert halves[0] and halves[1] and not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == list(range(dataset.count("train")))


def test_the_pipeline_runs_on_the_threads_it_is_given(dataset: PreparedDataset) -> None:
    options = Pipeline(dataset, shuffle=True, parallel_reads=3).data.options()
    assert options.threading.private_threadpool_size == 3
    # buffers and parallelism are set by the pipeline; the autotuner's thread held up freeing
    # every epoch's iterator (benchmarks/input_pipeline.py)
    assert options.autotune.enabled is False


def test_labels_come_with_their_mask(dataset: PreparedDataset) -> None:
    images, labels, mask = next(iter(Pipeline(dataset).data))
    expected = read_split(dataset, "train")["labels"][: len(labels)]
    np.testing.assert_array_equal(labels.numpy(), np.nan_to_num(expected, nan=0.0))
    np.testing.assert_array_equal(mask.numpy(), (~np.isnan(expected)).astype(np.float32))
    assert images.dtype.name == "uint8" and tuple(images.shape[1:]) == (32, 32, 1)


def test_a_damaged_shard_is_named(dataset: PreparedDataset, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset.root, copy)
    damaged = open_dataset(str(copy), resolve(workspace=tmp_path / "ws", environ={}))
    shard = damaged.shard_paths("train")[1]
    Path(shard).write_bytes(Path(shard).read_bytes()[:100])
    with pytest.raises(DatasetError, match=rf"shard {shard} cannot be read as Parquet"):
        make_tf_dataset(damaged, "train", BATCH)


def test_a_trials_pipeline_runs_on_the_trials_cpus_and_resizes(
    dataset: PreparedDataset, tmp_path: Path
) -> None:
    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.train import _Data

    config = TrialConfig.from_dict({"dataset": dataset.uri, "batch_size": 16, "image_size": 16})
    data = _Data(config, resolve(workspace=tmp_path / "ws", environ={}))
    pipeline = data.train_pipeline(start_epoch=0, cpus=2)
    assert pipeline.options().threading.private_threadpool_size == 2
    assert int(pipeline.cardinality()) == data.steps_per_epoch
    images, targets = next(iter(pipeline))
    assert tuple(images.shape) == (16, 16, 16, 1) and images.dtype.name == "uint8"
    assert tuple(targets.shape) == (16, 2 * len(dataset.labels))  # labels, then their mask


def test_batches_held_while_later_windows_are_read_keep_their_images(
    dataset: PreparedDataset,
) -> None:
    # Windows are handed to TensorFlow without a copy (Arrow's pool): every batch of a pass is
    # kept alive here while the later windows are allocated and filled, and none may change.
    pipeline = Pipeline(dataset, shuffle=True, seed=3, shuffle_buffer=64, parallel_reads=2)
    held = list(pipeline.data)
    assert len(held) > 1
    assert sorted(positions(dataset, held)) == list(range(dataset.count("train")))
