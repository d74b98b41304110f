"""The one reader of prepared datasets: manifest, Parquet shards, and a tf.data pipeline over them.

Reads local folders and `s3://` prefixes through pyarrow's filesystems (the
endpoint comes from the `cluster` resolver). Augmentation belongs to `trainable`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from chestxpert.cluster.endpoints import Endpoints, resolve, storage_filesystem
from chestxpert.datasets.schema import (
    MANIFEST,
    MANIFESTS,
    SCHEMA_VERSION,
    SPLITS,
    DatasetError,
    generation_of,
)
from chestxpert.datasets.shard_cache import ShardCache, ShardCheck, shard_cache_for, warn_once


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset opened for reading: its manifest and where its shards are."""

    uri: str
    manifest: dict[str, Any]
    fs: pafs.FileSystem
    root: str
    cache: ShardCache | None = None  # None: shards are read where they are

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def digest(self) -> str:
        return str(self.manifest.get("digest", ""))

    @property
    def generation(self) -> str:
        """The version this manifest describes (see `schema.generation_of`)."""
        return generation_of(self.manifest)

    def shard_paths(self, split: str) -> list[str]:
        """Shard paths of a split, or of several joined by `+` (e.g. `train+val`).

        Always those of the manifest this dataset was opened with: a trial that reopens its
        shards every epoch keeps reading one generation whatever `prepare` publishes meanwhile.
        """
        paths = []
        for part in split.split("+"):
            if part not in SPLITS:
                raise DatasetError(
                    f"split {part!r} is not known; expected one of {', '.join(SPLITS)}"
                )
            paths += [
                f"{self.root}/{relative}" for relative in self.manifest["splits"][part]["shards"]
            ]
        return paths

    def open_shard(self, path: str) -> AbstractContextManager[pa.NativeFile]:
        """An open file of shard `path` (one of `shard_paths`): its copy in the node's shard
        cache when the dataset is in object storage, else the file or object itself.

        Shards the manifest records no size and SHA-256 for (datasets prepared before it did)
        cannot be checked, so they are streamed, with one note per process.
        """
        if self.cache is None:
            return self.fs.open_input_file(path)
        recorded = self.manifest.get("shard_checks", {}).get(path[len(self.root) + 1 :])
        if recorded is None:
            warn_once(
                f"unchecked {self.uri}",
                f"{self.uri} was prepared before manifests recorded each shard's size and "
                "SHA-256, so its shards cannot be cached and are read from storage every "
                "epoch; `chestxpert data prepare` into a new --out records them",
            )
            return self.fs.open_input_file(path)
        return self.cache.open_shard(
            self.fs, path, ShardCheck(int(recorded["bytes"]), str(recorded["sha256"]))
        )

    def count(self, split: str) -> int:
        return sum(int(self.manifest["splits"][part]["images"]) for part in split.split("+"))


def open_dataset(
    uri: str,
    endpoints: Endpoints | None = None,
    generation: str = "",
    shard_cache: str = "",
    shard_cache_gb: float = 0.0,
) -> PreparedDataset:
    """Open a prepared dataset by URI (folder or `s3://` prefix); fails clearly if incomplete.

    `generation` "" opens the current dataset; a generation name opens that version, as long
    as `chestxpert data gc` has not removed it, so a sweep reads the version it started with
    while `data prepare --force` publishes another. The shards of a dataset in object storage
    are read through the node's shard cache, placed and capped by `shard_cache` and
    `shard_cache_gb` (see `shard_cache.shard_cache_for`); a local folder is read in place.
    """
    endpoints = endpoints or resolve()
    fs, root = storage_filesystem(endpoints, uri)
    manifest = None
    if generation:
        manifest = _read_manifest(fs, f"{root}/{MANIFESTS}/{generation}.json")
    if manifest is None:
        manifest = _read_manifest(fs, f"{root}/{MANIFEST}")
        if manifest is None:
            raise DatasetError(
                f"{uri} has no {MANIFEST}: it is not a prepared dataset, or its preparation did "
                "not finish; run `chestxpert data prepare` for it"
            )
        if generation and generation_of(manifest) != generation:
            raise DatasetError(
                f"{uri} no longer holds generation {generation} (its current one is "
                f"{generation_of(manifest)}): the dataset was replaced and the old version "
                "removed by `chestxpert data gc`; `sweep resume` and `final` take "
                "--allow-dataset-change to move to the current one"
            )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(
            f"{uri}/{MANIFEST} has schema version "
            f"{manifest.get('schema_version')}, this ChestXpert "
            f"reads version {SCHEMA_VERSION}; prepare the dataset again"
        )
    local = isinstance(fs, pafs.LocalFileSystem)
    cache = None if local else shard_cache_for(shard_cache, shard_cache_gb)
    return PreparedDataset(uri=uri, manifest=manifest, fs=fs, root=root, cache=cache)


def _read_manifest(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


def _columns_as_numpy(
    batch: pa.RecordBatch | pa.Table, columns: tuple[str, ...], size: int
) -> dict[str, np.ndarray]:
    """Shard columns as numpy: image N×S×S×1 uint8 (no copy where the column is one chunk),
    labels N×L float32 (NaN where unknown), other columns as object arrays."""
    out: dict[str, np.ndarray] = {}
    for name in columns:
        column = batch.column(name)
        if isinstance(column, pa.ChunkedArray):  # one chunk per row group: no copy
            column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        if name == "image":
            data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
            start = column.offset * size * size
            out[name] = data[start : start + len(column) * size * size].reshape(-1, size, size, 1)
        elif name == "labels":
            values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
            out[name] = values.reshape(len(column), -1)
        else:
            out[name] = np.asarray(column.to_pylist(), dtype=object)
    return out


def iter_batches(
    dataset: PreparedDataset,
    split: str,
    batch_rows: int = 256,
    shuffle_seed: int | None = None,
    columns: tuple[str, ...] = ("image", "labels"),
) -> Iterator[dict[str, np.ndarray]]:
    """Yield column batches of a split as numpy arrays (image: N×S×S×1 uint8, labels: N×L float32).

    `shuffle_seed` shuffles the file order (row order within a file is kept). Training reads
    through `make_tf_dataset`, which deals row groups rather than files.
    """
    paths = dataset.shard_paths(split)
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(paths)
    for path in paths:
        with dataset.open_shard(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(
                batch_size=batch_rows, columns=list(columns)
            ):
                yield _columns_as_numpy(batch, columns, dataset.image_size)


def read_split(
    dataset: PreparedDataset, split: str, columns: tuple[str, ...] = ("image", "labels")
) -> dict[str, np.ndarray]:
    """Read a whole split into memory, in the manifest's deterministic order (for evaluation)."""
    parts = list(iter_batches(dataset, split, batch_rows=4096, columns=columns))
    if not parts:
        return {name: np.empty((0,)) for name in columns}
    return {name: np.concatenate([part[name] for part in parts]) for name in columns}


# Rows the example shuffle mixes at once, at most: also bounded by SHUFFLE_BYTES of images,
# since a trial holds such windows in memory, one being batched and as many being read as its
# CPUs need (64 MiB is about 1,300 images at 224 px, 256 at 512 px).
SHUFFLE_ROWS = 2048
SHUFFLE_BYTES = 64 << 20
# Batches ready ahead of the consumer. The training pipeline reads its windows ahead in a stage
# of their own, so this only smooths the hand-over from one window's batches to the next's.
PREFETCH_BATCHES = 2


@dataclass(frozen=True)
class _RowGroups:
    """The (shard, row group) pairs of a split that one reader reads, from the shards' footers."""

    paths: list[str]
    footers: list[pq.FileMetaData]
    items: list[tuple[int, int]]  # (index into paths, row group)
    rows: list[int]  # rows of each item

    @classmethod
    def of(
        cls, dataset: PreparedDataset, split: str, shard_index: int, num_shards: int
    ) -> _RowGroups:
        paths = dataset.shard_paths(split)
        footers = []
        for path in paths:
            try:
                with dataset.open_shard(path) as handle:
                    footers.append(pq.ParquetFile(handle).metadata)
            except (OSError, pa.ArrowInvalid) as err:
                raise DatasetError(
                    f"{dataset.uri}: shard {path} cannot be read as Parquet ({err}); the "
                    "dataset is damaged, prepare it again"
                ) from None
        every = [(p, g) for p, footer in enumerate(footers) for g in range(footer.num_row_groups)]
        # Row groups, not files, are dealt to readers: a split of one shard still spreads.
        items = every[shard_index::num_shards]
        rows = [footers[p].row_group(g).num_rows for p, g in items]
        return cls(paths, footers, items, rows)


def make_tf_dataset(
    dataset: PreparedDataset,
    split: str,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    shuffle_buffer: int = SHUFFLE_ROWS,
    start_epoch: int = 0,
    parallel_reads: int = 1,
):
    """A `tf.data.Dataset` of `(image uint8 [S,S,1], labels float32 [L], mask float32 [L])` batches.

    `mask` is 0 where a label is unknown (NaN in the shard, e.g. CheXpert's ignored uncertain
    labels) and such labels are set to 0. The split's row groups (from the shard footers, read
    once here) are read `parallel_reads` at a time, which should be the CPUs the caller was
    given, not the machine's. Without `shuffle` the order is the manifest's, every time. With
    `shuffle` each pass is one epoch, counted from `start_epoch`: its row-group order and its
    example order (mixed within windows of `shuffle_buffer` rows, at most SHUFFLE_BYTES of
    images) depend only on `seed` and the epoch number, so a trial resumed at epoch k reads
    exactly what an uninterrupted one read in epoch k. `shard_index`/`num_shards` deal the row
    groups round-robin to readers. The dataset knows its length in batches.
    """
    import tensorflow as tf

    size = dataset.image_size
    num_labels = len(dataset.labels)
    groups = _RowGroups.of(dataset, split, shard_index, num_shards)
    largest = max(groups.rows, default=1)
    window_rows = max(1, min(shuffle_buffer, SHUFFLE_BYTES // (size * size)))
    per_window = max(1, window_rows // largest) if shuffle else 1
    windows = math.ceil(len(groups.items) / per_window)
    reads = max(1, parallel_reads)
    # A window's row groups are read side by side (pyarrow lets go of the GIL while it reads and
    # decompresses), and enough windows at once that `reads` row groups are always being read.
    readers = ThreadPoolExecutor(reads, thread_name_prefix="row-groups")
    windows_at_once = math.ceil(reads / per_window)
    epoch = {"next": start_epoch}

    def next_pass() -> np.int64:
        """The epoch of the pass that starts now: called once by each new iterator."""
        current = epoch["next"]
        if shuffle:
            epoch["next"] += 1
        return np.int64(current)

    def read_window(current: np.int64, window: np.int64):
        order = np.arange(len(groups.items))
        if shuffle:
            order = np.random.default_rng([seed, int(current)]).permutation(order)
        chosen = order[int(window) * per_window : (int(window) + 1) * per_window]
        parts = list(readers.map(lambda item: _read_row_group(dataset, groups, int(item)), chosen))
        if shuffle:
            # One copy from the row groups straight to their shuffled places.
            rows = sum(len(part["labels"]) for part in parts)
            places = np.random.default_rng([seed, int(current), int(window)]).permutation(rows)
            images = _pooled_empty((rows, size, size, 1))
            labels = np.empty((rows, num_labels), np.float32)
            start = 0
            for part in parts:
                end = start + len(part["labels"])
                images[places[start:end]] = part["image"]
                labels[places[start:end]] = part["labels"]
                start = end
        else:
            (part,) = parts
            images, labels = part["image"], part["labels"]
        mask = (~np.isnan(labels)).astype(np.float32)
        return images, np.nan_to_num(labels, nan=0.0), mask

    def read(current, window):
        images, labels, mask = tf.numpy_function(
            read_window, [current, window], (tf.uint8, tf.float32, tf.float32), stateful=False
        )
        return (
            tf.ensure_shape(images, (None, size, size, 1)),
            tf.ensure_shape(labels, (None, num_labels)),
            tf.ensure_shape(mask, (None, num_labels)),
        )

    # (epoch, window) for each window of one pass. Not `from_generator`: once a process had
    # iterated one, its training steps took 2.5x the time and CPU (TF 2.21; DenseNet121 at 64
    # px on 2 cores: 2.0 s against 0.78 s a step; benchmarks/step_after_pipeline.py).
    pass_epoch = tf.data.Dataset.from_tensors(np.int64(0)).map(
        lambda _: tf.ensure_shape(tf.numpy_function(next_pass, [], tf.int64, stateful=True), ())
    )
    windows_of_a_pass = pass_epoch.flat_map(
        lambda current: tf.data.Dataset.range(windows).map(lambda window: (current, window))
    )
    data = (
        windows_of_a_pass.map(read, num_parallel_calls=windows_at_once, deterministic=True)
        .rebatch(batch_size)
        .apply(tf.data.experimental.assert_cardinality(math.ceil(sum(groups.rows) / batch_size)))
        .prefetch(PREFETCH_BATCHES)
    )
    return data.with_options(pipeline_options(reads))


def pipeline_options(threads: int) -> Any:
    """The `tf.data.Options` of every pipeline a trial or the final job builds: `threads` threads
    (tf.data otherwise sizes its pool by the machine's cores), in a fixed order, and tf.data's
    autotuner off. The pipelines set their parallelism and buffers themselves, so it has nothing
    to tune, and with it on, freeing an iterator (each epoch of `model.fit`, each `predict`)
    waited about 0.1 s for its model thread (a third of a 5,500-image pass at 224 px on 1 CPU)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = max(1, threads)
    options.autotune.enabled = False
    options.deterministic = True
    return options


def _pooled_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised uint8 array in Arrow's memory pool. A window is tens of MB, which numpy
    takes from fresh pages of the OS each time (a page fault per 4 KiB, twelve per 224-px image)
    where the pool can reuse freed ones; and the pool's 64-byte alignment lets TensorFlow take
    the array without a copy, where numpy's 16 makes it copy. Filling a window and handing it to
    TensorFlow cost 11.7 us an image of 224 px this way against 26.6 with `np.empty` (1 CPU; the
    two causes not measured apart)."""
    buffer = pa.allocate_buffer(math.prod(shape))
    return np.frombuffer(buffer, np.uint8).reshape(shape)


def _read_row_group(
    dataset: PreparedDataset, groups: _RowGroups, item: int
) -> dict[str, np.ndarray]:
    path_index, row_group = groups.items[item]
    path = groups.paths[path_index]
    with dataset.open_shard(path) as handle:
        # The footer read when the pipeline was built; the row group's columns in one request.
        table = pq.ParquetFile(
            handle, metadata=groups.footers[path_index], pre_buffer=True
        ).read_row_group(row_group, columns=["image", "labels"], use_threads=False)
    return _columns_as_numpy(table, ("image", "labels"), dataset.image_size)
