"""`data prepare --on-cluster`: one Ray task per shard on a real Ray cluster, moto S3 in and out.

The cluster's digest equals a local prepare's, with a bad image left out; a worker node
SIGKILLed while it decodes a shard costs a retried task, never a duplicated or dropped shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from chestxpert.cluster.endpoints import resolve
from chestxpert.cluster.processes import free_port, session_members
from chestxpert.cluster.stack import StackOptions, ensure_ray_token, start_ray_head, start_ray_node
from chestxpert.datasets import synth
from chestxpert.datasets.output import DatasetWriter
from chestxpert.datasets.prepare import PrepareOptions, prepare
from chestxpert.datasets.prepare_cluster import plan_jobs, prepare_shard
from chestxpert.datasets.reader import open_dataset, read_split
from chestxpert.datasets.schema import SPLITS, DatasetError
from tests.conftest import CHESTXPERT_CLI, RayCluster, short_tmpdir, stop_cluster
from tests.test_prepare import upload_folder

pytestmark = pytest.mark.services

IMAGES = 240
SHARD_ROWS = 8
BROKEN = "00000005_000.png"  # truncated below: both prepares leave it out


@pytest.fixture(scope="module")
def phantoms_in_s3(tmp_path_factory, s3_endpoint) -> Iterator[dict]:
    """Phantoms (with one truncated PNG) uploaded to the test bucket, and the digest and split
    sizes a local prepare gives them; this process holds the endpoint's keys meanwhile."""
    root = tmp_path_factory.mktemp("cluster-prepare")
    raw = root / "raw"
    synth.generate(raw, images=IMAGES, size=256, seed=3, progress=False)
    broken = next(raw.glob(f"images_*/images/{BROKEN}"))
    broken.write_bytes(broken.read_bytes()[:200])
    env = s3_endpoint.env()
    upload_folder(s3_endpoint.client(), s3_endpoint.bucket, raw, "cluster-prepare/raw")
    endpoints = resolve(workspace=root / "ws", environ=env)
    manifest = prepare(str(raw), str(root / "local"), options(), endpoints)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield {
            "input": f"s3://{s3_endpoint.bucket}/cluster-prepare/raw",
            "digest": manifest["digest"],
            "images": {split: manifest["splits"][split]["images"] for split in SPLITS},
            "bad": manifest["bad_images"],
            "env": env,
            "endpoints": endpoints,
        }


def options(**changes) -> PrepareOptions:
    base = {
        "source": "nih",
        "image_size": 32,
        "on_bad_image": "skip",
        "shard_rows": SHARD_ROWS,
        "workers": 1,
        "progress": False,
    }
    return PrepareOptions(**{**base, **changes})


def prepare_command(source: str, out: str, address: str, workspace: Path) -> list[str]:
    return [
        CHESTXPERT_CLI, "data", "prepare", "--on-cluster", "--address", address,
        "--source", "nih", "--input", source, "--out", out, "--image-size", "32",
        "--shard-rows", str(SHARD_ROWS), "--on-bad-image", "skip", "--workspace", str(workspace),
    ]  # fmt: skip


def check_published(out: str, expected: dict) -> dict:
    """The dataset at `out` has the local prepare's digest and images, each in exactly one
    shard, every shard of a split from its own run of images."""
    dataset = open_dataset(out, expected["endpoints"])
    manifest = dataset.manifest
    assert manifest["digest"] == expected["digest"]
    assert manifest["bad_images"] == expected["bad"] == 1
    seen: list[str] = []
    for split in SPLITS:
        ids = read_split(dataset, split, columns=("image_id",))["image_id"].tolist()
        assert len(ids) == expected["images"][split]
        seen += ids
        shards = manifest["splits"][split]["shards"]
        assert len(shards) == len(set(shards))
        # runs of SHARD_ROWS images, one of which (in some split) is the broken one
        assert -(-len(ids) // SHARD_ROWS) <= len(shards) <= -(-(len(ids) + 1) // SHARD_ROWS)
    assert len(seen) == len(set(seen)) == sum(expected["images"].values())
    assert BROKEN not in seen
    return manifest


def test_the_cluster_gives_a_local_prepare_s_digest(
    ray_cluster: RayCluster, phantoms_in_s3: dict, s3_endpoint, tmp_path: Path
) -> None:
    """On the shared 3-node cluster: same digest, same images, the bad one listed."""
    out = f"s3://{s3_endpoint.bucket}/cluster-prepare/out-shared"
    command = prepare_command(phantoms_in_s3["input"], out, ray_cluster.address, tmp_path / "ws")
    env = {**ray_cluster.client_env(), **phantoms_in_s3["env"]}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "shard tasks over 3 CPUs" in result.stdout
    manifest = check_published(out, phantoms_in_s3)
    assert f"digest {manifest['digest'][:12]}" in result.stdout
    # The same command again finds the dataset it published.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds this dataset" in again.stdout


def test_a_shard_task_keeps_a_shard_an_earlier_run_staged(
    phantoms_in_s3: dict, s3_endpoint
) -> None:
    """The task itself (no Ray: called as the worker calls it), against S3: the first call stages
    its shard, the second finds it staged, verifies it and keeps it; an unreadable object fails
    the task; a staged shard of other images is written again."""
    from chestxpert.datasets.prepare import open_input, read_source

    opts = options(on_cluster=True)
    endpoints = phantoms_in_s3["endpoints"]
    output = DatasetWriter(f"s3://{s3_endpoint.bucket}/cluster-prepare/out-task", endpoints)
    with open_input(phantoms_in_s3["input"], endpoints) as source:
        table = read_source(opts, source.root)
        images = table.images.sort_values("image_id").reset_index(drop=True)
        images["split"] = "train"
        output.stage(uuid.uuid4().hex[:16])  # a staging area of this test run's own
        jobs = plan_jobs(output, images, table, opts, source)
        output.release()
    job = next(j for j in jobs if BROKEN not in j.images["image_id"].tolist())
    first = prepare_shard(job)
    assert first["kept"] is False and first["bad"] == []
    assert len(first["entry"]["rows"]) == SHARD_ROWS
    second = prepare_shard(job)
    assert second == {**first, "kept": True}
    # An object that cannot be fetched fails the task (Ray runs it again) instead of being
    # recorded as a bad image, which would change the digest.
    gone = dataclasses.replace(
        job, index=job.index + 1000, locations=[f"{uri}.gone" for uri in job.locations]
    )
    with pytest.raises(OSError, match="cannot be read from S3"):
        prepare_shard(gone)
    # A staged shard of other images under the same name (another plan) is not kept.
    shifted = dataclasses.replace(
        job, images=job.images.iloc[1:].reset_index(drop=True), locations=job.locations[1:]
    )
    redone = prepare_shard(shifted)
    assert redone["kept"] is False and len(redone["entry"]["rows"]) == SHARD_ROWS - 1


def test_a_killed_worker_node_costs_a_retry_not_a_shard(
    phantoms_in_s3: dict, s3_endpoint, tmp_path: Path
) -> None:
    """A cluster of a head without CPUs and one worker node: the worker node is SIGKILLed while
    it runs a shard task, after it has staged others; a second worker node joins. The prepare
    finishes with the local digest, every image in one shard, and Ray records a retried task.

    S3 is reached through a relay that holds each reply 50 ms (the driver's runtime env gives
    every task its endpoint) until the kill, so a task takes most of a second and the kill lands
    inside one: a fast task could finish between the look and the kill."""
    from benchmarks.shard_cache import CountingRelay

    env = phantoms_in_s3["env"]
    slow = CountingRelay(s3_endpoint.url, free_port(), delay_s=0.05)
    ws = short_tmpdir("cxpc")
    head_opts = StackOptions(
        workspace=ws,
        ray_port=free_port(),
        dashboard_port=free_port(),
        num_cpus=0,
        num_gpus=0,
        object_store_memory=200 * 1024**2,
    )
    records = [start_ray_head(head_opts, extra_env=env)]
    try:
        token = ensure_ray_token(ws)

        def worker(name: str, node_env: dict[str, str]) -> dict:
            record = start_ray_node(
                log_path=ws / "logs" / f"ray-{name}.log",
                token_path=token,
                temp_dir=ws / name,
                join_address=records[0]["address"],
                num_cpus=1,
                object_store_memory=200 * 1024**2,
                extra_env=node_env,
            )
            records.append(record)
            return record

        victim = worker("victim", env)
        cluster = RayCluster(
            records[0]["address"], records[0]["dashboard_url"], token, ws, tuple(records)
        )
        out = f"s3://{s3_endpoint.bucket}/cluster-prepare/out-killed"
        command = prepare_command(phantoms_in_s3["input"], out, cluster.address, tmp_path / "w")
        with (tmp_path / "prepare.log").open("w") as log:
            driver = subprocess.Popen(
                command,
                env={**cluster.client_env(), **env, "AWS_ENDPOINT_URL_S3": slow.url},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        staged_before = _kill_mid_shard(victim, s3_endpoint, driver)
        slow.delay_s = 0.0  # the rest at full speed
        worker("survivor", env)
        assert driver.wait(timeout=600) == 0, (tmp_path / "prepare.log").read_text()[-4000:]
        total_shards = sum(-(-n // SHARD_ROWS) for n in phantoms_in_s3["images"].values())
        assert 1 <= staged_before < total_shards, "the node must die mid-prepare"
        check_published(out, phantoms_in_s3)
        attempts = _shard_task_attempts(cluster)
        assert attempts and max(attempts) >= 1, f"no prepare_shard task was retried: {attempts}"
    finally:
        stop_cluster(records)
        slow.close()


def _kill_mid_shard(node: dict, s3_endpoint, driver: subprocess.Popen) -> int:
    """SIGKILL every process of `node` the moment one of its workers runs a shard task (Ray
    titles the worker `ray::prepare_shard` while it does) after at least one shard is staged;
    return how many shards were staged then."""
    client = s3_endpoint.client()
    prefix = "cluster-prepare/out-killed/generations/"
    deadline = time.monotonic() + 300
    staged = 0
    while time.monotonic() < deadline and driver.poll() is None:
        listing = client.list_objects_v2(Bucket=s3_endpoint.bucket, Prefix=prefix)
        staged = sum("/journal/" in item["Key"] for item in listing.get("Contents", []))
        if staged:
            for pid in session_members(node["pid"]):
                try:
                    running = "ray::prepare_shard" in " ".join(psutil.Process(pid).cmdline())
                except psutil.Error:
                    continue
                if running:
                    for member in session_members(node["pid"]):
                        os.kill(member, signal.SIGKILL)
                    return staged
        time.sleep(0.01)
    raise AssertionError(f"no shard task was caught running (staged: {staged})")


def _shard_task_attempts(cluster: RayCluster) -> list[int]:
    """The attempt numbers of every prepare_shard task Ray's state API knows of."""
    code = (
        "import json, time\n"
        "from ray.util.state import list_tasks\n"
        "time.sleep(2)\n"  # task events reach the GCS about once a second
        f"tasks = list_tasks(address={cluster.dashboard_url!r}, detail=True, limit=10000,"
        " filters=[('name', '=', 'prepare_shard')], raise_on_missing_output=False)\n"
        "print(json.dumps([t.attempt_number for t in tasks]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=cluster.client_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_on_cluster_refuses_local_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="--input .* is not an s3:// URI"):
        prepare(str(tmp_path / "raw"), "s3://bucket/out", options(on_cluster=True))
    with pytest.raises(DatasetError, match="--out .* is not an s3:// URI"):
        prepare("s3://bucket/raw", str(tmp_path / "out"), options(on_cluster=True))
