"""`chestxpert final NAME`: retrain the sweep's best configuration, evaluate it on the test split,
write the report, publish model and report as a new version in storage, register it in MLflow.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestxpert.cluster.endpoints import Endpoints
from chestxpert.cluster.errors import UserError
from chestxpert.datasets.images import resize_uint8
from chestxpert.results import versions
from chestxpert.results.final_figures import gradcam_gallery, summary_figures
from chestxpert.results.progress import Stages
from chestxpert.results.publish import FinalError, load_sweep, register_and_promote
from chestxpert.sweeps.layout import (
    DATASET_GENERATION,
    FINAL_STAGING,
    SPEC_FILE,
    VERSION_INFO,
    VERSION_MODEL,
    VERSION_REPORT,
    dataset_version,
)
from chestxpert.sweeps.spec import SweepSpec

__all__ = ["FinalError", "FinalOptions", "evaluate_model", "retrain_and_evaluate", "run_final"]


@dataclass(frozen=True)
class FinalOptions:
    """How to retrain and evaluate; `epochs` None keeps the best trial's."""

    epochs: int | None = None
    train_on: str = "train"
    threshold_method: str = "youden"
    target_sensitivity: float | None = None
    # Further operating points reported beside the main one, each chosen on validation
    # ("spec=0.9": the sensitivity at a specificity of 0.9; see evaluate.parse_operating_point).
    operating_points: tuple[str, ...] = ("spec=0.9",)
    bootstrap: int = 1000
    gradcam_layer: str | None = None
    examples_per_label: int = 3
    on_cluster: bool | None = None  # None: on the cluster when a Ray address is known
    cpus: float | None = None  # the retrain task's resources; None: the sweep's per trial
    gpus: float | None = None
    allow_dataset_change: bool = False  # retrain on a dataset replaced since the sweep began
    promote: bool = False  # make the new version the champion even if its metric is worse


def retrain_and_evaluate(
    config: dict[str, Any],
    opts: FinalOptions,
    name: str,
    fs,
    staging: str,
    endpoints: Endpoints | None = None,
) -> dict[str, Any]:
    """Train `config` to the end, then evaluate the trained model in this same process.

    Each epoch's checkpoint is copied over the last to `<staging>/model` on pyarrow filesystem
    `fs` (a staging folder nothing serves); the evaluated version (model with its thresholds
    and calibrator, report) then goes to `staging` as a whole. Runs in this process or as a
    Ray task on a node with the trial's resources, so a GPU node also evaluates on its GPU and
    the model is neither reloaded nor its graphs built again. Returns `evaluate_model`'s
    metrics with the last epoch's under `final_training`.
    """
    from chestxpert.cluster.endpoints import worker_endpoints
    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.train import run_trial

    endpoints = endpoints or worker_endpoints()
    work = Path(tempfile.mkdtemp(prefix="cx-retrain-"))
    version = work / "version"
    last: dict[str, Any] = {}
    models: list[Any] = []

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        print(
            f"final: epoch {int(metrics['epoch'])}  "
            f"val_auc_macro {metrics.get('val_auc_macro', float('nan')):.4f}",
            flush=True,
        )
        if checkpoint_dir is not None:
            versions.upload_folder(fs, checkpoint_dir, f"{staging}/{VERSION_MODEL}")
            shutil.rmtree(version / VERSION_MODEL, ignore_errors=True)
            shutil.copytree(checkpoint_dir, version / VERSION_MODEL)
            last.update(metrics)

    stages = Stages("final")  # printed where the work runs (a Ray task's lines reach the driver)
    try:
        stages.start("retrain", f"{config['epochs']} epochs")
        run_trial(TrialConfig.from_dict(config), report, endpoints=endpoints, trained=models.append)
        metrics = evaluate_model(
            version / VERSION_MODEL,
            config,
            opts,
            endpoints,
            version / VERSION_REPORT,
            name,
            model=models[0] if models else None,
            stages=stages,
        )
        metrics["final_training"] = last
        stages.start("staging", "the evaluated model and report to storage")
        versions.upload_folder(fs, version, staging)
        stages.end()
        return metrics
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_final(name: str, opts: FinalOptions, endpoints: Endpoints) -> dict[str, Any]:
    """The whole final job; returns the metrics dict also written as metrics.json.

    The retrain uploads its epochs to `final/staging/<attempt>/`, never served. Only once
    evaluation succeeded is the whole version (model with thresholds, report, version.json)
    published as `final/versions/<N>/` and sealed with SHA256SUMS; then it is registered in
    MLflow and, if promoted (see `publish.decide`), `champion` and `final/current.json` move
    to it. A crash anywhere leaves the previous final model served.
    """
    started = time.monotonic()
    stages = Stages("final")
    sweep = load_sweep(name, endpoints)
    location, spec = sweep.location, sweep.spec
    if opts.train_on not in ("train", "train+val"):
        raise FinalError(f"--train-on {opts.train_on!r}: expected train or train+val")
    from chestxpert.results.evaluate import parse_operating_point

    for text in opts.operating_points:  # a typo fails now, not after the retrain
        parse_operating_point(text)
    config = dict(sweep.summary["best_config"])
    config["epochs"] = opts.epochs or int(config.get("epochs") or spec.epochs())
    config["train_splits"] = opts.train_on
    config["dataset_generation"] = _dataset_generation(
        name, sweep.recorded, location, spec, opts, endpoints
    )
    left = versions.staging_attempts(location)
    if left:
        print(
            f"note: {location.uri}/{FINAL_STAGING} holds {len(left)} interrupted retrain(s) "
            f"({', '.join(left)}), never served; `chestxpert final {name} --finish` removes them",
            flush=True,
        )
    attempt = versions.new_attempt()
    staging = versions.staging_path(location, attempt)
    work = Path(tempfile.mkdtemp(prefix="cx-final-"))
    try:
        on_cluster = (
            endpoints.ray_address is not None if opts.on_cluster is None else opts.on_cluster
        )
        print(
            f"retraining the best configuration of {name} for {config['epochs']} epochs "
            f"on {opts.train_on} "
            f"({'a Ray task on the cluster' if on_cluster else 'this machine'}), then "
            "evaluating it there ...",
            flush=True,
        )
        if on_cluster:
            metrics = _retrain_on_cluster(config, name, location.fs, staging, spec, opts, endpoints)
        else:
            metrics = retrain_and_evaluate(config, opts, name, location.fs, staging, endpoints)
        train_metrics = metrics["final_training"]
        from chestxpert.results.download import download_folder

        # checksum-verified: the model published is the model evaluated (its weights' digest
        # was checked against the evaluated model's)
        folder = work / "version"
        staged = f"{location.uri}/{FINAL_STAGING}/{attempt}"
        download_folder(
            location.fs,
            f"{staging}/{VERSION_MODEL}",
            f"{staged}/{VERSION_MODEL}",
            folder,
            progress=False,
        )
        download_folder(
            location.fs,
            f"{staging}/{VERSION_REPORT}",
            f"{staged}/{VERSION_REPORT}",
            folder,
            progress=False,
            verify=False,
            required=("metrics.json", "report.html"),
        )
        number = versions.next_version(location)
        value = metrics["validation"].get(spec.metric, train_metrics.get(spec.metric))
        info = {
            "version": number,
            "sweep": name,
            "attempt": attempt,
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metric": spec.metric,
            "mode": spec.mode,
            "value": value,
            "test_auc_macro": metrics["evaluation"].get("auc_macro"),
            "epochs": config["epochs"],
            "train_splits": opts.train_on,
        }
        (folder / VERSION_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        stages.start("upload", f"version {number} to {location.uri}")
        try:
            versions.publish_version(location, number, folder)
        except FileExistsError:
            raise FinalError(
                f"version {number} of {name} appeared while this final ran: another "
                f"`chestxpert final {name}` is publishing; run one at a time"
            ) from None
        versions.remove_staging(location, attempt)
        local_report = endpoints.workspace / "reports" / name
        shutil.rmtree(local_report, ignore_errors=True)
        shutil.copytree(folder / VERSION_REPORT, local_report)
        metrics.update(
            version=number,
            report_dir=str(local_report),
            storage_dir=versions.version_uri(location, number),
        )
        stages.end()
        print(f"published version {number}: {metrics['storage_dir']}", flush=True)
        stages.start("registration", "MLflow model registry")
        outcome = register_and_promote(sweep, number, info, lambda: folder, endpoints, opts.promote)
        stages.end()
        metrics["promotion"] = outcome.message(name)
        metrics["mlflow"] = {
            "run_id": outcome.run_id,
            "model_name": outcome.model_name,
            "version": outcome.registered_version,
            "uri": f"models:/{outcome.model_name}"
            + ("@champion" if outcome.promoted else f"/{outcome.registered_version}"),
            "champion": outcome.promoted,
        }
        print(f"final job done in {(time.monotonic() - started) / 60:.1f} min")
        return metrics
    finally:
        shutil.rmtree(work, ignore_errors=True)
        # Our own attempt, if a failure stopped it before publishing; a kill leaves it to --finish.
        with contextlib.suppress(OSError):
            versions.remove_staging(location, attempt)


def _retrain_on_cluster(
    config: dict[str, Any],
    name: str,
    fs,
    staging: str,
    spec: SweepSpec,
    opts: FinalOptions,
    endpoints: Endpoints,
) -> dict[str, Any]:
    """`retrain_and_evaluate` as a Ray task with the trial's resources (or --cpus/--gpus) on a
    node that fits."""
    import ray

    from chestxpert.cluster.ray_driver import connect

    connect(endpoints)
    try:
        cpus = opts.cpus if opts.cpus is not None else spec.resources.cpus
        gpus = opts.gpus if opts.gpus is not None else spec.resources.gpus
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
            sizes = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
            raise FinalError(
                f"no node of the cluster has {cpus:g} CPU and {gpus:g} GPU for the retrain "
                f"(nodes: {sizes or 'none'}); pass --cpus/--gpus that fit, or --local"
            )
        # TF sizes its thread pools from this allocation (trainable.train._trial_cpus).
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(retrain_and_evaluate)
        return ray.get(task.remote(config, opts, name, fs, staging))
    finally:
        ray.shutdown()


def _dataset_generation(
    name: str,
    recorded: dict,
    location,
    spec: SweepSpec,
    opts: FinalOptions,
    endpoints: Endpoints,
) -> str:
    """The dataset version to retrain and evaluate on: the sweep's, or with
    `allow_dataset_change` the current one (noted in the spec record, so gc keeps it)."""
    from chestxpert.datasets.reader import open_dataset

    try:
        current = open_dataset(spec.dataset, endpoints)
    except UserError as err:
        raise FinalError(f"dataset {spec.dataset}: {err}") from None
    version = dataset_version(
        recorded,
        name,
        spec.dataset,
        current.digest,
        current.generation,
        opts.allow_dataset_change,
        "`final`",
    )
    if any(recorded.get(key) != value for key, value in version.items()):
        location.write_json(SPEC_FILE, {**recorded, **version})
    return version[DATASET_GENERATION]


def evaluate_model(
    model_dir: Path,
    config: dict,
    opts: FinalOptions,
    endpoints: Endpoints,
    out: Path,
    name: str,
    model=None,
    stages: Stages | None = None,
) -> dict[str, Any]:
    """Thresholds on validation, metrics on test, figures, Grad-CAM, the report files into `out`.

    `model` is the checkpoint in `model_dir` already in memory (it must hold the same weights),
    else it is loaded from there. The returned metrics also hold `validation`: ROC and PR AUCs
    on the validation split, what the sweep's metric is read from when deciding whether the
    model becomes the champion.
    """
    from chestxpert.datasets.reader import open_dataset, read_split
    from chestxpert.results.calibrate import fit_platt
    from chestxpert.results.evaluate import (
        choose_thresholds,
        evaluate,
        parse_operating_point,
        to_json_ready,
    )
    from chestxpert.results.report import write_html, write_markdown
    from chestxpert.results.subgroups import subgroup_aucs, subgroup_masks
    from chestxpert.trainable.backbones import get_backbone
    from chestxpert.trainable.checkpoint import load_model, read_state
    from chestxpert.trainable.metrics import auc_metrics
    from chestxpert.trainable.train import predict, weights_digest

    stages = stages or Stages("final")
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(model_dir)
    if model is None:
        model = load_model(model_dir, compile=False)
    elif weights_digest(model) != state["weights_sha256"]:
        raise FinalError(f"the model in memory is not the checkpoint in {model_dir}")
    labels = state["labels"]
    dataset = open_dataset(
        config["dataset"],
        endpoints,
        config.get("dataset_generation", ""),
        config.get("shard_cache") or "",
        config.get("shard_cache_gb") or 0.0,
    )
    columns = ("image", "labels", "patient_id", "image_id", "boxes")
    val = read_split(dataset, "val", columns)
    test = read_split(dataset, "test", (*columns, "sex", "view", "age_years"))
    if len(test["image"]) == 0:
        raise FinalError(f"{config['dataset']} has an empty test split; nothing to evaluate")
    size = state["preprocessing"]["image_size"]
    if size != dataset.image_size:
        val["image"] = resize_uint8(val["image"], size).numpy()
        test["image"] = resize_uint8(test["image"], size).numpy()
    stages.start("prediction", f"{len(val['image'])} validation, {len(test['image'])} test images")
    val_prob = predict(model, val["image"], 64)
    test_prob = predict(model, test["image"], 64)
    choice = choose_thresholds(
        val["labels"],
        val_prob,
        labels,
        method=opts.threshold_method,
        target_sensitivity=opts.target_sensitivity,
    )
    other_points = {}
    for text in opts.operating_points:
        method, target = parse_operating_point(text)
        other_points[text] = choose_thresholds(
            val["labels"],
            val_prob,
            labels,
            method=method,
            target_sensitivity=target if method == "sensitivity" else None,
            target_specificity=target if method == "specificity" else None,
        )
    calibrator = fit_platt(val["labels"], val_prob, labels)
    stages.start("bootstrap", f"{opts.bootstrap} patient resamples")
    evaluation = evaluate(
        test["labels"],
        test_prob,
        test["patient_id"],
        labels,
        choice,
        n_boot=opts.bootstrap,
        y_prob_calibrated=calibrator.apply(test_prob),
        other_points=other_points,
    )
    subgroups = to_json_ready(
        subgroup_aucs(
            test["labels"],
            test_prob,
            test["patient_id"],
            labels,
            subgroup_masks(test["sex"], test["view"], test["age_years"]),
            n_boot=opts.bootstrap,
        )
    )
    known = ~np.isnan(val["labels"])
    validation = auc_metrics(np.nan_to_num(val["labels"]), val_prob, known, labels)

    stages.start("figures")
    figures = summary_figures(evaluation, choice, out)
    stages.start("grad-cam")
    gallery, layer, note, localization = gradcam_gallery(
        model,
        get_backbone(config["backbone"]).last_conv_layer,
        opts.gradcam_layer,
        test,
        test_prob,
        labels,
        choice,
        size,
        opts.examples_per_label,
        out,
    )
    figures += gallery
    stages.start("report")
    metrics = {
        "sweep": name,
        "source": dataset.manifest.get("source"),
        "synthetic": bool(dataset.manifest.get("synthetic")),
        "dataset": config["dataset"],
        "dataset_digest": dataset.manifest.get("digest"),
        "config": config,
        "epochs": config["epochs"],
        "train_splits": config["train_splits"],
        "image_size": size,
        "labels": labels,
        "threshold_method": choice.method
        if choice.target_sensitivity is None
        else f"lowest threshold reaching sensitivity {choice.target_sensitivity}",
        "thresholds": choice.thresholds,
        "thresholds_defaulted": list(choice.defaulted),
        "operating_points": {name: point.thresholds for name, point in other_points.items()},
        "bootstrap_resamples": opts.bootstrap,
        "evaluation": evaluation,
        "validation": validation,
        "calibrator": calibrator.to_json(),
        "subgroups": subgroups,
        "gradcam_layer": layer,
        "gradcam_note": note,
        "localization": localization,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False, default=str))
    write_markdown(metrics, figures, out / "report.md")
    write_html(metrics, figures, out, out / "report.html")
    # The model carries its operating points and its calibrator, so predict needs nothing else;
    # both are in the model folder, so the version's publish and SHA256SUMS cover them.
    calibrator.write(model_dir)
    state.update(
        thresholds=choice.thresholds,
        operating_points=metrics["operating_points"],
        threshold_method=metrics["threshold_method"],
        last_conv_layer=layer,
    )
    (model_dir / "state.json").write_text(
        json.dumps(state, indent=2, sort_keys=True, default=float)
    )
    stages.end()
    return metrics
