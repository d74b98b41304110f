"""Every benchmark runs in smoke mode (`python -m benchmarks --smoke NAME`, tiny sizes), so none
of them rots between the rare full runs. Nothing here asserts a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks import BENCHMARKS
from tests.conftest import REPO

# A line each benchmark prints once it has measured both sides; a new benchmark needs a row.
RESULT_LINES = {
    "parquet_vs_png": "ratio parquet/png:",
    "input_pipeline": "ratio fit pipeline/in-memory:",
    "step_after_pipeline": "ratio step after make_tf_dataset/none:",
    "prepare_memory": "ratio peak RSS",
    "mlflow_job_runner": "ratio default/ours:",
    "s3_startup": "ratio mlflow/s3",
    "tune_trial": "ratio tune/bare (median): whole iteration",
    "startup_per_backbone": "1 of 1 backbones",
    "asha": "ratio asha/full: trial-epochs",
    "driver": "with callback over 1 rounds: trials/min",
    "journal": "the journal adds",
    "shard_cache": "ratio cached/streamed:",
    "scale": "peak RSS 120 / 30 images:",
    "demo_report": "pointing game above the centre baseline for 1 of 1 findings",
    # a whole demo is too long for a smoke run; tests/test_demo.py checks its stage line
    "demo_stages": "smoke mode runs no demo",
}
# Those that start Ray, MLflow or S3 processes.
STARTS_SERVICES = {
    "mlflow_job_runner",
    "s3_startup",
    "tune_trial",
    "asha",
    "driver",
    "shard_cache",
    "scale",
}
TIMEOUT_S = 900


def write_demo_report(workspace: Path) -> None:
    """A demo report's metrics.json as `results.final.evaluate_model` writes it, its evaluation
    and localisation from the same functions: the benchmark reads it instead of a demo."""
    from chestxpert.results.evaluate import choose_thresholds, evaluate
    from chestxpert.results.gradcam import localization_scores

    rng = np.random.default_rng(0)
    labels = ["Atelectasis", "Effusion"]
    y_true = (rng.random((40, len(labels))) < 0.4).astype(np.float64)
    y_prob = np.clip(0.6 * y_true + 0.4 * rng.random(y_true.shape), 0, 1)
    patients = [f"patient-{index // 2}" for index in range(len(y_true))]
    thresholds = choose_thresholds(y_true, y_prob, labels)
    heatmap = np.zeros((16, 16), np.float32)
    heatmap[4, 4] = 1.0  # peaks inside the box, away from the centre baseline's peak
    metrics = {
        "image_size": 128,
        "gradcam_layer": "pool3_relu",
        "evaluation": evaluate(y_true, y_prob, patients, labels, thresholds, n_boot=10),
        "localization": localization_scores({"Atelectasis": [(heatmap, (2.0, 2.0, 5.0, 5.0))]}),
    }
    path = workspace / "reports" / "demo-smoke" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(metrics, allow_nan=False, default=str))


class SmokeRuns:
    """The selected benchmarks' smoke runs, two at a time: while one is checked, the next one
    already runs (a single run leaves one of two cores idle most of the time)."""

    def __init__(self, names: list[str], folder: Path) -> None:
        self.names, self.folder = names, folder
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        if name in self.processes:
            return
        workspace = self.folder / name / "ws"  # also where demo_report looks for a report
        workspace.mkdir(parents=True)
        if name == "demo_report":
            write_demo_report(workspace)
        with (
            open(self.folder / name / "stdout", "w") as stdout,
            open(self.folder / name / "stderr", "w") as stderr,
        ):
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks", "--smoke", name],
                cwd=REPO,
                env={**os.environ, "CHESTXPERT_WORKSPACE": str(workspace)},
                stdout=stdout,
                stderr=stderr,
            )

    def finish(self, name: str) -> tuple[int, str, str]:
        """Start `name` and the next selected benchmark, wait for `name`, return its exit code,
        stdout and stderr."""
        self.start(name)
        waiting = [other for other in self.names if other not in self.processes]
        if waiting:
            self.start(waiting[0])
        code = self.processes[name].wait(timeout=TIMEOUT_S)
        out = (self.folder / name / "stdout").read_text()
        return code, out, (self.folder / name / "stderr").read_text()

    def close(self) -> None:
        """Interrupt a run still going (started ahead of a test that -x skipped, or past its
        timeout): on SIGINT a benchmark stops its services; kill it if it has not in 2 min."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    process.kill()


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory) -> Iterator[SmokeRuns]:
    selected = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.originalname == "test_benchmark_runs_in_smoke_mode"
    ]
    runs = SmokeRuns(selected, tmp_path_factory.mktemp("benchmarks"))
    try:
        yield runs
    finally:
        runs.close()


def test_every_benchmark_has_a_result_line() -> None:
    assert set(RESULT_LINES) == set(BENCHMARKS)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[pytest.mark.services] if name in STARTS_SERVICES else [])
        for name in BENCHMARKS
    ],
)
def test_benchmark_runs_in_smoke_mode(name: str, smoke_runs: SmokeRuns) -> None:
    code, out, err = smoke_runs.finish(name)
    assert code == 0, out[-3000:] + err[-3000:]
    ran = [line.split(" [smoke]: ", 1)[0] for line in out.splitlines() if " [smoke]: " in line]
    assert ran == [name], out
    assert RESULT_LINES[name] in out, out[-3000:]
    assert " failed" not in out, out[-3000:]


def test_importing_the_benchmarks_imports_neither_ray_nor_tensorflow() -> None:
    """Every child process imports the registry before it sets Ray's token variables (Ray fixes
    its auth mode when first imported) and before it starts its clocks."""
    code = "import sys, benchmarks; print(sorted({'ray', 'tensorflow'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
