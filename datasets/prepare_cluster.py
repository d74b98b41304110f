"""`data prepare --on-cluster`: decode and resize fanned out over a Ray cluster's CPUs, one Ray
task per output shard, each reading its images from S3 and staging its shard in the output.

Why tasks, not Ray Data: the shard is already the unit of everything that makes `prepare` safe.
It is staged whole with a journal entry (`datasets.output`), a rerun keeps it, the manifest
lists it. A task that owns exactly one shard keeps that: a task lost with its node is retried
by Ray (`max_retries`) and rewrites the same staged name with the same bytes, so nothing is
duplicated or dropped, and a rerun after a crash skips the tasks whose shard is staged. Ray Data
would cut its own blocks, and shards would have to be rebuilt from them, in an order it does
not promise.

The driver plans the tasks, gathers each task's journal entry (image ids and pixel hashes) and
computes the content digest in image order, as a local prepare does, so the digest is the same.
A task fills its shard from a fixed run of `shard_rows` images; an image that turns out bad is
left out of it (a local run fills every shard instead), so with bad images the shards hold
fewer rows than locally, while the digest, which covers images and not shards, is unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from chestxpert.cluster.endpoints import Endpoints, worker_endpoints
from chestxpert.datasets.output import DatasetWriter
from chestxpert.datasets.prepare import (
    UNREADABLE_OBJECT,
    InputFolder,
    PrepareOptions,
    SplitShards,
    Staged,
    decode_stream,
    digest_image,
    digest_start,
    source_boxes,
)
from chestxpert.datasets.schema import SPLITS, DatasetError, SourceTable

# Attempts Ray makes again at a task whose worker or node died, or that could not read an
# image object or write its shard (OSError); a task that raised anything else is not retried.
TASK_RETRIES = 3


def check_cluster_locations(input_uri: str, out_uri: str) -> None:
    """Refuse local folders: every node reads the images and writes the shards itself."""
    for flag, uri in (("--input", input_uri), ("--out", out_uri)):
        if not uri.startswith("s3://"):
            raise DatasetError(
                f"{flag} {uri} is not an s3:// URI: with --on-cluster every node of the Ray "
                "cluster reads the images and writes the shards itself, and a local folder "
                "exists only on this machine; give s3:// URIs, or drop --on-cluster"
            )


@dataclass(frozen=True)
class ShardJob:
    """One task's work: shard `index` of `split` from `images` (rows of the image table, in
    image order), read from `locations`."""

    split: str
    index: int
    images: pd.DataFrame
    locations: list[str]
    boxes: dict[str, list[tuple]]
    labels: tuple[str, ...]
    opts: PrepareOptions
    input_uri: str
    out_uri: str
    staging_key: str


def prepare_shard(job: ShardJob) -> dict[str, Any]:
    """Ray task: stage one shard and return {"entry": its journal entry (None when every image
    was bad), "bad": the bad images' [id, location, problem], "kept": whether it was staged
    by an earlier run already}. Endpoints come from the task's own environment (its node's, and
    the driver's runtime env): no credential travels in the task's arguments."""
    endpoints = worker_endpoints()
    output = DatasetWriter(job.out_uri, endpoints)
    output.stage(job.staging_key)
    try:
        ids = job.images["image_id"].tolist()
        entry = output.staged_entry(f"{job.split}-{job.index:05d}")
        if entry is not None and _covers(entry, ids):
            return {"entry": entry, "bad": entry["bad"], "kept": True}
        shards = SplitShards(job.split, output, job.images, job.opts, job.labels, job.index)
        size = job.opts.image_size
        tasks = ((image_id, job.locations[row], size) for row, image_id in enumerate(ids))
        bad = []
        try:
            for row, decoded in enumerate(decode_stream(tasks, 1, endpoints, job.input_uri)):
                if decoded[3] and decoded[3].startswith(UNREADABLE_OBJECT):
                    # Listed a moment ago, so a network or credential failure, not a bad image:
                    # the task fails and Ray runs it again (retry_exceptions).
                    raise OSError(f"{job.locations[row]} {decoded[3]}")
                taken = shards.add_decoded(
                    row, decoded, job.locations[row], job.boxes.get(ids[row], [])
                )
                if isinstance(taken, tuple):
                    bad.append(list(taken))
            shards.finish()
        finally:
            shards.close()
        return {"entry": shards.entries[0] if shards.entries else None, "bad": bad, "kept": False}
    finally:
        output.release()


def _covers(entry: dict[str, Any], ids: list[str]) -> bool:
    """Whether a staged entry holds exactly the task's images (used or bad), in order."""
    used = iter(row[0] for row in entry.get("rows", []))
    bad = {record[0] for record in entry.get("bad", [])}
    return all(image_id in bad or next(used, None) == image_id for image_id in ids) and (
        next(used, None) is None
    )


def plan_jobs(
    output: DatasetWriter,
    images: pd.DataFrame,
    table: SourceTable,
    opts: PrepareOptions,
    source: InputFolder,
) -> list[ShardJob]:
    """Each split's images in image order, cut into runs of `opts.shard_rows`: one job each."""
    assert source.uri is not None, "check_cluster_locations lets only s3:// inputs through"
    boxes = source_boxes(table)
    jobs = []
    for split in SPLITS:
        rows = images.index[images["split"] == split].tolist()
        for index, start in enumerate(range(0, len(rows), opts.shard_rows)):
            part = images.iloc[rows[start : start + opts.shard_rows]].reset_index(drop=True)
            jobs.append(
                ShardJob(
                    split=split,
                    index=index,
                    images=part.drop(columns=["path"]),
                    locations=[source.locate(path) for path in part["path"]],
                    boxes={i: boxes[i] for i in part["image_id"] if i in boxes},
                    labels=table.labels,
                    opts=opts,
                    input_uri=source.uri,
                    out_uri=output.uri,
                    staging_key=output.staging_key,
                )
            )
    return jobs


def stage_on_cluster(
    output: DatasetWriter,
    images: pd.DataFrame,
    table: SourceTable,
    opts: PrepareOptions,
    source: InputFolder,
    endpoints: Endpoints,
) -> Staged:
    """Stage every shard with one Ray task each on the cluster `endpoints` names, then compute
    the content digest from the tasks' journal entries in image order (as `_stage_shards`
    does while it decodes)."""
    import ray
    from tqdm import tqdm

    from chestxpert.cluster.ray_driver import connect

    jobs = plan_jobs(output, images, table, opts, source)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    pending: dict[Any, ShardJob] = {}
    bar = tqdm(
        total=len(images),
        desc="decode+resize (cluster)",
        unit="img",
        disable=not opts.progress,
        mininterval=1.0,
    )
    try:
        found = connect(endpoints)
        cpus = json.loads(found["resources"]).get("CPU", 0)
        print(
            f"preparing on the Ray cluster at {endpoints.ray_address or '(in-process)'}: "
            f"{len(jobs)} shard tasks over {cpus:g} CPUs",
            flush=True,
        )
        task = ray.remote(prepare_shard).options(
            name="prepare_shard",
            num_cpus=1,
            max_retries=TASK_RETRIES,
            retry_exceptions=[OSError],
        )
        pending = {task.remote(job): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                results[job.split, job.index] = ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                raise err.cause from err  # the task's own error (a DatasetError, an OSError)
            bar.update(len(job.images))
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref)
        ray.shutdown()
    kept = sum(1 for result in results.values() if result["kept"])
    if kept:
        print(f"resumed: {kept} of {len(jobs)} shards were staged by a stopped run and kept")
    return _gather(output, images, table, opts, jobs, results)


def _gather(
    output: DatasetWriter,
    images: pd.DataFrame,
    table: SourceTable,
    opts: PrepareOptions,
    jobs: list[ShardJob],
    results: dict[tuple[str, int], dict[str, Any]],
) -> Staged:
    """The digest, rows used, bad images and shard list from every task's result."""
    pixel_hashes: dict[str, str] = {}
    bad_by_id: dict[str, tuple[str, str, str]] = {}
    shards: dict[str, list[str]] = {split: [] for split in SPLITS}
    for job in jobs:  # in split, then shard order
        result = results[job.split, job.index]
        bad_by_id.update((record[0], tuple(record)) for record in result["bad"])
        if result["entry"] is not None:
            if not output.holds_size(result["entry"]):
                # Two attempts of one task (a retry and a node thought lost) write the same
                # bytes; a staged shard that differs from what its task reported does not.
                raise DatasetError(
                    f"staged shard {result['entry']['shard']} changed after its task reported "
                    "it (another attempt still writing?); run the same command again: it "
                    "keeps the shards that verify and redoes the rest"
                )
            output.record(result["entry"])
            pixel_hashes.update(result["entry"]["rows"])
            shards[job.split].append(result["entry"]["shard"])
    digest = digest_start(table.labels, opts, table.synthetic)
    label_matrix = images[list(table.labels)].to_numpy(dtype="float32")
    used_rows, bad = [], []
    for row, (image_id, split) in enumerate(zip(images["image_id"], images["split"], strict=True)):
        if image_id in bad_by_id:
            bad.append(bad_by_id[image_id])
            continue
        pixel_hash = bytes.fromhex(pixel_hashes[image_id])
        digest_image(digest, image_id, split, label_matrix[row], pixel_hash)
        used_rows.append(row)
    return Staged(digest.hexdigest(), used_rows, bad, shards)
