"""`chestxpert sweep run|resume`: a sweep spec to a Tune sweep, read top to bottom like the spec.

OptunaSearch (TPE) proposes configurations, ASHA stops weak trials, each trial
checkpoints to the sweep's storage and streams metrics to MLflow.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from chestxpert.cluster.endpoints import (
    Endpoints,
)
from chestxpert.cluster.errors import UserError
from chestxpert.cluster.ray_driver import connect
from chestxpert.sweeps.layout import (
    DATASET_DIGEST,
    DATASET_GENERATION,
    SPEC_FILE,
    SUMMARY_FILE,
    SweepLocation,
    dataset_version,
    locate,
)
from chestxpert.sweeps.spec import SweepSpec


class SweepError(UserError, RuntimeError):
    """A sweep that cannot start or resume; the message says what to do."""


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def trial_folder_name(trial) -> str:
    """`train_<trial id>`: Tune's default name repeats the whole config (the dataset path too)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def _tuner_parts(
    spec: SweepSpec,
    endpoints: Endpoints,
    location: SweepLocation,
    parent_run_id: str,
    dataset_generation: str = "",
):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from chestxpert.sweeps.tracking import NestedMlflowCallback
    from chestxpert.trainable.train import train

    # Bound here rather than put in param_space: a trial resumed after a dataset change the
    # user allowed must read the new version, and Tune keeps a trial's config as it began.
    pinned = tune.with_parameters(train, dataset_generation=dataset_generation)
    trainable = tune.with_resources(
        pinned, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}
    )
    # Optuna needs something to search; a spec without a space just repeats one config.
    if spec.search.algorithm == "optuna" and spec.space:
        import optuna

        sampler = optuna.samplers.TPESampler(
            seed=spec.search.seed, n_startup_trials=spec.search.tpe_startup_trials()
        )
        searcher = OptunaSearch(
            metric=spec.metric,
            mode=spec.mode,
            sampler=sampler,
            points_to_evaluate=spec.search.points_to_evaluate or None,
        )
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)
    else:
        search_alg = BasicVariantGenerator(
            random_state=spec.search.seed,
            max_concurrent=spec.search.max_concurrent,
            points_to_evaluate=spec.search.points_to_evaluate or None,
        )
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=spec.scheduler.max_t or spec.epochs(),
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    tune_config = tune.TuneConfig(
        metric=spec.metric,
        mode=spec.mode,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=spec.search.num_samples,
        time_budget_s=spec.search.time_budget_s,
        trial_dirname_creator=trial_folder_name,
    )
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
        ),
        callbacks=[
            NestedMlflowCallback(
                mlflow_uri,
                spec.mlflow.experiment,
                spec.name,
                parent_run_id,
                spec.scheduler.max_t or spec.epochs(),
            )
        ],
        verbose=1,
    )
    return trainable, tune_config, run_config


def run_sweep(
    spec: SweepSpec, endpoints: Endpoints, resume: bool = False, allow_dataset_change: bool = False
) -> dict[str, Any]:
    """Run (or, with `resume`, continue) the sweep and return its summary.

    The summary holds the best trial, its config and its checkpoint. Every trial reads the
    dataset version recorded when the sweep began, even one starting after `data prepare
    --force` replaced it; `resume` refuses a replaced dataset unless `allow_dataset_change`,
    which moves new and resumed trials to the current version.
    """
    from chestxpert.cluster.mlflow_runs import parent_run

    location = locate(endpoints, spec.name)
    recorded = location.read_json(SPEC_FILE)
    if resume and recorded is None:
        raise SweepError(
            f"no sweep named {spec.name!r} in {endpoints.storage_uri}; "
            "start it with `chestxpert sweep run`"
        )
    if not resume and recorded is not None:
        raise SweepError(
            f"a sweep named {spec.name!r} already exists in {location.uri}; continue it with "
            f"`chestxpert sweep resume {spec.name}` or choose another name (--name)"
        )
    try:
        from chestxpert.datasets.reader import open_dataset

        current = open_dataset(spec.dataset, endpoints)
    except UserError as err:
        raise SweepError(f"dataset {spec.dataset}: {err}") from None
    version = dataset_version(
        recorded if resume else None,
        spec.name,
        spec.dataset,
        current.digest,
        current.generation,
        allow_dataset_change,
        "`sweep resume`",
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
        tags["chestxpert.dataset_digest"] = version[DATASET_DIGEST]
        print(
            f"dataset: {spec.dataset} generation {version[DATASET_GENERATION]}",
            flush=True,
        )
        parent_id = parent_run(
            mlflow_uri,
            spec.mlflow.experiment,
            spec.name,
            spec.to_plain_dict(),
            tags,
            reuse=recorded.get("parent_run_id") if recorded else None,
        )
        if not resume:
            location.write_json(
                SPEC_FILE,
                {
                    "spec": spec.to_plain_dict(),
                    "raw": spec.model_dump(mode="json"),
                    "parent_run_id": parent_id,
                    **version,
                },
            )
        trainable, tune_config, run_config = _tuner_parts(
            spec, endpoints, location, parent_id, version[DATASET_GENERATION]
        )
        from ray import tune

        if resume:
            if not tune.Tuner.can_restore(location.path, storage_filesystem=location.fs):
                raise SweepError(
                    f"{location.uri} has the sweep's spec but no Tune state: the driver stopped "
                    "before the first trial started. Start it again with `chestxpert sweep run` "
                    "under a new --name"
                )
            if any(recorded.get(key) != value for key, value in version.items()):
                location.write_json(SPEC_FILE, {**recorded, **version})
            tuner = tune.Tuner.restore(
                location.path,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=True,
                storage_filesystem=location.fs,
            )
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
    summary: dict[str, Any] = {
        "name": spec.name,
        "metric": spec.metric,
        "mode": spec.mode,
        "trials": len(results),
        "errors": len(results.errors),
    }
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
            best_trial_id=best.metrics.get("trial_id"),
            best_metric=best_value,
            best_config=best.config,
            best_checkpoint=_with_scheme(checkpoint.path if checkpoint else None, location),
        )
        try:
            from chestxpert.cluster import mlflow_runs

            client = mlflow_runs.client(mlflow_uri)
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
            f"best trial {summary['best_trial_id']}: "
            f"{summary['metric']} = {summary['best_metric']:.4f}\n"
        )
        out.write(f"best config: {json.dumps(summary['best_config'], default=str)}\n")
        out.write(f"best checkpoint: {summary['best_checkpoint']}\n")
    else:
        out.write("no trial reported the metric; see the trial logs in the Ray dashboard\n")
    return out.getvalue()
