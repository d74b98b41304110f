"""Bytes fetched from S3 by a sweep: today's reader (every trial streams every shard every epoch)
against the per-node shard cache (each node fetches each shard once).

The same sweep (4 `convnet_small` trials × 3 epochs, no early stopping) runs twice on the tests'
three-node Ray cluster with the dataset on a moto S3 server: once with `trial.shard_cache: off`,
once with each node's own cache folder (each node's `CHESTXPERT_SHARD_CACHE`, as each machine of
a real cluster has its own disk). Every byte S3 sends back passes a relay in front of it that
counts them (HTTP headers, manifests and listings included). Target: the cached sweep fetches at
most 1.1 × (the shards trials read × the nodes that ran trials).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from benchmarks.runner import run_child, scratch_dir, services
from chestxpert.cluster.processes import free_port
from chestxpert.cluster.stack import LOCAL_BUCKET, StackOptions, start_s3


@dataclass(frozen=True)
class Size:
    images: int  # synthetic films at image_size
    image_size: int
    trials: int
    epochs: int


FULL = Size(images=3000, image_size=64, trials=4, epochs=3)
SMOKE = Size(images=60, image_size=32, trials=1, epochs=1)
TARGET = 1.1


class CountingRelay:
    """A TCP relay on loopback in front of `target_url` that counts the bytes coming back, each
    piece of them (up to 64 KiB) held `delay_s` first: a slow network, where a test needs one."""

    def __init__(self, target_url: str, port: int, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        target = urlparse(target_url)
        self.target = (target.hostname, target.port)
        self.server = socket.create_server(("127.0.0.1", port))
        self.url = f"http://127.0.0.1:{port}"
        self.received = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if counted and self.delay_s:
                    time.sleep(self.delay_s)
                sink.sendall(data)
                if counted:
                    with self._lock:
                        self.received += len(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def close(self) -> None:
        self.server.close()


def sweep_spec(name: str, dataset: str, size: Size, shard_cache: str | None) -> dict[str, Any]:
    """The sweep both sides run; they differ in `trial.shard_cache` only."""
    trial: dict[str, Any] = {
        "backbone": "convnet_small",
        "image_size": size.image_size,
        "epochs": size.epochs,
        "batch_size": 32,
    }
    if shard_cache is not None:
        trial["shard_cache"] = shard_cache
    return {
        "name": name,
        "dataset": dataset,
        "trial": trial,
        "resources": {"cpus": 1, "gpus": 0},
        "search": {"algorithm": "random", "seed": 0, "num_samples": size.trials},
        "space": {"learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2}},
        "scheduler": {"type": "none"},
        "max_retries": 0,
    }


def run_sweeps(spec: dict[str, Any]) -> dict[str, Any]:
    """Child (a Ray client with the cluster's token): the relay in front of S3 on the port the
    nodes were given, then each sweep with `run_sweep`, one after the other; per sweep the
    bytes S3 sent, its errors, its epochs and the Ray nodes its trials ran on."""
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.sweeps.layout import locate
    from chestxpert.sweeps.run import run_sweep
    from chestxpert.sweeps.spec import spec_from_dict
    from chestxpert.sweeps.status import read_trials

    work = Path(spec["work"])
    relay = CountingRelay(spec["s3_url"], spec["relay_port"])
    out = {}
    try:
        for label, data in spec["sweeps"].items():
            endpoints = resolve(
                workspace=work / "ws",
                storage=str(work / "storage"),
                mlflow_tracking_uri=f"sqlite:///{work / 'mlflow.db'}",
            )
            sweep = spec_from_dict(data, source=data["name"])
            before = relay.received
            summary = run_sweep(sweep, endpoints)
            rows = read_trials(
                locate(endpoints, sweep.name), "val_auc_macro", "max", sweep.epochs(), False
            )
            out[label] = {
                "fetched": relay.received - before,
                "errors": summary["errors"],
                "epochs": sum(row.epochs for row in rows),
                "nodes": sorted({result["node_id"] for row in rows for result in row.results}),
            }
    finally:
        relay.close()
    return out


def start_cached_cluster(work: Path, keys: dict[str, str]) -> tuple[Any, list, list, dict, int]:
    """The tests' three-node cluster, each node with a shard cache folder of its own and S3
    reached through a relay port (the relay itself runs in the child, beside the driver):
    (cluster, node records, cache folders, the nodes' S3 variables, the relay port)."""
    from tests.conftest import start_cluster

    relay_port = free_port()
    s3_env = {
        **keys,
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{relay_port}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    caches = [work / f"cache-node{index}" for index in range(3)]
    cluster, nodes = start_cluster(
        s3_env, [{"CHESTXPERT_SHARD_CACHE": str(folder)} for folder in caches]
    )
    return cluster, nodes, caches, s3_env, relay_port


def run(smoke: bool = False) -> None:
    import boto3

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.synth import generate
    from tests.conftest import stop_cluster

    size = SMOKE if smoke else FULL
    with scratch_dir() as work, services() as records:
        generate(work / "raw", images=size.images, size=size.image_size, seed=0, progress=False)
        opts = PrepareOptions(
            source="nih", image_size=size.image_size, shard_rows=250, progress=False
        )
        manifest = prepare(
            str(work / "raw"), str(work / "prepared"), opts, resolve(workspace=work, environ={})
        )
        s3 = start_s3(StackOptions(workspace=work / "s3", s3_port=free_port()))
        records.append(s3)
        keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        client = boto3.client(
            "s3",
            endpoint_url=s3["url"],
            region_name="us-east-1",
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        )
        for path in (work / "prepared").rglob("*"):
            if path.is_file():
                key = f"datasets/bench/{path.relative_to(work / 'prepared')}"
                client.upload_file(str(path), LOCAL_BUCKET, key)
        dataset = f"s3://{LOCAL_BUCKET}/datasets/bench"
        cluster, nodes, caches, s3_env, relay_port = start_cached_cluster(work, keys)
        read = manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]
        read_bytes = sum(manifest["shard_checks"][shard]["bytes"] for shard in read)
        print(
            f"  {size.images} images at {size.image_size} px, {len(read)} train+val shards "
            f"of {read_bytes / 1e6:.2f} MB (what trials read); {size.trials} convnet_small "
            f"trials x {size.epochs} epochs, 1 CPU each, on 3 Ray nodes",
            flush=True,
        )
        try:
            sweeps = {
                label: sweep_spec(f"bench-{label}", dataset, size, setting)
                for label, setting in (("streamed", "off"), ("cached", None))
            }
            spec = {"work": str(work), "s3_url": s3["url"], "relay_port": relay_port}
            result = run_child(
                run_sweeps,
                {**spec, "sweeps": sweeps},
                env={**cluster.client_env(), **s3_env},
                timeout=3600,
            )
        finally:
            stop_cluster(nodes)
        for label, side in result.items():
            if side["errors"] or side["epochs"] != size.trials * size.epochs:
                raise RuntimeError(f"the {label} sweep did not run every epoch: {side}")
            print(
                f"  {label}: {side['fetched'] / 1e6:.2f} MB from S3 "
                f"({side['fetched'] / read_bytes:.2f} x the shards trials read), trials "
                f"on {len(side['nodes'])} node(s)"
            )
        fetched = {label: side["fetched"] for label, side in result.items()}
        nodes_used = {label: len(side["nodes"]) for label, side in result.items()}
        cached_folders = sum(1 for folder in caches if any(folder.glob("*.parquet")))
        target = TARGET * read_bytes * nodes_used["cached"]
        print(
            f"  node caches filled: {cached_folders}; today's estimate trials x epochs x "
            f"shards = {size.trials * size.epochs * read_bytes / 1e6:.2f} MB"
        )
        print(
            f"  ratio cached/streamed: {fetched['cached'] / fetched['streamed']:.3f}; cached "
            f"{fetched['cached'] / 1e6:.2f} MB against a target of <= {target / 1e6:.2f} MB "
            f"({TARGET} x {read_bytes / 1e6:.2f} MB x {nodes_used['cached']} nodes): "
            f"{'met' if fetched['cached'] <= target else 'missed'}"
        )
