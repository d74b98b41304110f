"""Session fixtures that start real services on loopback and stop exactly them, by session id.

A three-node Ray cluster (head + two workers with one logical GPU each), an
MLflow server, an S3-compatible endpoint (moto) with a bucket, a finished tiny sweep, and
the central MLflow of cluster/compose.yaml (PostgreSQL, basic-auth, artifacts in S3).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from chestxpert.cluster.mlflow_server import (
    BasicAuth,
    MlflowServerConfig,
    S3Artifacts,
    start_mlflow_server,
    write_basic_auth_ini,
)
from chestxpert.cluster.processes import free_port, stop_group
from chestxpert.cluster.stack import (
    LOCAL_BUCKET,
    StackOptions,
    ensure_ray_token,
    start_mlflow,
    start_ray_head,
    start_ray_node,
    start_s3,
)
from tests.postgres_helpers import PostgresServer, start_postgres, stop_postgres

REPO = Path(__file__).resolve().parent.parent
# The installed console script, as users run it: `python -m` would put the current folder
# first on sys.path, where the repository's top-level folders could shadow other packages.
CHESTXPERT_CLI = str(Path(sys.executable).parent / "chestxpert")
# Tests reach no cloud: without this, the AWS SDK would ask 169.254.169.254 for an instance profile.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


# The test files that use the shared three-node cluster (`ray_cluster`). They run in one
# process, one after the other, as one unit: one cluster is started for the suite instead of
# one per process (about 35 s each), and it is stopped once the unit's last test is done
# instead of idling to the session's end (an idle cluster takes about an eighth of a core).
CLUSTER_FILES = (
    "test_sweeps.py",
    "test_sweep_drills.py",
    "test_prepare_cluster.py",
    "test_trial.py",
    "test_dataset_generations.py",
    "test_sweep_operate.py",
    "test_cluster.py",
)
# The test files that take longest, slowest first (measured with --durations). `make test`
# hands whole files to 2 processes in collection order (pytest-xdist: --dist loadfile
# --no-loadscope-reorder); starting these first keeps one process from running a long file
# alone at the end while the other idles. The rest keep pytest's order.
SLOWEST_FILES = (
    *CLUSTER_FILES,
    "test_final_versions.py",
    "test_final.py",
    "test_compare.py",
    "test_demo.py",
    "test_benchmarks.py",
    "test_workflow.py",
    "test_learnable.py",
    "test_readme.py",
    "test_stack_crashes.py",
    "test_shard_cache.py",
)
# Files handed out together to one process, as one unit, so the costly session fixture they
# share is built once: `finished_sweep` (a sweep and a final, about 90 s), `ray_cluster`.
SHARED_UNITS = {
    "test_final_versions.py": "finished_sweep",
    "test_final.py": "finished_sweep",
    "test_compare.py": "finished_sweep",
    **dict.fromkeys(CLUSTER_FILES, "ray_cluster"),
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile`, with SHARED_UNITS' files handed out together."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduler(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return SHARED_UNITS.get(Path(path).name, path)

    return Scheduler(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
    strays = sorted(
        {
            item.path.name
            for item in items
            if "ray_cluster" in getattr(item, "fixturenames", ())
            and item.path.name not in CLUSTER_FILES
        }
    )
    if strays:
        raise pytest.UsageError(
            f"{', '.join(strays)} use ray_cluster: add them to CLUSTER_FILES in tests/conftest.py "
            "(the cluster is stopped after the last of those files)"
        )


# The shared cluster's process records while it runs (see ray_cluster).
_CLUSTER_RECORDS: list[dict] = []


def _stop_shared_cluster() -> None:
    """Stop the shared cluster if it runs; once stopped, stopping again does nothing."""
    stop_cluster(_CLUSTER_RECORDS)
    _CLUSTER_RECORDS.clear()


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test of CLUSTER_FILES in this process, stop the shared cluster."""
    if item.path.name in CLUSTER_FILES and (
        nextitem is None or nextitem.path.name not in CLUSTER_FILES
    ):
        _stop_shared_cluster()


def python_json(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> Any:
    """Run `python ARGS` (a script, or `-c CODE`) in a new interpreter from the repository and
    return the JSON on its last stdout line (TensorFlow prints its start-up lines first)."""
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def short_tmpdir(prefix: str) -> Path:
    """A short folder under /tmp: Ray's socket paths must stay below 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def stack_port_flags() -> list[str]:
    """`chestxpert up`/`demo` flags giving Ray, its dashboard and MLflow free ports, so a
    stack started by a test or benchmark never meets one already running here."""
    return [
        "--ray-port",
        str(free_port()),
        "--dashboard-port",
        str(free_port()),
        "--mlflow-port",
        str(free_port()),
    ]


@dataclass(frozen=True)
class RayCluster:
    address: str
    dashboard_url: str
    token_path: Path
    workspace: Path
    records: tuple[dict, ...]

    def client_env(self) -> dict[str, str]:
        """Environment for a subprocess that connects to this cluster with its token."""
        return {
            **os.environ,
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
        }


def start_cluster(
    node_env: dict[str, str], per_node: Sequence[dict[str, str]] = ({}, {}, {})
) -> tuple[RayCluster, list[dict]]:
    """Head (1 CPU, no GPU) plus two workers (1 CPU, 1 logical GPU each), nodes with `node_env`
    and then each its own of `per_node` (head first), as each machine of a cluster has its own
    settings (a local cache folder, say)."""
    ws = short_tmpdir("cxr")
    opts = StackOptions(
        workspace=ws,
        ray_port=free_port(),
        dashboard_port=free_port(),
        num_cpus=1,
        num_gpus=0,
        object_store_memory=200 * 1024**2,
    )
    head = start_ray_head(opts, extra_env={**node_env, **per_node[0]})
    records = [head]
    try:
        token = ensure_ray_token(ws)
        for index in range(2):
            worker_tmp = ws / f"w{index}"
            records.append(
                start_ray_node(
                    log_path=ws / "logs" / f"ray-worker-{index}.log",
                    token_path=token,
                    temp_dir=worker_tmp,
                    join_address=head["address"],
                    num_cpus=1,
                    num_gpus=1,
                    object_store_memory=200 * 1024**2,
                    extra_env={**node_env, **per_node[index + 1]},
                )
            )
        cluster = RayCluster(head["address"], head["dashboard_url"], token, ws, tuple(records))
        wait_for_nodes(cluster, expected=3)
        return cluster, records
    except BaseException:
        stop_cluster(records)
        raise


def stop_cluster(records: list[dict] | tuple[dict, ...]) -> None:
    for record in reversed(records):
        stop_group(record["pid"], record["start_time"])


@pytest.fixture(scope="session", autouse=True)
def shard_cache_folder(tmp_path_factory) -> Path:
    """Where trials the tests start (and the Ray nodes, which inherit it) cache S3 shards:
    a session folder, not the user's ~/.cache, unless CHESTXPERT_SHARD_CACHE is set already."""
    os.environ.setdefault("CHESTXPERT_SHARD_CACHE", str(tmp_path_factory.mktemp("shard-cache")))
    return Path(os.environ["CHESTXPERT_SHARD_CACHE"])


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint) -> Iterator[RayCluster]:
    """The shared three-node cluster.

    Its nodes carry the S3 test endpoint and keys, as a real cluster's would.
    """
    cluster, records = start_cluster(s3_endpoint.env())
    _CLUSTER_RECORDS[:] = records  # stopped after the last test of CLUSTER_FILES
    try:
        yield cluster
    finally:
        _stop_shared_cluster()


def ray_summary(cluster: RayCluster) -> dict:
    """Live nodes and resources as a fresh Ray client (another process) sees them."""
    code = (
        "import json, ray; ray.init(logging_level='ERROR', log_to_driver=False);"
        "n=[x for x in ray.nodes() if x['Alive']]; r=ray.cluster_resources();"
        "print(json.dumps({'nodes': len(n), 'GPU': r.get('GPU', 0), 'CPU': r.get('CPU', 0),"
        "'gpu_nodes': sum(1 for x in n if x['Resources'].get('GPU'))}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=cluster.client_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_for_nodes(cluster: RayCluster, expected: int, timeout_s: float = 90) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray_summary(cluster)["nodes"] >= expected:
            return
        time.sleep(1)
    raise RuntimeError(
        f"Ray cluster did not reach {expected} nodes; logs in {cluster.workspace / 'logs'}"
    )


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    bucket: str
    record: dict

    def env(self) -> dict[str, str]:
        """Variables that point boto3, pyarrow and Ray at this endpoint (moto accepts any key)."""
        return {
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        """A boto3 client for this endpoint."""
        import boto3

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """moto's S3 server on loopback with the `chestxpert` bucket."""
    ws = short_tmpdir("cxs3")
    record = start_s3(StackOptions(workspace=ws, s3_port=free_port()))
    try:
        yield S3Endpoint(record["url"], LOCAL_BUCKET, record)
    finally:
        stop_group(record["pid"], record["start_time"])


@pytest.fixture
def s3_client(s3_endpoint: S3Endpoint):
    """A boto3 client for the test endpoint."""
    return s3_endpoint.client()


@pytest.fixture
def s3_filesystem(s3_endpoint: S3Endpoint):
    """A pyarrow S3 filesystem for the test endpoint; paths are `bucket/key` without a scheme."""
    import pyarrow.fs as pafs

    env = s3_endpoint.env()
    host = s3_endpoint.url.split("://", 1)[1]
    return pafs.S3FileSystem(
        endpoint_override=host,
        scheme="http",
        region=env["AWS_DEFAULT_REGION"],
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
    )


@dataclass(frozen=True)
class MlflowServer:
    url: str
    workspace: Path
    record: dict


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[MlflowServer]:
    """A real `mlflow server` process with a SQLite store and artifacts in a local folder."""
    ws = short_tmpdir("cxml")
    record = start_mlflow(
        StackOptions(workspace=ws, mlflow_port=free_port()), (ws / "storage").as_uri()
    )
    try:
        yield MlflowServer(record["url"], ws, record)
    finally:
        stop_group(record["pid"], record["start_time"])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on loopback with database `mlflow` and a password login for `mlflow`
    (the system's binaries, else pgserver's); its folder under /tmp is deleted afterwards."""
    # `@`, `/` and `:` in the password: the store URI must quote them.
    server = start_postgres(free_port(), f"pg@{secrets.token_urlsafe(18)}/:")
    try:
        yield server
    finally:
        stop_postgres(server)


@dataclass(frozen=True)
class CentralMlflow:
    """The central MLflow of cluster/compose.yaml with real processes, and its logins.

    `username`/`password` is the login clients use, made through the auth API as
    cluster/README.md step 4 makes the cluster's. `credentials` names every secret the stack
    was given, for tests that search for them.
    """

    url: str
    workspace: Path
    username: str
    password: str
    admin_username: str
    admin_password: str
    credentials: dict[str, str]
    postgres: PostgresServer
    record: dict

    def login_env(self) -> dict[str, str]:
        """MLflow's client variables: this server, with the client login."""
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }


@pytest.fixture(scope="session")
def central_mlflow(
    s3_endpoint: S3Endpoint, postgres_server: PostgresServer
) -> Iterator[CentralMlflow]:
    """`mlflow server` as compose.yaml runs it (same arguments and variables, built by
    cluster/mlflow_server.py): PostgreSQL store, `--app-name basic-auth`, artifacts proxied to
    the S3 endpoint with a key pair only the server has; the compose user `chestxpert`."""
    ws = short_tmpdir("cxcm")
    ini = write_basic_auth_ini(ws / "basic_auth.ini", f"sqlite:///{ws / 'basic_auth.db'}", "admin")
    auth = BasicAuth(
        config_path=str(ini),
        admin_username="admin",
        admin_password=f"admin-{secrets.token_urlsafe(18)}",
        flask_secret_key=secrets.token_hex(24),
    )
    s3 = S3Artifacts(
        s3_endpoint.url,
        access_key_id=f"mlflow-server-{secrets.token_hex(8)}",
        secret_access_key=f"mlflow-s3-secret-{secrets.token_hex(16)}",
        region="us-east-1",
    )
    config = MlflowServerConfig(
        host="127.0.0.1",
        port=free_port(),
        backend_store_uri=postgres_server.store_uri(),
        artifacts_destination=f"s3://{s3_endpoint.bucket}/mlflow",
        auth=auth,
        s3=s3,
    )
    record = start_mlflow_server(config, ws / "logs" / "mlflow.log")
    try:
        password = f"cluster-{secrets.token_urlsafe(18)}"
        created = requests.post(
            f"{record['url']}/api/2.0/mlflow/users/create",
            json={"username": "chestxpert", "password": password},
            auth=(auth.admin_username, auth.admin_password),
            timeout=30,
        )
        assert created.status_code == 200, created.text
        yield CentralMlflow(
            url=record["url"],
            workspace=ws,
            username="chestxpert",
            password=password,
            admin_username=auth.admin_username,
            admin_password=auth.admin_password,
            credentials={
                "MLflow client password": password,
                "MLflow admin password": auth.admin_password,
                "Flask secret key": auth.flask_secret_key,
                "PostgreSQL password": postgres_server.password,
                "MLflow server's S3 secret key": s3.secret_access_key or "",
            },
            postgres=postgres_server,
            record=record,
        )
    finally:
        stop_group(record["pid"], record["start_time"])


@pytest.fixture
def cli_env(monkeypatch, tmp_path: Path) -> None:
    """For tests that call `chestxpert.cli.main` in-process: what it sets in the environment (Ray's
    client auth, TensorFlow's log level, --verbose) is undone after the test."""
    for key, value in {
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray_auth_token"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CHESTXPERT_VERBOSE", raising=False)


@dataclass(frozen=True)
class SyntheticDataset:
    raw: Path
    prepared: Path
    manifest: dict


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> SyntheticDataset:
    """Synthetic phantoms (NIH layout, 64×64) prepared once per session into Parquet shards."""
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.synth import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root / "raw", images=600, size=64, seed=0, difficulty=0.1, progress=False)
    endpoints = resolve(workspace=root / "ws", environ={})
    opts = PrepareOptions(
        source="nih", image_size=64, split="official", val_fraction=0.15, progress=False
    )
    manifest = prepare(str(root / "raw"), str(root / "prepared"), opts, endpoints)
    return SyntheticDataset(root / "raw", root / "prepared", manifest)


@pytest.fixture(scope="session")
def finished_sweep(synthetic_dataset: SyntheticDataset, mlflow_server, tmp_path_factory) -> dict:
    """A one-trial sweep run to the end with an in-process Ray, then `chestxpert final --json` on
    it once (version 1, the champion); its storage, workspace, environment and the outputs."""
    import yaml

    root = tmp_path_factory.mktemp("final")
    spec = {
        "name": "tiny-final",
        "dataset": str(synthetic_dataset.prepared),
        "model_name": "tiny-final-model",
        "trial": {"backbone": "densenet_tiny", "image_size": 64, "epochs": 2, "batch_size": 32},
        "search": {"num_samples": 1, "max_concurrent": 1},
        "scheduler": {"type": "none"},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "CHESTXPERT_STORAGE": str(root / "storage"),
        "CHESTXPERT_WORKSPACE": str(root / "ws"),
        # the trial's system metrics every second (10 s by default): a few points in a short trial
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
    }
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [CHESTXPERT_CLI, "sweep", "run", str(root / "spec.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    final = subprocess.run(
        [CHESTXPERT_CLI, "final", "tiny-final", "--local", "--bootstrap", "200", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    return {
        "root": root,
        "env": env,
        "stdout": final.stdout,  # the --json summary
        "stderr": final.stderr,  # its progress
        "sweep_stderr": run.stderr,
        "sweep_stdout": run.stdout,
        "mlflow": mlflow_server.url,
    }


@pytest.fixture
def interrupt_on_second_shard(monkeypatch) -> dict:
    """Make `prepare` die (as on Ctrl-C) while writing its second shard; count the shard writes."""
    from chestxpert.datasets import prepare as prepare_module

    calls = {"n": 0}
    real = prepare_module._shard_table

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_shard_table", interrupt)
    calls.update(real=real, interrupt=interrupt)  # to switch it off and on within one test
    return calls
