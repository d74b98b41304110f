"""The local stack never orphans a service nor signals a stranger: `up` killed half-way, records
from another boot, and `demo --stop` beside a stack the user already runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from chestxpert.cluster.processes import free_port, process_start_time, session_members
from chestxpert.cluster.stack import StackOptions, down, up
from chestxpert.cluster.workspace import write_state
from tests.conftest import CHESTXPERT_CLI, short_tmpdir


def run_cli(*args: str, workspace: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHESTXPERT_CLI, "--workspace", str(workspace), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=workspace,
    )


def wait_for_record(state_file: Path, service: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = json.loads(state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        if service in state:
            return state
        time.sleep(0.05)
    raise AssertionError(f"`up` never recorded {service} in {state_file}")


@pytest.mark.services
def test_up_killed_before_mlflow_answers_leaves_nothing_down_cannot_stop() -> None:
    ws = short_tmpdir("cxk")
    mlflow_port = free_port()
    ports = ["--ray-port", str(free_port()), "--dashboard-port", str(free_port())]
    up_process = subprocess.Popen(
        [
            CHESTXPERT_CLI,
            "--workspace",
            str(ws),
            "up",
            "--num-cpus",
            "1",
            *ports,
            "--mlflow-port",
            str(mlflow_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ws,
    )
    try:
        state = wait_for_record(ws / "services.json", "mlflow")
        with pytest.raises(requests.RequestException):  # Ray is up, MLflow not answering yet
            requests.get(f"http://127.0.0.1:{mlflow_port}/health", timeout=1)
        up_process.send_signal(signal.SIGKILL)
        up_process.wait(30)
        assert session_members(state["ray"]["pid"]) and session_members(state["mlflow"]["pid"])

        stopped = run_cli("down", workspace=ws)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "stopping ray" in stopped.stdout and "stopping mlflow" in stopped.stdout
        for name in ("ray", "mlflow"):
            assert session_members(state[name]["pid"]) == [], f"{name} left processes behind"
        assert not (ws / "services.json").exists()
    finally:
        if up_process.poll() is None:
            up_process.kill()
        if (ws / "services.json").exists():
            run_cli("down", workspace=ws)


def test_records_from_another_boot_are_forgotten_and_never_signalled() -> None:
    ws = short_tmpdir("cxb")
    # A process that has the recorded pid and start time, as a pid reused after a reboot could.
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        record = {
            "pid": bystander.pid,
            "start_time": process_start_time(bystander.pid),
            "log": str(ws / "logs" / "mlflow.log"),
            "url": "http://127.0.0.1:1",
        }
        write_state(ws, {"boot_id": "a-previous-boot", "mlflow": record, "storage_uri": "x"})
        status = run_cli("status", workspace=ws)
        assert "before this machine last started" in status.stdout
        assert "mlflow" not in json.loads((ws / "services.json").read_text())
        write_state(ws, {"mlflow": record})  # an older ChestXpert kept no boot id at all
        stopped = run_cli("down", workspace=ws)
        assert stopped.returncode == 0, stopped.stderr
        assert "nothing was signalled" in stopped.stdout and "stopping" not in stopped.stdout
        assert bystander.poll() is None, "a record from another boot was signalled"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.services
def test_a_second_up_starts_nothing_so_demo_stop_leaves_the_users_stack_running() -> None:
    """`demo --stop` stops `down(only=<what its up started>)`: nothing, when a stack runs."""
    ws = short_tmpdir("cxu")
    opts = StackOptions(
        workspace=ws,
        ray_port=free_port(),
        dashboard_port=free_port(),
        mlflow_port=free_port(),
        num_cpus=1,
    )
    state, started = up(opts)
    try:
        assert started == ["ray", "mlflow"]
        again, started_again = up(opts)
        assert started_again == []
        assert down(ws, only=started_again) == []
        for name in ("ray", "mlflow"):
            assert session_members(state[name]["pid"]), f"{name} was stopped"
        assert requests.get(f"{state['mlflow']['url']}/health", timeout=5).status_code == 200
    finally:
        assert sorted(down(ws)) == ["mlflow", "ray"]
