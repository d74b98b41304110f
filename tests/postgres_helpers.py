"""A throwaway PostgreSQL server for the tests: MLflow's store, as in cluster/compose.yaml.

The system's PostgreSQL binaries when installed (Debian: /usr/lib/postgresql/N/bin), else the
ones the `pgserver` wheel ships (the dev extra), so `make test` needs nothing beyond pip.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from chestxpert.cluster.mlflow_server import postgres_store_uri
from chestxpert.cluster.processes import (
    is_ours,
    process_start_time,
    spawn,
    stop_group,
    wait_until,
)

LOOPBACK = "127.0.0.1"
SOURCES = ("system", "pgserver")
# PostgreSQL refuses to run as root. As root the throwaway server runs as `nobody`, which
# every Unix has; its data folder is made that user's and nobody else's.
UNPRIVILEGED_USER = "nobody"


def _has_server(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in ("initdb", "postgres", "pg_dump"))


def postgres_bin_dir(source: str | None = None) -> tuple[str, Path] | None:
    """(source, folder) of PostgreSQL's initdb/postgres/pg_dump: `system` or `pgserver`.

    With `source` None the system's binaries win when both exist (newest major version first).
    None when the asked-for source is not installed here.
    """
    candidates: list[tuple[str, Path]] = []
    if source in (None, "system"):
        debian = sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
            reverse=True,
        )
        candidates += [("system", Path(p)) for p in debian]
        on_path = shutil.which("postgres")
        if on_path:
            candidates.append(("system", Path(on_path).resolve().parent))
    if source in (None, "pgserver"):
        found = importlib.util.find_spec("pgserver")
        if found is not None and found.submodule_search_locations:
            package = Path(next(iter(found.submodule_search_locations)))
            candidates.append(("pgserver", package / "pginstall" / "bin"))
    return next(((name, path) for name, path in candidates if _has_server(path)), None)


@dataclass(frozen=True)
class PostgresServer:
    """A running server: its login, the folder holding its data and log, its process record."""

    source: str
    bin_dir: Path
    root: Path
    port: int
    user: str
    password: str
    database: str
    record: dict

    def store_uri(self) -> str:
        """MLflow's `--backend-store-uri` for this server's database (holds the password)."""
        return postgres_store_uri(self.user, self.password, LOOPBACK, self.port, self.database)

    def connect(self, database: str | None = None):
        """A psycopg2 connection with the password login, over TCP on loopback."""
        import psycopg2

        return psycopg2.connect(
            host=LOOPBACK,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database or self.database,
            connect_timeout=5,
        )

    def dump(self) -> bytes:
        """`pg_dump` of the database: every table's rows, as SQL text."""
        result = subprocess.run(
            [str(self.bin_dir / "pg_dump"), "-h", LOOPBACK, "-p", str(self.port)]
            + ["-U", self.user, "-d", self.database, "--no-owner"],
            env={**os.environ, "PGPASSWORD": self.password},
            capture_output=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        return result.stdout


def start_postgres(port: int, password: str, source: str | None = None) -> PostgresServer:
    """initdb a new data folder under /tmp, start `postgres` on 127.0.0.1:`port` only (no Unix
    socket) with a password login for user `mlflow`, and create database `mlflow`.

    The server leads its own session: stop it with `stop_postgres`.
    """
    located = postgres_bin_dir(source)
    if located is None:
        raise RuntimeError(
            f"no PostgreSQL server binaries ({source or 'system or pgserver'}): install the "
            "dev extra (`pip install -e '.[dev]'`, which brings pgserver) or PostgreSQL itself"
        )
    name, bin_dir = located
    root = Path(tempfile.mkdtemp(prefix="cxpg", dir="/tmp"))
    run_as = UNPRIVILEGED_USER if os.geteuid() == 0 else None
    if run_as is not None:
        import pwd

        entry = pwd.getpwnam(run_as)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    password_file = root / "initdb-password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    if run_as is not None:
        os.chown(password_file, entry.pw_uid, entry.pw_gid)
    identity = {} if run_as is None else {"user": run_as, "group": entry.pw_gid, "extra_groups": []}
    try:
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "mlflow"]
            + [f"--pwfile={password_file}", "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
            capture_output=True,
            text=True,
            timeout=120,
            **identity,
        )
    finally:
        password_file.unlink()
    if initdb.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb ({bin_dir}) failed:\n{initdb.stdout}\n{initdb.stderr}")
    log_path = root / "logs" / "postgres.log"
    # A throwaway store: durability settings off, which makes MLflow's writes cheap.
    cmd = [str(bin_dir / "postgres"), "-D", str(root / "data"), "-p", str(port)]
    cmd += ["-c", f"listen_addresses={LOOPBACK}", "-c", "unix_socket_directories="]
    cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    proc = spawn(cmd, log_path, user=run_as)
    record = {"pid": proc.pid, "start_time": process_start_time(proc.pid), "log": str(log_path)}
    server = PostgresServer(name, bin_dir, root, port, "mlflow", password, "mlflow", record)
    try:

        def accepts_login() -> bool:
            server.connect("postgres").close()
            return True

        wait_until("PostgreSQL", accepts_login, proc.pid, log_path, 60)
        admin = server.connect("postgres")
        admin.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        with admin.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        admin.close()
    except BaseException:
        stop_postgres(server)
        raise
    return server


def stop_postgres(server: PostgresServer) -> None:
    """Stop the server and delete the folder `start_postgres` made for it.

    PostgreSQL puts each of its children in a session of its own, so stopping the postmaster's
    session is not enough: SIGINT (its fast shutdown) makes it end its clients' connections and
    every child, then exit; SIGTERM would wait for the clients to disconnect first.
    """
    pid, start_time = server.record["pid"], server.record["start_time"]
    if is_ours(pid, start_time):
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process_start_time(pid) is not None:
            time.sleep(0.1)
    stop_group(pid, start_time)  # what is left, and the zombie of our child
    shutil.rmtree(server.root, ignore_errors=True)
