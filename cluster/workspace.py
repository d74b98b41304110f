"""The workspace folder: where runtime state (service logs, pids, local storage) lives.

Defaults to `.chestxpert/` in the current directory; `--workspace` or
`CHESTXPERT_WORKSPACE` move it. Nothing in it is ever committed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

WORKSPACE_ENV = "CHESTXPERT_WORKSPACE"
DEFAULT_WORKSPACE = ".chestxpert"
STATE_FILE = "services.json"


def workspace_path(flag: str | os.PathLike[str] | None = None) -> Path:
    """The absolute workspace folder: the flag, else `$CHESTXPERT_WORKSPACE`, else `./.chestxpert`.

    The folder is not created here; writers create what they need.
    """
    chosen = flag or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
    return Path(chosen).expanduser().resolve()


def write_json_atomic(path: Path, payload: Any, mode: int = 0o644) -> None:
    """Write `payload` as JSON to `path` through a temporary file and a rename.

    A reader sees either the old file or the whole new one, never half of it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def read_state(workspace: Path) -> dict[str, Any]:
    """Return the service state that `chestxpert up` recorded, or `{}` when nothing was started."""
    state_path = workspace / STATE_FILE
    if not state_path.exists():
        return {}
    try:
        return json.loads(state_path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(
            f"error: {state_path} is not valid JSON ({err}); "
            "if no ChestXpert services are running, delete it and run `chestxpert up` again"
        ) from None


def write_state(workspace: Path, state: dict[str, Any]) -> None:
    """Record the running services (pids, ports, URLs) in the workspace; no credentials go here."""
    write_json_atomic(workspace / STATE_FILE, state)
