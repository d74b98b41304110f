"""Where a sweep lives in storage, shared by `sweeps` and `results`: Tune's experiment folder
`<storage>/<name>` holding our spec record and, once the sweep ends, its summary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chestxpert.cluster.endpoints import Endpoints, storage_filesystem

SPEC_FILE = "chestxpert_spec.json"  # the spec as run, the parent MLflow run id
SUMMARY_FILE = "chestxpert_summary.json"  # best trial, config and checkpoint; written at the end


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

    def read_json(self, filename: str) -> dict[str, Any] | None:
        import pyarrow.fs as pafs

        target = f"{self.path}/{filename}"
        if self.fs.get_file_info(target).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(target) as stream:
            return json.loads(stream.read())

    def write_json(self, filename: str, payload: dict[str, Any]) -> None:
        self.fs.create_dir(self.path, recursive=True)
        data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        partial = f"{self.path}/.{filename}.partial"
        with self.fs.open_output_stream(partial) as stream:
            stream.write(data)
        self.fs.move(partial, f"{self.path}/{filename}")


def locate(endpoints: Endpoints, name: str) -> SweepLocation:
    """The storage location of sweep `name` under the resolved storage root."""
    fs, root = storage_filesystem(endpoints)
    return SweepLocation(fs, root, name, f"{endpoints.storage_uri}/{name}")
