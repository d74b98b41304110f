"""`chestxpert sweep run|resume`: a sweep spec to a Ray Tune sweep, read top to bottom like the spec.

OptunaSearch (TPE) proposes configurations, ASHA stops weak trials, each trial
checkpoints to the sweep's storage and streams metrics to MLflow.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.endpoints import (
    Endpoints,
    apply_client_environment,
    client_environment,
    prepare_ray_environment,
    storage_filesystem,
)
from cluster.errors import UserError
from sweeps.spec import SweepSpec

SPEC_FILE = "chestxpert_spec.json"
AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)
SUMMARY_FILE = "chestxpert_summary.json"


class SweepError(UserError, RuntimeError):
    """A sweep that cannot start or resume; the message says what to do."""


@dataclass(frozen=True)
class SweepLocation:
    """Where a sweep lives in storage: Tune's experiment folder `<storage>/<name>`."""

    fs: Any
    root: str  # storage root path on `fs` (no scheme)
    name: str
    uri: str  # human-readable, e.g. s3://bucket/prefix/name

    @property
    def path(self) -> str:
        return f"{self.root}/{self.name}"

    def read_json(self, filename: str) -> dict[str, Any] | None:
        import pyarrow.fs as pafs

        target = f"{self.path}/{filename}"
        if self.fs.get_file_info(target).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(target) as stream:
            return json.loads(stream.read())

    def write_json(self, filename: str, payload: dict[str, Any]) -> None:
        self.fs.create_dir(self.path, recursive=True)
        data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
        partial = f"{self.path}/.{filename}.partial"
        with self.fs.open_output_stream(partial) as stream:
            stream.write(data)
        self.fs.move(partial, f"{self.path}/{filename}")


def locate(endpoints: Endpoints, name: str) -> SweepLocation:
    """The storage location of sweep `name` under the resolved storage root."""
    fs, root = storage_filesystem(endpoints)
    return SweepLocation(fs, root, name, f"{endpoints.storage_uri}/{name}")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def worker_environment(endpoints: Endpoints) -> dict[str, str]:
    """Variables every trial process needs: where S3 is, quieter TensorFlow. No real credential:
    workers use their own AWS chain (instance profile); only the loopback stand-in keys pass."""
    env = {k: v for k, v in client_environment(endpoints).items() if not k.startswith("RAY_")}
    if not endpoints.local_s3:
        env.pop("AWS_ACCESS_KEY_ID", None)
        env.pop("AWS_SECRET_ACCESS_KEY", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def connect(endpoints: Endpoints) -> dict[str, str]:
    """Connect this driver to Ray (the resolved address, else an in-process local Ray); return what it found."""
    # Token auth and the token's path, for callers that did not come through the CLI
    # (which sets them first thing); a no-op when they are already set.
    prepare_ray_environment(endpoints.workspace)
    apply_client_environment(endpoints)
    if endpoints.ray_address is None:
        from cluster.stack import ensure_ray_token, ray_temp_dir

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
        ray.init(address=endpoints.ray_address, runtime_env=runtime_env, logging_level="WARNING",
                 configure_logging=False)  # fmt: skip
    else:
        ray.init(runtime_env=runtime_env, include_dashboard=False, logging_level="WARNING",
                 _temp_dir=str(ray_temp_dir(endpoints.workspace)), configure_logging=False)  # fmt: skip
    context = ray.get_runtime_context()
    return {"dashboard": endpoints.ray_dashboard_url or "(in-process Ray: no dashboard)",
            "job_id": context.get_job_id(), "resources": json.dumps(ray.cluster_resources())}  # fmt: skip


def trial_folder_name(trial) -> str:
    """`train_<trial id>`: Tune's default folder name repeats the whole config (the dataset path too)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def _tuner_parts(
    spec: SweepSpec, endpoints: Endpoints, location: SweepLocation, parent_run_id: str
):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.tracking import NestedMlflowCallback
    from trainable.train import train

    trainable = tune.with_resources(train, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus})
    # Optuna needs something to search; a spec without a space just repeats one config.
    if spec.search.algorithm == "optuna" and spec.space:
        import optuna

        sampler = optuna.samplers.TPESampler(
            seed=spec.search.seed, n_startup_trials=spec.search.tpe_startup_trials()
        )
        searcher = OptunaSearch(metric=spec.metric, mode=spec.mode, sampler=sampler,
                                points_to_evaluate=spec.search.points_to_evaluate or None)  # fmt: skip
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)
    else:
        search_alg = BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=spec.search.max_concurrent,
                                           points_to_evaluate=spec.search.points_to_evaluate or None)  # fmt: skip
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.scheduler.max_t or spec.epochs(),
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)  # fmt: skip
    else:
        scheduler = FIFOScheduler()
    tune_config = tune.TuneConfig(
        metric=spec.metric, mode=spec.mode, search_alg=search_alg, scheduler=scheduler,
        num_samples=spec.search.num_samples, time_budget_s=spec.search.time_budget_s,
        trial_dirname_creator=trial_folder_name,
    )  # fmt: skip
    mlflow_uri = spec.mlflow.tracking_uri or endpoints.mlflow_tracking_uri
    run_config = tune.RunConfig(
        name=spec.name,
        storage_path=location.root,
        storage_filesystem=location.fs,
        failure_config=tune.FailureConfig(max_failures=spec.max_retries),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=spec.checkpoints_to_keep,
            checkpoint_score_attribute=spec.metric,
            checkpoint_score_order=spec.mode,
        ),  # fmt: skip
        callbacks=[
            NestedMlflowCallback(
                mlflow_uri,
                spec.mlflow.experiment,
                spec.name,
                parent_run_id,
                spec.scheduler.max_t or spec.epochs(),
            )
        ],  # fmt: skip
        verbose=1,
    )
    return trainable, tune_config, run_config


def run_sweep(spec: SweepSpec, endpoints: Endpoints, resume: bool = False) -> dict[str, Any]:
    """Run (or, with `resume`, continue) the sweep and return its summary (best trial, config, checkpoint)."""
    from sweeps.tracking import parent_run

    location = locate(endpoints, spec.name)
    recorded = location.read_json(SPEC_FILE)
    if resume and recorded is None:
        raise SweepError(
            f"no sweep named {spec.name!r} in {endpoints.storage_uri}; start it with `chestxpert sweep run`"
        )
    if not resume and recorded is not None:
        raise SweepError(
            f"a sweep named {spec.name!r} already exists in {location.uri}; continue it with "
            f"`chestxpert sweep resume {spec.name}` or choose another name (--name)"
        )
    found = connect(endpoints)
    try:
        mlflow_uri = spec.mlflow.tracking_uri or endpoints.mlflow_tracking_uri
        print(f"Ray dashboard: {found['dashboard']}   resources: {found['resources']}")
        print(f"MLflow: {mlflow_uri}  experiment {spec.mlflow.experiment!r}")
        print(f"storage: {location.uri}", flush=True)
        tags = {
            "chestxpert.git_commit": _git_commit(),
            "chestxpert.ray_job_id": os.environ.get("RAY_JOB_ID", found["job_id"]),
        }
        try:
            from datasets.reader import open_dataset

            tags["chestxpert.dataset_digest"] = open_dataset(spec.dataset, endpoints).manifest.get(
                "digest", ""
            )
        except UserError as err:
            raise SweepError(f"dataset {spec.dataset}: {err}") from None
        parent_id = parent_run(mlflow_uri, spec.mlflow.experiment, spec.name, spec.to_plain_dict(), tags,
                               reuse=recorded.get("parent_run_id") if recorded else None)  # fmt: skip
        if not resume:
            location.write_json(SPEC_FILE, {"spec": spec.to_plain_dict(), "raw": spec.model_dump(mode="json"),
                                             "parent_run_id": parent_id})  # fmt: skip
        trainable, tune_config, run_config = _tuner_parts(spec, endpoints, location, parent_id)
        from ray import tune

        if resume:
            if not tune.Tuner.can_restore(location.path, storage_filesystem=location.fs):
                raise SweepError(
                    f"{location.uri} has the sweep's spec but no Tune state: the driver stopped before the "
                    f"first trial started. Start it again with `chestxpert sweep run` under a new --name"
                )
            tuner = tune.Tuner.restore(location.path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=location.fs)  # fmt: skip
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=spec.param_space(),
                tune_config=tune_config,
                run_config=run_config,
            )
        results = tuner.fit()
        return _summarise(spec, results, location, mlflow_uri, parent_id)
    finally:
        # Leave Ray before anyone stops it: a driver still attached to a stopped
        # GCS waits 60 s and then kills its own process.
        import ray

        ray.shutdown()


def _summarise(
    spec: SweepSpec, results, location: SweepLocation, mlflow_uri: str, parent_id: str
) -> dict[str, Any]:
    summary: dict[str, Any] = {"name": spec.name, "metric": spec.metric, "mode": spec.mode,
                               "trials": len(results), "errors": len(results.errors)}  # fmt: skip
    try:
        best = results.get_best_result(metric=spec.metric, mode=spec.mode, scope="all")
    except RuntimeError:
        best = None
    if best is not None and best.metrics:
        checkpoint = best.get_best_checkpoint(spec.metric, spec.mode) or best.checkpoint
        history = best.metrics_dataframe
        best_value = float(
            history[spec.metric].max() if spec.mode == "max" else history[spec.metric].min()
        )
        summary.update(
            best_trial_id=best.metrics.get("trial_id"), best_metric=best_value, best_config=best.config,
            best_checkpoint=_with_scheme(checkpoint.path if checkpoint else None, location),
        )  # fmt: skip
        try:
            from sweeps.tracking import _client

            client = _client(mlflow_uri)
            client.log_metric(parent_id, f"best_{spec.metric}", best_value)
            client.set_tag(parent_id, "chestxpert.best_trial_id", str(summary["best_trial_id"]))
            client.set_tag(parent_id, "chestxpert.best_checkpoint", str(summary["best_checkpoint"]))
            client.log_text(
                parent_id, json.dumps(best.config, indent=2, default=str), "best_config.json"
            )
            client.set_terminated(parent_id, status="FINISHED")
        except Exception as err:
            print(
                f"warning: could not record the best trial in MLflow ({type(err).__name__}: {err})"
            )
    location.write_json(SUMMARY_FILE, summary)
    return summary


def _with_scheme(path: str | None, location: SweepLocation) -> str | None:
    if path is None:
        return None
    return (
        f"s3://{path}"
        if location.uri.startswith("s3://") and not path.startswith("s3://")
        else path
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-sweep lines: best trial, its metric, its config and its checkpoint."""
    out = io.StringIO()
    out.write(f"sweep {summary['name']}: {summary['trials']} trials, {summary['errors']} errored\n")
    if summary.get("best_trial_id"):
        out.write(
            f"best trial {summary['best_trial_id']}: {summary['metric']} = {summary['best_metric']:.4f}\n"
        )
        out.write(f"best config: {json.dumps(summary['best_config'], default=str)}\n")
        out.write(f"best checkpoint: {summary['best_checkpoint']}\n")
    else:
        out.write("no trial reported the metric; see the trial logs in the Ray dashboard\n")
    return out.getvalue()
