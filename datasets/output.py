"""Where `data prepare` writes: the checks on `--out`, one generation's shards, and the manifest.

A new dataset version goes under `generations/<generation>/` and becomes current when
`manifest.json` is replaced in one step; nothing here deletes a file another command wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from chestxpert.cluster.endpoints import Endpoints, normalize_storage_uri, storage_filesystem
from chestxpert.datasets.schema import (
    GENERATIONS,
    MANIFEST,
    MANIFESTS,
    DatasetError,
    generation_of,
)

# How many entries of a refused --out the message lists.
SHOWN_ENTRIES = 5
# Hidden names of work in progress: a generation being written, a manifest being replaced.
PARTIAL_MARK = ".partial-"


def is_chestxpert_manifest(manifest: Any) -> bool:
    """True for a manifest `prepare` wrote (another tool's manifest.json is not ours)."""
    return isinstance(manifest, dict) and {"digest", "splits", "schema_version"} <= manifest.keys()


def _storage_path(uri: str) -> tuple[str, str]:
    """(scheme, path) of a normalised URI, the path with symlinks resolved for local folders."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return "s3", f"{parsed.netloc}{parsed.path}".rstrip("/")
    return "file", os.path.realpath(unquote(parsed.path))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_target(input_uri: str, out_uri: str, endpoints: Endpoints) -> str:
    """Refuse an `--out` that `prepare` could damage, before any file is read or written.

    Accepted: an absent or empty folder (or S3 prefix), a ChestXpert dataset (it has our
    manifest.json), or the leftovers of an interrupted `prepare` (only `generations/` and
    `manifests/`). Refused whatever `--force` says: a bucket root, a folder inside `--input` or
    holding it, and anything else holding files, the message naming the first few. Returns the
    normalised output URI.
    """
    try:
        out = normalize_storage_uri(out_uri)
    except ValueError as err:
        raise DatasetError(f"--out {err}") from None
    scheme, out_path = _storage_path(out)
    shown = out if scheme == "s3" else unquote(urlparse(out).path)  # as the user knows it
    if scheme == "s3" and "/" not in out_path:
        raise DatasetError(
            f"--out {shown} is a bucket root: a bucket also holds MLflow artifacts, sweeps and "
            f"other data, so `data prepare` writes only under a prefix; use e.g. "
            f"{shown}/datasets/NAME"
        )
    try:
        in_scheme, in_path = _storage_path(normalize_storage_uri(input_uri))
    except ValueError:
        in_scheme, in_path = "", ""  # reading the input reports it
    if in_scheme == scheme and _inside(out_path, in_path):
        raise DatasetError(
            f"--out {shown} is inside --input {input_uri}: the prepared shards would land among "
            "the source files; choose an --out outside the input folder"
        )
    if in_scheme == scheme and _inside(in_path, out_path):
        raise DatasetError(
            f"--input {input_uri} is inside --out {shown}: the source files would share a folder "
            "with the prepared dataset; choose an --out beside the input, e.g. "
            f"{shown}/prepared"
        )
    fs, root = storage_filesystem(endpoints, out)
    if scheme == "file":
        _check_writable(Path(root))
    else:
        bucket = root.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise DatasetError(
                f"S3 bucket {bucket!r} does not exist at {endpoints.s3_endpoint_url or 'AWS'}; "
                f"create it first (aws s3 mb s3://{bucket}) or choose another --out"
            )
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.NotFound:
        return out
    if kind != pafs.FileType.Directory:
        raise DatasetError(f"--out {shown} is a file, not a folder; choose another --out")
    entries = sorted(
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        if info.base_name  # S3 "folder" marker objects list with an empty name
    )
    if MANIFEST in entries:
        manifest = read_json(fs, f"{root}/{MANIFEST}")
        if is_chestxpert_manifest(manifest):
            return out
        raise DatasetError(
            f"--out {shown} holds a {MANIFEST} that ChestXpert did not write, with "
            f"{_listing(entries)}; `data prepare` never replaces what it did not write, "
            "--force included: choose another --out"
        )
    others = [name for name in entries if name not in (GENERATIONS, MANIFESTS)]
    if others:
        raise DatasetError(
            f"--out {shown} is not empty and is not a ChestXpert dataset (it holds "
            f"{_listing(others)}); `data prepare` writes only into an absent or empty folder "
            "or over its own dataset, and never deletes what it did not write, --force "
            "included: choose a new --out"
        )
    return out


def _check_writable(folder: Path) -> None:
    """Fail now, not after an hour of decoding, when the output cannot be created."""
    nearest = folder
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise DatasetError(
            f"output {folder} is not writable ({nearest} is a file); choose another --out"
        )
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise DatasetError(f"output folder {nearest} is not writable; choose another --out")


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_ENTRIES])
    more = f" and {len(names) - SHOWN_ENTRIES} more" if len(names) > SHOWN_ENTRIES else ""
    return shown + more


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    """A JSON file's content, None if it is absent, "unreadable" if it is not JSON."""
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, UnicodeDecodeError):
        return "unreadable"


def _json_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"


class DatasetWriter:
    """Writes one generation of a dataset at a checked `--out`, then makes it current.

    Local folders: the shards go into a hidden folder renamed to `generations/<gen>` when
    complete. S3 (no rename): straight under `generations/<gen>/`, which no manifest names
    until the end. Then `manifests/<gen>.json`, then `manifest.json`, each replaced in one
    step (local: temporary file and rename; S3: a single PUT), so a reader sees the old
    dataset or the new one, never a mix, and a reader holding the old manifest keeps its shards.
    """

    def __init__(self, uri: str, endpoints: Endpoints) -> None:
        self.uri = normalize_storage_uri(uri)
        self.fs, self.root = storage_filesystem(endpoints, self.uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.generation = ""
        self.write_root = ""
        self._created: list[Path] = []  # local folders this writer made, deepest last

    def current_manifest(self) -> dict[str, Any] | None:
        """The manifest readers see now, or None when there is no dataset yet."""
        found = read_json(self.fs, f"{self.root}/{MANIFEST}")
        return found if is_chestxpert_manifest(found) else None

    def stored_manifest(self, generation: str) -> dict[str, Any] | None:
        """The kept manifest of `generation`, if that generation is stored whole."""
        found = read_json(self.fs, f"{self.root}/{MANIFESTS}/{generation}.json")
        return found if is_chestxpert_manifest(found) else None

    def begin(self, generation: str) -> str:
        """Start writing `generation`; returns the prefix shard paths in its manifest take."""
        self.generation = generation
        final = f"{self.root}/{GENERATIONS}/{generation}"
        if not self.is_local:
            self.write_root = final
            return f"{GENERATIONS}/{generation}"
        try:
            self._make_dirs(Path(self.root) / GENERATIONS)
        except OSError as err:
            raise DatasetError(
                f"output {self.root} is not writable ({err.strerror}); choose another --out"
            ) from None
        if Path(final).exists():
            # Renamed into place by a `prepare` killed before its manifest: same digest, our
            # own files; no manifest names them, so no reader can be using them.
            self._discard(Path(final))
        partial = (
            Path(self.root) / GENERATIONS / f"{PARTIAL_MARK}{generation}-{uuid.uuid4().hex[:8]}"
        )
        partial.mkdir()
        self.write_root = str(partial)
        return f"{GENERATIONS}/{generation}"

    def _make_dirs(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir()
            self._created.append(path)

    def write_bytes(self, relative: str, payload: bytes) -> None:
        """Write one file of the generation (relative to the generation's folder)."""
        path = f"{self.write_root}/{relative}"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as stream:
            stream.write(payload)

    def write_table(self, relative: str, table: pa.Table) -> None:
        """Write one Parquet shard of the generation (relative to the generation's folder)."""
        path = f"{self.write_root}/{relative}"
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=self.fs, compression="zstd", row_group_size=256)

    def publish(self, manifest: dict[str, Any]) -> None:
        """Make the written generation current: shards in place, its manifest kept, then current."""
        if self.is_local:
            os.rename(self.write_root, f"{self.root}/{GENERATIONS}/{self.generation}")
            self.write_root = f"{self.root}/{GENERATIONS}/{self.generation}"
        self.make_current(manifest)

    def make_current(self, manifest: dict[str, Any]) -> None:
        """Keep `manifest` as `manifests/<gen>.json` and make it `manifest.json`.

        A current dataset written before generations existed is kept under its digest first,
        so a sweep pinned to it still opens it.
        """
        previous = self.current_manifest()
        if previous is not None and not previous.get("generation"):
            legacy = generation_of(previous)
            if legacy and self.stored_manifest(legacy) is None:
                self._replace(f"{MANIFESTS}/{legacy}.json", _json_bytes(previous))
        self._replace(f"{MANIFESTS}/{generation_of(manifest)}.json", _json_bytes(manifest))
        self._replace(MANIFEST, _json_bytes(manifest))
        self._created.clear()  # a dataset now lives here: abandon() must not remove it

    def _replace(self, relative: str, payload: bytes) -> None:
        path = f"{self.root}/{relative}"
        folder, name = path.rsplit("/", 1)
        self.fs.create_dir(folder, recursive=True)
        if not self.is_local:
            with self.fs.open_output_stream(path) as stream:  # one PUT: all or nothing
                stream.write(payload)
            return
        partial = f"{folder}/.{name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
        with open(partial, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)

    def abandon(self) -> None:
        """After a failure: remove the unfinished generation and the empty folders we made."""
        if not self.is_local:
            return  # S3 leftovers sit under generations/ where no manifest names them
        if self.write_root and PARTIAL_MARK in Path(self.write_root).name:
            self._discard(Path(self.write_root))
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only if empty: never what someone else put there
            except OSError:
                break

    @staticmethod
    def _discard(folder: Path) -> None:
        aside = folder.parent / f"{PARTIAL_MARK}discard-{uuid.uuid4().hex[:8]}"
        folder.rename(aside)  # out of sight at once, then removed
        shutil.rmtree(aside, ignore_errors=True)
