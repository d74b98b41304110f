"""What the benchmarks share: run a benchmark's child function in a fresh interpreter, and a
scratch folder that is removed whatever happens.

A child is a plain module-level function `f(spec: dict) -> dict`; `run_child(f, spec)` runs
`python -m benchmarks.child MODULE:FUNCTION SPEC_JSON` from the repository root and returns
the dict `f` returned. Each side of a comparison thus starts with nothing imported and no
TensorFlow or Ray state left by the other side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chestxpert.cluster.processes import stop_group

REPO = Path(__file__).resolve().parent.parent
# The line of a child's stdout that carries its result; TF, Ray and MLflow print too.
RESULT_PREFIX = "chestxpert-bench-result: "

ChildFunction = Callable[[dict[str, Any]], dict[str, Any]]


def run_child(
    function: ChildFunction,
    spec: dict[str, Any],
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """Run `function(spec)` in a fresh interpreter with `env` added to this one's environment,
    and return its result; raise with the child's output tail if it fails or outlives
    `timeout` seconds."""
    target = f"{function.__module__}:{function.__qualname__}"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.child", target, json.dumps(spec)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"{target} failed (exit code {result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


@contextmanager
def scratch_dir(prefix: str = "cxb-") -> Iterator[Path]:
    """A new folder under the system temp dir, removed on the way out. Its path is short, and
    Ray's folder inside a workspace is kept short by `chestxpert.cluster.stack.ray_temp_dir`."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def services() -> Iterator[list[dict[str, Any]]]:
    """A list for the records of started services (`chestxpert.cluster.stack.start_*`); those
    still in it on the way out are stopped, last started first."""
    records: list[dict[str, Any]] = []
    try:
        yield records
    finally:
        stop_all(records)


def stop_all(records: list[dict[str, Any]]) -> None:
    """Stop every service in `records`, last started first, and empty the list."""
    while records:
        record = records.pop()
        stop_group(record["pid"], record["start_time"])
