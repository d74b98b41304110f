"""`chestxpert final`: retrain the best configuration, evaluate on test, report, register, store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from chestxpert.results.gradcam import MIN_OVERLAY_SIDE
from tests.report_helpers import assert_numbers_match, assert_self_contained

pytestmark = pytest.mark.services


def test_final_report_has_the_clinical_table_and_is_self_contained(finished_sweep: dict) -> None:
    report = finished_sweep["root"] / "ws" / "reports" / "tiny-final"
    metrics = json.loads((report / "metrics.json").read_text())
    per_label = metrics["evaluation"]["per_label"]
    assert len(per_label) == 14
    for label, item in per_label.items():
        if item["auc"] is not None:
            assert item["auc_low"] <= item["auc"] <= item["auc_high"], label
        op = item["operating_point"]
        assert op["tp"] + op["fn"] == metrics["evaluation"]["counts"]["positives"][label]
    md = (report / "report.md").read_text()
    assert (
        "| Pathology | Positives | Negatives | Prevalence | AUC (95% CI) | Sensitivity (95% CI) "
        "| Specificity (95% CI) | PPV (95% CI) | NPV (95% CI) | F1 | Threshold |\n" in md
    )
    # the fixture's dataset was drawn by `data synth`: the manifest says so, and so does the report
    assert metrics["synthetic"] is True
    assert "Synthetic phantoms: for testing the pipeline, not a clinical result" in md
    assert "CheXNet" not in md and "Intended use: research use only" in md
    ev = metrics["evaluation"]
    assert ev["auc_macro_low"] <= ev["auc_macro"] <= ev["auc_macro_high"]
    assert "brier" in ev["calibration"]["pooled"] and "calibration_calibrated" in ev
    assert metrics["calibrator"]["fitted_on"] == "validation"
    # beside Youden, the default further operating point, chosen on validation, with its CIs
    spec = ev["operating_points"]["spec=0.9"]
    assert set(spec) == set(per_label) and metrics["operating_points"]["spec=0.9"]
    assert "## Operating point spec=0.9" in md and "## Subgroups" in md
    subgroups = metrics["subgroups"]
    for row in subgroups["rows"]:  # rows only where counts allow
        assert row["positives"] >= subgroups["min_positives"], row
    page = (report / "report.html").read_text()
    assert page.count("<figure>") == page.count("<figcaption>") >= 4
    assert_self_contained(page)
    assert_numbers_match(metrics, page)
    assert (
        "src='data:image/png;base64," in page
        and "src='http" not in page
        and "src='figures" not in page
    )
    gallery = sorted((report / "gradcam").glob("*.png"))
    assert [p for p in gallery if p.name.endswith("_true_positives_1.png")], "no Grad-CAM overlays"
    for overlay_file in gallery:  # the 64 px test images, enlarged smoothly for a reader
        with Image.open(overlay_file) as picture:
            assert min(picture.size) >= MIN_OVERLAY_SIDE, (overlay_file.name, picture.size)
    assert "input to 512 px, as the dataset keeps no original" in md
    assert metrics["gradcam_layer"] != "relu", (
        "at 64 px the 2×2 last map cannot localise; a deeper map is used"
    )
    assert metrics["localization"], "synthetic phantoms carry boxes: localisation must be scored"
    for item in metrics["localization"].values():
        assert {
            "pointing_hit_rate",
            "baseline_pointing_hit_rate",
            "mean_iou",
            "baseline_mean_iou",
        } <= set(item)


def test_thresholds_come_from_validation_and_travel_with_the_model(finished_sweep: dict) -> None:
    from chestxpert.datasets.reader import open_dataset, read_split
    from chestxpert.results.evaluate import choose_thresholds
    from chestxpert.trainable.checkpoint import file_sha256, load_model, read_state

    version = finished_sweep["root"] / "storage" / "tiny-final" / "final" / "versions" / "1"
    model_dir = version / "model"
    state = read_state(model_dir)
    assert (model_dir / "model.keras.sha256").read_text().strip() == file_sha256(
        model_dir / "model.keras"
    )
    model = load_model(model_dir, compile=False)
    val = read_split(open_dataset(state["config"]["dataset"]), "val")
    expected = choose_thresholds(
        val["labels"], model.predict(val["image"], verbose=0), state["labels"]
    ).thresholds
    assert state["thresholds"] == pytest.approx(expected)
    # the calibrator travels with the model, inside the sealed version
    calibrator = json.loads((model_dir / "calibrator.json").read_text())
    assert calibrator["labels"] == state["labels"] and calibrator["method"] == "platt"
    assert set(state["operating_points"]["spec=0.9"]) == set(state["labels"])
    report_dir = version / "report"
    assert (report_dir / "report.html").exists() and (report_dir / "metrics.json").exists()
    # Sealed: SHA256SUMS lists every other file of the version with its digest.
    listed = dict(
        reversed(line.split("  ", 1)) for line in (version / "SHA256SUMS").read_text().splitlines()
    )
    files = {p.relative_to(version).as_posix() for p in version.rglob("*") if p.is_file()}
    assert set(listed) == files - {"SHA256SUMS"} and "model/calibrator.json" in listed
    assert all(file_sha256(version / rel) == digest for rel, digest in listed.items())


def test_final_run_is_nested_and_the_model_registered_as_champion(finished_sweep: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=finished_sweep["mlflow"])
    version = client.get_model_version_by_alias("tiny-final-model", "champion")
    # The storage pointer and the alias name the same model.
    final = finished_sweep["root"] / "storage" / "tiny-final" / "final"
    pointer = json.loads((final / "current.json").read_text())
    assert pointer["version"] == 1 and pointer["registered_version"] == version.version
    assert version.tags["chestxpert.final_version"] == (final / "versions" / "1").as_uri()
    assert pointer["metric"] == "val_auc_macro" and 0.0 <= pointer["value"] <= 1.0
    summary = json.loads(finished_sweep["stdout"])
    assert summary["promotion"].startswith("champion: version 1 (val_auc_macro")
    assert summary["mlflow"]["uri"] == "models:/tiny-final-model@champion"
    run = client.get_run(version.run_id)
    assert run.data.tags["chestxpert.role"] == "final"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert (
        parent.data.tags["chestxpert.role"] == "sweep"
        and parent.data.tags["chestxpert.sweep"] == "tiny-final"
    )
    assert "test_auc_macro" in run.data.metrics
    assert run.data.metrics["test_ece_pooled_calibrated"] >= 0.0
    assert {"test_auc_macro_low", "test_brier_pooled"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report", "checkpoint"} <= artifacts
    mlflow.set_tracking_uri(finished_sweep["mlflow"])
    loaded = mlflow.pyfunc.load_model("models:/tiny-final-model@champion")
    assert loaded.metadata.get_input_schema() is not None, (
        "the model is logged with its input signature"
    )
    (output,) = loaded.metadata.get_output_schema().inputs  # a Schema's specs, in or out
    assert (output.type, output.shape) == (np.dtype("float32"), (-1, 14))
    probabilities = loaded.predict(np.zeros((2, 64, 64, 1), dtype=np.uint8))
    assert np.asarray(probabilities).shape == (2, 14)


def test_the_sweep_reads_in_mlflow_as_its_users_read_it(
    finished_sweep: dict, synthetic_dataset
) -> None:
    """The experiment opens on its runs; parent and trial show the dataset; the parent holds the
    sweep report and the best checkpoint; the trial its system metrics."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=finished_sweep["mlflow"])
    experiment = client.get_experiment_by_name("tiny-final")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    page = f"#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    assert f"MLflow experiment: {finished_sweep['mlflow']}/{page}" in finished_sweep["sweep_stdout"]
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags["chestxpert.role"] == "sweep"]
    (trial,) = [r for r in runs if r.data.tags["chestxpert.role"] == "trial"]
    generation = synthetic_dataset.manifest["generation"]
    for run in (parent, trial):
        (held,) = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert (held.dataset.name, held.dataset.digest) == ("prepared", generation)
        assert json.loads(held.dataset.source)["uri"] == synthetic_dataset.prepared.as_uri()
        assert held.dataset.source_type == "local"
    sweep = finished_sweep["root"] / "storage" / "tiny-final"
    summary = json.loads((sweep / "chestxpert_summary.json").read_text())
    assert parent.data.tags["chestxpert.best_checkpoint"] == summary["best_checkpoint"]
    assert (sweep / "report" / "report.html").exists()
    assert "logged to the sweep's parent run" in finished_sweep["sweep_stdout"]
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.json"} <= report
    # sampled in the trial's own process, every second here (MLFLOW_SYSTEM_METRICS_…)
    metrics = client.get_run(trial.info.run_id).data.metrics
    for key in (
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
        "system/trial_cpu_utilization_percentage",
        "system/trial_memory_rss_megabytes",
    ):
        assert key in metrics, sorted(metrics)
    rss = client.get_metric_history(trial.info.run_id, "system/trial_memory_rss_megabytes")
    assert len(rss) >= 2 and all(point.value > 50 for point in rss)


def test_final_json_summary_and_progress_per_stage(finished_sweep: dict) -> None:
    """`final --json`: stdout is the summary alone (README schema); each stage's start and end,
    with its seconds, are on stderr, in order."""
    summary = json.loads(finished_sweep["stdout"])
    assert set(summary) == {
        "sweep",
        "version",
        "auc_macro",
        "auc_micro",
        "test_images",
        "report",
        "storage",
        "mlflow",
        "promotion",
    }
    assert summary["sweep"] == "tiny-final" and summary["version"] == 1
    assert 0.0 <= summary["auc_macro"] <= 1.0 and summary["test_images"] > 0
    assert set(summary["mlflow"]) == {"run_id", "model_name", "version", "uri", "champion"}
    progress = finished_sweep["stderr"]
    assert "final: epoch 2" in progress
    stages = ["retrain", "prediction", "bootstrap", "grad-cam", "upload", "registration"]
    ends = [progress.index(f"final: {stage} done in ") for stage in stages]
    assert ends == sorted(ends), progress[-3000:]
    starts = [progress.index(f"final: {stage} ") for stage in stages]  # the start comes first
    assert all(start < end for start, end in zip(starts, ends, strict=True))
    assert starts[1:] == sorted(starts[1:]) and starts[1] > ends[0]


def test_no_tensorflow_start_up_lines_in_the_output_or_the_trial_logs(finished_sweep: dict) -> None:
    """The sweep and the final imported TensorFlow in the CLI and in Ray trial workers; none of
    its oneDNN/CUDA start-up lines reached the user or the workers' logs (no --verbose)."""
    from chestxpert.cluster.quiet import NOISE

    logs = finished_sweep["root"] / "ws" / "ray" / "session_latest" / "logs"
    workers = sorted(logs.glob("worker-*"))
    assert workers, f"no worker logs in {logs}"
    texts = {
        "sweep run": finished_sweep["sweep_stderr"],
        "final": finished_sweep["stderr"],
        **{path.name: path.read_text(errors="replace") for path in workers},
    }
    for where, text in texts.items():
        noisy = [line for line in text.splitlines() if NOISE.search(line)]
        assert not noisy, f"{where}: {noisy[:3]}"
