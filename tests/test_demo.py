"""`chestxpert demo` (what `make demo` runs), scaled down: the whole path on the local stack."""

from __future__ import annotations

import json
import subprocess

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
        "demo finished",
        "final report",
        "report.html",
        "models:/",
    ):
        assert step in out, step
    assert (ws / "data" / "synth-300-64" / "manifest.json").exists()
    summaries = list((ws / "storage").glob("demo-*/chestxpert_summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["trials"] == 1 and summary["errors"] == 0
    assert (
        (ws / "storage")
        .joinpath(summary["best_checkpoint"].split("/storage/", 1)[1], "model.keras")
        .exists()
    )
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
