"""`chestxpert pull-best` and `predict MODEL`: which model folder a sweep name or a model reference
means (best checkpoint, final version, storage URI, registered model) and its local cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
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
from chestxpert.results import versions
from chestxpert.results.download import (
    CHECKSUM_FILE,
    PullError,
    download_folder,
    replace_folder,
    verify_checksum,
)
from chestxpert.sweeps.layout import (
    FINAL_POINTER,
    FINAL_VERSIONS,
    LEGACY_FINAL_MODEL,
    SPEC_FILE,
    SUMMARY_FILE,
    VERSION_CHECKSUMS,
    VERSION_MODEL,
    SweepLocation,
    locate,
)
from chestxpert.trainable.checkpoint import MODEL_FILE, STATE_FILE

CHECKPOINT_ARTIFACTS = "checkpoint"  # the final run's artifact folder that holds the model
CACHE_FOLDER = Path("cache") / "models"  # under the workspace


def pull_best(
    name: str,
    to: Path,
    final: bool = False,
    endpoints: Endpoints | None = None,
    progress: bool = True,
    version: int | None = None,
    verify: bool = True,
) -> Path:
    """Download sweep `name`'s best trial checkpoint (or, with `final`, its final model) into `to`.

    The folder arrives as `to/<folder name>` (`checkpoint_NNNNNN` or `model`) holding model.keras
    and state.json, replaced whole if it was there before; model.keras is checked against
    model.keras.sha256 when the source has one (`verify` False skips every check). `final` and
    `version` are as in `pull_final`. `progress` shows a tqdm bar in bytes on stderr.
    Returns the local folder. Raises PullError for an unknown sweep, an unfinished one, a missing
    final model or missing files, and ChecksumError for a corrupted download (nothing is left).
    """
    endpoints = endpoints or resolve()
    if final or version is not None:
        return pull_final(name, to, endpoints, version, verify, progress)[0]
    location = locate(endpoints, name)
    _require_sweep(location)
    fs, path, uri = _best_checkpoint(location, endpoints)
    return download_folder(fs, path, uri, Path(to), progress=progress, verify=verify)


def pull_final(
    name: str,
    to: Path,
    endpoints: Endpoints,
    version: int | None = None,
    verify: bool = True,
    progress: bool = True,
) -> tuple[Path, str]:
    """Download a final model of sweep `name` into `to/model`; return it and what it is, in words.

    Without `version`: the one `final/current.json` names (MLflow's `champion`), or, when no
    pointer was ever written, the legacy `final/model/` of releases before versions. With
    `version`: that published version, champion or not. Every file is checked against the
    version's SHA256SUMS; a version without one (its publication was interrupted) is refused
    unless `verify` is False. Retrain staging is never served. Raises PullError, with what to
    run, when there is no final model or no such version; ChecksumError for a damaged copy.
    """
    location = locate(endpoints, name)
    _require_sweep(location)
    path, uri, expected, what = _final_source(location, version, verify)
    folder = download_folder(
        location.fs, path, uri, Path(to), progress=progress, expected=expected, verify=verify
    )
    return folder, what


def _final_source(
    location: SweepLocation, version: int | None, verify: bool
) -> tuple[str, str, dict[str, str] | None, str]:
    """Which final model folder to fetch: its path, URI, expected checksums and description."""
    name, pointer = location.name, versions.read_pointer(location)
    if version is None and pointer is None:
        if versions.legacy_model(location):
            what = f"the legacy final model ({LEGACY_FINAL_MODEL}/, from before versions)"
            legacy = LEGACY_FINAL_MODEL
            return f"{location.path}/{legacy}", f"{location.uri}/{legacy}", None, what
        listed = ", ".join(map(str, versions.published_versions(location)))
        raise PullError(
            f"sweep {name!r} has no final model yet: version(s) {listed} are published in "
            f"{location.uri}/{FINAL_VERSIONS} but were never registered as champion (MLflow "
            f"failed?). `chestxpert final {name} --finish` completes that; `--version N` "
            f"fetches one as it is"
            if listed
            else f"sweep {name!r} has no final model yet (no {location.uri}/{FINAL_POINTER}); "
            f"run `chestxpert final {name}` first"
        )
    if version is None:
        version = int(pointer["version"])
        value = pointer.get("value")
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "unknown"
        what = f"version {version}, the champion ({pointer.get('metric')} {shown})"
    else:
        what = f"version {version}"
    if version not in versions.version_numbers(location):
        published = ", ".join(map(str, versions.published_versions(location))) or "none"
        raise PullError(
            f"sweep {name!r} has no final version {version} in {location.uri}/{FINAL_VERSIONS} "
            f"(published versions: {published})"
        )
    uri = versions.version_uri(location, version)
    sums = versions.read_checksums(location, version)
    if sums is None and verify:
        raise PullError(
            f"version {version} of sweep {name!r} has no {VERSION_CHECKSUMS} ({uri}): its "
            f"publication was interrupted or the file was removed, so its files cannot be "
            f"verified; nothing was fetched. `--no-verify` fetches it anyway"
        )
    prefix = f"{VERSION_MODEL}/"
    expected = {k[len(prefix) :]: v for k, v in (sums or {}).items() if k.startswith(prefix)}
    path = f"{versions.version_path(location, version)}/{VERSION_MODEL}"
    return path, f"{uri}/{VERSION_MODEL}", expected if sums and verify else None, what


def load_lines(path: Path) -> str:
    """The two lines of Python that load a pulled folder (safe mode, no optimizer)."""
    return (
        "from chestxpert.trainable.checkpoint import load_model\n"
        f"model = load_model({json.dumps(str(Path(path).absolute()))}, compile=False)"
    )


def resolve_model(model_ref: str, endpoints: Endpoints, progress: bool = True) -> Path:
    """The local checkpoint folder that `model_ref` names, downloaded first if it is remote.

    `model_ref` is a local folder; a storage URI (`s3://…` or `file://…`) of a checkpoint folder;
    or `models:/NAME@ALIAS` or `models:/NAME/VERSION` from the MLflow registry at
    `endpoints.mlflow_tracking_uri` (the version's run holds the folder as artifacts under
    `checkpoint/`). Remote folders are cached
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
    remote_sum = versions.read_text(fs, f"{path}/{CHECKSUM_FILE}")
    if remote_sum is not None and _cached_matches(cache, remote_sum):
        return cache
    staging = _staging(cache)
    try:
        replace_folder(download_folder(fs, path, uri, staging, progress=progress), cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def _registry_model(model_ref: str, endpoints: Endpoints) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    name, _, alias = model_ref[len("models:/") :].partition("@")
    name, _, number = name.partition("/") if not alias else (name, "", "")
    if not name or "/" in name or not (alias or number.isdigit()):
        raise PullError(
            f"MODEL {model_ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION, e.g. "
            "models:/chestxpert@champion or models:/chestxpert/3"
        )
    tracking_uri = endpoints.mlflow_tracking_uri
    if endpoints.s3_endpoint_url:
        apply_client_environment(endpoints)  # artifacts kept in S3-compatible storage
    client = mlflow_runs.client(tracking_uri)
    try:
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        else:
            version = client.get_model_version(name, number)
    except MlflowException as err:
        raise PullError(_registry_miss(client, tracking_uri, name, alias, number, err)) from None
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
        replace_folder(fetched, cache)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def _registry_miss(
    client, tracking_uri: str, name: str, alias: str, number: str, err: Exception
) -> str:
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
    if not alias:
        return (
            f"model {name!r} in the MLflow registry at {tracking_uri} has no version {number} "
            f"(aliases: {aliases or 'none'})"
        )
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


def _is_dir(fs: Any, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory


def _staging(cache: Path) -> Path:
    """A fresh hidden folder beside the cache entry: downloads land there, then one rename."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{cache.name}.fetch-", dir=cache.parent))
