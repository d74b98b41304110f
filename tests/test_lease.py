"""One writer per sweep: the lease against real holder processes (alive, SIGKILLed, SIGSTOPped),
in a local folder and in S3 (moto, with its conditional writes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chestxpert.cluster.endpoints import resolve
from chestxpert.sweeps import lease
from chestxpert.sweeps.layout import LEASE_FILE, locate

HOLDER = """
import sys
from chestxpert.cluster.endpoints import resolve
from chestxpert.sweeps import lease
from chestxpert.sweeps.layout import locate

storage, workspace, beat = sys.argv[1], sys.argv[2], float(sys.argv[3])
lease.HEARTBEAT_SECONDS = beat
endpoints = resolve(storage=storage, workspace=workspace)
held = lease.acquire(locate(endpoints, "sweep"), endpoints, "sweep run sweep", "holder")
print("held", flush=True)
input()
held.release()
print("released", flush=True)
"""


@pytest.fixture(params=["folder", "s3"])
def storage(request, tmp_path: Path, monkeypatch) -> tuple[str, dict[str, str]]:
    """A storage root of each kind, and the environment that reaches it."""
    if request.param == "folder":
        return str(tmp_path / "storage"), {}
    s3 = request.getfixturevalue("s3_endpoint")
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{s3.bucket}/lease-{uuid.uuid4().hex[:8]}", s3.env()


def _endpoints(storage: tuple[str, dict[str, str]], workspace: Path):
    root, env = storage
    return resolve(
        storage=root,
        s3_endpoint_url=env.get("AWS_ENDPOINT_URL_S3"),
        workspace=workspace,
        environ={},
    )


def _holder(storage, workspace: Path, beat: float = 15.0) -> subprocess.Popen:
    root, env = storage
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, root, str(workspace), str(beat)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert process.stdout.readline().strip() == "held", process.stderr.read()
    return process


def test_a_second_writer_is_refused_with_the_holder(storage, tmp_path: Path) -> None:
    endpoints = _endpoints(storage, tmp_path)
    location = locate(endpoints, "sweep")
    holder = _holder(storage, tmp_path)
    try:
        for force in (False, True):  # --force never takes a live lease
            with pytest.raises(lease.LeaseError) as refused:
                lease.acquire(location, endpoints, "sweep run sweep", "second", force=force)
            message = str(refused.value)
            assert f"pid {holder.pid} on {socket.gethostname()}" in message
            assert "`chestxpert sweep run sweep`" in message and "last heartbeat" in message
            assert ("--force takes only a stale lease" in message) == force
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert lease.read_holder(location) is None
    mine = lease.acquire(location, endpoints, "sweep resume sweep", "second")
    assert lease.read_holder(location)["session"] == "second"
    mine.release()
    assert location.read_bytes(LEASE_FILE) is None


def test_the_lease_of_a_killed_driver_is_taken_only_with_force(storage, tmp_path: Path) -> None:
    endpoints = _endpoints(storage, tmp_path)
    location = locate(endpoints, "sweep")
    holder = _holder(storage, tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with pytest.raises(lease.LeaseError) as refused:
        lease.acquire(location, endpoints, "sweep resume sweep", "next")
    assert f"pid {holder.pid} is not running on this host" in str(refused.value)
    assert "take the lease with --force" in str(refused.value)
    mine = lease.acquire(location, endpoints, "sweep resume sweep", "next", force=True)
    assert lease.read_holder(location)["session"] == "next"
    mine.release()


def test_a_stale_lease_from_another_host_needs_force(tmp_path: Path) -> None:
    endpoints = resolve(storage=str(tmp_path / "storage"), workspace=tmp_path, environ={})
    location = locate(endpoints, "sweep")
    beat = datetime.now(UTC) - timedelta(seconds=120)
    stale = {
        "owner": "ana@gpu-node-7",
        "host": "gpu-node-7",
        "pid": 4242,
        "started": beat.isoformat(),
        "heartbeat": beat.isoformat(),
        "command": "sweep run sweep",
        "session": "old",
    }
    location.write_json(LEASE_FILE, stale)
    with pytest.raises(lease.LeaseError) as refused:
        lease.acquire(location, endpoints, "sweep resume sweep", "new")
    assert str(refused.value) == (
        "sweep 'sweep' is being written by ana@gpu-node-7 (pid 4242 on gpu-node-7, "
        "`chestxpert sweep run sweep`), last heartbeat 120 s ago (stale after 45 s): if that "
        "driver is gone, take the lease with --force"
    )
    location.write_json(LEASE_FILE, {**stale, "heartbeat": datetime.now(UTC).isoformat()})
    with pytest.raises(lease.LeaseError, match="--force takes only a stale lease"):
        lease.acquire(location, endpoints, "sweep resume sweep", "new", force=True)
    location.write_json(LEASE_FILE, stale)
    mine = lease.acquire(location, endpoints, "sweep resume sweep", "new", force=True)
    assert json.loads(location.read_bytes(LEASE_FILE))["session"] == "new"
    mine.release()


def test_a_driver_whose_lease_was_taken_stops_at_once(storage, tmp_path: Path, monkeypatch) -> None:
    endpoints = _endpoints(storage, tmp_path)
    location = locate(endpoints, "sweep")
    holder = _holder(storage, tmp_path, beat=0.5)
    try:
        holder.send_signal(signal.SIGSTOP)  # frozen: no heartbeat, pid still there
        monkeypatch.setattr(lease, "STALE_SECONDS", 2.0)
        time.sleep(3)
        mine = lease.acquire(location, endpoints, "sweep resume sweep", "taker", force=True)
        holder.send_signal(signal.SIGCONT)
        assert holder.wait(timeout=30) == lease.LOST_EXIT_CODE
        assert "was taken by" in holder.stderr.read()
        assert lease.read_holder(location)["session"] == "taker"  # the old driver left it alone
        mine.release()
    finally:
        holder.kill()
        holder.wait(timeout=30)
