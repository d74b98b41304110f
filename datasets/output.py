"""Where `data prepare` writes: the checks on `--out`, one generation's shards, and the manifest.

A new dataset version goes under `generations/<generation>/` and becomes current when
`manifest.json` is replaced in one step; nothing here deletes a file another command wrote.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

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
# The staging area of one set of inputs and options, under generations/ (which gc watches):
# the shards as they will be published, and beside them one journal entry per finished shard.
STAGING_MARK = f"{PARTIAL_MARK}stage-"
STAGED_SHARDS = "shards"
STAGED_JOURNAL = "journal"
STAGING_LOCK = "lock"
# A shard file still being written (local; on S3 shards are written locally and uploaded).
SCRATCH_SUFFIX = ".writing"


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


def _sha256(stream: Any) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 22):
        digest.update(chunk)
    return digest.hexdigest()


class DatasetWriter:
    """Stages the shards of one `prepare` at a checked `--out`, then publishes them as a generation.

    Shards are written as they fill into a staging area, `generations/.partial-stage-<key>/`,
    named by a key of the inputs and options (not by the content digest, which is known only at
    the end), so a rerun with the same arguments finds the shards a killed run finished. Each
    staged shard has a journal entry (its size and SHA-256, and what the digest needs of its
    rows), written after the shard: a shard without an entry that matches it is not kept.
    Publishing moves the shards to `generations/<gen>/` (local: one rename; S3, which has no
    rename: copy, then delete the staged objects this run's key created), then writes
    `manifests/<gen>.json`, then `manifest.json`, each replaced in one step, so a reader sees
    the old dataset or the new one, never a mix, and a reader holding the old manifest keeps its
    shards.
    """

    def __init__(self, uri: str, endpoints: Endpoints) -> None:
        self.uri = normalize_storage_uri(uri)
        self.fs, self.root = storage_filesystem(endpoints, self.uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.staging_key = ""
        self.staging = ""
        self._scratch: Path | None = None  # local folder for shards being written
        self._lock: Any = None  # the open lock file of a local staging area
        self._created: list[Path] = []  # local folders this writer made, deepest last
        # Size and SHA-256 of each staged shard, by its path in the generation, for the manifest
        # (readers check cached copies against them).
        self.shard_checks: dict[str, dict[str, Any]] = {}

    def current_manifest(self) -> dict[str, Any] | None:
        """The manifest readers see now, or None when there is no dataset yet."""
        found = read_json(self.fs, f"{self.root}/{MANIFEST}")
        return found if is_chestxpert_manifest(found) else None

    def stored_manifest(self, generation: str) -> dict[str, Any] | None:
        """The kept manifest of `generation`, if that generation is stored whole."""
        found = read_json(self.fs, f"{self.root}/{MANIFESTS}/{generation}.json")
        return found if is_chestxpert_manifest(found) else None

    def stage(self, key: str) -> None:
        """Open the staging area of inputs-and-options `key`, creating it or finding it again."""
        self.staging_key = key
        self.staging = f"{self.root}/{GENERATIONS}/{STAGING_MARK}{key}"
        if not self.is_local:
            self._scratch = Path(tempfile.mkdtemp(prefix="chestxpert-shards-"))
            return
        try:
            self._make_dirs(Path(self.root) / GENERATIONS)
            Path(self.staging, STAGED_SHARDS).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DatasetError(
                f"output {self.root} is not writable ({err.strerror}); choose another --out"
            ) from None
        self._lock_staging()
        # Shards are written beside their staged place, so moving one in is a rename.
        self._scratch = Path(self.staging, STAGED_SHARDS)
        for leftover in self._scratch.glob(f"**/*{SCRATCH_SUFFIX}"):
            leftover.unlink()  # a shard a killed run was writing: only ever ours

    def _lock_staging(self) -> None:
        """Hold the staging area for this run: two runs with the same arguments would write the
        same files. A POSIX record lock belongs to this process alone (decode workers forked
        later do not share it) and goes with it, so a killed run does not leave it behind."""
        lock = open(Path(self.staging, STAGING_LOCK), "a")  # held until the run ends
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            staging, self.staging = self.staging, ""  # not ours: abandon() must leave it
            raise DatasetError(
                f"another `data prepare` with the same input and options is writing to {self.uri} "
                f"(in {staging}); let it finish, or stop it and run the command again"
            ) from None
        self._lock = lock

    def scratch_file(self, relative: str) -> Path:
        """A local path to write shard `relative` to before `stage_file` moves it into staging."""
        assert self._scratch is not None, "stage() first"
        path = self._scratch / f"{relative}{SCRATCH_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def staged_entries(self, name: str) -> list[dict[str, Any]]:
        """Journal entries of the staged shards `name`-00000, -00001, … whose file still has the
        size and SHA-256 its entry gives, up to the first one missing or not matching."""
        kept = []
        while (entry := self.staged_entry(f"{name}-{len(kept):05d}")) is not None:
            kept.append(entry)
        return kept

    def staged_entry(self, journal: str) -> dict[str, Any] | None:
        """The journal entry named `journal` if its staged shard still has the size and SHA-256
        the entry gives (the shard is then recorded for the manifest), else None."""
        entry = read_json(self.fs, f"{self.staging}/{STAGED_JOURNAL}/{journal}.json")
        if not isinstance(entry, dict) or not self._holds(entry):
            return None
        self.record(entry)
        return entry

    def holds_size(self, entry: dict[str, Any]) -> bool:
        """Whether the staged shard of `entry` has the size the entry gives (one HEAD request;
        `staged_entry` checks the SHA-256 too)."""
        info = self.fs.get_file_info(f"{self.staging}/{STAGED_SHARDS}/{entry.get('shard')}")
        return info.type == pafs.FileType.File and info.size == entry.get("bytes")

    def _holds(self, entry: dict[str, Any]) -> bool:
        if not self.holds_size(entry):
            return False
        path = f"{self.staging}/{STAGED_SHARDS}/{entry['shard']}"
        with self.fs.open_input_stream(path) as stream:
            return _sha256(stream) == entry.get("sha256")

    def stage_file(self, scratch: Path, entry: dict[str, Any]) -> dict[str, Any]:
        """Move a finished shard from `scratch_file` into staging, then record `entry` for it;
        return the entry as journalled.

        `entry["shard"]` is the shard's path in the generation and `entry["journal"]` the name
        of its entry; the size and SHA-256 are added here, from the file as written.
        """
        with scratch.open("rb") as handle:
            entry = {**entry, "bytes": scratch.stat().st_size, "sha256": _sha256(handle)}
        target = f"{self.staging}/{STAGED_SHARDS}/{entry['shard']}"
        if self.is_local:
            os.replace(scratch, target)
        else:
            pafs.copy_files(
                str(scratch),
                target,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
            scratch.unlink()
        journal = f"{self.staging}/{STAGED_JOURNAL}/{entry['journal']}.json"
        self._replace(journal[len(self.root) + 1 :], _json_bytes(entry))  # whole, or absent
        self.record(entry)
        return entry

    def record(self, entry: dict[str, Any]) -> None:
        """Note a staged shard's size and SHA-256 (from its journal entry) for the manifest."""
        self.shard_checks[entry["shard"]] = {"bytes": entry["bytes"], "sha256": entry["sha256"]}

    def stage_bytes(self, relative: str, payload: bytes) -> None:
        """Write one small file (the bad-image list) among the staged shards."""
        self._put(f"{self.staging}/{STAGED_SHARDS}/{relative}", payload)

    def _put(self, path: str, payload: bytes) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as stream:  # S3: one PUT, all or nothing
            stream.write(payload)

    def publish(self, generation: str, manifest: dict[str, Any]) -> None:
        """Make the staged shards generation `generation`, then make `manifest` current."""
        final = f"{self.root}/{GENERATIONS}/{generation}"
        shards = f"{self.staging}/{STAGED_SHARDS}"
        if self.is_local:
            if Path(final).exists():
                # Moved into place by a `prepare` killed before its manifest: same digest, our
                # own files; no manifest names them, so no reader can be using them.
                self._discard(Path(final))
            os.rename(shards, final)
        else:
            selector = pafs.FileSelector(shards, recursive=True)
            for info in self.fs.get_file_info(selector):
                if info.type == pafs.FileType.File:
                    self.fs.copy_file(info.path, final + info.path[len(shards) :])
        self.make_current(manifest)
        self.drop_staging()

    def drop_staging(self) -> None:
        """Remove this run's staging area: its shards are published, or not needed."""
        if self.is_local:
            if Path(self.staging).exists():
                self._discard(Path(self.staging))
        elif self.fs.get_file_info(self.staging).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.staging)
        self.release()

    def release(self) -> None:
        """Let go of the staging area (its lock) and remove the local scratch files; the staged
        shards stay."""
        if self._lock is not None:
            self._lock.close()  # releases the staging area
            self._lock = None
        if self._scratch is None:
            return
        if self.is_local:
            for leftover in self._scratch.glob(f"**/*{SCRATCH_SUFFIX}"):
                leftover.unlink(missing_ok=True)
        else:
            shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch = None

    def _make_dirs(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir()
            self._created.append(path)

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

    def abandon(self) -> int:
        """After a failure: keep the staged shards for a rerun, remove the rest; return how many
        shards stay staged. A staging area with no finished shard goes, with the empty folders
        this writer made."""
        kept = 0
        if self.staging:
            selector = pafs.FileSelector(f"{self.staging}/{STAGED_JOURNAL}", allow_not_found=True)
            kept = len(self.fs.get_file_info(selector))
            if not kept:
                self.drop_staging()
        self.release()
        if not kept and self.is_local:
            for folder in reversed(self._created):
                try:
                    folder.rmdir()  # only if empty: never what someone else put there
                except OSError:
                    break
        return kept

    @staticmethod
    def _discard(folder: Path) -> None:
        aside = folder.parent / f"{PARTIAL_MARK}discard-{uuid.uuid4().hex[:8]}"
        folder.rename(aside)  # out of sight at once, then removed
        shutil.rmtree(aside, ignore_errors=True)
