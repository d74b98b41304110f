"""`chestxpert pull-best` and `predict MODEL`: a checkpoint folder out of storage or MLflow.

Every download lands in a hidden sibling folder first and is renamed into place only once
complete and checksum-verified, so a folder that exists is a whole model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from chestxpert.cluster import mlflow_runs
from chestxpert.cluster.endpoints import (
    Endpoints,
    apply_client_environment,
    resolve,
    storage_filesystem,
)
from chestxpert.cluster.errors import UserError
from chestxpert.sweeps.layout import SPEC_FILE, SUMMARY_FILE, SweepLocation, locate
from chestxpert.trainable.checkpoint import MODEL_FILE, STATE_FILE, file_sha256

CHECKSUM_FILE = f"{MODEL_FILE}.sha256"
FINAL_MODEL = "final/model"  # under the sweep folder: written by `chestxpert final`
CHECKPOINT_ARTIFACTS = "checkpoint"  # the final run's artifact folder that holds the model
CACHE_FOLDER = Path("cache") / "models"  # under the workspace
CHUNK_BYTES = 1 << 20


class PullError(UserError, RuntimeError):
    """A model that cannot be found or fetched; the message says where we looked and what to do."""


class ChecksumError(PullError):
    """A downloaded model.keras whose SHA-256 is not the one recorded beside it."""


def pull_best(
    name: str,
    to: Path,
    final: bool = False,
    endpoints: Endpoints | None = None,
    progress: bool = True,
) -> Path:
    """Download sweep `name`'s best trial checkpoint (or, with `final`, its final model) into `to`.

    The folder arrives as `to/<folder name>` (`checkpoint_NNNNNN` or `model`) holding model.keras
    and state.json, replaced whole if it was there before; model.keras is checked against
    model.keras.sha256 when the source has one. `progress` shows a tqdm bar in bytes on stderr.
    Returns the local folder. Raises PullError for an unknown sweep, an unfinished one, a missing
    final model or missing files, and ChecksumError for a corrupted download (nothing is left).
    """
    endpoints = endpoints or resolve()
    location = locate(endpoints, name)
    _require_sweep(location)
    if final:
        fs, path = location.fs, f"{location.path}/{FINAL_MODEL}"
        uri = f"{location.uri}/{FINAL_MODEL}"
        if not _is_dir(fs, path):
            raise PullError(
                f"sweep {name!r} has no final model yet (looked in {uri}); "
                f"run `chestxpert final {name}` first"
            )
    else:
        fs, path, uri = _best_checkpoint(location, endpoints)
    return download_folder(fs, path, uri, Path(to), progress=progress)


def load_lines(path: Path) -> str:
    """The two lines of Python that load a pulled folder (safe mode, no optimizer)."""
    return (
        "from chestxpert.trainable.checkpoint import load_model\n"
        f"model = load_model({json.dumps(str(Path(path).absolute()))}, compile=False)"
    )


def resolve_model(model_ref: str, endpoints: Endpoints, progress: bool = True) -> Path:
    """The local checkpoint folder that `model_ref` names, downloaded first if it is remote.

    `model_ref` is a local folder; a storage URI (`s3://…` or `file://…`) of a checkpoint folder;
    or `models:/NAME@ALIAS` from the MLflow registry at `endpoints.mlflow_tracking_uri` (the
    version's run holds the folder as artifacts under `checkpoint/`). Remote folders are cached
    in `<workspace>/cache/models/<sha1>`: by URI (fetched again when the remote checksum differs
    from the cached one) or by run (a run's artifacts do not change); `progress` shows a tqdm
    bar for storage downloads. Raises PullError (ChecksumError for a corrupted download).
    """
    if model_ref.startswith("models:/"):
        return _registry_model(model_ref, endpoints)
    if model_ref.startswith(("s3://", "file://")):
        return _storage_model(model_ref, endpoints, progress)
    folder = Path(model_ref).expanduser()
    if folder.is_dir():
        return folder.absolute()
    if folder.is_file():
        raise PullError(
            f"MODEL {model_ref!r} is a file; give the checkpoint folder that holds "
            f"{MODEL_FILE} and {STATE_FILE} ({folder.parent})"
        )
    raise PullError(
        f"MODEL {model_ref!r} is not a folder here; expected a checkpoint folder, a storage URI "
        f"(s3://… or file://…) or a registered model (models:/NAME@ALIAS)"
    )


def download_folder(fs: Any, path: str, uri: str, to: Path, progress: bool = True) -> Path:
    """Copy every file under `path` on pyarrow filesystem `fs` into `to/<folder name>` atomically.

    `uri` names the source in messages. Checks that model.keras and state.json are there and
    that model.keras matches model.keras.sha256 when present. Returns the local folder.
    """
    files = _list_files(fs, path)
    missing = [name for name in (MODEL_FILE, STATE_FILE) if name not in files]
    if missing:
        found = ", ".join(sorted(files)) or "nothing"
        raise PullError(
            f"{uri} is not a complete checkpoint: missing {', '.join(missing)} (found {found})"
        )
    destination = to / path.rstrip("/").rsplit("/", 1)[-1]
    created = not to.exists()
    to.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=to))
    try:
        bar = _progress_bar(sum(files.values()), destination.name, progress)
        with bar:
            for relative in files:
                target = partial / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(f"{path}/{relative}") as source, target.open("wb") as out:
                    for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
                        out.write(chunk)
                        bar.update(len(chunk))
        verify_checksum(partial, uri)
        _replace_folder(partial, destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # left alone if something else appeared in it
                to.rmdir()
        raise
    return destination


def verify_checksum(folder: Path, source: str) -> None:
    """Compare model.keras in `folder` with the hex digest in model.keras.sha256, if present.

    Older checkpoints have no checksum file; they pass unchecked. Raises ChecksumError
    naming both digests and `source`.
    """
    recorded_file = folder / CHECKSUM_FILE
    if not recorded_file.is_file():
        return
    text = recorded_file.read_text().split()
    expected = text[0].lower() if text else ""
    actual = file_sha256(folder / MODEL_FILE)
    if actual != expected:
        raise ChecksumError(
            f"{MODEL_FILE} from {source} is corrupted: its SHA-256 is {actual} but {CHECKSUM_FILE} "
            f"says {expected or '(empty)'}; nothing was kept. Pull again; if it repeats, the copy "
            f"in storage is damaged"
        )


def _require_sweep(location: SweepLocation) -> None:
    if _is_dir(location.fs, location.path):
        return
    from chestxpert.sweeps.status import list_sweeps  # imports Ray Tune: only on this error path

    known = list_sweeps(location.fs, location.root)
    there = f"sweeps there: {', '.join(known)}" if known else "it holds no sweeps"
    raise PullError(
        f"no sweep named {location.name!r}: looked for {location.uri} ({there}). Check the name "
        "with `chestxpert sweep list`, or point --storage / CHESTXPERT_STORAGE at the sweep's "
        "storage"
    )


def _best_checkpoint(location: SweepLocation, endpoints: Endpoints) -> tuple[Any, str, str]:
    summary = location.read_json(SUMMARY_FILE)
    if summary is None:
        started = location.read_json(SPEC_FILE) is not None
        raise PullError(
            f"sweep {location.name!r} has not finished: {location.uri} has no {SUMMARY_FILE}"
            + (
                f". See `chestxpert sweep status {location.name}`; continue an interrupted sweep "
                f"with `chestxpert sweep resume {location.name}`"
                if started
                else ", nor a spec: it is not a ChestXpert sweep"
            )
        )
    recorded = summary.get("best_checkpoint")
    if not recorded:
        raise PullError(
            f"sweep {location.name!r} finished without a best checkpoint (no trial reported "
            f"{summary.get('metric', 'the metric')}); see `chestxpert sweep status {location.name}`"
        )
    fs, path = storage_filesystem(endpoints, recorded)
    if _is_dir(fs, path):
        return fs, path, recorded
    # A storage copied or synced elsewhere keeps the layout below the sweep folder.
    marker = f"/{location.name}/"
    if marker in recorded:
        moved = f"{location.path}/{recorded.split(marker, 1)[1]}"
        if _is_dir(location.fs, moved):
            return location.fs, moved, f"{location.uri}/{recorded.split(marker, 1)[1]}"
    raise PullError(
        f"the best checkpoint of sweep {location.name!r}, {recorded} (from {location.uri}/"
        f"{SUMMARY_FILE}), is missing: Tune may have deleted it (checkpoints_to_keep) or the "
        f"storage was moved"
    )


def _storage_model(uri: str, endpoints: Endpoints, progress: bool) -> Path:
    fs, path = storage_filesystem(endpoints, uri)
    if not _is_dir(fs, path):
        raise PullError(f"MODEL {uri} is not a folder in storage; expected a checkpoint folder")
    cache = _cache_folder(endpoints, uri)
    remote_sum = _read_small(fs, f"{path}/{CHECKSUM_FILE}")
    if remote_sum is not None and _cached_matches(cache, remote_sum):
        return cache
    staging = _staging(cache)
    try:
        _replace_folder(download_folder(fs, path, uri, staging, progress=progress), cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def _registry_model(model_ref: str, endpoints: Endpoints) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    name, _, alias = model_ref[len("models:/") :].partition("@")
    if not name or not alias or "/" in name:
        raise PullError(
            f"MODEL {model_ref!r}: expected models:/NAME@ALIAS, e.g. models:/chestxpert@champion"
        )
    tracking_uri = endpoints.mlflow_tracking_uri
    if endpoints.s3_endpoint_url:
        apply_client_environment(endpoints)  # artifacts kept in S3-compatible storage
    client = mlflow_runs.client(tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        raise PullError(_registry_miss(client, tracking_uri, name, alias, err)) from None
    if not version.run_id:
        raise PullError(
            f"{model_ref} is version {version.version} of {name!r} in the MLflow registry at "
            f"{tracking_uri}, but that version names no run to download the checkpoint from"
        )
    cache = _cache_folder(endpoints, f"runs:/{version.run_id}/{CHECKPOINT_ARTIFACTS}")
    if _cached_matches(cache, None):
        return cache
    staging = _staging(cache)
    try:
        try:
            fetched = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=version.run_id,
                    artifact_path=CHECKPOINT_ARTIFACTS,
                    dst_path=str(staging),
                    tracking_uri=tracking_uri,
                )
            )
        except (MlflowException, OSError) as err:
            raise PullError(
                f"{model_ref} (run {version.run_id}) has no downloadable {CHECKPOINT_ARTIFACTS}/ "
                f"artifacts at {tracking_uri}: {err}"
            ) from None
        source = f"{model_ref} (run {version.run_id}, artifacts {CHECKPOINT_ARTIFACTS}/)"
        missing = [f for f in (MODEL_FILE, STATE_FILE) if not (fetched / f).is_file()]
        if missing:
            raise PullError(f"{source} is not a complete checkpoint: missing {', '.join(missing)}")
        verify_checksum(fetched, source)
        _replace_folder(fetched, cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def _registry_miss(client, tracking_uri: str, name: str, alias: str, err: Exception) -> str:
    try:
        model = client.get_registered_model(name)
    except Exception:
        try:
            names = sorted(m.name for m in client.search_registered_models(max_results=50))
        except Exception:
            return f"cannot read the MLflow registry at {tracking_uri}: {err}"
        listed = ", ".join(names) if names else "none"
        return (
            f"the MLflow registry at {tracking_uri} has no model {name!r} (registered models: "
            f"{listed}); `chestxpert final SWEEP` registers one"
        )
    aliases = ", ".join(f"@{a} → version {v}" for a, v in sorted(model.aliases.items()))
    return (
        f"model {name!r} in the MLflow registry at {tracking_uri} has no alias {alias!r} "
        f"(aliases: {aliases or 'none'})"
    )


def _cache_folder(endpoints: Endpoints, key: str) -> Path:
    return endpoints.workspace / CACHE_FOLDER / hashlib.sha1(key.encode()).hexdigest()


def _cached_matches(cache: Path, remote_sum: str | None) -> bool:
    """A cached folder is reused when whole and, if a remote checksum is given, equal to it."""
    if not ((cache / MODEL_FILE).is_file() and (cache / STATE_FILE).is_file()):
        return False
    if remote_sum is None:
        return True
    local_sum = cache / CHECKSUM_FILE
    return local_sum.is_file() and local_sum.read_text().split()[:1] == remote_sum.split()[:1]


def _replace_folder(new: Path, destination: Path) -> None:
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
        files[info.path[len(path) :].lstrip("/")] = int(info.size or 0)
    return files


def _is_dir(fs: Any, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def _read_small(fs: Any, path: str) -> str | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode(errors="replace")


def _staging(cache: Path) -> Path:
    """A fresh hidden folder beside the cache entry: downloads land there, then one rename."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{cache.name}.fetch-", dir=cache.parent))


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
