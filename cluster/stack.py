"""The local service stack: a Ray head and its dashboard, an MLflow server, an optional S3 endpoint.

`up` starts what is missing and waits for health, `status` reports, `down`
stops exactly the process groups that `up` recorded in the workspace.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from chestxpert.cluster.endpoints import LOCAL_S3_KEY, normalize_storage_uri
from chestxpert.cluster.mlflow_server import MlflowServerConfig, S3Artifacts, start_mlflow_server
from chestxpert.cluster.processes import (
    ServiceError,
    boot_id,
    free_port,
    is_ours,
    port_in_use,
    spawn_service,
    stop_group,
    wait_until,
)
from chestxpert.cluster.workspace import read_state, write_state

LOOPBACK = "127.0.0.1"
LOCAL_BUCKET = "chestxpert"
# Unix sockets live under Ray's temp dir and their paths are capped at 107
# bytes; Ray adds about 65 characters (session_<timestamp>_<pid>/sockets/...).
RAY_TEMP_DIR_MAX = 40
SERVICE_ORDER = ("ray", "mlflow", "s3")
# The ports Ray hands its workers (`ray start --min/--max-worker-port`); FREE_PORTS in
# cluster.processes stays below them.
RAY_WORKER_PORTS = range(20000, 30000)
OnSpawn = Callable[[dict[str, Any]], None]  # called with a service's record once it exists


@dataclass(frozen=True)
class StackOptions:
    """What `chestxpert up` starts. Ports are on 127.0.0.1 unless `host` says otherwise."""

    workspace: Path
    ray_port: int = 6379
    dashboard_port: int = 8265
    mlflow_port: int = 5000
    s3_port: int = 9000
    num_cpus: int | None = None
    num_gpus: int = 0
    s3: bool = False
    storage: str | None = None
    host: str = LOOPBACK
    object_store_memory: int | None = None
    timeout_s: float = 90.0


def _bin(name: str) -> str:
    # The console scripts of the interpreter we run in, not whatever PATH finds.
    return str(Path(sys.executable).parent / name)


def _say(message: str) -> None:
    print(message, flush=True)


def ray_temp_dir(workspace: Path) -> Path:
    """Where Ray keeps sessions and logs: `<workspace>/ray`, or a short folder linked from there.

    Ray's Unix-socket paths must stay under 107 bytes, so a deep workspace gets
    its Ray folder under the system temp dir, named after the workspace.
    """
    inside = workspace / "ray"
    if len(str(inside)) <= RAY_TEMP_DIR_MAX:
        return inside
    digest = hashlib.sha1(str(workspace).encode()).hexdigest()[:10]
    short = Path(tempfile.gettempdir()) / f"cx-ray-{digest}"
    short.mkdir(parents=True, exist_ok=True)
    link = workspace / "ray"
    if not link.exists() and not link.is_symlink():
        workspace.mkdir(parents=True, exist_ok=True)
        link.symlink_to(short, target_is_directory=True)
    return short


def ensure_ray_token(workspace: Path) -> Path:
    """Create (once) the workspace's Ray auth token, readable by its owner only; return its path."""
    token_path = workspace / "ray_auth_token"
    if not token_path.exists():
        workspace.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return token_path


def ray_node_env(token_path: Path, temp_dir: Path) -> dict[str, str]:
    """Environment for every Ray process we start.

    Token auth on, usage stats off, temp files kept in our folder.
    """
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(temp_dir),
        "TMPDIR": str(temp_dir),
        # Draining exists for Ray Serve upgrades; our nodes stop in seconds without it.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "3",
        # Ray runs its workers at nice 15, so every burst of its own daemons preempts a
        # trial; on 2 cores that made epochs 13-15% slower (python -m benchmarks tune_trial).
        "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0"),
    }


def start_ray_node(
    *,
    log_path: Path,
    token_path: Path,
    temp_dir: Path,
    head_port: int | None = None,
    join_address: str | None = None,
    dashboard_port: int | None = None,
    num_cpus: int | None = None,
    num_gpus: int = 0,
    host: str = LOOPBACK,
    object_store_memory: int | None = None,
    extra_env: dict[str, str] | None = None,
    on_spawn: OnSpawn | None = None,
) -> dict[str, Any]:
    """Start one Ray node (`ray start --block`) in its own session and return its record.

    A head node gets `head_port` (and the dashboard on `dashboard_port`); a worker
    node joins `join_address`. Logical GPUs are advertised with `num_gpus`, so
    GPU scheduling can be exercised on a CPU machine. `extra_env` reaches every
    process on the node, as a real node's environment (credentials, endpoints) would.
    """
    cmd = [
        _bin("ray"),
        "start",
        "--block",
        "--disable-usage-stats",
        f"--node-ip-address={host}",
        f"--temp-dir={temp_dir}",
        f"--num-gpus={num_gpus}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--min-worker-port={RAY_WORKER_PORTS.start}",
        f"--max-worker-port={RAY_WORKER_PORTS.stop - 1}",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if object_store_memory is not None:
        cmd.append(f"--object-store-memory={object_store_memory}")
    if head_port is not None:
        cmd += ["--head", f"--port={head_port}", f"--dashboard-host={host}"]
        cmd += [f"--dashboard-port={dashboard_port}", "--include-dashboard=true"]
    else:
        assert join_address is not None
        cmd.append(f"--address={join_address}")
    env = {**ray_node_env(token_path, temp_dir), **(extra_env or {})}
    _, record = spawn_service(cmd, log_path, env=env, on_spawn=on_spawn)
    return record


def ray_client_check(address: str, token_path: Path, timeout_s: float = 60.0) -> dict[str, float]:
    """Connect a Ray client with the token; return live node count, CPUs and GPUs.

    Runs in a child process: Ray fixes its auth mode when first imported, so a
    process that imported Ray earlier could not switch to token mode.
    """
    import json
    import subprocess

    code = (
        "import json, ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR', "
        "log_to_driver=False, configure_logging=False)\n"
        "r = ray.cluster_resources()\n"
        "n = [x for x in ray.nodes() if x.get('Alive')]\n"
        "print(json.dumps({'nodes': len(n), 'CPU': r.get('CPU', 0.0), 'GPU': r.get('GPU', 0.0)}))\n"
    )
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_AUTH_TOKEN", None)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s
    )
    if result.returncode != 0:
        raise RuntimeError(
            result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _http_ok(url: str, expect: str | None = None) -> bool:
    response = requests.get(url, timeout=2)
    return response.status_code == 200 and (expect is None or expect in response.text)


def _check_ports(opts: StackOptions, wanted: list[str]) -> None:
    flags = {
        "ray": [
            (opts.ray_port, "Ray GCS", "--ray-port"),
            (opts.dashboard_port, "Ray dashboard", "--dashboard-port"),
        ],
        "mlflow": [(opts.mlflow_port, "MLflow", "--mlflow-port")],
        "s3": [(opts.s3_port, "S3 endpoint", "--s3-port")],
    }
    for service in wanted:
        for port, what, flag in flags[service]:
            if port in RAY_WORKER_PORTS:
                raise ServiceError(
                    f"port {port} ({what}) is in the range Ray gives its workers "
                    f"({RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}); choose one outside "
                    f"it with `chestxpert up {flag} PORT`"
                )
            if port_in_use(port, opts.host):
                raise ServiceError(
                    f"port {port} ({what}) is already in use on {opts.host}; "
                    f"choose another with `chestxpert up {flag} PORT`"
                )


def start_ray_head(
    opts: StackOptions,
    extra_env: dict[str, str] | None = None,
    on_spawn: OnSpawn | None = None,
) -> dict[str, Any]:
    """Start the Ray head (GCS, dashboard, token auth) and wait until a client connects.

    `on_spawn` gets the record (pid, start time, log, URLs) as soon as the process exists,
    before it is healthy, so a caller killed while waiting has recorded what to stop.
    """
    ws = opts.workspace
    token_path = ensure_ray_token(ws)
    temp_dir = ray_temp_dir(ws)
    log_path = ws / "logs" / "ray-head.log"
    address = f"{opts.host}:{opts.ray_port}"
    dashboard = f"http://{opts.host}:{opts.dashboard_port}"
    urls = {
        "address": address,
        "dashboard_url": dashboard,
        "url": dashboard,
        "auth_token_path": str(token_path),
        "temp_dir": str(temp_dir),
    }
    record = start_ray_node(
        log_path=log_path,
        token_path=token_path,
        temp_dir=temp_dir,
        head_port=opts.ray_port,
        dashboard_port=opts.dashboard_port,
        num_cpus=opts.num_cpus,
        num_gpus=opts.num_gpus,
        host=opts.host,
        object_store_memory=opts.object_store_memory,
        extra_env=extra_env,
        on_spawn=None if on_spawn is None else lambda started: on_spawn({**started, **urls}),
    )
    record.update(urls)
    wait_until(
        "Ray head",
        lambda: _http_ok(f"{dashboard}/api/gcs_healthz", "success"),
        record["pid"],
        log_path,
        opts.timeout_s,
    )
    try:
        resources = ray_client_check(address, token_path)
    except Exception as err:
        stop_group(record["pid"], record["start_time"])
        raise ServiceError(f"a Ray client could not connect to {address}: {err}") from None
    record["resources"] = resources
    return record


def start_mlflow(
    opts: StackOptions,
    storage_uri: str,
    s3_url: str | None = None,
    job_runner: bool = False,
    on_spawn: OnSpawn | None = None,
) -> dict[str, Any]:
    """Start an MLflow server (SQLite store in the workspace, artifacts under `storage_uri`).

    MLflow's job runner (seven worker processes, unused here) is off unless `job_runner`.
    The server is started by `cluster.mlflow_server`, as the central one is, with one uvicorn
    worker where the central one has two.
    """
    ws = opts.workspace
    ws.mkdir(parents=True, exist_ok=True)
    if storage_uri.startswith("file://"):
        Path(storage_uri[len("file://") :]).mkdir(parents=True, exist_ok=True)
    s3 = None
    if s3_url:
        # Our loopback endpoint's stand-in keys, unless the user's own are in the environment.
        local_keys = not os.environ.get("AWS_ACCESS_KEY_ID")
        s3 = S3Artifacts(
            s3_url,
            access_key_id=LOCAL_S3_KEY if local_keys else None,
            secret_access_key=LOCAL_S3_KEY if local_keys else None,
        )
    config = MlflowServerConfig(
        host=opts.host,
        port=opts.mlflow_port,
        backend_store_uri=f"sqlite:///{ws / 'mlflow.db'}",
        artifacts_destination=f"{storage_uri}/mlflow-artifacts",
        # One uvicorn process: a SQLite store takes one writer at a time, and a second
        # worker cost 4 s and 4 CPU-seconds more at every start here, and 250 MB.
        workers=1,
        job_runner=job_runner,
        s3=s3,
    )
    return start_mlflow_server(config, ws / "logs" / "mlflow.log", opts.timeout_s, on_spawn)


def start_s3(opts: StackOptions, on_spawn: OnSpawn | None = None) -> dict[str, Any]:
    """Start moto's S3-compatible server and create the `chestxpert` bucket.

    The server keeps everything in memory: it is for trials only.
    """
    log_path = opts.workspace / "logs" / "s3.log"
    url = f"http://{opts.host}:{opts.s3_port}"
    cmd = [sys.executable, "-m", "moto.server", "-H", opts.host, "-p", str(opts.s3_port)]
    proc, record = spawn_service(cmd, log_path, on_spawn=on_spawn, url=url)
    wait_until(
        "S3 endpoint", lambda: _http_ok(f"{url}/moto-api/"), proc.pid, log_path, opts.timeout_s
    )
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=LOCAL_S3_KEY,
        aws_secret_access_key=LOCAL_S3_KEY,
    )
    s3.create_bucket(Bucket=LOCAL_BUCKET)
    return record


def service_alive(record: dict[str, Any]) -> bool:
    """True when the recorded service's leader process is still the one we started."""
    return is_ours(record["pid"], record.get("start_time"))


def recorded_services(workspace: Path) -> dict[str, Any]:
    """The state `up` recorded in `workspace`, minus records from another boot of the machine.

    After a reboot (or a record written by an older ChestXpert, which kept no boot id) the
    recorded pids may belong to anyone: such records are dropped and never signalled.
    """
    state = read_state(workspace)
    names = [name for name in SERVICE_ORDER if name in state]
    if names and state.get("boot_id") != boot_id():
        pids = ", ".join(f"{name} pid {state[name]['pid']}" for name in names)
        _say(
            f"forgetting services recorded in {workspace / 'services.json'} before this machine "
            f"last started ({pids}): those processes are gone, and nothing was signalled"
        )
        for name in names:
            del state[name]
        write_state(workspace, state)
    return state


def up(opts: StackOptions) -> tuple[dict[str, Any], list[str]]:
    """Start the services that are not running yet; return the workspace state and the names
    of the services this call started.

    Idempotent: services recorded and alive are reported, not restarted. Each service is
    recorded as soon as its process exists, so `down` can stop it even if this call is
    killed while waiting for it. On a start-up failure, what this call started is stopped.
    """
    ws = opts.workspace
    ws.mkdir(parents=True, exist_ok=True)
    state = recorded_services(ws)
    state["boot_id"] = boot_id()
    running = [name for name in SERVICE_ORDER if name in state and service_alive(state[name])]
    for name in SERVICE_ORDER:
        if name in state and name not in running:
            stop_group(state[name]["pid"], state[name].get("start_time"))  # leftovers of a crash
            del state[name]
    if running and opts.s3 and "s3" not in running:
        raise ServiceError(
            "the stack is already running without --s3 (its MLflow stores artifacts in "
            f"{state.get('storage_uri')}); run `chestxpert down`, then `chestxpert up --s3`"
        )
    for name in running:
        _say(f"{name:7s} already running  {state[name]['url']}")
    wanted = [n for n in SERVICE_ORDER if n not in running and (n != "s3" or opts.s3)]
    _check_ports(opts, wanted)

    spawned: list[str] = []

    def record(name: str) -> OnSpawn:
        def on_spawn(started: dict[str, Any]) -> None:
            state[name] = started
            spawned.append(name)
            write_state(ws, state)

        return on_spawn

    try:
        if "s3" in wanted:
            _say(f"starting S3 endpoint on {opts.host}:{opts.s3_port} (moto, in memory) ...")
            state["s3"] = start_s3(opts, on_spawn=record("s3"))
            _say(f"s3      ready  {state['s3']['url']}  bucket s3://{LOCAL_BUCKET}")
        if "storage_uri" not in state or not running:
            default_storage = f"s3://{LOCAL_BUCKET}" if opts.s3 else str(ws / "storage")
            state["storage_uri"] = normalize_storage_uri(opts.storage or default_storage)
        if "ray" in wanted:
            _say(
                f"starting Ray head on {opts.host}:{opts.ray_port} "
                f"(dashboard port {opts.dashboard_port}) ..."
            )
            state["ray"] = start_ray_head(opts, on_spawn=record("ray"))
            _say(
                f"ray     ready  {state['ray']['address']}  "
                f"dashboard {state['ray']['dashboard_url']}"
            )
        if "mlflow" in wanted:
            _say(f"starting MLflow server on {opts.host}:{opts.mlflow_port} ...")
            s3_url = (
                state.get("s3", {}).get("url") if state["storage_uri"].startswith("s3://") else None
            )
            state["mlflow"] = start_mlflow(
                opts, state["storage_uri"], s3_url, on_spawn=record("mlflow")
            )
            _say(f"mlflow  ready  {state['mlflow']['url']}")
    except BaseException:
        for name in reversed(spawned):
            stop_group(state[name]["pid"], state[name].get("start_time"))
            del state[name]
        if any(name in state for name in SERVICE_ORDER):
            write_state(ws, state)
        else:
            (ws / "services.json").unlink(missing_ok=True)
        raise
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_state(ws, state)
    _say(f"storage {state['storage_uri']}")
    _say(f"state   {ws / 'services.json'}  (Ray token: {state['ray']['auth_token_path']})")
    return state, spawned


def health(workspace: Path) -> list[dict[str, Any]]:
    """One row per recorded service: name, URL, whether its process lives and whether it answers."""
    state = recorded_services(workspace)
    rows = []
    for name in SERVICE_ORDER:
        if name not in state:
            continue
        record = state[name]
        alive = service_alive(record)
        answering = False
        detail = ""
        if alive:
            try:
                if name == "ray":
                    answering = _http_ok(f"{record['dashboard_url']}/api/gcs_healthz", "success")
                    resources = record.get("resources", {})
                    detail = (
                        f"GCS {record['address']}, CPU {resources.get('CPU', '?')}, "
                        f"GPU {resources.get('GPU', 0)}"
                    )
                elif name == "mlflow":
                    answering = _http_ok(f"{record['url']}/health")
                else:
                    answering = _http_ok(f"{record['url']}/moto-api/")
                    detail = f"bucket s3://{LOCAL_BUCKET}, in memory"
            except requests.RequestException as err:
                detail = f"not answering: {type(err).__name__}"
        rows.append(
            {
                "service": name,
                "url": record["url"],
                "pid": record["pid"],
                "alive": alive,
                "healthy": alive and answering,
                "detail": detail,
                "log": record["log"],
            }
        )
    return rows


def down(workspace: Path, only: Iterable[str] | None = None) -> list[str]:
    """Stop the services `up` recorded in this workspace, by session, and forget them.

    `only` limits it to those service names (what one `up` call started, for `demo --stop`).
    Returns the names of the services that were stopped. Processes not started by `up` are
    never signalled, nor are records from before the machine last started.
    """
    state = recorded_services(workspace)
    stopped = []
    for name in reversed(SERVICE_ORDER):
        record = state.get(name)
        if record is None or (only is not None and name not in only):
            continue
        _say(f"stopping {name} (session {record['pid']}) ...")
        if stop_group(record["pid"], record.get("start_time")):
            stopped.append(name)
        del state[name]
        write_state(workspace, state)
    if not any(name in state for name in SERVICE_ORDER):
        (workspace / "services.json").unlink(missing_ok=True)
    return stopped
