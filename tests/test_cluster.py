"""The local stack (`chestxpert up/status/down`), process control, and endpoint resolution."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from chestxpert.cluster import endpoints
from chestxpert.cluster.errors import UserError
from chestxpert.cluster.processes import (
    ServiceError,
    free_port,
    process_start_time,
    session_members,
    spawn,
    stop_group,
    wait_until,
)
from chestxpert.cluster.stack import RAY_TEMP_DIR_MAX, ray_temp_dir
from chestxpert.cluster.workspace import write_state
from tests.conftest import CHESTXPERT_CLI, RayCluster, ray_summary, short_tmpdir

CLI = [CHESTXPERT_CLI]


def run_cli(
    *args: str, workspace: Path, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "--workspace", str(workspace), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=workspace,
        env=env,
    )


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses listening on `port`, read from /proc/net/tcp (no traffic sent)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


@pytest.mark.services
def test_up_status_down_lifecycle() -> None:
    ws = short_tmpdir("cxw")
    ports = {
        "--ray-port": free_port(),
        "--dashboard-port": free_port(),
        "--mlflow-port": free_port(),
    }
    port_args = [str(item) for pair in ports.items() for item in pair]
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        first = run_cli("up", "--num-cpus", "1", "--num-gpus", "1", *port_args, workspace=ws)
        assert first.returncode == 0, first.stdout + first.stderr
        dashboard = f"http://127.0.0.1:{ports['--dashboard-port']}"
        mlflow_url = f"http://127.0.0.1:{ports['--mlflow-port']}"
        assert dashboard in first.stdout and mlflow_url in first.stdout

        state = json.loads((ws / "services.json").read_text())
        assert set(state) >= {"ray", "mlflow", "storage_uri"}
        assert state["ray"]["resources"] == {"nodes": 1, "CPU": 1.0, "GPU": 1.0}
        assert state["storage_uri"] == (ws / "storage").as_uri()
        # Ray keeps its sessions in the workspace, not /tmp/ray.
        assert list(ray_temp_dir(ws).glob("session_*")), "no Ray session folder in the workspace"
        assert requests.get(f"{mlflow_url}/health", timeout=5).status_code == 200

        # Token auth is on: the Jobs API refuses a call without the token and accepts ours.
        token = Path(state["ray"]["auth_token_path"]).read_text().strip()
        assert requests.get(f"{dashboard}/api/jobs/", timeout=5).status_code == 401
        authed = requests.get(
            f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        assert authed.status_code == 200
        assert oct(Path(state["ray"]["auth_token_path"]).stat().st_mode & 0o777) == "0o600"

        # what we start listens on loopback only (Ray's own GCS/raylet ports cannot be confined)
        for port in (ports["--dashboard-port"], ports["--mlflow-port"]):
            assert listening_addresses(port) == {"127.0.0.1"}, port

        status = run_cli("status", workspace=ws)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("healthy") == 2
        assert "`chestxpert dashboard` prints its URL and token" in status.stdout

        # the dashboard's URL and the token its login prompt takes; --open with and without a
        # browser (one that notes the URL it was given)
        headless = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")
        }
        shown = run_cli("dashboard", "--open", workspace=ws, env=headless)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert f"dashboard: {dashboard}\n" in shown.stdout
        assert f"token:     {token}\n" in shown.stdout
        assert "no browser on this machine" in shown.stdout
        browser = ws / "browser.sh"
        browser.write_text(f'#!/bin/sh\necho "$1" > {ws / "opened.txt"}\n')
        browser.chmod(0o755)
        opened = run_cli(
            "dashboard", "--open", workspace=ws, env={**headless, "BROWSER": str(browser)}
        )
        assert opened.returncode == 0 and "opened in a browser" in opened.stdout, opened.stderr
        assert (ws / "opened.txt").read_text().strip() == dashboard

        again = run_cli("up", "--num-cpus", "1", *port_args, workspace=ws)
        assert again.returncode == 0, again.stderr
        assert (
            "ray     already running" in again.stdout and "mlflow  already running" in again.stdout
        )
        assert json.loads((ws / "services.json").read_text())["ray"]["pid"] == state["ray"]["pid"]

        down = run_cli("down", workspace=ws)
        assert down.returncode == 0, down.stderr
        for name in ("ray", "mlflow"):
            assert session_members(state[name]["pid"]) == [], f"{name} left processes behind"
        assert not (ws / "services.json").exists()
        assert bystander.poll() is None, "down touched a process it did not start"

        after = run_cli("status", workspace=ws)
        assert "no services recorded" in after.stdout
    finally:
        bystander.kill()
        bystander.wait()
        state_file = ws / "services.json"
        if state_file.exists():  # a failed assertion must not leave services running
            run_cli("down", workspace=ws)


@pytest.mark.parametrize("flag", ["--ray-port", "--dashboard-port", "--mlflow-port"])
def test_up_port_conflict_names_port_and_flag(flag: str) -> None:
    ws = short_tmpdir("cxp")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {
            "--ray-port": free_port(),
            "--dashboard-port": free_port(),
            "--mlflow-port": free_port(),
        }
        ports[flag] = port
        args = [str(item) for pair in ports.items() for item in pair]
        result = run_cli("up", *args, workspace=ws, timeout=60)
    assert result.returncode == 3
    assert f"port {port}" in result.stderr and f"chestxpert up {flag} PORT" in result.stderr
    assert not (ws / "services.json").exists(), "a refused `up` must start nothing"


def test_up_refuses_a_port_in_ray_s_worker_range() -> None:
    """Ray would give the port to a worker too; its own start-up error blamed the dashboard."""
    ws = short_tmpdir("cxp")
    result = run_cli(
        "up", "--ray-port", "27001", "--mlflow-port", str(free_port()), workspace=ws, timeout=60
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert (
        "port 27001 (Ray GCS) is in the range Ray gives its workers (20000-29999); choose one "
        "outside it with `chestxpert up --ray-port PORT`"
    ) in result.stderr
    assert not (ws / "services.json").exists(), "a refused `up` must start nothing"


def test_service_dying_during_startup_reports_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    proc = spawn(
        [sys.executable, "-c", "print('bad config: no such store'); raise SystemExit(3)"], log
    )
    with pytest.raises(ServiceError) as err:
        wait_until("Example service", lambda: False, proc.pid, log, timeout_s=20)
    assert "Example service exited during start-up" in str(err.value)
    assert "bad config: no such store" in str(err.value)


def test_stop_group_stops_the_whole_session_and_nothing_else(tmp_path: Path) -> None:
    # A leader whose child opens its own process group, as Ray's workers do.
    code = (
        "import subprocess, sys, time, os;"
        "subprocess.Popen([sys.executable, '-c', "
        "'import os, time; os.setpgrp(); time.sleep(600)']);"
        "time.sleep(600)"
    )
    leader = spawn([sys.executable, "-c", code], tmp_path / "leader.log")
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while len(session_members(leader.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(session_members(leader.pid)) == 2
        assert stop_group(leader.pid, process_start_time(leader.pid), timeout_s=5)
        assert session_members(leader.pid) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_stop_group_ignores_a_reused_pid() -> None:
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        recorded_start = (
            process_start_time(other.pid) - 1
        )  # as if pid were reused since we recorded it
        assert stop_group(other.pid, recorded_start, timeout_s=2) is False
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_ray_temp_dir_stays_short_enough_for_unix_sockets(tmp_path: Path) -> None:
    deep = tmp_path / ("very-long-folder-name-" * 4) / "ws"
    chosen = ray_temp_dir(deep)
    assert len(str(chosen)) <= RAY_TEMP_DIR_MAX
    assert (deep / "ray").resolve() == chosen.resolve(), "the workspace must link to Ray's folder"
    assert ray_temp_dir(Path("/tmp/ws")) == Path("/tmp/ws/ray")


# --- endpoint resolution: flag, then environment, then workspace state, then default ---

FIELDS = {
    "ray_address": ("RAY_ADDRESS", "address", "10.0.0.1:6379", "10.0.0.2:6379", "10.0.0.3:6379"),
    "mlflow_tracking_uri": (
        "MLFLOW_TRACKING_URI",
        "url",
        "http://flag:5000",
        "http://env:5000",
        "http://ws:5000",
    ),
    "storage": (
        "CHESTXPERT_STORAGE",
        None,
        "s3://flag-bucket/x",
        "s3://env-bucket/x",
        "s3://ws-bucket/x",
    ),
}


def _workspace_with_state(tmp_path: Path) -> Path:
    write_state(
        tmp_path,
        {
            "ray": {
                "address": "10.0.0.3:6379",
                "dashboard_url": "http://10.0.0.3:8265",
                "auth_token_path": "/ws/token",
                "url": "http://10.0.0.3:8265",
                "pid": 1,
            },
            "mlflow": {"url": "http://ws:5000", "pid": 2},
            "s3": {"url": "http://127.0.0.1:9999", "pid": 3},
            "storage_uri": "s3://ws-bucket/x",
        },
    )
    return tmp_path


def _resolved(result: endpoints.Endpoints, field: str) -> str | None:
    return result.storage_uri if field == "storage" else getattr(result, field)


@pytest.mark.parametrize("field", list(FIELDS))
def test_resolution_order(tmp_path: Path, field: str) -> None:
    env_name, _, flag_value, env_value, ws_value = FIELDS[field]
    ws = _workspace_with_state(tmp_path)
    flag = {field: flag_value}
    environ = {env_name: env_value}
    assert _resolved(endpoints.resolve(workspace=ws, environ=environ, **flag), field) == flag_value
    from_env = endpoints.resolve(workspace=ws, environ=environ)
    assert _resolved(from_env, field) == env_value and from_env.sources[field] == "env"
    from_ws = endpoints.resolve(workspace=ws, environ={})
    assert _resolved(from_ws, field) == ws_value and from_ws.sources[field] == "workspace"


def test_defaults_without_state_are_local(tmp_path: Path) -> None:
    result = endpoints.resolve(workspace=tmp_path, environ={})
    assert result.ray_address is None
    assert result.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert result.storage_uri == (tmp_path / "storage").as_uri()
    assert result.s3_endpoint_url is None


def test_s3_endpoint_and_ray_token_follow_their_sources(tmp_path: Path) -> None:
    ws = _workspace_with_state(tmp_path)
    from_ws = endpoints.resolve(workspace=ws, environ={})
    assert from_ws.s3_endpoint_url == "http://127.0.0.1:9999" and from_ws.local_s3
    assert from_ws.ray_auth_token_path == "/ws/token"
    env = {"AWS_ENDPOINT_URL": "http://minio:9000", "RAY_ADDRESS": "10.9.9.9:6379"}
    from_env = endpoints.resolve(workspace=ws, environ=env)
    assert from_env.s3_endpoint_url == "http://minio:9000" and not from_env.local_s3
    # Another cluster's token is not ours to hand out.
    assert from_env.ray_auth_token_path is None
    assert (
        endpoints.resolve(
            workspace=ws,
            environ={"AWS_ENDPOINT_URL_S3": "http://a", "AWS_ENDPOINT_URL": "http://b"},
        ).s3_endpoint_url
        == "http://a"
    )
    local = endpoints.resolve(workspace=ws, environ={}, storage=str(tmp_path / "data"))
    assert local.storage_uri == (tmp_path / "data").as_uri()
    assert local.s3_endpoint_url == "http://127.0.0.1:9999", (
        "s3:// datasets still need the endpoint"
    )


@pytest.mark.parametrize("bad", ["gs://bucket/x", "s3://", "hdfs://nn/x"])
def test_unsupported_storage_uri_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        endpoints.normalize_storage_uri(bad)
    with pytest.raises(UserError, match=r"^storage URI .*expected.*\(from the flag\)$"):
        endpoints.resolve(storage=bad, environ={})


def test_endpoints_never_hold_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFORTEST123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-do-not-print")
    result = endpoints.resolve(
        workspace=tmp_path, storage="s3://bucket/p", s3_endpoint_url="http://127.0.0.1:1"
    )
    assert "fake-secret-do-not-print" not in repr(result)
    assert "fake-secret-do-not-print" not in json.dumps(endpoints.client_environment(result))


# --- the shared fixtures really are what later tests rely on ---


@pytest.mark.services
def test_multi_node_fixture_has_three_nodes_and_two_gpus(ray_cluster: RayCluster) -> None:
    summary = ray_summary(ray_cluster)
    assert summary == {"nodes": 3, "GPU": 2.0, "CPU": 3.0, "gpu_nodes": 2}


@pytest.mark.services
def test_ray_cluster_refuses_clients_without_the_token(ray_cluster: RayCluster) -> None:
    env = {k: v for k, v in ray_cluster.client_env().items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = "not-the-token"
    code = "import ray; ray.init(logging_level='ERROR')"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert (
        "Authentication token is missing or incorrect" in result.stderr
        or "Unauthenticated" in result.stderr
    )


@pytest.mark.services
def test_s3_fixture_round_trip(s3_client, s3_filesystem, s3_endpoint, monkeypatch) -> None:
    s3_client.put_object(Bucket=s3_endpoint.bucket, Key="probe/hello.txt", Body=b"hello")
    with s3_filesystem.open_input_stream(f"{s3_endpoint.bucket}/probe/hello.txt") as stream:
        assert stream.read() == b"hello"
    resolved = endpoints.resolve(
        storage=f"s3://{s3_endpoint.bucket}/probe",
        s3_endpoint_url=s3_endpoint.url,
        environ=s3_endpoint.env(),
    )
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    fs, path = endpoints.storage_filesystem(resolved)
    assert path == f"{s3_endpoint.bucket}/probe"
    assert fs.get_file_info(f"{path}/hello.txt").size == 5


@pytest.mark.services
def test_mlflow_fixture_answers(mlflow_server) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    experiment_id = client.create_experiment("fixture-check")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "val_auc_macro", 0.5, step=1)
    assert client.get_metric_history(run.info.run_id, "val_auc_macro")[0].value == 0.5


def test_local_storage_paths_with_spaces_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "my storage 100%"
    result = endpoints.resolve(workspace=tmp_path, storage=str(folder), environ={})
    fs, path = endpoints.storage_filesystem(result)
    assert path == str(folder)
    assert endpoints.normalize_storage_uri(result.storage_uri) == result.storage_uri


def test_free_ports_are_outside_the_ephemeral_range_and_free_on_every_interface() -> None:
    from chestxpert.cluster.processes import FREE_PORTS

    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {free_port() for _ in range(50)}
    assert len(ports) > 40, "ports must not repeat from one call to the next"
    for port in ports:
        assert port in FREE_PORTS and not low <= port <= high
        with socket.socket() as server:
            server.bind(("0.0.0.0", port))  # free on every interface, not just loopback


def test_a_trial_takes_storage_from_its_environment_never_from_its_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray worker may run in a folder holding another stack's `.chestxpert/services.json`;
    the dataset's S3 endpoint must come from the environment the driver gave the trial."""
    write_state(
        tmp_path / ".chestxpert",
        {"s3": {"url": "http://127.0.0.1:1"}, "storage_uri": "s3://someone-elses/bucket"},
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHESTXPERT_WORKSPACE", raising=False)
    assert endpoints.resolve(environ={}).s3_endpoint_url == "http://127.0.0.1:1", (
        "the CLI does read the workspace it runs in"
    )
    trial = endpoints.worker_endpoints(environ={"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"})
    assert trial.s3_endpoint_url == "http://127.0.0.1:9"
    assert trial.storage_uri != "s3://someone-elses/bucket"
    assert endpoints.worker_endpoints(environ={}).s3_endpoint_url is None
