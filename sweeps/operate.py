"""`chestxpert sweep stop|logs`: find the driver of a sweep (a `sweep run` process on this machine,
or a job submitted through Ray's Jobs API), stop it so that `sweep resume` continues, show its logs.

The sweep's lease (sweeps/lease.py) names the running driver: host, pid, and the Ray job of a
submitted one. A submitted job that has not yet taken the lease (its runtime environment is
being set up) is found through the job metadata `sweep submit` sets.
"""

from __future__ import annotations

import asyncio
import calendar
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chestxpert.cluster.errors import UserError
from chestxpert.cluster.processes import is_ours, process_start_time
from chestxpert.sweeps.driver_log import LOGS_DIR, log_name, machine_folder, session_of
from chestxpert.sweeps.layout import SPEC_FILE, SUMMARY_FILE, SweepLocation
from chestxpert.sweeps.lease import read_holder

SWEEP_METADATA = "chestxpert_sweep"  # the Jobs API metadata key `sweep submit` sets to the name
# Set in a submitted job's environment: Ray's job supervisor then stops the driver with SIGINT
# (Tune's graceful stop) and waits this long before SIGKILL (its default is SIGTERM and 3 s).
JOB_STOP_ENV = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "120"}
ACTIVE_JOB = ("PENDING", "RUNNING")

Say = Callable[[str], None]


class StopError(UserError):
    """The sweep has no driver this command can stop; the message says why and what to do."""


def sweep_jobs(client, name: str) -> list:
    """The Jobs API's jobs submitted for sweep `name`, newest first."""
    jobs = [job for job in client.list_jobs() if (job.metadata or {}).get(SWEEP_METADATA) == name]
    return sorted(jobs, key=lambda job: job.start_time or 0, reverse=True)


def _not_running(location: SweepLocation, holder: dict[str, Any] | None) -> str:
    name = location.name
    if holder is not None:
        return (
            f"sweep {name!r} is not running: its last driver ({holder.get('owner')}, pid "
            f"{holder.get('pid')} on {holder.get('host')}) is gone without releasing the sweep; "
            f"continue it with `chestxpert sweep resume {name} --force`"
        )
    if location.read_bytes(SPEC_FILE) is None:
        return f"no sweep named {name!r} in {location.uri.rsplit('/', 1)[0]} (pass --storage?)"
    if location.read_json(SUMMARY_FILE) is not None:
        return f"sweep {name!r} is not running: it finished (`chestxpert sweep status {name}`)"
    return (
        f"sweep {name!r} is not running (no driver holds it); continue it with "
        f"`chestxpert sweep resume {name}`"
    )


def stop_sweep(
    location: SweepLocation, jobs: Callable[[], Any] | None, timeout_s: float, say: Say = print
) -> bool:
    """Stop the driver of the sweep at `location` and wait up to `timeout_s` for it to end.

    `jobs` makes a Jobs API client (None when no dashboard address is known). Returns True when
    the driver ended in time. Raises StopError when nothing runs the sweep, or when its driver
    runs on another host.
    """
    holder = read_holder(location)
    if holder is not None and holder["live"]:
        if holder.get("ray_job"):
            if jobs is None:
                raise StopError(
                    f"sweep {location.name!r} runs as Ray job {holder['ray_job']}: pass the "
                    "cluster's dashboard with --address http://HEAD:8265"
                )
            return _stop_job(jobs(), holder["ray_job"], location.name, timeout_s, say)
        if holder.get("host") != socket.gethostname():
            raise StopError(
                f"sweep {location.name!r} is driven by pid {holder.get('pid')} on "
                f"{holder.get('host')}, not on this host ({socket.gethostname()}): run "
                f"`chestxpert sweep stop {location.name}` there"
            )
        return _stop_local(location.name, holder, timeout_s, say)
    if jobs is not None:
        active = [job for job in sweep_jobs(jobs(), location.name) if job.status in ACTIVE_JOB]
        if active:
            return _stop_job(jobs(), active[0].submission_id, location.name, timeout_s, say)
    raise StopError(_not_running(location, holder))


def _stop_local(name: str, holder: dict[str, Any], timeout_s: float, say: Say) -> bool:
    pid = int(holder["pid"])
    started = process_start_time(pid)
    if started is None:
        raise StopError(f"sweep {name!r}: its driver pid {pid} just ended")
    os.kill(pid, signal.SIGINT)
    say(
        f"sent SIGINT to the driver of sweep {name!r} (pid {pid}, `chestxpert "
        f"{holder.get('command')}`); waiting up to {timeout_s:.0f} s while Tune saves its state"
    )
    began = time.monotonic()
    while is_ours(pid, started):
        if time.monotonic() - began > timeout_s:
            say(
                f"pid {pid} is still running after {timeout_s:.0f} s: see `chestxpert sweep logs "
                f"{name}`; `kill {pid}` ends it at once (then `sweep resume {name} --force`)"
            )
            return False
        time.sleep(0.5)
    say(
        f"the driver (pid {pid}) exited after {time.monotonic() - began:.0f} s; continue the "
        f"sweep with `chestxpert sweep resume {name}`"
    )
    return True


def _stop_job(client, job_id: str, name: str, timeout_s: float, say: Say) -> bool:
    client.stop_job(job_id)
    say(f"asked Ray to stop job {job_id} (sweep {name!r}); waiting up to {timeout_s:.0f} s")
    began = time.monotonic()
    while True:
        status = str(client.get_job_status(job_id))
        if status not in ACTIVE_JOB:
            break
        if time.monotonic() - began > timeout_s:
            say(f"job {job_id} is still {status} after {timeout_s:.0f} s")
            return False
        time.sleep(1.0)
    say(
        f"job {job_id} ended {status} after {time.monotonic() - began:.0f} s; continue the sweep "
        f"with `chestxpert sweep resume {name}` (or submit it again)"
    )
    return True


# --- logs ---------------------------------------------------------------------------------


def _driver_logs(location: SweepLocation, workspace: Path) -> dict[str, Path | None]:
    """Log file name -> a path on this machine (None: only in object storage), oldest first."""
    found: dict[str, Path | None] = {name: None for name in location.list_files(LOGS_DIR)}
    if location.is_local:
        found = {name: Path(location.path) / LOGS_DIR / name for name in found}
    else:
        folder = machine_folder(location, workspace)
        for path in folder.glob("driver-*.log") if folder.is_dir() else ():
            found[path.name] = path
    return dict(sorted(found.items()))


def show_logs(
    location: SweepLocation,
    workspace: Path,
    jobs: Callable[[], Any] | None,
    follow: bool,
    out: Callable[[str], None],
) -> None:
    """Print the logs of the sweep's newest driver: a submitted job's from the Jobs API, a local
    driver's from its log file; `follow` keeps printing until that driver ends."""
    holder = read_holder(location)
    live = holder is not None and holder["live"]
    files = _driver_logs(location, workspace)
    newest = next(reversed(files), None)
    job_id = holder.get("ray_job") if live else None
    if not live and jobs is not None:
        # not running now: the newest driver is the last job submitted or the last log written
        try:
            submitted = sweep_jobs(jobs(), location.name)
        except Exception:  # no Jobs API there (the local stack is down): the log files remain
            submitted = []
        if submitted and (
            newest is None
            or (submitted[0].start_time or 0) / 1000 > _session_time(session_of(newest))
            or submitted[0].status in ACTIVE_JOB
        ):
            job_id = submitted[0].submission_id
    if job_id:
        if jobs is None:
            raise StopError(
                f"sweep {location.name!r} runs as Ray job {job_id}: pass the cluster's dashboard "
                "with --address http://HEAD:8265"
            )
        _job_logs(jobs(), job_id, follow, out)
        return
    if newest is None:
        raise StopError(
            f"no driver log for sweep {location.name!r} in {location.uri}/{LOGS_DIR}"
            + ("" if location.is_local else f" nor in {machine_folder(location, workspace)}")
            + ("" if jobs is not None else "; for a submitted sweep, pass --address")
        )
    path = files[newest]
    if path is None:
        out((location.read_bytes(f"{LOGS_DIR}/{newest}") or b"").decode(errors="replace"))
        return
    driving = live and log_name(holder.get("session", "")) == newest
    _print_file(path, follow and driving, location, holder, out)


def _session_time(session: str) -> float:
    try:  # sessions start with their UTC start time (sweeps/journal.py)
        return float(calendar.timegm(time.strptime(session[:16], "%Y%m%dT%H%M%SZ")))
    except ValueError:
        return 0.0


def _print_file(path: Path, follow: bool, location: SweepLocation, holder, out) -> None:
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(65536)
            if chunk:
                out(chunk.decode(errors="replace"))
                continue
            if not follow:
                return
            current = read_holder(location)
            if current is None or current.get("session") != holder.get("session"):
                follow = False  # the driver released the sweep: one last read, then stop
                continue
            time.sleep(0.5)


def _job_logs(client, job_id: str, follow: bool, out) -> None:
    if not follow:
        out(client.get_job_logs(job_id))
        return

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out(lines)

    asyncio.run(tail())
