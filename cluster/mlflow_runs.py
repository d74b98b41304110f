"""The one home of MLflow clients and of the runs ChestXpert makes: a parent run per sweep,
a nested run per trial, a final run under the parent, a run per `chestxpert train`, and the
registered versions of final models with the `champion` alias.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SWEEP_TAG = "chestxpert.sweep"
TRIAL_TAG = "chestxpert.trial_id"
ENDED_TAG = "chestxpert.ended"
ROLE_TAG = "chestxpert.role"  # sweep | trial | final | train
STORAGE_TAG = "chestxpert.storage"  # the sweep's storage folder: one sweep name, many storages
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under this run id
# On a final run and its registered model version: the storage folder of the published
# version it holds, so a registration is found again (never made twice) after a failure.
FINAL_VERSION_TAG = "chestxpert.final_version"
CHAMPION_ALIAS = "champion"
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, prompts);
# "custom_model_development" is the kind its own "Machine learning" choice sets: it opens on
# the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DATASET_CONTEXT_TAG = "mlflow.data.context"  # MLflow's own: the Datasets column shows it
# Packages whose presence means this may run inside Databricks: without them MLflow's Databricks
# request-header provider can never apply, yet on every request it tries to import them (and
# IPython), each failed import searching sys.path again: half of a call's client CPU here
# (set_tag 2.3 ms, 1.2 ms without), which the sweep driver pays several times per trial.
DATABRICKS_PACKAGES = ("dbruntime", "pyspark")


def client(tracking_uri: str):
    """An `MlflowClient` for `tracking_uri` that gives up in seconds when the server is away.

    MLflow's default is ~4 minutes of retries per call; the sweep driver (and so every
    trial's report) would wait on it. A caller may still set the two variables itself.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # MLflow prints a "View run … at: <tracking URI>" line per ended run: one per trial in a
    # sweep's log, and the URI may carry a user and password.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    skip_databricks_headers()
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def skip_databricks_headers(environ=os.environ) -> bool:
    """Drop MLflow's Databricks request-header provider where it cannot apply (no Databricks
    runtime variable, none of DATABRICKS_PACKAGES installed); True if it was dropped.

    Only that provider goes: a package's absence is not recorded anywhere (libraries test
    `name in sys.modules`, so a None entry there breaks them)."""
    if environ.get("DATABRICKS_RUNTIME_VERSION") or any(
        importlib.util.find_spec(package) for package in DATABRICKS_PACKAGES
    ):
        return False
    from mlflow.tracking.request_header import registry
    from mlflow.tracking.request_header.databricks_request_header_provider import (
        DatabricksRequestHeaderProvider,
    )

    providers = getattr(registry._request_header_provider_registry, "_registry", None)
    if not isinstance(providers, list):  # a later MLflow keeps them otherwise: leave it be
        return False
    providers[:] = [p for p in providers if not isinstance(p, DatabricksRequestHeaderProvider)]
    return True


def failures() -> tuple[type[BaseException], ...]:
    """What a call to an absent, slow or refusing MLflow server raises through the client."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.RequestException, OSError)


def experiment_id(mlflow_client, name: str) -> str:
    """The id of MLflow experiment `name`, created if missing, of the kind that opens on its runs.

    With a local SQLite store (the workspace default, no server) MLflow would put the
    experiment's artifacts in `./mlruns` under whatever directory the command ran in;
    they go next to the database instead. A server decides its own artifact root.
    """
    found = mlflow_client.get_experiment_by_name(name)
    if found:
        # An experiment made before the kind was set gets it; a kind a user chose stays.
        if EXPERIMENT_KIND_TAG not in found.tags:
            mlflow_client.set_experiment_tag(
                found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        return found.experiment_id
    location = None
    if mlflow_client.tracking_uri.startswith("sqlite:///"):
        database = Path(mlflow_client.tracking_uri[len("sqlite:///") :])
        location = (database.parent / "mlflow-artifacts").absolute().as_uri()
    return mlflow_client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


def log_dataset(mlflow_client, run, dataset: dict[str, Any], context: str = "training") -> bool:
    """Give `run` the prepared dataset as an input (MLflow's Datasets column) unless it has it.

    `dataset` is a plain dict (it travels in the tracking journal): `name`, `uri` (the
    source), `digest` (MLflow keeps at most 36 characters) and an optional `profile`.
    Nothing is read from the data. Returns True when the input was logged now.
    """
    import json
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    held = run.inputs.dataset_inputs if run.inputs is not None else []
    if any(
        (d.dataset.name, d.dataset.digest) == (dataset["name"], dataset["digest"]) for d in held
    ):
        return False
    with warnings.catch_warnings():  # a local path matches two equivalent local sources
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(dataset["uri"])
    described = MetaDataset(source, name=dataset["name"], digest=dataset["digest"]).to_dict()
    profile = json.dumps(dataset["profile"]) if dataset.get("profile") else None
    entity = Dataset(**described, profile=profile)
    tags = [InputTag(DATASET_CONTEXT_TAG, context)]
    mlflow_client.log_inputs(run.info.run_id, datasets=[DatasetInput(entity, tags)])
    return True


def experiment_page(mlflow_client, name: str) -> str | None:
    """The UI page of experiment `name` (made if missing), opened on its runs; None for a
    store without a UI (`sqlite:`, `file:`).

    MLflow 3.17's UI does not read `mlflow.experimentKind` for the page it opens: a switch
    of the browser's (GenAI or Model training, GenAI until a user changes it) decides, and
    `workflowType=machine_learning` in the link selects Model training for it.
    """
    if not mlflow_client.tracking_uri.startswith(("http://", "https://")):
        return None
    exp = experiment_id(mlflow_client, name)
    root = safe_uri(mlflow_client.tracking_uri).rstrip("/")
    return f"{root}/#/experiments/{exp}?workflowType=machine_learning"


def find_run(mlflow_client, experiment: str, tags: dict[str, str]):
    """The newest run in experiment id `experiment` carrying all `tags`, or None."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = mlflow_client.search_runs(
        [experiment], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def plain_params(values: dict[str, Any]) -> dict[str, str]:
    """Config values as MLflow params (strings, at most MAX_PARAM_CHARS characters each)."""
    return {key: str(value)[:MAX_PARAM_CHARS] for key, value in values.items()}


def log_params(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    """Log `params` in batches of 100, MLflow's limit per call."""
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in plain_params(params).items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def safe_uri(tracking_uri: str) -> str:
    """`tracking_uri` without a user or password in it, for messages and records.

    MLflow takes credentials from MLFLOW_TRACKING_USERNAME/PASSWORD, but a URI such as
    `https://user:secret@host` also works; the secret must never reach a log or storage.
    """
    parts = urlsplit(tracking_uri)
    if not parts.username and not parts.password:
        return tracking_uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def ensure_parent_run(
    mlflow_client,
    experiment: str,
    sweep: str,
    params: dict[str, Any],
    tags: dict[str, str],
    reuse: str | None = None,
    storage: str | None = None,
):
    """The sweep's parent run in experiment id `experiment`, created only when missing.

    Looked up by `reuse` (the recorded run id), then by its tags (sweep name, role and,
    when given, the storage folder), so a replay or a second driver never makes a second
    parent. Returns `(run, created)`.
    """
    if reuse:
        try:
            run = mlflow_client.get_run(reuse)
            if run.info.lifecycle_stage == "active":
                return run, False
        except Exception:
            pass  # a different MLflow server than the sweep started with: look it up or make it
    wanted = {SWEEP_TAG: sweep, ROLE_TAG: "sweep", **({STORAGE_TAG: storage} if storage else {})}
    found = find_run(mlflow_client, experiment, wanted)
    if found is not None:
        return found, False
    run = mlflow_client.create_run(experiment, run_name=sweep, tags={**wanted, **tags})
    log_params(mlflow_client, run.info.run_id, params)
    return run, True


def parent_run(
    tracking_uri: str,
    experiment: str,
    sweep: str,
    params: dict[str, Any],
    tags: dict[str, str],
    reuse: str | None = None,
    storage: str | None = None,
) -> str:
    """The id of the sweep's parent run (the spec as params) on `tracking_uri`.

    `reuse`, a recorded run id, is returned when that run exists on this server; else
    a run with the sweep's tags, else a new one (see `ensure_parent_run`).
    """
    mlflow_client = client(tracking_uri)
    exp = experiment_id(mlflow_client, experiment)
    run, _ = ensure_parent_run(mlflow_client, exp, sweep, params, tags, reuse, storage)
    return run.info.run_id


def ensure_trial_run(
    mlflow_client,
    experiment: str,
    sweep: str,
    parent_run_id: str | None,
    trial_id: str,
    config: dict,
    surely_new: bool = False,
):
    """Trial `trial_id`'s run nested under `parent_run_id`: returns `(run, created)`.

    Created (with the trial's config as params) when no run of this sweep carries the
    trial's tag yet, so a replay never makes a second run for one trial. A run found
    under another parent (made while the parent was unknown, or before a resume against
    a new parent) is moved under this one; one whose params never arrived gets them.
    `surely_new`: the caller knows there is none (`trial_run_ids`), so no search is made.
    """
    existing = None
    if not surely_new:
        existing = find_run(mlflow_client, experiment, {SWEEP_TAG: sweep, TRIAL_TAG: trial_id})
    if existing is not None:
        run_id = existing.info.run_id
        if parent_run_id and existing.data.tags.get(PARENT_TAG) != parent_run_id:
            mlflow_client.set_tag(run_id, PARENT_TAG, parent_run_id)
        if config and not existing.data.params:
            log_params(mlflow_client, run_id, config)
        return existing, False
    tags = {SWEEP_TAG: sweep, TRIAL_TAG: trial_id, ROLE_TAG: "trial"}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run = mlflow_client.create_run(experiment, run_name=f"{sweep}-{trial_id}", tags=tags)
    log_params(mlflow_client, run.info.run_id, config)
    return run, True


def trial_run_ids(mlflow_client, experiment: str, sweep: str) -> dict[str, str]:
    """Trial id -> run id of every trial run sweep `sweep` has in experiment id `experiment`."""
    query = f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{ROLE_TAG}` = 'trial'"
    found: dict[str, str] = {}
    token = None
    while True:
        page = mlflow_client.search_runs([experiment], query, max_results=1000, page_token=token)
        for run in page:
            found.setdefault(run.data.tags.get(TRIAL_TAG, ""), run.info.run_id)
        token = page.token
        if not token:
            return found


def trial_run(
    mlflow_client, experiment: str, sweep: str, parent_run_id: str, trial_id: str, config: dict
) -> str:
    """The id of trial `trial_id`'s run, nested under the sweep's parent run (see
    `ensure_trial_run`)."""
    run, _ = ensure_trial_run(mlflow_client, experiment, sweep, parent_run_id, trial_id, config)
    return run.info.run_id


def final_run(
    mlflow_client,
    experiment: str,
    sweep: str,
    parent_run_id: str,
    config: dict,
    version_uri: str,
) -> str:
    """The run of the final model published at `version_uri`, nested under the sweep's parent.

    Made (with the config as params) unless a run carrying that version exists: a
    registration finished later continues the run an interrupted one began. Returns its id.
    """
    exp = experiment_id(mlflow_client, experiment)
    existing = find_run(mlflow_client, exp, {ROLE_TAG: "final", FINAL_VERSION_TAG: version_uri})
    if existing is not None:
        return existing.info.run_id
    tags = {
        PARENT_TAG: parent_run_id,
        SWEEP_TAG: sweep,
        ROLE_TAG: "final",
        FINAL_VERSION_TAG: version_uri,
    }
    run = mlflow_client.create_run(exp, run_name=f"{sweep}-final", tags=tags)
    log_params(mlflow_client, run.info.run_id, config)
    return run.info.run_id


def registered_final_version(mlflow_client, model_name: str, version_uri: str):
    """The registered version of `model_name` holding the final model at `version_uri`, or None."""
    found = mlflow_client.search_model_versions(
        f"name = '{model_name}' and tags.`{FINAL_VERSION_TAG}` = '{version_uri}'"
    )
    return max(found, key=lambda version: int(version.version)) if found else None


def register_final_version(
    mlflow_client, model_name: str, model_id: str, run_id: str, version_uri: str
):
    """Register logged model `model_id` (of run `run_id`) as a new version of `model_name`.

    The registered model is created when missing. The version is tagged with `version_uri`
    in the same call that makes it, so it is never left untagged. Returns the ModelVersion.
    """
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(model_name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return mlflow_client.create_model_version(
        model_name,
        source=f"models:/{model_id}",
        run_id=run_id,
        tags={FINAL_VERSION_TAG: version_uri},
        model_id=model_id,
    )


def champion_version(mlflow_client, model_name: str):
    """The version of `model_name` that alias `champion` names, or None (no model, no alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def train_run(mlflow_client, experiment: str, run_name: str, config: dict) -> str:
    """A new run for one `chestxpert train` (no sweep); returns its id."""
    run = mlflow_client.create_run(
        experiment_id(mlflow_client, experiment), run_name=run_name, tags={ROLE_TAG: "train"}
    )
    log_params(mlflow_client, run.info.run_id, config)
    return run.info.run_id
