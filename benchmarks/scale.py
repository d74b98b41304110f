"""`data prepare` at scale, streaming from S3: 5,000 and 20,000 full-size (1024²) phantoms in the
NIH layout, prepared at 224 px; peak RSS, images/s and local disk at both sizes (memory must not
grow with the images), the cluster prepare's digest against the local one, and the S3 bytes a
2-trial densenet_tiny sweep reads through the node caches.

Each size is drawn (`data synth`, NIH layout: images_0NN/images/…, Data_Entry_2017.csv, the
official split lists, BBox_List_2017.csv), uploaded to a moto S3 server of its own and the local
copy removed; `prepare` then reads the images object by object (`--input s3://…`), in a fresh
interpreter whose whole process tree (the decode workers too) is sampled for RSS and whose
temporary folder is sampled for disk. At 5,000 the same input is also prepared on a local
3-node Ray cluster (`--on-cluster`), which must give the same digest. The 5,000 input is
deleted before the 20,000 are drawn: moto keeps objects in memory (about 0.6 MB per phantom).
On the 20,000-image dataset a 2-trial, 1-epoch densenet_tiny sweep runs on the 3-node cluster
with a shard cache per node; a relay in front of S3 counts every byte S3 sends.

Acceptance (issue 13): peak RSS ≤ 1.5 GB at both sizes, the same digest locally and on the
cluster. It takes about an hour on 2 cores and needs ~14 GB of free memory; `--smoke` runs
the S3 prepare and its measurements at toy sizes only (the cluster prepare has its test,
tests/test_prepare_cluster.py, and the cached sweep is the shard_cache benchmark's).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.runner import run_child, scratch_dir, services
from chestxpert.cluster.processes import free_port
from chestxpert.cluster.stack import LOCAL_BUCKET, StackOptions, start_s3


@dataclass(frozen=True)
class Size:
    images: tuple[int, int]  # the two dataset sizes, smaller first
    original: int  # side of the drawn PNGs
    image_size: int  # side of the prepared images
    sweep: bool  # the cluster prepare and the cached sweep


FULL = Size(images=(5_000, 20_000), original=1024, image_size=224, sweep=True)
SMOKE = Size(images=(30, 120), original=128, image_size=32, sweep=False)
TARGET_RSS_MB = 1536
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def prepare_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: prepare `spec["input"]` into `spec["out"]` (on the cluster at `spec["address"]`
    when given), sampling every 0.2 s the RSS summed over this process and its children and the
    bytes in this process's temporary folder; return the peaks, the seconds and the digest."""
    import resource
    import tempfile

    import psutil

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare

    scratch = Path(tempfile.gettempdir())
    peaks = {"tree_rss": 0, "disk": 0}
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.wait(0.2):
            rss = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    rss += process.memory_info().rss
                except psutil.Error:
                    continue
            peaks["tree_rss"] = max(peaks["tree_rss"], rss)
            peaks["disk"] = max(peaks["disk"], _folder_bytes(scratch))

    threading.Thread(target=sample, daemon=True).start()
    opts = PrepareOptions(
        source="nih",
        image_size=spec["image_size"],
        on_cluster=spec.get("address") is not None,
        progress=False,
    )
    endpoints = resolve(ray_address=spec.get("address"), workspace=spec["ws"])
    started = time.monotonic()
    manifest = prepare(spec["input"], spec["out"], opts, endpoints)
    seconds = time.monotonic() - started
    done.set()
    return {
        "seconds": seconds,
        "images": sum(split["images"] for split in manifest["splits"].values()),
        "digest": manifest["digest"],
        "tree_rss_mb": peaks["tree_rss"] / 2**20,
        "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "disk_mb": peaks["disk"] / 2**20,
        "shard_mb": sum(check["bytes"] for check in manifest["shard_checks"].values()) / 2**20,
        "train_val_mb": sum(
            manifest["shard_checks"][shard]["bytes"]
            for split in ("train", "val")
            for shard in manifest["splits"][split]["shards"]
        )
        / 2**20,
    }


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue  # removed while we walked
    return total


def _s3_client(url: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
    )


def upload(client, folder: Path, prefix: str) -> int:
    """Copy every file under `folder` to `prefix` in the bucket, 8 at a time; return the bytes."""
    files = [path for path in folder.rglob("*") if path.is_file()]
    with ThreadPoolExecutor(8) as pool:
        for _ in pool.map(
            lambda path: client.upload_file(
                str(path), LOCAL_BUCKET, f"{prefix}/{path.relative_to(folder)}"
            ),
            files,
        ):
            pass
    return sum(path.stat().st_size for path in files)


def delete_prefix(client, prefix: str) -> None:
    """Remove every object under `prefix` (moto then frees their memory)."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=LOCAL_BUCKET, Prefix=f"{prefix}/"):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=LOCAL_BUCKET, Delete={"Objects": keys})


def draw_and_upload(work: Path, client, images: int, size: Size) -> tuple[str, float]:
    """Draw `images` phantoms, upload them, remove the local copy; the input URI and the MB."""
    import shutil

    from chestxpert.datasets.synth import generate

    raw = work / f"raw-{images}"
    summary = generate(raw, images=images, size=size.original, seed=images, progress=False)
    started = time.monotonic()
    uploaded = upload(client, raw, f"raw-{images}")
    print(
        f"  {images} phantoms at {size.original} px drawn at {summary['images_per_second']:.0f} "
        f"img/s; {uploaded / 2**20:,.0f} MB uploaded in {time.monotonic() - started:.0f} s",
        flush=True,
    )
    shutil.rmtree(raw)
    return f"s3://{LOCAL_BUCKET}/raw-{images}", uploaded / 2**20


def measure_prepare(
    work: Path, s3_env: dict[str, str], source: str, out: str, size: Size, address: str | None
) -> dict[str, Any]:
    """`prepare_child` in a fresh interpreter with a temporary folder of its own."""
    tmp = work / f"tmp-{free_port()}"
    tmp.mkdir()
    spec = {
        "input": source,
        "out": out,
        "image_size": size.image_size,
        "ws": str(work / "ws"),
        "address": address,
    }
    env = {**s3_env, "TMPDIR": str(tmp)}
    return run_child(prepare_child, spec, env=env, timeout=4 * 3600)


def report_prepare(label: str, result: dict[str, Any]) -> None:
    print(
        f"  {label}: {result['images']} images in {result['seconds']:.0f} s "
        f"({result['images'] / result['seconds']:.1f} img/s); peak RSS {result['tree_rss_mb']:,.0f}"
        f" MB for the process tree ({result['main_rss_mb']:,.0f} MB the prepare process); local "
        f"disk peak {result['disk_mb']:,.0f} MB; {result['shard_mb']:,.0f} MB of shards in S3; "
        f"digest {result['digest'][:12]}",
        flush=True,
    )


def run_cached_sweep(work: Path, s3_url: str, dataset: str, size: Size) -> dict[str, Any]:
    """The 2-trial, 1-epoch densenet_tiny sweep on the 3-node cluster, node caches on; what the
    shard_cache benchmark's child reports for it."""
    from benchmarks.shard_cache import run_sweeps, start_cached_cluster
    from tests.conftest import stop_cluster

    cluster, nodes, caches, s3_env, relay_port = start_cached_cluster(work, KEYS)
    sweep = {
        "name": "scale",
        "dataset": dataset,
        "trial": {
            "backbone": "densenet_tiny",
            "image_size": size.image_size,
            "epochs": 1,
            "batch_size": 32,
        },
        "resources": {"cpus": 1, "gpus": 0},
        "search": {"algorithm": "random", "seed": 0, "num_samples": 2},
        "space": {"learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2}},
        "scheduler": {"type": "none"},
        "max_retries": 0,
    }
    try:
        spec = {"work": str(work), "s3_url": s3_url, "relay_port": relay_port}
        result = run_child(
            run_sweeps,
            {**spec, "sweeps": {"cached": sweep}},
            env={**cluster.client_env(), **s3_env},
            timeout=4 * 3600,
        )["cached"]
    finally:
        stop_cluster(nodes)
    result["cached_mb"] = (
        sum(path.stat().st_size for folder in caches for path in folder.glob("**/*.parquet"))
        / 2**20
    )
    return result


def check_memory(size: Size) -> None:
    """Refuse to start when moto could not hold the larger input (~0.6 MB per 1024² phantom)."""
    import psutil

    need = size.images[1] * 0.6 * (size.original / 1024) ** 2 * 2**20 + 6 * 2**30
    available = psutil.virtual_memory().available
    if available < need:
        raise RuntimeError(
            f"the scale benchmark needs about {need / 2**30:.0f} GB of free memory (moto holds "
            f"the {size.images[1]} phantoms in memory); {available / 2**30:.0f} GB are free"
        )


def run(smoke: bool = False) -> None:
    from tests.conftest import start_cluster, stop_cluster

    size = SMOKE if smoke else FULL
    check_memory(size)
    with scratch_dir("cxsc-") as work, services() as records:
        s3 = start_s3(StackOptions(workspace=work / "s3", s3_port=free_port()))
        records.append(s3)
        client = _s3_client(s3["url"])
        s3_env = {**KEYS, "AWS_ENDPOINT_URL_S3": s3["url"], "AWS_DEFAULT_REGION": "us-east-1"}
        results = {}
        for images in size.images:
            source, _ = draw_and_upload(work, client, images, size)
            out = f"s3://{LOCAL_BUCKET}/datasets/scale-{images}"
            results[images] = measure_prepare(work, s3_env, source, out, size, None)
            report_prepare(f"prepare {images} (local, streaming from S3)", results[images])
            if size.sweep and images == size.images[0]:
                cluster, nodes = start_cluster(s3_env)
                try:
                    on_cluster = measure_prepare(
                        work, {**s3_env, **cluster.client_env()}, source, f"{out}-cluster",
                        size, cluster.address,
                    )  # fmt: skip
                finally:
                    stop_cluster(nodes)
                report_prepare(f"prepare {images} (--on-cluster, 3 nodes)", on_cluster)
                if on_cluster["digest"] != results[images]["digest"]:
                    raise RuntimeError("the cluster prepare's digest differs from the local one")
                print("  cluster digest = local digest: yes", flush=True)
            delete_prefix(client, source.removeprefix(f"s3://{LOCAL_BUCKET}/"))
        small, large = (results[images] for images in size.images)
        worst = max(small["tree_rss_mb"], large["tree_rss_mb"])
        print(
            f"  peak RSS {size.images[1]} / {size.images[0]} images: "
            f"{large['tree_rss_mb'] / small['tree_rss_mb']:.2f}x; worst {worst:,.0f} MB against "
            f"<= {TARGET_RSS_MB} MB: {'met' if worst <= TARGET_RSS_MB else 'missed'}",
            flush=True,
        )
        if not size.sweep:
            return
        dataset = f"s3://{LOCAL_BUCKET}/datasets/scale-{size.images[1]}"
        sweep = run_cached_sweep(work, s3["url"], dataset, size)
        if sweep["errors"] or sweep["epochs"] != 2:
            raise RuntimeError(f"the sweep did not run both trials' epoch: {sweep}")
        print(
            f"  sweep (2 densenet_tiny trials x 1 epoch at {size.image_size} px, node caches on): "
            f"{sweep['fetched'] / 2**20:,.0f} MB from S3 for {large['train_val_mb']:,.0f} MB of "
            f"train+val shards (x {len(sweep['nodes'])} nodes = "
            f"{large['train_val_mb'] * len(sweep['nodes']):,.0f} MB); "
            f"{sweep['cached_mb']:,.0f} MB in the node caches",
            flush=True,
        )
