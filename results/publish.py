"""A published final version into MLflow, and `champion` with the storage pointer moved together:
register the version, decide, move the alias, write the pointer last; `final --finish` redoes it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from chestxpert.cluster import mlflow_runs
from chestxpert.cluster.endpoints import Endpoints
from chestxpert.cluster.errors import UserError
from chestxpert.results import versions
from chestxpert.sweeps.layout import (
    FINAL_POINTER,
    FINAL_VERSIONS,
    SPEC_FILE,
    SUMMARY_FILE,
    VERSION_INFO,
    VERSION_MODEL,
    VERSION_REPORT,
    SweepLocation,
    locate,
)
from chestxpert.sweeps.spec import SweepSpec, spec_from_dict
from chestxpert.trainable.checkpoint import MODEL_FILE, STATE_FILE


class FinalError(UserError, RuntimeError):
    """The final job cannot run; the message says what to do."""


@dataclass(frozen=True)
class Sweep:
    """A finished sweep as the final job needs it: where, its record, its spec, its summary."""

    location: SweepLocation
    recorded: dict[str, Any]
    spec: SweepSpec
    summary: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What became of a published version: registered as `model_name` version
    `registered_version`, and promoted to champion (pointer moved) or kept beside it."""

    version: int
    promoted: bool
    reason: str
    model_name: str
    registered_version: str
    run_id: str

    def message(self, sweep: str) -> str:
        """One line for the user: what `champion` and `pull-best --final` now serve, and why."""
        if self.promoted:
            return (
                f"champion: version {self.version} ({self.reason}) is models:/{self.model_name}"
                f"@champion (registered version {self.registered_version}) and what "
                f"`chestxpert pull-best {sweep} --final` fetches"
            )
        return (
            f"kept, not promoted: version {self.version} ({self.reason}); it is registered as "
            f"{self.model_name} version {self.registered_version} without the champion alias. "
            f"Fetch it with `chestxpert pull-best {sweep} --final --version {self.version}`; "
            f"make it the champion with `chestxpert final {sweep} --finish --promote`"
        )


# What a server that is down, slow or refusing looks like through the MLflow client.
def load_sweep(name: str, endpoints: Endpoints) -> Sweep:
    """Sweep `name` from storage, refusing one that does not exist or has no best trial."""
    location = locate(endpoints, name)
    recorded, summary = location.read_json(SPEC_FILE), location.read_json(SUMMARY_FILE)
    if recorded is None:
        raise FinalError(
            f"no sweep named {name!r} in {endpoints.storage_uri}; "
            "`chestxpert sweep list` shows them"
        )
    if not summary or not summary.get("best_config"):
        raise FinalError(
            f"sweep {name!r} has no best trial yet; see `chestxpert sweep status {name}`"
        )
    spec = spec_from_dict(recorded["raw"], source=f"{location.uri}/{SPEC_FILE}")
    return Sweep(location, recorded, spec, summary)


def decide(
    metric: str, mode: str, new: float | None, current: tuple[str, float | None] | None, force: bool
) -> tuple[bool, str]:
    """Whether a version with `metric` value `new` replaces the `current` (label, value) champion.

    It does when there is none, when `force` (`--promote`), when the champion's value is
    unknown, or when `new` is at least as good (>= for mode max, <= for min). Returns the
    decision and the comparison in words, both values named.
    """

    def shown(value: float | None) -> str:
        return "unknown" if value is None else f"{value:.4f}"

    if current is None:
        return True, f"{metric} {shown(new)}; the sweep had no final model"
    label, old = current
    if force:
        return True, f"{metric} {shown(new)} against {shown(old)} of {label}: --promote"
    if old is None:
        return True, f"{metric} {shown(new)}; {label} has no recorded {metric}"
    if new is None:
        return False, f"{metric} unknown against {shown(old)} of {label}, the champion"
    better = new >= old if mode == "max" else new <= old
    sign = ("≥" if mode == "max" else "≤") if better else ("<" if mode == "max" else ">")
    return better, f"{metric} {shown(new)} {sign} {shown(old)} of {label}" + (
        "" if better else ", the champion"
    )


def register_and_promote(
    sweep: Sweep,
    number: int,
    info: dict[str, Any],
    fetch: Callable[[], Path],
    endpoints: Endpoints,
    force: bool,
) -> Outcome:
    """Register published version `number` (its version.json `info`) and maybe promote it.

    In this order, so `champion` and `final/current.json` never name different models: find or
    make the MLflow run and registered version tagged with the version's storage folder (`fetch`
    gives the version's files in a local folder, called only when it must be registered);
    decide (see `decide`; a version `champion` already names stays promoted); move the alias;
    write the pointer. An MLflow failure raises FinalError saying the version is in storage and
    that `chestxpert final NAME --finish` completes it; the pointer is then untouched.
    """
    location, spec = sweep.location, sweep.spec
    uri = spec.mlflow.tracking_uri or endpoints.mlflow_tracking_uri
    model_name = spec.model_name or spec.name
    version_uri = versions.version_uri(location, number)
    current = versions.champion_metric(location, info["metric"])
    try:
        client = mlflow_runs.client(uri)
        registered = mlflow_runs.registered_final_version(client, model_name, version_uri)
        if registered is None:
            registered = _register(sweep, version_uri, fetch(), client, uri, model_name)
        champion = mlflow_runs.champion_version(client, model_name)
        promoted, reason = decide(info["metric"], info["mode"], info["value"], current, force)
        if champion is not None and str(champion.version) == str(registered.version):
            promoted, reason = True, f"{reason}; already MLflow's champion"
        if promoted:
            client.set_registered_model_alias(
                model_name, mlflow_runs.CHAMPION_ALIAS, registered.version
            )
    except mlflow_runs.failures() as err:
        serving = f"still {current[0]}" if current else "none yet"
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise FinalError(
            f"version {number} of {sweep.spec.name} is published in storage ({version_uri}) but "
            f"MLflow at {uri} failed: {first_line}. The champion and `pull-best --final` are "
            f"{serving}. When MLflow answers, run `chestxpert final {spec.name} --finish` to "
            f"register it and move the champion if it is better"
        ) from None
    if promoted:
        _point_at(
            sweep,
            {
                "version": number,
                "folder": f"{FINAL_VERSIONS}/{number}",
                "metric": info["metric"],
                "mode": info["mode"],
                "value": info["value"],
                "model_name": model_name,
                "registered_version": str(registered.version),
                "run_id": registered.run_id,
                "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "why": reason,
            },
        )
    return Outcome(
        number, promoted, reason, model_name, str(registered.version), registered.run_id or ""
    )


def _point_at(sweep: Sweep, pointer: dict[str, Any]) -> None:
    """Write the pointer after the alias moved; a storage failure says how to catch up."""
    try:
        versions.write_pointer(sweep.location, pointer)
    except OSError as err:
        raise FinalError(
            f"MLflow's champion is now version {pointer['version']} of {sweep.spec.name} but "
            f"writing {sweep.location.uri}/{FINAL_POINTER} failed ({err}), so `pull-best "
            f"--final` still serves the previous one; run `chestxpert final {sweep.spec.name} "
            f"--finish` to write it"
        ) from None


def finish(name: str, endpoints: Endpoints, promote: bool) -> tuple[list[Outcome], list[str]]:
    """`chestxpert final NAME --finish`: complete what an interrupted or failed final left.

    Every sealed version newer than the pointer's (all of them when there is none), oldest
    first, is registered if it is not and promoted by the usual rule; `promote` forces the
    newest. Retrain attempts left in `final/staging/` are removed: they were never published.
    Returns the outcomes and the removed attempts.
    """
    sweep = load_sweep(name, endpoints)
    location = sweep.location
    pointer = versions.read_pointer(location) or {}
    pending = [n for n in versions.published_versions(location) if n > pointer.get("version", 0)]
    outcomes = []
    for number in pending:
        work = Path(tempfile.mkdtemp(prefix="cx-finish-"))
        try:
            info = versions.read_version_info(location, number)
            if info is None:
                raise FinalError(
                    f"{versions.version_uri(location, number)} has no {VERSION_INFO}: it was "
                    f"changed after it was published; remove it or restore the file"
                )
            fetch = partial(download_version, location, number, work)
            force = promote and number == pending[-1]
            outcomes.append(register_and_promote(sweep, number, info, fetch, endpoints, force))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    stale = versions.staging_attempts(location)
    for attempt in stale:
        versions.remove_staging(location, attempt)
    return outcomes, stale


def download_version(location: SweepLocation, number: int, to: Path) -> Path:
    """Sealed version `number` into `to/<number>`, every file checked against its SHA256SUMS."""
    from chestxpert.results.download import download_folder

    return download_folder(
        location.fs,
        versions.version_path(location, number),
        versions.version_uri(location, number),
        to,
        progress=False,
        expected=versions.read_checksums(location, number),
        required=(f"{VERSION_MODEL}/{MODEL_FILE}", f"{VERSION_MODEL}/{STATE_FILE}", VERSION_INFO),
    )


def _register(
    sweep: Sweep, version_uri: str, folder: Path, client, tracking_uri: str, model_name: str
):
    """Log the version to its final run (test metrics, report, checkpoint, the Keras model with
    its input signature) and register it under `model_name`, tagged with `version_uri`."""
    import mlflow
    from mlflow.entities import Metric

    from chestxpert.trainable.checkpoint import load_model
    from chestxpert.trainable.metrics import metric_key

    model_dir, report_dir = folder / VERSION_MODEL, folder / VERSION_REPORT
    metrics = json.loads((report_dir / "metrics.json").read_text())
    run_id = mlflow_runs.final_run(
        client,
        sweep.spec.mlflow.experiment or sweep.spec.name,
        sweep.spec.name,
        sweep.recorded.get("parent_run_id", ""),
        metrics["config"],
        version_uri,
    )
    ev = metrics["evaluation"]
    before = ev["calibration"]["pooled"]
    after = (ev.get("calibration_calibrated") or {}).get("pooled") or {}
    values = {
        "test_auc_macro": ev.get("auc_macro"),
        "test_auc_macro_low": ev.get("auc_macro_low"),
        "test_auc_macro_high": ev.get("auc_macro_high"),
        "test_auc_micro": ev.get("auc_micro"),
        "test_pr_auc_macro": ev.get("pr_auc_macro"),
        "test_ece_pooled": before.get("ece"),
        "test_brier_pooled": before.get("brier"),
        "test_ece_pooled_calibrated": after.get("ece"),
        "test_brier_pooled_calibrated": after.get("brier"),
    }
    values.update(
        {
            f"test_auc_{metric_key(label)}": item.get("auc")
            for label, item in ev["per_label"].items()
        }
    )
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items() if v is not None]
    )
    client.log_artifacts(run_id, str(report_dir), "report")
    client.log_artifacts(run_id, str(model_dir), "checkpoint")

    model = load_model(model_dir, compile=False)
    size = metrics["image_size"]
    example = np.zeros((1, size, size, 1), dtype=np.uint8)
    # The output's shape and dtype as the model declares them: what `predict` would return,
    # without tracing a prediction graph (about 3 s for DenseNet121 on a CPU driver).
    output = np.zeros((1, *model.output.shape[1:]), dtype=model.output.dtype)
    signature = mlflow.models.infer_signature(example, output)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            pip_requirements=["tensorflow>=2.21,<2.22", "keras>=3.15,<3.16"],
        )
    client.set_terminated(run_id)
    return mlflow_runs.register_final_version(
        client, model_name, info.model_id, run_id, version_uri
    )
