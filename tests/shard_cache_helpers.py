"""Child processes for tests/test_shard_cache.py (run by `benchmarks.runner.run_child`): read a
prepared dataset on the S3 test endpoint through a node's shard cache and say what came from S3.

What came from S3 is counted by a pyarrow filesystem handler that passes every call to the real
S3 filesystem and notes each object it opens: it counts, it does not stand in for S3.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs


class CountingHandler(pafs.FileSystemHandler):
    """The S3 filesystem `inner`, noting (path, bytes) of every object opened for reading."""

    def __init__(self, inner: pafs.FileSystem, delay_s: float = 0.0) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.fetched: list[tuple[str, int]] = []

    def _whole(self, path: str) -> pa.BufferReader:
        with self.inner.open_input_stream(path) as stream:
            data = stream.read()
        self.fetched.append((path, len(data)))
        time.sleep(self.delay_s)  # widens the window in which another process asks too
        return pa.BufferReader(data)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._whole(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._whole(path)

    def get_type_name(self) -> str:
        return "counting-s3"

    def equals(self, other: Any) -> bool:
        return self is other

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(selector)

    def _read_only(self, *args: Any) -> None:
        raise NotImplementedError("the counting filesystem only reads")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


def _counted_dataset(spec: dict[str, Any]):
    """The dataset at spec["uri"], its filesystem wrapped to count, its cache as spec says."""
    import dataclasses

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.reader import open_dataset
    from chestxpert.datasets.shard_cache import ShardCache

    dataset = open_dataset(spec["uri"], resolve(workspace=spec["workspace"]))
    handler = CountingHandler(dataset.fs, spec.get("delay_s", 0.0))
    cache = ShardCache(Path(spec["cache"]), spec["cap_bytes"]) if spec.get("cache") else None
    return dataclasses.replace(dataset, fs=pafs.PyFileSystem(handler), cache=cache), handler


def read_shards(spec: dict[str, Any]) -> dict[str, Any]:
    """Read shards spec["reads"] (indexes into the train split's shard list, in order) through
    the cache at spec["cache"] capped at spec["cap_bytes"], after spec["go"] exists if given.

    Returns the objects fetched from S3, a digest of each table read, the cache's entries
    (name: bytes) after each read, and what was printed to stderr.
    """
    import pyarrow.parquet as pq

    dataset, handler = _counted_dataset(spec)
    paths = dataset.shard_paths("train")
    if spec.get("go"):
        while not Path(spec["go"]).exists():
            time.sleep(0.01)
    tables, entries = [], []
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        for index in spec["reads"]:
            with dataset.open_shard(paths[index]) as handle:
                table = pq.ParquetFile(handle).read()
            tables.append(hashlib.sha256(str(table.to_pydict()).encode()).hexdigest())
            entries.append(
                {
                    item.name: item.stat().st_size
                    for item in Path(spec["cache"]).glob("*.parquet")
                    if item.is_file()
                }
                if spec.get("cache")
                else {}
            )
    return {
        "fetched": handler.fetched,
        "tables": tables,
        "entries": entries,
        "stderr": stderr.getvalue(),
    }


def read_split_digest(spec: dict[str, Any]) -> dict[str, Any]:
    """`read_split` of spec["split"] as a trial reads it (open_dataset with the environment's
    cache settings, run twice, as two epochs would); a digest of the images and labels, the
    stderr printed, and the cache folder's entries."""
    import numpy as np

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.reader import open_dataset, read_split

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        dataset = open_dataset(spec["uri"], resolve(workspace=spec["workspace"]))
        digests = []
        for _ in range(2):
            data = read_split(dataset, spec["split"])
            digest = hashlib.sha256(np.ascontiguousarray(data["image"]).tobytes())
            digest.update(np.nan_to_num(data["labels"], nan=-1).tobytes())
            digests.append(digest.hexdigest())
    root = os.environ.get("CHESTXPERT_SHARD_CACHE", "")
    cached = sorted(p.name for p in Path(root).glob("*.parquet")) if Path(root).is_dir() else []
    return {
        "digests": digests,
        "stderr": stderr.getvalue(),
        "cached": cached,
        "cache_is_none": dataset.cache is None,
    }


def trained_weights(spec: dict[str, Any]) -> dict[str, Any]:
    """Train spec["config"] for its epochs in this process; the trained weights' digest."""
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.train import run_trial, weights_digest

    digests: list[str] = []
    run_trial(
        TrialConfig.from_dict(spec["config"]),
        lambda metrics, checkpoint: None,
        endpoints=resolve(workspace=spec["workspace"]),
        trained=lambda model: digests.append(weights_digest(model)),
    )
    return {"weights": digests[0]}
