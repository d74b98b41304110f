"""The per-node shard cache on real processes and the S3 test endpoint: one fetch per shard for
processes that ask at once, damaged copies fetched again, the cap kept by LRU eviction, streaming
when the cache cannot hold a shard, and a trial that trains the same through it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.runner import run_child
from tests.conftest import REPO, SyntheticDataset
from tests.shard_cache_helpers import read_shards, read_split_digest, trained_weights

pytestmark = pytest.mark.services


@dataclass(frozen=True)
class S3Dataset:
    uri: str
    manifest: dict


@pytest.fixture(scope="module")
def s3_dataset(
    synthetic_dataset: SyntheticDataset, s3_endpoint, tmp_path_factory
) -> Iterator[S3Dataset]:
    """The session's synthetic images prepared in shards of 100 (several per split) and copied
    to the S3 test endpoint, once per module."""
    import boto3

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare

    folder = tmp_path_factory.mktemp("cache-dataset")
    opts = PrepareOptions(
        source="nih", image_size=64, split="official", shard_rows=100, progress=False
    )
    manifest = prepare(
        str(synthetic_dataset.raw), str(folder / "prepared"), opts, resolve(environ={})
    )
    client = boto3.client("s3", endpoint_url=s3_endpoint.url, **_boto_keys(s3_endpoint))
    prefix = f"cache-tests/{folder.name}"
    for path in (folder / "prepared").rglob("*"):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder / 'prepared')}"
            client.upload_file(str(path), s3_endpoint.bucket, key)
    yield S3Dataset(f"s3://{s3_endpoint.bucket}/{prefix}", manifest)


def _boto_keys(s3_endpoint) -> dict[str, str]:
    env = s3_endpoint.env()
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def _spec(uri: str, tmp_path: Path, **values) -> dict:
    return {"uri": uri, "workspace": str(tmp_path / "ws"), **values}


def test_the_manifest_records_each_shard_and_local_datasets_are_read_in_place(
    synthetic_dataset: SyntheticDataset,
) -> None:
    from chestxpert.datasets.reader import open_dataset

    manifest = synthetic_dataset.manifest
    shards = [path for split in manifest["splits"].values() for path in split["shards"]]
    assert sorted(manifest["shard_checks"]) == sorted(shards)
    for relative in shards:
        data = (synthetic_dataset.prepared / relative).read_bytes()
        assert manifest["shard_checks"][relative] == {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    assert open_dataset(str(synthetic_dataset.prepared)).cache is None


def test_two_processes_asking_at_once_fetch_a_shard_once(
    s3_dataset: S3Dataset, s3_endpoint, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    spec = _spec(
        s3_dataset.uri,
        tmp_path,
        cache=str(tmp_path / "cache"),
        cap_bytes=10**9,
        reads=[0],
        go=str(go),
        delay_s=1.0,  # the first download lasts a second: the other process asks meanwhile
    )
    code = (
        "import json, sys; from tests.shard_cache_helpers import read_shards; "
        "print(json.dumps(read_shards(json.loads(sys.argv[1]))))"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(spec)],
            cwd=REPO,
            env={**os.environ, **s3_endpoint.env()},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(3)  # both are waiting for `go` (imports take about a second)
    go.touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    fetched = [item for result in results for item in result["fetched"]]
    assert len(fetched) == 1, fetched
    assert results[0]["tables"] == results[1]["tables"]
    assert not any(result["stderr"] for result in results)


def test_a_damaged_copy_is_fetched_again(
    s3_dataset: S3Dataset, s3_endpoint, tmp_path: Path
) -> None:
    spec = _spec(s3_dataset.uri, tmp_path, cache=str(tmp_path / "cache"), cap_bytes=10**9)
    first = run_child(read_shards, {**spec, "reads": [0, 0]}, env=s3_endpoint.env())
    assert len(first["fetched"]) == 1 and first["tables"][0] == first["tables"][1]
    (entry,) = (tmp_path / "cache").glob("*.parquet")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the size is right, the hash is not
    entry.write_bytes(data)

    second = run_child(read_shards, {**spec, "reads": [0, 0]}, env=s3_endpoint.env())
    assert len(second["fetched"]) == 1
    assert second["tables"] == first["tables"]
    assert second["stderr"].count("does not match its manifest") == 1
    assert entry.read_bytes() != bytes(data)


def test_eviction_keeps_the_cap_and_drops_the_least_recently_used(
    s3_dataset: S3Dataset, s3_endpoint, tmp_path: Path
) -> None:
    checks = s3_dataset.manifest["shard_checks"]
    sizes = [checks[path]["bytes"] for path in s3_dataset.manifest["splits"]["train"]["shards"]]
    assert len(sizes) >= 3, "the fixture dataset needs three training shards"
    cap = sizes[0] + sizes[1] + max(sizes[2] - 1, 0)  # room for two of the first three
    spec = _spec(s3_dataset.uri, tmp_path, cache=str(tmp_path / "cache"), cap_bytes=cap)
    # 0 and 1 fetched, 0 read again (1 is now the least recently used), then 2 evicts 1
    result = run_child(read_shards, {**spec, "reads": [0, 1, 0, 2, 0]}, env=s3_endpoint.env())
    fetched = [path.rsplit("/", 1)[1] for path, _ in result["fetched"]]
    assert fetched == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for entries in result["entries"]:
        assert sum(entries.values()) <= cap
    assert sorted(result["entries"][-1].values()) == sorted([sizes[0], sizes[2]])
    assert result["stderr"] == ""


@pytest.mark.parametrize("problem", ["cap of 1 byte", "not a folder", "old manifest"])
def test_a_cache_that_cannot_hold_shards_streams_them_with_one_warning(
    s3_dataset: S3Dataset, s3_endpoint, s3_filesystem, tmp_path: Path, problem: str
) -> None:
    env = {**s3_endpoint.env(), "CHESTXPERT_SHARD_CACHE": str(tmp_path / "cache")}
    uri = s3_dataset.uri
    expected = "cannot hold shards"
    if problem == "cap of 1 byte":
        env["CHESTXPERT_SHARD_CACHE_GB"] = "0.000000001"
        expected = "larger than the cache's cap of 1 bytes"
    elif problem == "not a folder":  # the tests run as root: a read-only folder would not do
        (tmp_path / "file").write_text("")
        env["CHESTXPERT_SHARD_CACHE"] = str(tmp_path / "file" / "cache")
    else:  # a dataset prepared before manifests recorded shard sizes and hashes
        root = uri.removeprefix("s3://")
        with s3_filesystem.open_input_stream(f"{root}/manifest.json") as stream:
            manifest = json.loads(stream.read())
        del manifest["shard_checks"]
        with s3_filesystem.open_output_stream(f"{root}-old/manifest.json") as stream:
            stream.write(json.dumps(manifest).encode())
        for shards in manifest["splits"].values():
            for shard in shards["shards"]:
                s3_filesystem.copy_file(f"{root}/{shard}", f"{root}-old/{shard}")
        uri = f"{uri}-old"
        expected = "prepared before manifests recorded each shard's size and SHA-256"
    streamed = run_child(
        read_split_digest, _spec(uri, tmp_path, split="train"), env=env, timeout=120
    )
    assert streamed["stderr"].count("warning:") == 1 and expected in streamed["stderr"]
    assert streamed["cached"] == []
    assert not list((tmp_path / "cache").glob(".partial-*"))
    off = {**s3_endpoint.env(), "CHESTXPERT_SHARD_CACHE": "off"}
    direct = run_child(read_split_digest, _spec(uri, tmp_path, split="train"), env=off)
    assert direct["cache_is_none"] and direct["stderr"] == ""
    assert streamed["digests"] == direct["digests"]


def test_a_trial_trains_the_same_through_the_cache(
    s3_dataset: S3Dataset, s3_endpoint, tmp_path: Path
) -> None:
    config = {
        "dataset": s3_dataset.uri,
        "backbone": "convnet_small",
        "image_size": 32,
        "epochs": 2,
        "batch_size": 64,
        "cpus": 1,  # one thread: the same sums in the same order, so the same weights
        "seed": 3,
    }
    spec = {"workspace": str(tmp_path / "ws")}
    cached = run_child(
        trained_weights,
        {**spec, "config": {**config, "shard_cache": str(tmp_path / "cache")}},
        env=s3_endpoint.env(),
    )
    assert list((tmp_path / "cache").glob("*.parquet")), "the trial read through the cache"
    streamed = run_child(
        trained_weights, {**spec, "config": {**config, "shard_cache": "off"}}, env=s3_endpoint.env()
    )
    assert cached["weights"] == streamed["weights"]
