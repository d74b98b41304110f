"""The tracking journal: every MLflow event of a sweep driver, appended to the sweep's storage
before it is sent, so `sweep resume` and `sweep mlflow-sync` can replay what a dead driver lost.

One JSON line per event in `<sweep>/tracking/journal-<session>.jsonl`, one segment per driver
session. A local storage folder is appended to directly. Object storage cannot append, so the
segment is written to a buffer in the workspace and uploaded every SYNC_SECONDS and at close,
in parts of about PART_BYTES (`journal-<session>-p00001.jsonl`, …) so an upload never grows
with the sweep; a driver killed between two uploads leaves its buffer for the next command on
the same machine (`upload_leftovers`). `acked-<session>.json` says, per MLflow server, up to
which `seq` the server has the segment; replay skips that much and is idempotent beyond it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chestxpert.cluster.mlflow_runs import safe_uri
from chestxpert.sweeps.layout import TRACKING_DIR, SweepLocation, acked_name, journal_name

SYNC_SECONDS = 5.0  # upload interval of an object-storage segment, and of the acked marker
BUFFER_FOLDER = "journal-buffer"  # under the workspace: segments on their way to object storage
PART_BYTES = 256 * 1024  # an object-storage part is closed once it holds this much
_SEGMENT_FILE = re.compile(r"^journal-(.+?)(?:-p(\d{5}))?\.jsonl$")


def new_session() -> str:
    """A driver session's name: UTC start time, pid and a random suffix; sorts by start time."""
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{started}-{os.getpid()}-{secrets.token_hex(3)}"


def buffer_folder(workspace: Path, location: SweepLocation) -> Path:
    """Where this machine buffers the journal of the sweep at `location` (object storage only)."""
    key = hashlib.sha256(location.uri.encode()).hexdigest()[:16]
    return workspace / BUFFER_FOLDER / f"{location.name}-{key}"


class Journal:
    """This driver session's segment: `append` writes and flushes a line before returning.

    Thread-safe: Tune's event loop appends, the MLflow sender acknowledges, and a daemon
    thread uploads (object storage) and writes the acked marker every SYNC_SECONDS.
    Flushed, not fsynced: a killed process loses nothing the OS was given; a machine that
    loses power may lose the last lines, which Tune's result.json files still hold.
    """

    def __init__(self, location: SweepLocation, session: str, workspace: Path) -> None:
        self.location = location
        self.session = session
        if location.is_local:
            self.local_path = Path(location.path) / journal_name(session)
        else:
            self.local_path = buffer_folder(workspace, location) / f"journal-{session}.jsonl"
        self.local_path.parent.mkdir(parents=True, exist_ok=True)
        if not location.is_local:
            (self.local_path.parent / "location.txt").write_text(location.uri + "\n")
        self._file = open(self.local_path, "a", encoding="utf-8")
        self.seq = 0
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._acked: dict[str, int] = {}
        self._acked_written: dict[str, int] = {}
        self._part = 1  # object storage: the part being uploaded, and where it starts
        self._part_start = 0
        self._uploaded = 0
        self._warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Journal one event (`kind`: parent, start, metrics, end); returns it with its `seq`."""
        with self._lock:
            self.seq += 1
            event = {"seq": self.seq, "kind": kind}
            event.update((key, value) for key, value in fields.items() if value is not None)
            self._file.write(json.dumps(event, separators=(",", ":"), default=str) + "\n")
            self._file.flush()
        if self._thread is None:
            self._thread = threading.Thread(target=self._sync_loop, name="journal", daemon=True)
            self._thread.start()
        return event

    def acknowledge(self, tracking_uri: str, seq: int) -> None:
        """Note that the MLflow server at `tracking_uri` has every event up to `seq`."""
        key = safe_uri(tracking_uri)
        with self._lock:
            self._acked[key] = max(seq, self._acked.get(key, 0))

    def sync(self) -> None:
        """Upload the segment (object storage) and the acked marker, where they changed."""
        with self._sync_lock:
            if not self.location.is_local:
                data = self.local_path.read_bytes()
                whole = data[: data.rfind(b"\n") + 1]  # never a line still being written
                if len(whole) > self._uploaded:
                    part = whole[self._part_start :]
                    self.location.write_bytes(part_name(self.session, self._part), part)
                    self._uploaded = len(whole)
                    if len(part) >= PART_BYTES:
                        self._part, self._part_start = self._part + 1, len(whole)
            with self._lock:
                acked = dict(self._acked)
            if acked != self._acked_written:
                self.location.write_json(acked_name(self.session), {"acked": acked})
                self._acked_written = acked

    def _sync_loop(self) -> None:
        while not self._stop.wait(SYNC_SECONDS):
            try:
                self.sync()
            except Exception as err:  # storage away: the buffer keeps everything; try again
                if not self._warned:
                    print(
                        f"warning: could not write the tracking journal to "
                        f"{self.location.uri}/{TRACKING_DIR} ({type(err).__name__}); retrying",
                        flush=True,
                    )
                    self._warned = True

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        """Stop the uploader, write what is left and close the segment; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._file.closed:
            self._file.close()
        try:
            self.sync()
        except Exception as err:  # storage away at the very end: the buffer still has it all
            print(
                f"warning: could not write the tracking journal to {self.location.uri}/"
                f"{TRACKING_DIR} ({type(err).__name__}); {self.local_path} keeps it, and the "
                f"next `chestxpert sweep resume` or `mlflow-sync` on this machine uploads it",
                flush=True,
            )


@dataclass
class Segment:
    """One session's journal as storage holds it."""

    session: str
    events: list[dict[str, Any]]
    acked: dict[str, int] = field(default_factory=dict)
    torn: int = 0  # lines that do not parse: the last one, cut by a crash

    def unsent(self, tracking_uri: str) -> list[dict[str, Any]]:
        """The events the MLflow server at `tracking_uri` has not acknowledged, oldest first."""
        done = self.acked.get(safe_uri(tracking_uri), 0)
        return [event for event in self.events if event.get("seq", 0) > done]


def part_name(session: str, part: int) -> str:
    """Part `part` (from 1) of a session's segment in object storage, relative to the sweep."""
    return f"{TRACKING_DIR}/journal-{session}-p{part:05d}.jsonl"


def _stored_parts(location: SweepLocation) -> dict[str, list[str]]:
    """Session -> the file names holding its segment, in order (one, or parts in S3)."""
    parts: dict[str, list[tuple[int, str]]] = {}
    for filename in location.list_files(TRACKING_DIR):
        found = _SEGMENT_FILE.match(filename)
        if found:
            number = int(found.group(2) or 0)
            parts.setdefault(found.group(1), []).append((number, filename))
    return {session: [name for _, name in sorted(files)] for session, files in parts.items()}


def read_segments(location: SweepLocation, exclude: tuple[str, ...] = ()) -> list[Segment]:
    """Every journal segment of the sweep, oldest session first, but the sessions in `exclude`."""
    segments = []
    for session, filenames in sorted(_stored_parts(location).items()):
        if session in exclude:
            continue
        data = b"".join(location.read_bytes(f"{TRACKING_DIR}/{name}") or b"" for name in filenames)
        events, torn, seen = [], 0, set()
        for line in data.decode("utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if event.get("seq") not in seen:  # a part uploaded twice holds its lines twice
                seen.add(event.get("seq"))
                events.append(event)
        marker = location.read_json(acked_name(session)) or {}
        segments.append(Segment(session, events, dict(marker.get("acked", {})), torn))
    return segments


def record_acked(location: SweepLocation, session: str, tracking_uri: str, seq: int) -> None:
    """Mark `session`'s segment as held up to `seq` by the MLflow server at `tracking_uri`."""
    marker = location.read_json(acked_name(session)) or {}
    acked = dict(marker.get("acked", {}))
    key = safe_uri(tracking_uri)
    if seq > acked.get(key, 0):
        acked[key] = seq
        location.write_json(acked_name(session), {"acked": acked})


def upload_leftovers(
    location: SweepLocation, workspace: Path, exclude: tuple[str, ...] = ()
) -> list[str]:
    """Upload what killed drivers left in this machine's buffer; return their sessions.

    Only for object storage (a local folder holds its segments already). Parts are whole-line
    slices of the buffer in order, so what storage lacks is the buffer past the bytes its
    parts hold; that goes up as one more part. The buffer itself is left in place. Sessions
    in `exclude` (a driver alive now) upload their own buffers.
    """
    if location.is_local:
        return []
    folder = buffer_folder(workspace, location)
    if not folder.is_dir():
        return []
    stored = _stored_parts(location)
    uploaded = []
    for path in sorted(folder.glob("journal-*.jsonl")):
        session = path.name[len("journal-") : -len(".jsonl")]
        if session in exclude:
            continue
        names = stored.get(session, [])
        held = sum(
            location.fs.get_file_info(f"{location.path}/{TRACKING_DIR}/{name}").size or 0
            for name in names
        )
        data = path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) > held:
            last = int(_SEGMENT_FILE.match(names[-1]).group(2) or 0) if names else 0
            location.write_bytes(part_name(session, last + 1), whole[held:])
            uploaded.append(session)
    return uploaded
