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
    callback,
    dataset_generation: str = "",
    study=None,
    system_metrics=None,
    stop=None,
):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from chestxpert.sweeps.retention import CheckpointRetention
    from chestxpert.trainable.train import train

    # Bound here rather than put in param_space: a trial resumed after a dataset change the
    # user allowed must read the new version, and Tune keeps a trial's config as it began.
    pinned = tune.with_parameters(
        train, dataset_generation=dataset_generation, system_metrics=system_metrics
    )
    trainable = tune.with_resources(
        pinned, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}
    )
    # Optuna needs something to search (sweeps.study.uses_optuna); without it, one config.
    if study is not None:
        import optuna

        from chestxpert.sweeps.study_search import StudySearch

        sampler = optuna.samplers.TPESampler(
            seed=spec.search.seed, n_startup_trials=spec.search.tpe_startup_trials()
        )
        searcher = StudySearch(
            study.storage,
            study.name,
            max_t=spec.scheduler.max_t if spec.scheduler.type == "asha" else None,
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
        reuse_actors=spec.reuse_actors,
    )
    run_config = tune.RunConfig(
        name=spec.name,
        storage_path=location.root,
        storage_filesystem=location.fs,
        failure_config=tune.FailureConfig(max_failures=spec.max_retries),
        # Tune keeps every checkpoint; CheckpointRetention deletes the surplus once no state a
        # resume could restore names it (Tune's own num_to_keep can delete the one it names).
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=None,
            checkpoint_score_attribute=spec.metric,
            checkpoint_score_order=spec.mode,
        ),
        callbacks=[
            callback,
            CheckpointRetention(location, spec.checkpoints_to_keep, spec.metric, spec.mode),
            *([] if stop is None else [stop]),
        ],
        verbose=1,
    )
    return trainable, tune_config, run_config


def run_sweep(
    spec: SweepSpec,
    endpoints: Endpoints,
    resume: bool = False,
    mlflow_uri: str | None = None,
    force: bool = False,
    allow_dataset_change: bool = False,
) -> dict[str, Any]:
    """Run (or, with `resume`, continue) the sweep and return its summary.

    The summary holds the best trial, its config and its checkpoint. The sweep's lease is
    taken before anything is written (`force` takes a stale one). MLflow is `mlflow_uri`,
    else the server the sweep recorded, else the spec's, else the resolved endpoint; a
    server that does not answer is waited for while tracking goes to the journal. Every
    trial reads the dataset version recorded when the sweep began, even one starting after
    `data prepare --force` replaced it; `resume` refuses a replaced dataset unless
    `allow_dataset_change`, which moves new and resumed trials to the current version.
    """
    from chestxpert.sweeps.driver_log import console_log
    from chestxpert.sweeps.journal import new_session
    from chestxpert.sweeps.lease import acquire

    location = locate(endpoints, spec.name)
    session = new_session()
    command = f"sweep {'resume' if resume else 'run'} {spec.name}"
    lease = acquire(location, endpoints, command, session, force=force)
    try:
        with console_log(location, endpoints.workspace, session):  # for `sweep logs`
            return _run_holding_lease(
                spec, endpoints, location, session, resume, mlflow_uri, allow_dataset_change
            )
    finally:
        lease.release()


def _run_holding_lease(
    spec: SweepSpec,
    endpoints: Endpoints,
    location: SweepLocation,
    session: str,
    resume: bool,
    mlflow_uri: str | None,
    allow_dataset_change: bool,
) -> dict[str, Any]:
    from chestxpert.cluster.mlflow_runs import safe_uri
    from chestxpert.datasets.reader import open_dataset
    from chestxpert.sweeps.graceful import GracefulStop, end_stopped, unfinished
    from chestxpert.sweeps.status import record_abandoned
    from chestxpert.sweeps.study import plan_study
    from chestxpert.sweeps.sweep_runs import dataset_input
    from chestxpert.trainable.system_metrics import SystemMetricsTarget

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
    mlflow_uri = (
        mlflow_uri
        or (recorded or {}).get("mlflow_tracking_uri")
        or spec.mlflow.tracking_uri
        or endpoints.mlflow_tracking_uri
    )
    study = plan_study(spec, endpoints.workspace, recorded)
    found = connect(endpoints)
    callback = None
    try:
        print(f"Ray dashboard: {found['dashboard']}   resources: {found['resources']}")
        print(f"MLflow: {safe_uri(mlflow_uri)}  experiment {spec.mlflow.experiment!r}")
        print(f"storage: {location.uri}", flush=True)
        if study is not None:
            print(f"Optuna study: {study.name} in {study.storage}", flush=True)
            version = {**version, **study.record()}  # recorded beside the dataset version
        tags = {
            "chestxpert.git_commit": _git_commit(),
            "chestxpert.ray_job_id": os.environ.get("RAY_JOB_ID", found["job_id"]),
        }
        tags["chestxpert.dataset_digest"] = version[DATASET_DIGEST]
        print(f"dataset: {spec.dataset} generation {version[DATASET_GENERATION]}", flush=True)
        inputs = dataset_input(spec.dataset, current.manifest)
        if resume:  # before Tune restores: what a dead driver started after its last snapshot
            record_abandoned(location)
        callback = _tracking(
            spec, endpoints, location, session, resume, mlflow_uri, recorded, tags, version, inputs
        )
        stop = GracefulStop(spec.name)
        callback.stopped = lambda: stop.requested
        trainable, tune_config, run_config = _tuner_parts(
            spec,
            endpoints,
            location,
            callback,
            version[DATASET_GENERATION],
            study,
            SystemMetricsTarget(safe_uri(mlflow_uri), spec.mlflow.experiment, spec.name),
            stop,
        )
        from ray import tune

        if resume:
            if not tune.Tuner.can_restore(location.path, storage_filesystem=location.fs):
                raise SweepError(
                    f"{location.uri} has the sweep's spec but no Tune state: the driver stopped "
                    "before the first trial started. Start it again with `chestxpert sweep run` "
                    "under a new --name"
                )
            tuner = tune.Tuner.restore(
                location.path,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=True,
                # Without it Tune restores no search space, and a searcher whose state file the
                # killed driver never wrote has nothing to sample from.
                param_space=spec.param_space(),
                storage_filesystem=location.fs,
            )
            # Tune brings back the callbacks pickled when the sweep started (the MLflow
            # server and parent run of then); this driver's callback replaces them. Ray 2.60
            # keeps the restored run config on the tuner's local TunerInternal.
            from chestxpert.sweeps.abandoned import RecordAbandoned

            tuner._local_tuner.get_run_config().callbacks = [
                *run_config.callbacks,
                RecordAbandoned(location),
            ]
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=spec.param_space(),
                tune_config=tune_config,
                run_config=run_config,
            )
        results = tuner.fit()
        if callback.parent_run_id:
            # A resumed Tune uploads the spec record it read at restore at every snapshot,
            # undoing a parent id recorded since; record it again now that Tune is done.
            callback.record_parent(callback.parent_run_id)
        if stop.requested and unfinished(spec, location):
            return end_stopped(spec.name, callback)  # no summary: `sweep resume` continues
        return _summarise(spec, results, location, callback)
    finally:
        if callback is not None and callback.journal is not None and not callback.journal.closed:
            callback.close(attempts=1)  # the sweep stopped early: keep the journal whole
        # Leave Ray before anyone stops it: a driver still attached to a stopped
        # GCS waits 60 s and then kills its own process.
        import ray

        ray.shutdown()


def _tracking(
    spec: SweepSpec,
    endpoints: Endpoints,
    location: SweepLocation,
    session: str,
    resume: bool,
    mlflow_uri: str,
    recorded: dict[str, Any] | None,
    tags: dict[str, str],
    dataset: dict[str, Any],
    inputs: dict[str, Any],
):
    """This session's MLflow callback, journalling into the sweep's storage.

    The parent run is made now if MLflow answers; if not, one warning, and the callback
    makes it when the server returns. `inputs` describes the dataset for MLflow's Datasets
    column (`sweep_runs.dataset_input`); the parent and every trial run get it. The spec
    record keeps the parent id and the server, for `final` and `mlflow-sync`. A resume first
    replays what earlier drivers left.
    """
    from chestxpert.cluster.mlflow_runs import client, experiment_page, parent_run, safe_uri
    from chestxpert.sweeps.journal import Journal, upload_leftovers
    from chestxpert.sweeps.replay import sync_sweep
    from chestxpert.sweeps.tracking import NestedMlflowCallback, outage_warning

    max_epochs = spec.scheduler.max_t or spec.epochs()
    params = spec.to_plain_dict()
    if resume:
        upload_leftovers(location, endpoints.workspace)
    journal = Journal(location, session, endpoints.workspace)
    record = dict(recorded or {"spec": params, "raw": spec.model_dump(mode="json")})
    parent_id, warned = record.get("parent_run_id"), False
    try:
        parent_id = parent_run(
            mlflow_uri,
            spec.mlflow.experiment,
            spec.name,
            params,
            tags,
            reuse=parent_id,
            storage=location.uri,
        )
        page = experiment_page(client(mlflow_uri), spec.mlflow.experiment)
        if page:
            print(f"MLflow experiment: {page}", flush=True)
    except Exception as err:
        print(outage_warning(mlflow_uri, f"{location.uri}/tracking", spec.name, err), flush=True)
        warned = True
    # A URI with a password in it is not recorded: later commands fall back to the spec.
    record.update(
        dataset,
        parent_run_id=parent_id,
        mlflow_tracking_uri=mlflow_uri if safe_uri(mlflow_uri) == mlflow_uri else None,
    )
    location.write_json(SPEC_FILE, record)

    def record_parent(run_id: str) -> None:
        current = location.read_json(SPEC_FILE) or record
        if current.get("parent_run_id") != run_id:
            location.write_json(SPEC_FILE, {**current, "parent_run_id": run_id})

    def catch_up(runs) -> None:
        counts = sync_sweep(
            runs, location, spec.metric, spec.mode, max_epochs, params, exclude=(session,)
        )
        if counts.values or counts.ended:
            print(
                f"MLflow: replayed {counts.events} journalled event(s): {counts.values} metric "
                f"value(s) added, {counts.ended} trial run(s) given their final status",
                flush=True,
            )

    callback = NestedMlflowCallback(
        mlflow_uri, spec.mlflow.experiment, spec.name, parent_id, max_epochs, location.uri, inputs
    )
    callback.attach(
        journal, catch_up=catch_up if resume else None, on_parent=record_parent, warned=warned
    )
    callback.start_parent(params, tags)
    return callback


def _best_checkpoint(best, metric: str, mode: str):
    """The best trial's checkpoint with the best finite `metric`, else its latest. Not Tune's
    `get_best_checkpoint`: a NaN compares false, so it can return a diverged epoch's."""
    from chestxpert.sweeps.retention import score

    scored = [
        (value, checkpoint)
        for checkpoint, metrics in best.best_checkpoints
        if (value := score(metrics, metric)) is not None
    ]
    if not scored:
        return best.checkpoint
    pick = max if mode == "max" else min
    return pick(scored, key=lambda item: item[0])[1]


def _summarise(spec: SweepSpec, results, location: SweepLocation, callback) -> dict[str, Any]:
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
        checkpoint = _best_checkpoint(best, spec.metric, spec.mode)
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
    location.write_json(SUMMARY_FILE, summary)
    try:
        if callback.runs.parent_run_id is None:
            raise ConnectionError("MLflow never answered during the sweep")
        callback.runs.end_parent("FINISHED", summary)
    except Exception as err:
        print(
            f"warning: could not record the sweep's summary in MLflow ({type(err).__name__}); "
            f"run `chestxpert sweep mlflow-sync {spec.name}` when it answers",
            flush=True,
        )
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
    if summary.get("stopped"):
        return (
            f"sweep {summary['name']} stopped before its end: its state and checkpoints are "
            f"saved; continue it with `chestxpert sweep resume {summary['name']}`\n"
        )
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
