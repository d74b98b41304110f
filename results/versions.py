"""The final models of a sweep in storage: numbered versions, each sealed by its SHA256SUMS, and
the pointer `final/current.json`, written last, naming the version MLflow's `champion` is.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from chestxpert.sweeps.layout import (
    FINAL_POINTER,
    FINAL_STAGING,
    FINAL_VERSIONS,
    LEGACY_FINAL_MODEL,
    VERSION_CHECKSUMS,
    VERSION_INFO,
    SweepLocation,
    write_whole,
)
from chestxpert.trainable.checkpoint import STATE_FILE, file_sha256


def version_path(location: SweepLocation, number: int) -> str:
    """Version `number`'s folder on `location.fs` (no scheme)."""
    return f"{location.path}/{FINAL_VERSIONS}/{number}"


def version_uri(location: SweepLocation, number: int) -> str:
    """Version `number`'s folder as users and MLflow tags spell it (`s3://…` or `file://…`)."""
    return f"{location.uri}/{FINAL_VERSIONS}/{number}"


def version_numbers(location: SweepLocation) -> list[int]:
    """Every numbered folder under `final/versions/`, sealed or not (a publish may have died)."""
    selector = pafs.FileSelector(f"{location.path}/{FINAL_VERSIONS}", allow_not_found=True)
    names = (
        info.base_name
        for info in location.fs.get_file_info(selector)
        if info.type == pafs.FileType.Directory
    )
    return sorted(int(name) for name in names if name.isdigit())


def read_checksums(location: SweepLocation, number: int) -> dict[str, str] | None:
    """Version `number`'s SHA256SUMS as relative path → hex digest; None while it is unsealed."""
    text = read_text(location.fs, f"{version_path(location, number)}/{VERSION_CHECKSUMS}")
    if text is None:
        return None
    sums: dict[str, str] = {}
    for line in text.splitlines():
        digest, _, relative = line.partition("  ")
        if digest and relative:
            sums[relative] = digest.lower()
    return sums


def published_versions(location: SweepLocation) -> list[int]:
    """The sealed versions (SHA256SUMS present), oldest first."""
    return [n for n in version_numbers(location) if read_checksums(location, n) is not None]


def next_version(location: SweepLocation) -> int:
    """One more than any version number in use, sealed, unsealed or named by the pointer."""
    pointer = read_pointer(location) or {}
    return max([0, int(pointer.get("version", 0)), *version_numbers(location)]) + 1


def publish_version(location: SweepLocation, number: int, local: Path) -> dict[str, str]:
    """Upload every file under `local` to version `number`'s folder, then seal it with SHA256SUMS.

    SHA256SUMS goes last and whole, so a crash leaves an unsealed folder that nothing serves.
    Refuses a number already in use (versions are never rewritten). Returns the checksums.
    """
    remote = version_path(location, number)
    if location.fs.get_file_info(remote).type != pafs.FileType.NotFound:
        raise FileExistsError(f"{version_uri(location, number)} exists; versions are never reused")
    sums = {
        path.relative_to(local).as_posix(): file_sha256(path)
        for path in sorted(local.rglob("*"))
        if path.is_file()
    }
    upload_folder(location.fs, local, remote)
    text = "".join(f"{digest}  {relative}\n" for relative, digest in sums.items())
    write_whole(location.fs, f"{remote}/{VERSION_CHECKSUMS}", text.encode())
    return sums


def upload_folder(fs: Any, local: Path, remote: str) -> None:
    """Copy every file under local folder `local` to `remote` on pyarrow filesystem `fs`."""
    fs.create_dir(remote, recursive=True)
    pafs.copy_files(
        str(local), remote, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def read_version_info(location: SweepLocation, number: int) -> dict[str, Any] | None:
    """Version `number`'s version.json (its metric, attempt and time), or None."""
    return location.read_json(f"{FINAL_VERSIONS}/{number}/{VERSION_INFO}")


def read_pointer(location: SweepLocation) -> dict[str, Any] | None:
    """`final/current.json`: the champion version, its metric and MLflow model version; or None."""
    return location.read_json(FINAL_POINTER)


def write_pointer(location: SweepLocation, pointer: dict[str, Any]) -> None:
    """Make `pointer` the current one, whole (the last write of a publish)."""
    location.write_json(FINAL_POINTER, pointer)


def legacy_model(location: SweepLocation) -> bool:
    """Whether `final/model/`, the one final model of releases before versions, is there."""
    return location.fs.get_file_info(f"{location.path}/{LEGACY_FINAL_MODEL}").type == (
        pafs.FileType.Directory
    )


def champion_metric(location: SweepLocation, metric: str) -> tuple[str, float | None] | None:
    """What the current final model is and its value of `metric`; None when there is none.

    The pointer's version, else the legacy `final/model` (its state.json holds the last epoch's
    validation metrics, computed by the same code on the same split).
    """
    pointer = read_pointer(location)
    if pointer is not None:
        value = pointer.get("value") if pointer.get("metric") == metric else None
        return f"version {pointer['version']}", value
    if legacy_model(location):
        state = location.read_json(f"{LEGACY_FINAL_MODEL}/{STATE_FILE}") or {}
        return "the legacy final/model", (state.get("metrics") or {}).get(metric)
    return None


def new_attempt() -> str:
    """A fresh staging name: UTC time, then random hex so two retrains never share one."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def staging_path(location: SweepLocation, attempt: str) -> str:
    """Where retrain attempt `attempt` uploads its epochs (`final/staging/<attempt>/model`) and,
    once evaluated, its report (`.../report`)."""
    return f"{location.path}/{FINAL_STAGING}/{attempt}"


def staging_attempts(location: SweepLocation) -> list[str]:
    """The attempts whose uploads are still in `final/staging/` (interrupted retrains)."""
    selector = pafs.FileSelector(f"{location.path}/{FINAL_STAGING}", allow_not_found=True)
    return sorted(info.base_name for info in location.fs.get_file_info(selector))


def remove_staging(location: SweepLocation, attempt: str) -> None:
    """Delete attempt `attempt`'s staging folder (after it was published or abandoned)."""
    folder = f"{location.path}/{FINAL_STAGING}/{attempt}"
    if location.fs.get_file_info(folder).type == pafs.FileType.Directory:
        location.fs.delete_dir(folder)


def read_text(fs: Any, path: str) -> str | None:
    """The text of the file at `path` on `fs`, or None when there is no such file."""
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode(errors="replace")
