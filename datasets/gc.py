"""Removing a dataset's old generations: list them, measure them, delete exactly what `prepare`
wrote for them. Which ones a sweep or a final model still names is decided by the caller.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from chestxpert.cluster.endpoints import Endpoints, normalize_storage_uri, storage_filesystem
from chestxpert.datasets.output import PARTIAL_MARK, is_chestxpert_manifest, read_json
from chestxpert.datasets.schema import (
    GENERATIONS,
    MANIFEST,
    MANIFESTS,
    DatasetError,
    generation_of,
)

# A generation folder without its manifest copy is a `prepare` that died, or one still
# writing: only after this long without a new file is it taken for dead.
UNFINISHED_GRACE_SECONDS = 3600


@dataclass(frozen=True)
class GenerationRow:
    """One generation (or unfinished leftover) of a dataset and what gc did or would do.

    `action` is "keep" or "remove"; `reason` says why in words; `paths` are the files and
    folders removed (or to remove), relative to the dataset's root.
    """

    name: str
    action: str
    reason: str
    bytes: int
    files: int
    paths: list[str] = field(default_factory=list)


def collect_garbage(
    uri: str,
    endpoints: Endpoints,
    keep: Mapping[str, str],
    dry_run: bool = False,
    grace_seconds: float = UNFINISHED_GRACE_SECONDS,
) -> list[GenerationRow]:
    """Delete the generations of dataset `uri` that are neither current nor in `keep`.

    `keep` maps generation names to the reason they stay (e.g. "sweep nih-lr"). A removed
    generation loses its manifest copy first, then its shards, so a crash half-way leaves
    files no manifest names, which the next gc removes. Unfinished leftovers of a killed
    `prepare` go once nothing was written to them for `grace_seconds`. With `dry_run` nothing
    is deleted and the rows say what would be. Raises `DatasetError` if `uri` holds no
    ChestXpert dataset.
    """
    uri = normalize_storage_uri(uri)
    fs, root = storage_filesystem(endpoints, uri)
    current = read_json(fs, f"{root}/{MANIFEST}")
    if not is_chestxpert_manifest(current):
        raise DatasetError(
            f"{uri} has no ChestXpert {MANIFEST}: it is not a prepared dataset, so gc touches "
            "nothing there; give the URI that `chestxpert data prepare --out` wrote"
        )
    current_generation = generation_of(current)
    copies = {
        info.base_name.removesuffix(".json"): info
        for info in _children(fs, f"{root}/{MANIFESTS}")
        if info.base_name.endswith(".json") and not info.base_name.startswith(".")
    }
    folders = {info.base_name: info for info in _children(fs, f"{root}/{GENERATIONS}")}
    now = time.time()
    rows = []
    for name in sorted(set(copies) | {n for n in folders if not n.startswith(".")}):
        paths = [f"{MANIFESTS}/{name}.json"] if name in copies else []
        if name in folders:
            files = _files(fs, f"{root}/{GENERATIONS}/{name}")
            paths.append(f"{GENERATIONS}/{name}")
        else:  # a dataset written before generations: its shards sit under <split>/
            stored = read_json(fs, copies[name].path)
            files = _legacy_files(fs, root, stored if is_chestxpert_manifest(stored) else {})
            paths += [info.path[len(root) + 1 :] for info in files]
        size = sum(info.size or 0 for info in files)
        if name == current_generation:
            action, reason = "keep", "current"
        elif name in keep:
            action, reason = "keep", keep[name]
        elif name not in copies:
            action, reason = _unfinished(files, now, grace_seconds)
        else:
            action, reason = "remove", "no sweep or final model names it"
        rows.append(GenerationRow(name, action, reason, size, len(files), paths))
    leftovers = [info for info in folders.values() if info.base_name.startswith(".")]
    leftovers += [
        info
        for folder in (root, f"{root}/{MANIFESTS}")
        for info in _children(fs, folder)
        if PARTIAL_MARK in info.base_name
    ]
    for info in leftovers:
        files = _files(fs, info.path) if info.type == pafs.FileType.Directory else [info]
        action, reason = _unfinished(files, now, grace_seconds)
        relative = info.path[len(root) + 1 :]
        size = sum(f.size or 0 for f in files)
        rows.append(GenerationRow(relative, action, reason, size, len(files), [relative]))
    if not dry_run:
        for row in rows:
            if row.action == "remove":
                _remove(fs, root, row.paths)
    return rows


def _children(fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(folder, allow_not_found=True)
    return [info for info in fs.get_file_info(selector) if info.base_name]


def _files(fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
    return [info for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]


def _legacy_files(fs: pafs.FileSystem, root: str, manifest: dict) -> list[pafs.FileInfo]:
    """The files an old-layout manifest names (shards, bad-image list), as far as they exist."""
    named = [
        shard for split in manifest.get("splits", {}).values() for shard in split.get("shards", [])
    ]
    if manifest.get("bad_images_report"):
        named.append(manifest["bad_images_report"])
    infos = fs.get_file_info([f"{root}/{relative}" for relative in named]) if named else []
    return [info for info in infos if info.type == pafs.FileType.File]


def _unfinished(files: list[pafs.FileInfo], now: float, grace_seconds: float) -> tuple[str, str]:
    newest = max((info.mtime.timestamp() for info in files if info.mtime), default=0.0)
    idle = now - newest
    if files and idle < grace_seconds:
        return "keep", f"unfinished, written {idle / 60:.0f} min ago: a prepare may still run"
    return "remove", "unfinished: a prepare that stopped before publishing it"


def _remove(fs: pafs.FileSystem, root: str, paths: list[str]) -> None:
    emptied = set()
    for relative in paths:  # the manifest copy comes first: the generation stops being "stored"
        path = f"{root}/{relative}"
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
            emptied.add(path.rsplit("/", 1)[0])
    if isinstance(fs, pafs.LocalFileSystem):
        for folder in sorted(emptied, reverse=True):
            if folder != root and folder.startswith(root + "/"):
                try:
                    os.rmdir(folder)  # an old-layout split folder, now empty
                except OSError:
                    pass
