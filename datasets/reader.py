"""The one reader of prepared datasets: manifest, Parquet shards, and a tf.data pipeline over them.

Reads local folders and `s3://` prefixes through pyarrow's filesystems (the
endpoint comes from the `cluster` resolver). Augmentation belongs to `trainable`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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


def iter_batches(
    dataset: PreparedDataset,
    split: str,
    batch_rows: int = 256,
    shard_index: int = 0,
    num_shards: int = 1,
    shuffle_seed: int | None = None,
    columns: tuple[str, ...] = ("image", "labels"),
) -> Iterator[dict[str, np.ndarray]]:
    """Yield column batches of a split as numpy arrays (image: N×S×S×1 uint8, labels: N×L float32).

    Files are dealt round-robin to `num_shards` workers; `shuffle_seed` shuffles
    the file order (row order within a file is kept; the tf.data buffer mixes further).
    """
    paths = dataset.shard_paths(split)[shard_index::num_shards]
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(paths)
    size = dataset.image_size
    for path in paths:
        with dataset.open_shard(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(
                batch_size=batch_rows, columns=list(columns)
            ):
                out: dict[str, np.ndarray] = {}
                for name in columns:
                    column = batch.column(name)
                    if name == "image":
                        data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
                        start = column.offset * size * size
                        out[name] = data[start : start + len(column) * size * size].reshape(
                            -1, size, size, 1
                        )
                    elif name == "labels":
                        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                        out[name] = values.reshape(len(column), -1)
                    else:
                        out[name] = np.asarray(column.to_pylist(), dtype=object)
                yield out


def read_split(
    dataset: PreparedDataset, split: str, columns: tuple[str, ...] = ("image", "labels")
) -> dict[str, np.ndarray]:
    """Read a whole split into memory, in the manifest's deterministic order (for evaluation)."""
    parts = list(iter_batches(dataset, split, batch_rows=4096, columns=columns))
    if not parts:
        return {name: np.empty((0,)) for name in columns}
    return {name: np.concatenate([part[name] for part in parts]) for name in columns}


def make_tf_dataset(
    dataset: PreparedDataset,
    split: str,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    shuffle_buffer: int = 2048,
    cache: bool = False,
    start_epoch: int = 0,
):
    """A `tf.data.Dataset` of `(image uint8 [S,S,1], labels float32 [L], mask float32 [L])` batches.

    `mask` is 0 where a label is unknown (NaN in the shard, e.g. CheXpert's
    ignored uncertain labels) and such labels are set to 0. Without `shuffle`
    the order is the manifest's, every time. With `shuffle` each pass draws a
    new file order and buffer order from `seed` and the epoch number, counted
    from `start_epoch` (so a resumed trial does not replay epoch 0's order).
    `cache` keeps decoded batches in memory after the first pass (small datasets only).
    """
    import tensorflow as tf

    size = dataset.image_size
    num_labels = len(dataset.labels)
    epoch = {"n": start_epoch}

    def generate():
        file_seed = seed + epoch["n"] if shuffle else None
        epoch["n"] += 1
        for batch in iter_batches(
            dataset, split, shard_index=shard_index, num_shards=num_shards, shuffle_seed=file_seed
        ):
            labels = batch["labels"]
            mask = (~np.isnan(labels)).astype(np.float32)
            yield batch["image"], np.nan_to_num(labels, nan=0.0), mask

    signature = (
        tf.TensorSpec((None, size, size, 1), tf.uint8),
        tf.TensorSpec((None, num_labels), tf.float32),
        tf.TensorSpec((None, num_labels), tf.float32),
    )
    data = tf.data.Dataset.from_generator(generate, output_signature=signature).unbatch()
    if cache:
        data = data.cache()
    if shuffle:
        data = data.shuffle(shuffle_buffer, seed=seed + start_epoch, reshuffle_each_iteration=True)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)
