"""The Ray driver side: connect to the resolved cluster, the environment workers get, and the
code a submitted job ships to workers. The one place that calls `ray.init`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from chestxpert.cluster.endpoints import (
    Endpoints,
    apply_client_environment,
    client_environment,
    prepare_ray_environment,
)
from chestxpert.cluster.quiet import quiet_environment

AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)
# The parts of the `chestxpert` package; in a source checkout each is a top-level folder.
PACKAGE_PARTS = ("cluster", "datasets", "trainable", "sweeps", "results")


def worker_environment(endpoints: Endpoints) -> dict[str, str]:
    """Variables every trial process needs: where S3 is, quieter TensorFlow. No real credential:
    workers use their own AWS chain (instance profile); only the loopback stand-in keys pass."""
    env = {k: v for k, v in client_environment(endpoints).items() if not k.startswith("RAY_")}
    if not endpoints.local_s3:
        env.pop("AWS_ACCESS_KEY_ID", None)
        env.pop("AWS_SECRET_ACCESS_KEY", None)
    env.update(quiet_environment())
    return env


def connect(endpoints: Endpoints) -> dict[str, str]:
    """Connect this driver to Ray and return what it found.

    It connects to the resolved address, else to an in-process local Ray.
    """
    # Token auth and the token's path, for callers that did not come through the CLI
    # (which sets them first thing); a no-op when they are already set.
    prepare_ray_environment(endpoints.workspace)
    apply_client_environment(endpoints)
    if endpoints.ray_address is None:
        from chestxpert.cluster.stack import ensure_ray_token, ray_temp_dir

        # An in-process Ray creates its cluster with the token RAY_AUTH_TOKEN_PATH names.
        ensure_ray_token(endpoints.workspace)
    import ray
    from ray.tune.execution import class_cache

    # Ray Tune copies the driver's AWS keys into every trial's runtime env, and
    # Ray's runtime-env agent writes that env to its log in plain text. Trials
    # take credentials from their node's own AWS chain instead.
    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(AWS_CREDENTIAL_VARIABLES)

    # Inside a Ray job the job's runtime env already carries these variables, and
    # Ray refuses to merge a driver runtime env that names the same keys again.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    runtime_env = None if in_job else {"env_vars": worker_environment(endpoints)}
    if endpoints.ray_address:
        ray.init(
            address=endpoints.ray_address,
            runtime_env=runtime_env,
            logging_level="WARNING",
            configure_logging=False,
        )
    else:
        ray.init(
            runtime_env=runtime_env,
            include_dashboard=False,
            logging_level="WARNING",
            _temp_dir=str(ray_temp_dir(endpoints.workspace)),
            configure_logging=False,
        )
    context = ray.get_runtime_context()
    return {
        "dashboard": endpoints.ray_dashboard_url or "(in-process Ray: no dashboard)",
        "job_id": context.get_job_id(),
        "resources": json.dumps(ray.cluster_resources()),
    }


def package_for_workers(staging: Path) -> Path:
    """Copy the `chestxpert` package, laid out as it installs, into `staging/chestxpert`.

    A submitted job ships this folder as a Ray `py_modules` entry, so the driver and every
    worker import the submitter's code whatever is (or is not) installed on the nodes. In a
    source checkout the parts live in top-level folders; here they are nested as in a wheel.
    """
    spec = importlib.util.find_spec("chestxpert")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the chestxpert package is not importable here; install it first")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    root = staging / "chestxpert"
    shutil.copytree(Path(next(iter(spec.submodule_search_locations))), root, ignore=ignore)
    for part in PACKAGE_PARTS:
        if not (root / part).exists():
            located = importlib.util.find_spec(f"chestxpert.{part}")
            assert located is not None and located.origin is not None
            shutil.copytree(Path(located.origin).parent, root / part, ignore=ignore)
    return root
