"""Where a sweep lives in storage, shared by `sweeps` and `results`: Tune's experiment folder
`<storage>/<name>` holding our spec record, lease, tracking journal, at the end its summary, and
its final models.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from chestxpert.cluster.endpoints import Endpoints, storage_filesystem
from chestxpert.cluster.errors import UserError

SPEC_FILE = "chestxpert_spec.json"  # the spec as run, the parent MLflow run id and server,
# the dataset version
SUMMARY_FILE = "chestxpert_summary.json"  # best trial, config and checkpoint; written at the end
FINAL_STATE = "final/model/state.json"  # the final model's state: config, dataset digest
# Who is writing the sweep now (sweeps/lease.py); JSON inside. Not `*.json`: Tune's restore
# copies the folder's top-level *.json and *.pkl files to the driver and uploads them back at
# every snapshot, which would roll a lease back to the heartbeat it had at restore.
LEASE_FILE = "chestxpert.lease"
# Trials a resume found started by a dead driver after Tune's last snapshot (its ids, JSON);
# not `*.json` for the same reason.
ABANDONED_FILE = "chestxpert.abandoned"
TRACKING_DIR = "tracking"  # one journal segment per driver session, and what MLflow has of it
# `chestxpert sweep report`: the sweep in one self-contained page, and the numbers behind it
SWEEP_REPORT_DIR = "report"
SWEEP_REPORT_HTML = f"{SWEEP_REPORT_DIR}/report.html"
SWEEP_REPORT_DATA = f"{SWEEP_REPORT_DIR}/report.json"


def journal_name(session: str) -> str:
    """A driver session's journal segment, relative to the sweep's folder."""
    return f"{TRACKING_DIR}/journal-{session}.jsonl"


def acked_name(session: str) -> str:
    """How far each MLflow server has a session's segment, relative to the sweep's folder."""
    return f"{TRACKING_DIR}/acked-{session}.json"


# The dataset version in the spec record: the digest and generation trials read now, every
# generation any of them read (`data gc` keeps those), and each change allowed on the way.
DATASET_DIGEST = "dataset_digest"
DATASET_GENERATION = "dataset_generation"
DATASET_GENERATIONS = "dataset_generations"
DATASET_CHANGES = "dataset_changes"
ALLOW_FLAG = "--allow-dataset-change"


class DatasetChangedError(UserError, RuntimeError):
    """The dataset was replaced since the sweep began; the message names both digests."""


def dataset_version(
    recorded: dict[str, Any] | None,
    name: str,
    dataset_uri: str,
    digest: str,
    generation: str,
    allow_change: bool,
    command: str,
) -> dict[str, Any]:
    """The spec-record keys for the dataset version `command` will read.

    `recorded` is the sweep's spec record (None for a new sweep); `digest` and `generation`
    are the dataset's current ones. Unchanged (or a new sweep): the current version. Changed:
    `DatasetChangedError`, unless `allow_change`, which moves to the current version and notes
    the change. A sweep recorded before datasets had versions takes the current one.
    """
    record = {DATASET_DIGEST: digest, DATASET_GENERATION: generation}
    if recorded is None:
        return {**record, DATASET_GENERATIONS: [generation]}
    before = recorded.get(DATASET_DIGEST)
    seen = list(recorded.get(DATASET_GENERATIONS) or [])
    if before and before != digest:
        if not allow_change:
            raise DatasetChangedError(
                f"dataset {dataset_uri} changed since sweep {name!r} began: its digest was "
                f"{before[:12]} and is now {digest[:12]}, so {command} would train on other "
                f"data than the sweep's trials; pass {ALLOW_FLAG} to use the current version "
                "anyway, or prepare the old data again (same input and options) to restore it"
            )
        change = {"from": before, "to": digest, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        changes = [*recorded.get(DATASET_CHANGES, []), {**change, "by": command}]
        return {**record, DATASET_GENERATIONS: [*seen, generation], DATASET_CHANGES: changes}
    if generation not in seen:
        seen.append(generation)
    return {**record, DATASET_GENERATIONS: seen}


# `chestxpert final` keeps every model it publishes; relative to the sweep folder:
FINAL_DIR = "final"
FINAL_STAGING = f"{FINAL_DIR}/staging"  # <attempt>/model: a retrain's epochs; never served
FINAL_VERSIONS = f"{FINAL_DIR}/versions"  # <N>/: published versions 1, 2, …; N is never reused
FINAL_POINTER = f"{FINAL_DIR}/current.json"  # the version `champion` names; written last
LEGACY_FINAL_MODEL = f"{FINAL_DIR}/model"  # where releases before versions put the one model
# Inside a version folder: the model (thresholds in its state.json), the report, what the
# version is (metric, attempt), and SHA256SUMS, written last, that `sha256sum -c` can read.
VERSION_MODEL = "model"
VERSION_REPORT = "report"
VERSION_INFO = "version.json"
VERSION_CHECKSUMS = "SHA256SUMS"


@dataclass(frozen=True)
class SweepLocation:
    """Where a sweep lives in storage: Tune's experiment folder `<storage>/<name>`."""

    fs: Any
    root: str  # storage root path on `fs` (no scheme)
    name: str
    uri: str  # human-readable, e.g. s3://bucket/prefix/name

    @property
    def path(self) -> str:
        return f"{self.root}/{self.name}"

    @property
    def is_local(self) -> bool:
        """True for a folder on this machine (appendable); False for object storage."""
        import pyarrow.fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    def read_bytes(self, filename: str) -> bytes | None:
        """The file `filename` (relative to the sweep's folder), or None when it is missing."""
        import pyarrow.fs as pafs

        target = f"{self.path}/{filename}"
        if self.fs.get_file_info(target).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(target) as stream:
            return stream.read()

    def read_json(self, filename: str) -> dict[str, Any] | None:
        data = self.read_bytes(filename)
        return None if data is None else json.loads(data)

    def write_bytes(self, filename: str, data: bytes) -> None:
        """Write `filename` (a path under the sweep folder) whole, so a reader never sees half."""
        write_whole(self.fs, f"{self.path}/{filename}", data)

    def write_json(self, filename: str, payload: dict[str, Any]) -> None:
        self.write_bytes(
            filename, json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        )

    def list_files(self, folder: str) -> list[str]:
        """Names of the files directly in `folder` (relative to the sweep's folder), sorted."""
        import pyarrow.fs as pafs

        target = f"{self.path}/{folder}"
        if self.fs.get_file_info(target).type != pafs.FileType.Directory:
            return []
        selector = pafs.FileSelector(target, recursive=False)
        return sorted(
            info.base_name
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File
        )


def write_whole(fs: Any, path: str, data: bytes) -> None:
    """Put `data` at `path` on pyarrow filesystem `fs` so a reader sees the old file or the new one.

    An S3 object appears only once its upload completes, so S3 gets one upload; a local or
    other filesystem gets a hidden temporary file beside the target, then a rename.
    """
    folder, _, name = path.rpartition("/")
    fs.create_dir(folder, recursive=True)
    if fs.type_name == "s3":
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    partial = f"{folder}/.{name}.partial"
    with fs.open_output_stream(partial) as stream:
        stream.write(data)
    fs.move(partial, path)


def locate(endpoints: Endpoints, name: str) -> SweepLocation:
    """The storage location of sweep `name` under the resolved storage root."""
    fs, root = storage_filesystem(endpoints)
    return SweepLocation(fs, root, name, f"{endpoints.storage_uri}/{name}")
