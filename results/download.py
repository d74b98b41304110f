"""Downloading a model folder and verifying it: files land in a hidden sibling folder, are checked
against model.keras.sha256 or a version's SHA256SUMS, and are renamed into place only when whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from chestxpert.cluster.errors import UserError
from chestxpert.sweeps.layout import VERSION_CHECKSUMS
from chestxpert.trainable.checkpoint import MODEL_FILE, STATE_FILE, file_sha256

CHECKSUM_FILE = f"{MODEL_FILE}.sha256"
CHUNK_BYTES = 1 << 20


class PullError(UserError, RuntimeError):
    """A model that cannot be found or fetched; the message says where we looked and what to do."""


class ChecksumError(PullError):
    """A downloaded model.keras whose SHA-256 is not the one recorded beside it."""


def download_folder(
    fs: Any,
    path: str,
    uri: str,
    to: Path,
    progress: bool = True,
    expected: dict[str, str] | None = None,
    verify: bool = True,
    required: tuple[str, ...] = (MODEL_FILE, STATE_FILE),
) -> Path:
    """Copy every file under `path` on pyarrow filesystem `fs` into `to/<folder name>` atomically.

    `uri` names the source in messages. Checks that the `required` files are there; with
    `verify`, that model.keras matches model.keras.sha256 (refused without one) or, given `expected`
    (relative path → SHA-256, from a version's SHA256SUMS), that the folder holds exactly those
    files with those digests (SHA256SUMS itself aside). Returns the local folder.
    """
    files = _list_files(fs, path)
    missing = [name for name in required if name not in files]
    if missing:
        found = ", ".join(sorted(files)) or "nothing"
        raise PullError(
            f"{uri} is not a complete checkpoint: missing {', '.join(missing)} (found {found})"
        )
    if expected is not None:
        _check_listing(set(files) - {VERSION_CHECKSUMS}, expected, uri)
    destination = to / path.rstrip("/").rsplit("/", 1)[-1]
    created = not to.exists()
    to.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=to))
    try:
        digests: dict[str, str] = {}
        bar = _progress_bar(sum(files.values()), destination.name, progress)
        with bar:
            for relative in files:
                target = partial / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with fs.open_input_stream(f"{path}/{relative}") as source, target.open("wb") as out:
                    for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
                digests[relative] = digest.hexdigest()
        if verify and expected is None:  # a version is checked file by file against SHA256SUMS
            verify_checksum(partial, uri)
        for relative, wanted in (expected or {}).items():
            if digests[relative] != wanted:
                raise ChecksumError(
                    f"{relative} from {uri} is corrupted: its SHA-256 is {digests[relative]} but "
                    f"{VERSION_CHECKSUMS} says {wanted}; nothing was kept. Pull again; if it "
                    f"repeats, the copy in storage is damaged"
                )
        replace_folder(partial, destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # left alone if something else appeared in it
                to.rmdir()
        raise
    return destination


def _check_listing(found: set[str], expected: dict[str, str], uri: str) -> None:
    """Refuse a folder whose files are not exactly the ones its SHA256SUMS lists."""
    absent, unlisted = sorted(set(expected) - found), sorted(found - set(expected))
    if absent or unlisted:
        problems = [f"missing {', '.join(absent)}"] if absent else []
        problems += [f"not listed: {', '.join(unlisted)}"] if unlisted else []
        raise ChecksumError(
            f"{uri} does not match its {VERSION_CHECKSUMS} ({'; '.join(problems)}); nothing was "
            f"fetched. The copy in storage was changed after it was published"
        )


def verify_checksum(folder: Path, source: str) -> None:
    """Compare model.keras in `folder` with the hex digest in model.keras.sha256.

    Every checkpoint ChestXpert writes has the checksum file; one without it is refused
    (the caller skips this with --no-verify). Raises ChecksumError naming `source` and, for a
    mismatch, both digests.
    """
    recorded_file = folder / CHECKSUM_FILE
    if not recorded_file.is_file():
        raise ChecksumError(
            f"{source} has no {CHECKSUM_FILE}, so its {MODEL_FILE} cannot be checked; nothing "
            "was kept. Pass --no-verify to take it unchecked"
        )
    text = recorded_file.read_text().split()
    expected = text[0].lower() if text else ""
    actual = file_sha256(folder / MODEL_FILE)
    if actual != expected:
        raise ChecksumError(
            f"{MODEL_FILE} from {source} is corrupted: its SHA-256 is {actual} but {CHECKSUM_FILE} "
            f"says {expected or '(empty)'}; nothing was kept. Pull again; if it repeats, the copy "
            f"in storage is damaged"
        )


def replace_folder(new: Path, destination: Path) -> None:
    """Rename `new` to `destination`; an older `destination` is moved aside first, then deleted."""
    old = None
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
        os.replace(destination, old / destination.name)
    try:
        os.replace(new, destination)
    except BaseException:
        if old is not None:
            os.replace(old / destination.name, destination)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _list_files(fs: Any, path: str) -> dict[str, int]:
    """Relative path → size of every file under `path`; S3 "folder" marker keys are skipped."""
    files: dict[str, int] = {}
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File or info.path.endswith("/"):
            continue
        relative = info.path[len(path) :].lstrip("/")
        parts = relative.replace("\\", "/").split("/")
        if ".." in parts or relative.startswith(("/", "~")) or ":" in parts[0]:
            # An object store key is any string: one like `model/../../.bashrc` must not
            # write outside the download folder.
            raise PullError(
                f"{path} holds a file named {relative!r}, which would land outside the download "
                "folder; nothing was downloaded. The storage holds a key no ChestXpert wrote"
            )
        files[relative] = int(info.size or 0)
    return files


def _progress_bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        disable=not progress,
    )
