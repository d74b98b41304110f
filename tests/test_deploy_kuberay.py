"""The KubeRay manifests: the pinned Ray with token auth and GPUs, the project image as a
non-root user, secrets by reference only, and a RayJob that runs the GPU sweep spec.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from packaging.version import Version

from tests.conftest import REPO
from tests.deploy_helpers import (
    RAYCLUSTER,
    RAYJOB,
    SECRET_NAME,
    dockerfile_instructions,
    kuberay_docs,
    load_cluster_yaml,
    pyproject_requirement,
    ray_cluster_spec,
)


def pod_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_manifest_runs_the_pinned_ray_with_token_auth_and_gpus(path: Path) -> None:
    docs = kuberay_docs(path)
    assert all(doc["apiVersion"] in ("v1", "ray.io/v1") for doc in docs)
    assert "Secret" not in {doc["kind"] for doc in docs}, (
        "Secrets are made with kubectl, never committed"
    )
    specs = [spec for spec in map(ray_cluster_spec, docs) if spec]
    assert len(specs) == 1
    spec = specs[0]
    assert spec["rayVersion"] == importlib.metadata.version("ray")
    assert Version(spec["rayVersion"]) in pyproject_requirement("ray").specifier
    assert spec["authOptions"]["mode"] == "token"
    image = load_cluster_yaml()["docker"]["image"]
    for pod in pod_specs(spec):
        assert (
            pod["securityContext"]["runAsNonRoot"] is True
            and pod["securityContext"]["runAsUser"] == 1000
        )
        assert pod["serviceAccountName"] == "chestxpert-ray"
        for container in pod["containers"]:
            assert container["image"] == image, "every node runs the same project image"
            assert {"configMapRef": {"name": "chestxpert-endpoints"}} in container["envFrom"]
            for variable in container.get("env", []):
                if SECRET_NAME.search(variable["name"]):
                    assert "value" not in variable and "secretKeyRef" in variable["valueFrom"], (
                        variable
                    )
    gpu_groups = spec["workerGroupSpecs"]
    assert (
        len(gpu_groups) == 1
        and gpu_groups[0]["minReplicas"] == 0
        and gpu_groups[0]["maxReplicas"] == 8
    )
    resources = gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert (
        "nvidia.com/gpu" not in head["limits"]
        and spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    )


def test_kuberay_config_map_service_account_and_secrets_by_reference() -> None:
    docs = {doc["kind"]: doc for doc in kuberay_docs(RAYCLUSTER)}
    data = docs["ConfigMap"]["data"]
    assert urlparse(data["MLFLOW_TRACKING_URI"]).scheme in ("http", "https")
    assert data["CHESTXPERT_STORAGE"].startswith("s3://")
    assert not any(SECRET_NAME.search(key) for key in data), (
        "credentials do not belong in a ConfigMap"
    )
    role = docs["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role)


def test_rayjob_runs_the_gpu_sweep_spec_from_the_image() -> None:
    from chestxpert.cli import build_parser

    job = kuberay_docs(RAYJOB)[0]
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    entrypoint = job["spec"]["entrypoint"]
    assert "chestxpert sweep run sweeps/examples/nih-densenet121-gpu.yaml" in entrypoint
    workdir, _, command = entrypoint.partition(" && ")
    assert workdir == "cd " + next(
        args for keyword, args in dockerfile_instructions() if keyword == "WORKDIR"
    )
    argv = shlex.split(command)[1:]
    assert (REPO / argv[-1]).is_file()
    assert build_parser().parse_args(argv).sweep_command == "run"
