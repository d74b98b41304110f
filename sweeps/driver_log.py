"""The driver's console log: `sweep run` and `sweep resume` copy all they print (stdout and
stderr: our lines, Tune's progress, trial output Ray forwards) to `driver-<session>.log`.

Where: `<sweep>/logs/` when the storage is a local folder, written as it goes. Object storage
cannot append, so there the log is written on the driver's machine in
`<workspace>/logs/sweeps/<name>-<key>/` and uploaded to `<sweep>/logs/` when the driver ends. A
submitted job's driver writes none: Ray's Jobs API keeps the job's logs.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from chestxpert.sweeps.layout import SweepLocation
from chestxpert.sweeps.lease import submitted_job_id

LOGS_DIR = "logs"  # relative to the sweep's folder


def log_name(session: str) -> str:
    """A driver session's log file name; names sort by the session's start time."""
    return f"driver-{session}.log"


def session_of(filename: str) -> str:
    """The driver session a log file name belongs to."""
    return filename.removeprefix("driver-").removesuffix(".log")


def machine_folder(location: SweepLocation, workspace: Path) -> Path:
    """Where this machine writes the logs of a sweep kept in object storage."""
    key = hashlib.sha256(location.uri.encode()).hexdigest()[:16]
    return workspace / "logs" / "sweeps" / f"{location.name}-{key}"


def writing_path(location: SweepLocation, workspace: Path, session: str) -> Path:
    """The file a driver on this machine writes its log to while it runs."""
    if location.is_local:
        return Path(location.path) / LOGS_DIR / log_name(session)
    return machine_folder(location, workspace) / log_name(session)


class _Tee:
    """Copies what this process writes to file descriptors 1 and 2 (children included) into
    `path` too, through a pipe per descriptor and a thread per pipe."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "ab", buffering=0)
        self.lock = threading.Lock()
        self.saved: dict[int, int] = {}
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            read_end, write_end = os.pipe()
            self.saved[fd] = os.dup(fd)
            os.dup2(write_end, fd)
            os.close(write_end)
            thread = threading.Thread(
                target=self._copy, args=(read_end, self.saved[fd]), name="driver-log", daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def _copy(self, read_end: int, terminal: int) -> None:
        while chunk := os.read(read_end, 65536):
            try:
                os.write(terminal, chunk)
            except OSError:  # the terminal went away: the log still gets everything
                pass
            try:
                with self.lock:
                    self.file.write(chunk)
            except (OSError, ValueError):
                pass
        os.close(read_end)

    def stop(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)  # closes our write end; the pipe ends when children close theirs
        for thread in self.threads:
            thread.join(timeout=2.0)  # a child that outlives the driver keeps its copy open
        if not any(thread.is_alive() for thread in self.threads):
            for saved in self.saved.values():
                os.close(saved)
            self.file.close()


@contextmanager
def console_log(location: SweepLocation, workspace: Path, session: str) -> Iterator[Path | None]:
    """Copy this driver's console to its log while the block runs; yield the log's path (None
    for a submitted job's driver). With object storage the log is uploaded at the end."""
    if submitted_job_id() is not None:
        yield None
        return
    path = writing_path(location, workspace, session)
    tee = _Tee(path)
    tee.start()
    try:
        where = path if location.is_local else f"{path} (uploaded to {location.uri}/{LOGS_DIR}/)"
        print(f"driver log: {where}", flush=True)
        yield path
    finally:
        tee.stop()
        if not location.is_local:
            try:
                location.write_bytes(f"{LOGS_DIR}/{path.name}", path.read_bytes())
            except Exception as err:  # the log stays on this machine; `sweep logs` finds it here
                print(f"warning: could not upload {path} ({type(err).__name__})", file=sys.stderr)
