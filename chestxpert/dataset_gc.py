"""`chestxpert data gc URI`: remove a dataset's old generations that no recorded sweep or final
model names. Here in the app because it reads both the dataset and the sweeps' storage layout.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from chestxpert.cluster.endpoints import Endpoints, normalize_storage_uri, storage_filesystem
from chestxpert.datasets.schema import GENERATION_CHARS, DatasetError


def dataset_references(uri: str, endpoints: Endpoints) -> dict[str, str]:
    """Generations of dataset `uri` that something in the storage root still names, with why.

    Scans every sweep under `endpoints.storage_uri`: its spec record (every generation its
    trials read) and the state of every final model it has (each published version, a retrain
    in progress in staging, and the one model of releases before versions: the digest each
    was trained on). Sweeps recorded before datasets had versions name none.
    """
    from chestxpert.results import versions
    from chestxpert.sweeps.layout import (
        DATASET_GENERATION,
        DATASET_GENERATIONS,
        FINAL_STAGING,
        FINAL_STATE,
        FINAL_VERSIONS,
        SPEC_FILE,
        VERSION_MODEL,
        SweepLocation,
    )
    from chestxpert.sweeps.status import list_sweeps

    target = _canonical(uri)
    fs, root = storage_filesystem(endpoints)
    named: dict[str, list[str]] = {}
    for name in list_sweeps(fs, root):
        location = SweepLocation(fs, root, name, f"{endpoints.storage_uri}/{name}")
        recorded = location.read_json(SPEC_FILE) or {}
        if _same(recorded.get("raw", {}).get("dataset"), target):
            generations = recorded.get(DATASET_GENERATIONS) or [recorded.get(DATASET_GENERATION)]
            for generation in filter(None, generations):
                named.setdefault(generation, []).append(f"sweep {name}")
        finals = {FINAL_STATE: f"final model of {name}"}
        for number in versions.version_numbers(location):
            finals[f"{FINAL_VERSIONS}/{number}/{VERSION_MODEL}/state.json"] = (
                f"final model version {number} of {name}"
            )
        for attempt in versions.staging_attempts(location):
            finals[f"{FINAL_STAGING}/{attempt}/{VERSION_MODEL}/state.json"] = (
                f"final retrain {attempt} of {name} (in progress or interrupted)"
            )
        for relative, why in finals.items():
            state = location.read_json(relative) or {}
            digest = state.get("dataset_digest")
            if digest and _same(state.get("config", {}).get("dataset"), target):
                config = state["config"]
                generation = config.get("dataset_generation") or digest[:GENERATION_CHARS]
                named.setdefault(generation, []).append(why)
    return {generation: ", ".join(why) for generation, why in named.items()}


def _canonical(uri: str) -> str:
    """One spelling per location; local symlinks resolved, so a sweep that named the dataset
    through a link still protects its generations."""
    uri = normalize_storage_uri(uri)
    if uri.startswith("file://"):
        return Path(os.path.realpath(unquote(urlparse(uri).path))).as_uri()
    return uri


def _same(dataset: str | None, target: str) -> bool:
    try:
        return bool(dataset) and _canonical(dataset) == target
    except ValueError:
        return False


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count} B"


def cmd_gc(args: argparse.Namespace) -> int:
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.gc import collect_garbage

    endpoints = resolve(
        storage=args.storage, s3_endpoint_url=args.s3_endpoint, workspace=args.workspace
    )
    try:
        uri = normalize_storage_uri(args.uri)
    except ValueError as err:
        raise DatasetError(f"data gc: dataset URI {err}") from None
    keep = {} if args.ignore_references else dataset_references(uri, endpoints)
    rows = collect_garbage(uri, endpoints, keep, dry_run=args.dry_run)
    removed = 0
    for row in rows:
        what = f"{row.files} files, {_size(row.bytes)}"
        if row.action == "keep":
            print(f"keep    {row.name}  {row.reason}  ({what})")
        else:
            removed += row.bytes
            verb = "would remove" if args.dry_run else "removed"
            reason = row.reason
            if args.ignore_references and not reason.startswith("unfinished"):
                reason = "not current (--ignore-references)"
            print(f"{verb:7s} {row.name}  {reason}  ({what})")
    scanned = (
        "references ignored" if args.ignore_references else f"sweeps in {endpoints.storage_uri}"
    )
    total = f"{'would free' if args.dry_run else 'freed'} {_size(removed)}"
    print(f"{uri}: {total} ({scanned})")
    return 0


def register(data_sub: argparse._SubParsersAction) -> None:
    """Add `chestxpert data gc` to the `data` commands."""
    gc = data_sub.add_parser(
        "gc", help="remove a dataset's old generations that no sweep or final model names"
    )
    gc.add_argument("uri", help="the dataset's folder or s3:// prefix (as given to prepare --out)")
    gc.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    gc.add_argument(
        "--ignore-references",
        action="store_true",
        help="remove every generation but the current one, even those sweeps still name",
    )
    gc.add_argument(
        "--storage",
        default=None,
        help="storage whose sweeps are checked for references (else CHESTXPERT_STORAGE, …)",
    )
    gc.add_argument(
        "--s3-endpoint", default=None, help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL…)"
    )
    gc.set_defaults(func=cmd_gc)
