"""`chestxpert final NAME`: retrain the sweep's best configuration, evaluate it on the test split,
write the report, log and register the model in MLflow, and store model and report in storage.
"""

from __future__ import annotations

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
from chestxpert.sweeps.layout import SPEC_FILE, SUMMARY_FILE, locate
from chestxpert.sweeps.spec import SweepSpec, spec_from_dict

# DenseNet121's last map is 7×7 at the 224 px it was designed for; at 128 px it is 4×4 and
# points at little (the README gives the demo's pointing-game figures for both maps).
# Smaller last maps step back to the deepest ≥ 7×7 one.
MIN_GRADCAM_MAP = 7


class FinalError(UserError, RuntimeError):
    """The final job cannot run; the message says what to do."""


@dataclass(frozen=True)
class FinalOptions:
    """How to retrain and evaluate; `epochs` None keeps the best trial's."""

    epochs: int | None = None
    train_on: str = "train"
    threshold_method: str = "youden"
    target_sensitivity: float | None = None
    bootstrap: int = 1000
    gradcam_layer: str | None = None
    examples_per_label: int = 3
    on_cluster: bool | None = None  # None: on the cluster when a Ray address is known
    cpus: float | None = None  # the retrain task's resources; None: the sweep's per trial
    gpus: float | None = None


def _upload_folder(fs, local: Path, remote: str) -> None:
    import pyarrow.fs as pafs

    fs.create_dir(remote, recursive=True)
    pafs.copy_files(
        str(local), remote, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def retrain(
    config: dict[str, Any], fs, remote_model_dir: str, endpoints: Endpoints | None = None
) -> dict[str, float]:
    """Train `config` to the end and copy its last checkpoint to `remote_model_dir` on `fs`.

    Runs in this process or as a Ray task on a node with the trial's resources.
    """
    from chestxpert.trainable.config import TrialConfig
    from chestxpert.trainable.train import run_trial

    last: dict[str, Any] = {}

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        print(
            f"final: epoch {int(metrics['epoch'])}  "
            f"val_auc_macro {metrics.get('val_auc_macro', float('nan')):.4f}",
            flush=True,
        )
        if checkpoint_dir is not None:
            _upload_folder(fs, checkpoint_dir, remote_model_dir)
            last.update(metrics)

    run_trial(TrialConfig.from_dict(config), report, endpoints=endpoints)
    return last


def _gradcam_layer(model, preferred: str, chosen: str | None) -> tuple[str, str | None]:
    """The layer to explain and, when we had to step back from the last conv layer, why."""
    if chosen:
        model.get_layer(chosen)  # a typo fails here, with Keras naming the layer
        return chosen, None
    side = model.get_layer(preferred).output.shape[1]
    if side is None or side >= MIN_GRADCAM_MAP:
        return preferred, None
    for layer in reversed(model.layers[: model.layers.index(model.get_layer(preferred))]):
        shape = layer.output.shape
        if len(shape) == 4 and shape[1] and shape[1] >= MIN_GRADCAM_MAP and "relu" in layer.name:
            note = (
                f"Grad-CAM uses layer {layer.name} ({shape[1]}×{shape[2]}): the last convolutional "
                f"layer {preferred} is only {side}×{side} at this image size (7×7 at 224 px); "
                f"`--gradcam-layer` chooses another."
            )
            return layer.name, note
    return (
        preferred,
        f"Grad-CAM layer {preferred} is {side}×{side}: heatmaps cannot localise at this size.",
    )


OVERLAY_SIDE = 256  # small training images are enlarged so a reader can see the finding and the box


def _readable_overlay(image: np.ndarray, heat: np.ndarray, box, title: str):
    from PIL import Image

    from chestxpert.results.gradcam import overlay

    factor = max(1, OVERLAY_SIDE // image.shape[0])
    if factor > 1:
        side = image.shape[0] * factor
        image = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC))
        heat = np.asarray(
            Image.fromarray(heat.astype(np.float32), mode="F").resize(
                (side, side), Image.Resampling.BILINEAR
            )
        )
        box = tuple(v * factor for v in box) if box else None
    return overlay(image, heat, box=box, title=title)


def run_final(name: str, opts: FinalOptions, endpoints: Endpoints) -> dict[str, Any]:
    """The whole final job; returns the metrics dict also written as metrics.json."""
    started = time.monotonic()
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
    if opts.train_on not in ("train", "train+val"):
        raise FinalError(f"--train-on {opts.train_on!r}: expected train or train+val")
    spec = spec_from_dict(recorded["raw"], source=f"{location.uri}/{SPEC_FILE}")
    config = dict(summary["best_config"])
    config["epochs"] = opts.epochs or int(config.get("epochs") or spec.epochs())
    config["train_splits"] = opts.train_on
    remote_model = f"{location.path}/final/model"
    work = Path(tempfile.mkdtemp(prefix="cx-final-"))
    try:
        on_cluster = (
            endpoints.ray_address is not None if opts.on_cluster is None else opts.on_cluster
        )
        print(
            f"retraining the best configuration of {name} for {config['epochs']} epochs "
            f"on {opts.train_on} "
            f"({'a Ray task on the cluster' if on_cluster else 'this machine'}) ...",
            flush=True,
        )
        if on_cluster:
            import ray

            from chestxpert.cluster.ray_driver import connect

            connect(endpoints)
            try:
                cpus = opts.cpus if opts.cpus is not None else spec.resources.cpus
                gpus = opts.gpus if opts.gpus is not None else spec.resources.gpus
                nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
                if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
                    sizes = ", ".join(
                        f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes
                    )
                    raise FinalError(
                        f"no node of the cluster has {cpus:g} CPU and {gpus:g} GPU for the retrain "
                        f"(nodes: {sizes or 'none'}); pass --cpus/--gpus that fit, or --local"
                    )
                # TF sizes its thread pools from this allocation (trainable.train._trial_cpus).
                task = ray.remote(num_cpus=cpus, num_gpus=gpus)(retrain)
                train_metrics = ray.get(task.remote(config, location.fs, remote_model))
            finally:
                ray.shutdown()
        else:
            train_metrics = retrain(config, location.fs, remote_model, endpoints)
        from chestxpert.results.pull import download_folder

        # checksum-verified: the model evaluated is the model published
        model_dir = download_folder(
            location.fs, remote_model, f"{location.uri}/final/model", work, progress=False
        )
        metrics = evaluate_model(model_dir, config, opts, endpoints, work / "report", name)
        metrics["final_training"] = train_metrics
        _publish(location, model_dir, work / "report", metrics)
        local_report = endpoints.workspace / "reports" / name
        shutil.rmtree(local_report, ignore_errors=True)
        shutil.copytree(work / "report", local_report)
        metrics["report_dir"] = str(local_report)
        metrics["storage_dir"] = f"{location.uri}/final"
        metrics["mlflow"] = _log_to_mlflow(
            recorded, spec, model_dir, work / "report", metrics, endpoints
        )
        print(f"final job done in {(time.monotonic() - started) / 60:.1f} min")
        return metrics
    finally:
        shutil.rmtree(work, ignore_errors=True)


def evaluate_model(
    model_dir: Path,
    config: dict,
    opts: FinalOptions,
    endpoints: Endpoints,
    out: Path,
    name: str,
) -> dict[str, Any]:
    """Thresholds on validation, metrics on test, figures, Grad-CAM, the report files into `out`."""
    from chestxpert.datasets.reader import open_dataset, read_split
    from chestxpert.results.evaluate import choose_thresholds, evaluate
    from chestxpert.results.figures import curves_figure, reliability_figure
    from chestxpert.results.gradcam import (
        GradCam,
        heatmaps_for_boxes,
        localization_scores,
        select_examples,
    )
    from chestxpert.results.report import write_html, write_markdown
    from chestxpert.trainable.backbones import get_backbone
    from chestxpert.trainable.checkpoint import load_model, read_state

    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir, compile=False)
    state = read_state(model_dir)
    labels = state["labels"]
    dataset = open_dataset(config["dataset"], endpoints)
    columns = ("image", "labels", "patient_id", "image_id", "boxes")
    val, test = read_split(dataset, "val", columns), read_split(dataset, "test", columns)
    if len(test["image"]) == 0:
        raise FinalError(f"{config['dataset']} has an empty test split; nothing to evaluate")
    size = state["preprocessing"]["image_size"]
    if size != dataset.image_size:
        val["image"] = resize_uint8(val["image"], size).numpy()
        test["image"] = resize_uint8(test["image"], size).numpy()
    val_prob = model.predict(val["image"], batch_size=64, verbose=0)
    test_prob = model.predict(test["image"], batch_size=64, verbose=0)
    choice = choose_thresholds(
        val["labels"],
        val_prob,
        labels,
        method=opts.threshold_method,
        target_sensitivity=opts.target_sensitivity,
    )
    evaluation = evaluate(
        test["labels"], test_prob, test["patient_id"], labels, choice, n_boot=opts.bootstrap
    )

    figures: dict[str, str] = {}
    (out / "figures").mkdir(exist_ok=True)
    reliability_figure(evaluation["calibration"], out / "figures" / "reliability.png")
    figures["reliability diagram"] = "figures/reliability.png"
    for kind in ("roc", "pr"):
        curves_figure(evaluation["curves"], out / "figures" / f"{kind}.png", kind=kind)
        figures[f"{kind.upper()} curves"] = f"figures/{kind}.png"

    backbone = get_backbone(config["backbone"])
    layer, note = _gradcam_layer(model, backbone.last_conv_layer, opts.gradcam_layer)
    gradcam = GradCam(model, layer)
    thresholds = [choice.thresholds[label] for label in labels]
    examples = select_examples(
        np.nan_to_num(test["labels"], nan=0.0),
        test_prob,
        thresholds,
        labels,
        k=opts.examples_per_label,
    )
    (out / "gradcam").mkdir(exist_ok=True)
    for column, label in enumerate(labels):
        for kind, indices in examples.get(label, {}).items():
            if not indices:
                continue
            maps = gradcam.heatmaps(test["image"][indices], [column] * len(indices))
            for rank, (index, heat) in enumerate(zip(indices, maps, strict=True), start=1):
                box = next(
                    (
                        (b["x"], b["y"], b["w"], b["h"])
                        for b in (test["boxes"][index] or [])
                        if b["label"] == label
                    ),
                    None,
                )
                title = f"{label} {kind.replace('_', ' ')[:-1]} p={test_prob[index, column]:.2f}"
                picture = _readable_overlay(test["image"][index][..., 0], heat, box, title)
                rel = f"gradcam/{label}_{kind}_{rank}.png"
                picture.save(out / rel)
                figures[f"{label} {kind} {rank}"] = rel
    localization = {}
    with_boxes = [i for i, boxes in enumerate(test["boxes"]) if boxes is not None and len(boxes)]
    if with_boxes:
        try:
            pairs = heatmaps_for_boxes(
                gradcam,
                test["image"][with_boxes],
                [test["boxes"][i] for i in with_boxes],
                {label: i for i, label in enumerate(labels)},
            )
            localization = localization_scores(pairs)
        except ValueError as err:
            note = (note + " " if note else "") + f"No localisation scores: {err}"
    metrics = {
        "sweep": name,
        "source": dataset.manifest.get("source"),
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
        "bootstrap_resamples": opts.bootstrap,
        "evaluation": evaluation,
        "gradcam_layer": layer,
        "gradcam_note": note,
        "localization": localization,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False, default=str))
    write_markdown(metrics, figures, out / "report.md")
    write_html(metrics, figures, out, out / "report.html")
    # The model carries its operating points, so predict needs nothing else.
    state.update(
        thresholds=choice.thresholds,
        threshold_method=metrics["threshold_method"],
        last_conv_layer=layer,
    )
    (model_dir / "state.json").write_text(
        json.dumps(state, indent=2, sort_keys=True, default=float)
    )
    return metrics


def _publish(location, model_dir: Path, report_dir: Path, metrics: dict) -> None:
    """Model (with its checksum) and report into `<storage>/<sweep>/final/`."""
    _upload_folder(location.fs, model_dir, f"{location.path}/final/model")
    _upload_folder(location.fs, report_dir, f"{location.path}/final/report")


def _log_to_mlflow(
    recorded: dict,
    spec: SweepSpec,
    model_dir: Path,
    report_dir: Path,
    metrics: dict,
    endpoints: Endpoints,
) -> dict[str, str]:
    """A run nested under the sweep's parent run: test metrics, report, the model.

    The model is logged with its input signature and registered under the spec's model name
    with alias `champion`.
    """
    import mlflow
    from mlflow.entities import Metric

    from chestxpert.cluster import mlflow_runs
    from chestxpert.trainable.checkpoint import load_model

    uri = spec.mlflow.tracking_uri or endpoints.mlflow_tracking_uri
    model_name = spec.model_name or spec.name
    client = mlflow_runs.client(uri)
    parent = recorded.get("parent_run_id") or ""  # None: MLflow never answered the sweep
    run_id = mlflow_runs.final_run(
        client, spec.mlflow.experiment or spec.name, spec.name, parent, metrics["config"]
    )
    ev = metrics["evaluation"]
    values = {
        "test_auc_macro": ev.get("auc_macro"),
        "test_auc_micro": ev.get("auc_micro"),
        "test_pr_auc_macro": ev.get("pr_auc_macro"),
    }
    from chestxpert.trainable.metrics import metric_key

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
    client.set_terminated(run_id)

    model = load_model(model_dir, compile=False)
    size = metrics["image_size"]
    example = np.zeros((1, size, size, 1), dtype=np.uint8)
    signature = mlflow.models.infer_signature(example, model.predict(example, verbose=0))
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            registered_model_name=model_name,
            pip_requirements=["tensorflow>=2.21,<2.22", "keras>=3.15,<3.16"],
        )
    version = info.registered_model_version
    client.set_registered_model_alias(model_name, "champion", str(version))
    return {
        "run_id": run_id,
        "model_name": model_name,
        "version": str(version),
        "uri": f"models:/{model_name}@champion",
    }
