"""cluster.yaml through Ray's own config preparation and schema: loopback dashboard, token
auth, instance profiles, a CPU head and spot GPU workers that fit every GPU example sweep.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from tests.conftest import REPO
from tests.deploy_helpers import (
    RAYCLUSTER,
    RAYJOB,
    kuberay_docs,
    load_cluster_yaml,
    ray_cli_context,
    ray_cluster_spec,
)

GPU_SPECS = sorted((REPO / "sweeps" / "examples").glob("*-gpu.yaml"))


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a config before it asks AWS anything: merge Ray's AWS defaults,
    then check it against ray-schema.json and Ray's own rules. Returns the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_own_validation() -> None:
    prepared = ray_validate(load_cluster_yaml())
    assert prepared["cluster_name"] == "chestxpert"
    assert prepared["provider"] == {
        "type": "aws",
        "region": "us-east-1",
        "cache_stopped_nodes": False,
    }


HEAD, WORKER = "ray.head.cpu", "ray.worker.gpu"
BREAKAGES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "unknown top-level key": lambda c: c.update(dashboard_host="0.0.0.0"),
    "unknown docker key": lambda c: c["docker"].update(env={"MLFLOW_TRACKING_URI": "x"}),
    "GPU count as text": lambda c: c["available_node_types"][WORKER]["resources"].update(GPU="1"),
    "negative CPU count": lambda c: c["available_node_types"][WORKER]["resources"].update(CPU=-8),
    "min_workers as text": lambda c: c["available_node_types"][WORKER].update(min_workers="0"),
    "node type without node_config": lambda c: c["available_node_types"][HEAD].pop("node_config"),
    "per-type docker run_options": lambda c: c["available_node_types"][WORKER].update(
        docker={"run_options": []}
    ),
    "head type that does not exist": lambda c: c.update(head_node_type="ray.head.missing"),
    "max_workers as text": lambda c: c.update(max_workers="eight"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_cluster_yaml_is_rejected(breakage: str) -> None:
    config = load_cluster_yaml()
    BREAKAGES[breakage](config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


def ray_start_params(command_line: str) -> dict[str, Any]:
    """The parsed options of the `ray start` in a start command (`ulimit ...; ray start ...`)."""
    segments = [s.strip() for s in command_line.split(";") if s.strip().startswith("ray start")]
    assert len(segments) == 1, command_line
    return ray_cli_context(shlex.split(segments[0])[1:]).params


def test_the_head_starts_ray_with_the_dashboard_on_loopback_and_no_gpu() -> None:
    commands = load_cluster_yaml()["head_start_ray_commands"]
    assert commands[0] == "ray stop"
    params = ray_start_params(commands[1])
    assert params["head"] and params["port"] == 6379
    assert params["dashboard_host"] == "127.0.0.1"
    assert params["num_gpus"] == 0
    assert params["disable_usage_stats"]
    assert params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"


def test_workers_join_the_head_without_usage_stats() -> None:
    commands = load_cluster_yaml()["worker_start_ray_commands"]
    assert commands[0] == "ray stop"
    params = ray_start_params(commands[1])
    assert params["address"] == "$RAY_HEAD_IP:6379" and not params["head"]
    assert params["disable_usage_stats"]


def test_cluster_yaml_nodes_use_the_image_token_and_instance_profiles() -> None:
    config = load_cluster_yaml()
    prepared = ray_validate(config)
    docker = config["docker"]
    assert docker["container_name"] and "chestxpert" in docker["image"]
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    env = dict(
        option.split(" ", 1)[1].split("=", 1)
        for option in docker["run_options"]
        if option.startswith("--env ")
    )
    assert urlparse(env["MLFLOW_TRACKING_URI"]).scheme in ("http", "https")
    assert env["CHESTXPERT_STORAGE"].startswith("s3://")
    assert docker["worker_run_options"] == ["--gpus all"] and "head_run_options" not in docker
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for name, node_type in config["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), (name, arn)
    # The image has everything: Ray's AWS defaults (which pip-install another Ray) must not run.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip" in command for command in prepared[key]), (key, prepared[key])
    # Ray's own security group opens only ssh to the world; a group of ours may not open more.
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        if any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])):
            assert rule["FromPort"] == rule["ToPort"] == 22, rule


def test_cluster_yaml_has_a_cpu_head_and_spot_gpu_workers() -> None:
    config = load_cluster_yaml()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] > 0
    workers = [
        body
        for name, body in config["available_node_types"].items()
        if name != config["head_node_type"]
    ]
    assert len(workers) == 1
    worker = workers[0]
    assert worker["resources"]["GPU"] == 1
    assert (worker["min_workers"], worker["max_workers"]) == (0, 8) and config["max_workers"] >= 8
    assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert worker["node_config"]["InstanceType"].startswith("g5.")


def kuberay_gpu_groups() -> list[dict[str, Any]]:
    groups = []
    for doc in kuberay_docs(RAYCLUSTER) + kuberay_docs(RAYJOB):
        spec = ray_cluster_spec(doc)
        if spec:
            groups += spec["workerGroupSpecs"]
    return groups


@pytest.mark.parametrize("spec_path", GPU_SPECS, ids=lambda p: p.name)
def test_every_gpu_example_trial_fits_a_gpu_worker(spec_path: Path) -> None:
    wanted = yaml.safe_load(spec_path.read_text())["resources"]
    config = load_cluster_yaml()
    worker = next(
        body for body in config["available_node_types"].values() if body["resources"].get("GPU")
    )
    assert (
        wanted["cpus"] <= worker["resources"]["CPU"]
        and wanted["gpus"] <= worker["resources"]["GPU"]
    )
    for group in kuberay_gpu_groups():
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert wanted["cpus"] <= int(group["rayStartParams"]["num-cpus"])
        assert wanted["gpus"] <= int(limits["nvidia.com/gpu"])


def test_there_are_gpu_example_specs() -> None:
    assert GPU_SPECS, "sweeps/examples/*-gpu.yaml: the cluster files are sized for them"
