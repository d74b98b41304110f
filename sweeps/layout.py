"""Where a sweep lives in storage, shared by `sweeps` and `results`: Tune's experiment folder
`<storage>/<name>` holding our spec record, lease, tracking journal and, at the end, summary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chestxpert.cluster.endpoints import Endpoints, storage_filesystem

SPEC_FILE = "chestxpert_spec.json"  # the spec as run, the parent MLflow run id and server
SUMMARY_FILE = "chestxpert_summary.json"  # best trial, config and checkpoint; written at the end
# Who is writing the sweep now (sweeps/lease.py); JSON inside. Not `*.json`: Tune's restore
# copies the folder's top-level *.json and *.pkl files to the driver and uploads them back at
# every snapshot, which would roll a lease back to the heartbeat it had at restore.
LEASE_FILE = "chestxpert.lease"
TRACKING_DIR = "tracking"  # one journal segment per driver session, and what MLflow has of it


def journal_name(session: str) -> str:
    """A driver session's journal segment, relative to the sweep's folder."""
    return f"{TRACKING_DIR}/journal-{session}.jsonl"


def acked_name(session: str) -> str:
    """How far each MLflow server has a session's segment, relative to the sweep's folder."""
    return f"{TRACKING_DIR}/acked-{session}.json"


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
        """Write `filename` whole, so a reader never sees half of it.

        An object in S3 appears only when its upload completes; a local file is written
        under a temporary name and then renamed.
        """
        folder, _, base = f"{self.path}/{filename}".rpartition("/")
        self.fs.create_dir(folder, recursive=True)
        if not self.is_local:
            with self.fs.open_output_stream(f"{folder}/{base}") as stream:
                stream.write(data)
            return
        partial = f"{folder}/.{base}.partial"
        with self.fs.open_output_stream(partial) as stream:
            stream.write(data)
        self.fs.move(partial, f"{folder}/{base}")

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


def locate(endpoints: Endpoints, name: str) -> SweepLocation:
    """The storage location of sweep `name` under the resolved storage root."""
    fs, root = storage_filesystem(endpoints)
    return SweepLocation(fs, root, name, f"{endpoints.storage_uri}/{name}")
