"""Start service processes in their own session and stop exactly those, by session.

Every process we start leads a new session (so its session id is its pid); we
record the pid and its start time, and only ever signal that session. Process
bookkeeping goes through psutil, so it works wherever psutil does (Linux, macOS).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from chestxpert.cluster.errors import UserError


class ServiceError(UserError, RuntimeError):
    """A service could not be started or stopped; the message says what to do."""


def process_start_time(pid: int) -> float | None:
    """When `pid` started (seconds since the epoch, as psutil reports it), or None if gone.

    Recorded with every pid we start: a pid the kernel has reused has another start time.
    """
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_ours(pid: int, start_time: float | None) -> bool:
    """True when `pid` is alive and is the very process we started (not a reused pid)."""
    current = process_start_time(pid)
    return current is not None and (start_time is None or _same_start(current, start_time))


def _same_start(current: float, recorded: float) -> bool:
    # psutil derives the start time from boot time + ticks: equal within a tick or two.
    return abs(current - float(recorded)) < 0.05


def session_members(sid: int) -> list[int]:
    """Pids of live (non-zombie) processes in session `sid`.

    Ray's workers open process groups of their own inside the session, so the
    session, not the group, is what holds everything a service started.
    """
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(process.pid) == sid:
                members.append(process.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def boot_id() -> str:
    """An identifier of this boot of the machine: records from another boot name dead pids.

    Linux's own boot id where there is one, else the boot time (macOS and others).
    """
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"boot-{psutil.boot_time():.0f}"


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something already listens on `port` (on loopback or on all interfaces)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((host, port)) == 0:
            return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


# Below Linux's ephemeral range (32768-60999), from which outgoing connections take their
# local ports: a port handed out by asking the kernel for port 0 can be taken by some
# client's connection before the service binds it (seen: Ray's client server dying with
# "Failed to bind"). Ray's worker ports are 20000-29999 (cluster.stack).
FREE_PORTS = range(10000, 20000)
_port_rng = random.SystemRandom()  # trials seed the global random module; ports must not repeat


def free_port() -> int:
    """A TCP port free on every interface right now, outside the ephemeral range."""
    for _ in range(500):
        port = _port_rng.choice(FREE_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("0.0.0.0", port))  # bound, never listened on; closed at once
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port between {FREE_PORTS.start} and {FREE_PORTS.stop - 1}")


def spawn(
    cmd: list[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
) -> subprocess.Popen:
    """Start `cmd` as the leader of a new session, its output appended to `log_path`.

    `user` (a login name; only root may give one) runs it as that user with that user's
    group and no others: for servers that refuse to run as root, such as PostgreSQL.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    identity: dict = {}
    if user is not None:
        import pwd

        identity = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
            **identity,
        )


def spawn_service(
    cmd: list[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    on_spawn: Callable[[dict[str, Any]], None] | None = None,
    **fields: Any,
) -> tuple[subprocess.Popen, dict[str, Any]]:
    """`spawn` a service and make its record (pid, start time, log, and `fields` such as its url).

    `on_spawn` gets the record as soon as the process exists, before anyone waits for it: a
    caller killed while the service starts has already recorded what to stop.
    """
    proc = spawn(cmd, log_path, env=env)
    record = {
        "pid": proc.pid,
        "start_time": process_start_time(proc.pid),
        "log": str(log_path),
        **fields,
    }
    if on_spawn is not None:
        on_spawn(record)
    return proc, record


def log_tail(log_path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {log_path})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    name: str,
    check: Callable[[], bool],
    leader_pid: int,
    log_path: Path,
    timeout_s: float,
) -> None:
    """Poll `check` until true; fail with the log tail if the process dies or time runs out
    (then its session is stopped: the caller never got a record to stop it by)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(leader_pid)
        if process_start_time(leader_pid) is None:
            raise ServiceError(
                f"{name} exited during start-up. Last lines of {log_path}:\n{log_tail(log_path)}"
            )
        try:
            if check():
                return
        except Exception:  # a service that is still starting refuses connections
            pass
        time.sleep(0.5)
    # Not left running for nobody to stop: the caller never got its record.
    stop_group(leader_pid, None)
    raise ServiceError(
        f"{name} did not become healthy within {timeout_s:.0f} s and was stopped. Last lines "
        f"of {log_path}:\n{log_tail(log_path)}"
    )


def _reap(pid: int) -> None:
    # When the leader is our own child (tests, `up` still running) it must be
    # waited for, or it lingers as a zombie and looks alive to signal 0.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal_session(sid: int, signum: int) -> None:
    for member in session_members(sid):
        try:
            os.kill(member, signum)
        except ProcessLookupError:
            pass


def stop_group(pid: int, start_time: float | None, timeout_s: float = 30.0) -> bool:
    """Stop the session that `pid` leads: SIGTERM to all of it, then SIGKILL after `timeout_s`.

    Returns True when something of ours was signalled. If `pid` now belongs to
    another process (reused pid), nothing is signalled.
    """
    _reap(pid)
    leader_now = process_start_time(pid)
    if (
        leader_now is not None
        and start_time is not None
        and not _same_start(leader_now, start_time)
    ):
        return False
    if not session_members(pid):
        return False
    _signal_session(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not session_members(pid):
            return True
        time.sleep(0.2)
    _signal_session(pid, signal.SIGKILL)
    for _ in range(50):
        _reap(pid)
        if not session_members(pid):
            break
        time.sleep(0.1)
    return True
