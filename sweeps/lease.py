"""One writer per sweep: `<sweep>/chestxpert.lease` names the driver writing the sweep (owner, host,
pid, heartbeat); `sweep run`, `sweep resume` and a submitted job's driver take it first.

A second writer is refused with the holder's name. A heartbeat thread refreshes the lease every
HEARTBEAT_SECONDS; a lease whose heartbeat is older than STALE_SECONDS (or whose pid is gone
from this host) can be taken with `--force`. On S3 every write is conditional (If-None-Match /
If-Match on the object's ETag), so two writers can never both win; on a folder, creation is
atomic (a hard link) and a `--force` takeover is a compare-then-rename with a small race window.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from chestxpert.cluster.endpoints import Endpoints, s3_client
from chestxpert.cluster.errors import UserError
from chestxpert.sweeps.layout import LEASE_FILE, SweepLocation

HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 3 * HEARTBEAT_SECONDS  # 45 s: three missed heartbeats
LOST_EXIT_CODE = 75  # the driver stops at once when another writer took its lease


class LeaseError(UserError):
    """The sweep has another writer, or its lease cannot be taken; the message says who."""


def _now() -> datetime:
    return datetime.now(UTC)


class _FolderStore:
    """The lease as a file in a local (or shared, e.g. NFS) folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.made_folder = not path.parent.exists()

    def read(self) -> tuple[bytes | None, Any]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        return data, data

    def _temporary(self, data: bytes) -> str:
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return name

    def create(self, data: bytes) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        name = self._temporary(data)
        try:
            os.link(name, self.path)  # atomic, fails if the lease exists, never half-written
        except FileExistsError:
            return None
        finally:
            os.unlink(name)
        return data

    def replace(self, data: bytes, expected: Any) -> Any:
        name = self._temporary(data)
        current, _ = self.read()
        if current != expected:
            os.unlink(name)
            return None
        os.replace(name, self.path)
        return data

    def delete(self, expected: Any) -> None:
        current, _ = self.read()
        if current == expected:
            self.path.unlink(missing_ok=True)
            if self.made_folder:
                try:
                    self.path.parent.rmdir()  # only if empty: a sweep that never started
                except OSError:
                    pass


class _S3Store:
    """The lease as an S3 object, written only with If-None-Match / If-Match conditions."""

    def __init__(self, endpoints: Endpoints, path: str) -> None:
        self.client = s3_client(endpoints)
        self.bucket, _, self.key = path.partition("/")

    @staticmethod
    def _precondition_failed(err: Exception) -> bool:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "NoSuchKey")

    def read(self) -> tuple[bytes | None, Any]:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        return answer["Body"].read(), answer["ETag"]

    def create(self, data: bytes) -> Any:
        try:
            answer = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*"
            )
        except Exception as err:
            if self._precondition_failed(err):
                return None
            raise
        return answer["ETag"]

    def replace(self, data: bytes, expected: Any) -> Any:
        try:
            answer = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=data, IfMatch=expected
            )
        except Exception as err:
            if self._precondition_failed(err):
                return None
            raise
        return answer["ETag"]

    def delete(self, expected: Any) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=expected)
        except Exception as err:
            if not self._precondition_failed(err):
                raise


def _store(location: SweepLocation, endpoints: Endpoints):
    if location.is_local:
        return _FolderStore(Path(location.path) / LEASE_FILE)
    return _S3Store(endpoints, f"{location.path}/{LEASE_FILE}")


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container user with no passwd entry
        return str(os.getuid())


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def submitted_job_id() -> str | None:
    """The Ray Jobs API submission id when this process is a submitted job's entrypoint, else
    None. Ray hands the entrypoint its job config, metadata included, in this variable."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return config.get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def read_holder(location: SweepLocation) -> dict[str, Any] | None:
    """The sweep's lease as stored, with `age_s` (seconds since its heartbeat) and `live`
    (heartbeat fresh and, on this host, the pid running); None when nobody holds it."""
    data = location.read_bytes(LEASE_FILE)
    return None if data is None else _describe(data)


def _describe(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
        beat = datetime.fromisoformat(holder["heartbeat"])
        holder["age_s"] = max(0.0, (_now() - beat).total_seconds())
    except (ValueError, KeyError, TypeError):
        return {"owner": "?", "host": "?", "pid": 0, "command": "?", "age_s": None, "live": False}
    here = holder.get("host") == socket.gethostname()
    holder["gone_here"] = here and _pid_gone(int(holder.get("pid", 0)))
    holder["live"] = holder["age_s"] <= STALE_SECONDS and not holder["gone_here"]
    return holder


def _refusal(location: SweepLocation, holder: dict[str, Any], force: bool) -> str:
    who = (
        f"sweep {location.name!r} is being written by {holder.get('owner')} "
        f"(pid {holder.get('pid')} on {holder.get('host')}, `chestxpert {holder.get('command')}`)"
    )
    if holder["age_s"] is None:
        return (
            f"{location.uri}/{LEASE_FILE} is not a lease ChestXpert can read; if no driver is "
            "writing the sweep, take it with --force"
        )
    beat = f"last heartbeat {holder['age_s']:.0f} s ago"
    if holder.get("gone_here"):
        return (
            f"{who}, {beat}, but pid {holder.get('pid')} is not running on this host: if that "
            "driver is gone, take the lease with --force"
        )
    if holder["age_s"] > STALE_SECONDS:
        return (
            f"{who}, {beat} (stale after {STALE_SECONDS:.0f} s): if that driver is gone, "
            "take the lease with --force"
        )
    refused = " --force takes only a stale lease;" if force else ""
    return f"{who}, {beat};{refused} wait for it to end, or stop it first"


class Lease:
    """A held lease: refreshed by a daemon thread until `release`."""

    def __init__(self, location: SweepLocation, store, payload: dict[str, Any], tag: Any) -> None:
        self.location = location
        self.payload = payload
        self._store = store
        self._tag = tag
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._beat, name="sweep-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            payload = {**self.payload, "heartbeat": _now().isoformat()}
            try:
                tag = self._store.replace(json.dumps(payload, indent=2).encode(), self._tag)
            except Exception as err:  # storage away for a moment: the lease goes stale only at 45 s
                if not self._warned:
                    print(
                        f"warning: could not refresh {self.location.uri}/{LEASE_FILE} "
                        f"({type(err).__name__}); retrying",
                        flush=True,
                    )
                    self._warned = True
                continue
            if tag is None:
                tag = self._still_ours(payload)
            self._tag, self.payload = tag, payload

    def _still_ours(self, payload: dict[str, Any]) -> Any:
        # The lease changed under us. An older copy of our own lease (a storage tool that
        # re-uploads what it read) is rewritten; another driver's lease means we lost it.
        data, tag = self._store.read()
        if data is not None and _describe(data).get("session") == self.payload["session"]:
            written = self._store.replace(json.dumps(payload, indent=2).encode(), tag)
            if written is not None:
                return written
        self._lost()

    def _lost(self) -> NoReturn:
        # Another driver took the lease with --force: it now writes the sweep, so this one
        # must write nothing more, not even Tune's end-of-run state. Ray ends our trials.
        data, _ = self._store.read()
        holder = _describe(data) if data else {"owner": "nobody", "pid": "?", "host": "?"}
        print(
            f"error: the lease of sweep {self.location.name!r} was taken by "
            f"{holder.get('owner')} (pid {holder.get('pid')} on {holder.get('host')}); "
            "this driver stops now so that one writer alone writes the sweep",
            file=sys.stderr,
            flush=True,
        )
        os._exit(LOST_EXIT_CODE)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, if it is still ours."""
        self._stop.set()
        self._thread.join()
        try:
            self._store.delete(self._tag)
        except Exception as err:
            print(
                f"warning: could not remove {self.location.uri}/{LEASE_FILE} "
                f"({type(err).__name__}); the next writer may need --force after "
                f"{STALE_SECONDS:.0f} s",
                flush=True,
            )


def acquire(
    location: SweepLocation,
    endpoints: Endpoints,
    command: str,
    session: str,
    force: bool = False,
) -> Lease:
    """Take the sweep's lease for this process, or raise LeaseError naming who holds it.

    `command` (e.g. `sweep run NAME`) is shown to a refused writer; `force` takes a lease
    whose heartbeat is stale or whose pid is gone from this host, never a live one.
    """
    store = _store(location, endpoints)
    host = socket.gethostname()
    now = _now().isoformat()
    payload = {
        "owner": f"{_user()}@{host}",
        "host": host,
        "pid": os.getpid(),
        "started": now,
        "heartbeat": now,
        "command": command,
        "session": session,
        "ray_job": submitted_job_id(),  # a submitted driver is stopped through the Jobs API
    }
    data = json.dumps(payload, indent=2).encode()
    for _ in range(3):  # a holder may release between our attempt and our look
        tag = store.create(data)
        if tag is not None:
            return Lease(location, store, payload, tag)
        current, current_tag = store.read()
        if current is None:
            continue
        holder = _describe(current)
        if holder["live"] or not force:
            raise LeaseError(_refusal(location, holder, force))
        tag = store.replace(data, current_tag)
        if tag is not None:
            print(
                f"took the lease of sweep {location.name!r} from {holder.get('owner')} "
                f"(pid {holder.get('pid')} on {holder.get('host')})",
                flush=True,
            )
            return Lease(location, store, payload, tag)
    raise LeaseError(
        f"sweep {location.name!r}: another driver took the lease at the same moment; "
        f"see `{location.uri}/{LEASE_FILE}`"
    )
