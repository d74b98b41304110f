"""`chestxpert demo` (what `make demo` runs), scaled down: the whole path on the local stack."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from chestxpert.cluster.processes import session_members
from tests.conftest import CHESTXPERT_CLI, REPO, short_tmpdir, stack_port_flags


@pytest.mark.services
def test_demo_runs_the_whole_path_and_stops_what_it_started() -> None:
    ws = short_tmpdir("cxd")
    ports = stack_port_flags()
    result = subprocess.run(
        [
            CHESTXPERT_CLI,
            "--workspace",
            str(ws),
            "demo",
            "--images",
            "300",
            "--samples",
            "1",  # one DenseNet121 trial: two build their graphs side by side on 2 cores
            "--epochs",
            "2",
            "--image-size",
            "64",
            "--stop",
            *ports,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    for step in (
        "[1/4] drawing 300 synthetic",
        "[2/4] preparing",
        "[3/4] sweep demo-",
        "best trial",
        "[4/4] final",
        "demo finished in ",
        "final report",
        "report.html",
        "models:/",
    ):
        assert step in out, step
    stages = out.split("demo finished in ", 1)[1].split("\n", 1)[0]
    for stage in ("services", "[1/4] draw", "[2/4] prepare", "[3/4] sweep", "[4/4] final"):
        assert re.search(rf"{re.escape(stage)} \d+\.\d min", stages), stages
    assert (ws / "data" / "synth-300-64" / "manifest.json").exists()
    summaries = list((ws / "storage").glob("demo-*/chestxpert_summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["trials"] == 1 and summary["errors"] == 0
    best = (ws / "storage").joinpath(summary["best_checkpoint"].split("/storage/", 1)[1])
    assert (best / "model.keras").exists()
    _assert_a_real_densenet121_epoch(best)
    assert list((ws / "reports").glob("demo-*/report.html")), "no final report"
    sweep_reports = list((ws / "storage").glob("demo-*/report/report.html"))
    assert sweep_reports, "no sweep report"
    shown = f"sweep report    {(ws / 'storage').as_uri()}/"
    assert shown in out and out.split(shown, 1)[1].split("\n")[0].endswith("/report/report.html")
    assert "<h2>Learning curves</h2>" in sweep_reports[0].read_text()
    assert list((ws / "storage").glob("demo-*/final/versions/1/model/model.keras.sha256")), (
        "final model not stored"
    )
    assert list((ws / "storage").glob("demo-*/final/current.json")), "final model not promoted"
    assert not (ws / "services.json").exists(), "--stop must stop the stack"
    assert "stopping ray" in out and "stopping mlflow" in out
    for line in out.splitlines():
        if line.startswith("stopping "):
            session = int(line.split("session ")[1].rstrip(") ."))
            assert session_members(session) == []


def _assert_a_real_densenet121_epoch(checkpoint: Path) -> None:
    """The demo's trial trained DenseNet121 itself (the product's model, from scratch): its
    checkpoint holds every per-epoch metric, finite, and the network's own last conv map."""
    import numpy as np

    from chestxpert.trainable.checkpoint import load_model, read_state

    state = read_state(checkpoint)
    assert state["config"]["backbone"] == "densenet121"
    assert state["preprocessing"]["image_size"] == 64 and len(state["labels"]) == 14
    metrics = state["metrics"]
    for key in (
        "train_loss",
        "val_loss",
        "val_auc_macro",
        "val_pr_auc_macro",
        "epoch_seconds",
        "images_per_second",
        "startup_seconds",
    ):
        assert np.isfinite(metrics[key]), key
    assert 0.0 <= metrics["val_auc_macro"] <= 1.0
    # start-up covers building DenseNet121 and its first step (tens of seconds), measured
    assert metrics["startup_seconds"] > 5.0
    per_label = [
        k
        for k in metrics
        if k.startswith("val_auc_") and k not in ("val_auc_macro", "val_auc_labels")
    ]
    assert len(per_label) == metrics["val_auc_labels"] > 0
    model = load_model(checkpoint, compile=False)
    assert model.get_layer("relu").output.shape[1:3] == (2, 2)  # DenseNet121's last map at 64 px
