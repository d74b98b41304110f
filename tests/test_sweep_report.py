"""`sweep report` from a sweep's storage alone: storage built here by hand (no Ray, no training)
with a completed, two ASHA-stopped, an errored and an interrupted trial, as a crashed driver
leaves them. The page must parse as a browser parses it, fetch nothing, and say the numbers its
JSON holds."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import html5lib
import pyarrow.fs as pafs
import pytest

from chestxpert.cluster.processes import free_port
from chestxpert.results.sweep_data import asha_rungs, sweep_report_data
from chestxpert.results.sweep_report import build_report, log_to_mlflow, write_report
from chestxpert.sweeps.layout import SPEC_FILE, SWEEP_REPORT_DATA, SWEEP_REPORT_HTML, SweepLocation
from chestxpert.sweeps.spec import SweepSpec

NAME = "crashed"
START = 1_800_000_000.0
# trial id -> (Tune's status, learning rate, batch size, validation AUC per epoch)
TRIALS = {
    "aaaa00000": ("TERMINATED", 1e-3, 16, [0.60, 0.66, 0.70, 0.72]),  # ran all 4 epochs
    "bbbb00001": ("TERMINATED", 3e-4, 32, [0.55]),  # ASHA: stopped at rung 1
    "cccc00002": ("TERMINATED", 2e-3, 16, [0.58, 0.61]),  # ASHA: stopped at rung 2
    "dddd00003": ("ERROR", 5e-3, 32, [0.50]),
    "eeee00004": ("RUNNING", 8e-4, 16, []),  # the driver died while it built its model
}


def _spec(tmp_path: Path, **changes) -> SweepSpec:
    raw = {
        "name": NAME,
        "dataset": str(tmp_path / "data"),
        "trial": {"epochs": 4},
        "resources": {"cpus": 2, "gpus": 0.5},
        "search": {"num_samples": 6},
        "space": {
            "learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "batch_size": {"type": "choice", "values": [16, 32]},
        },
        "scheduler": {"type": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2},
        **changes,
    }
    return SweepSpec.model_validate(raw)


def _sweep(tmp_path: Path, trials: dict, spec: SweepSpec) -> SweepLocation:
    """Sweep storage as Tune and the driver leave it: spec record, trial folders with params and
    results, Tune's experiment state, a checkpoint with its state.json; no summary (crashed)."""
    sweep = tmp_path / "storage" / NAME
    sweep.mkdir(parents=True)
    (sweep / SPEC_FILE).write_text(json.dumps({"raw": spec.model_dump(mode="json")}))
    states = []
    for index, (trial_id, (status, rate, batch, values)) in enumerate(trials.items()):
        folder = sweep / f"train_{trial_id}"
        folder.mkdir()
        config = {"learning_rate": rate, "batch_size": batch, "epochs": 4, "backbone": "densenet"}
        (folder / "params.json").write_text(json.dumps(config))
        began = START + 100 * index
        rows = [
            {
                "trial_id": trial_id,
                "epoch": epoch,
                "val_auc_macro": value,
                "timestamp": began + 30 * epoch,
                "time_this_iter_s": 30.0,
                "time_total_s": 30.0 * epoch,
            }
            for epoch, value in enumerate(values, start=1)
        ]
        (folder / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.utime(folder / "params.json", (began, began))
        if status == "ERROR":
            (folder / "error.txt").write_text("Traceback: out of memory")
        if values:
            checkpoint = folder / f"checkpoint_{len(values) - 1:06d}"
            checkpoint.mkdir()
            state = {"epoch": len(values), "metrics": {"val_auc_macro": max(values)}}
            (checkpoint / "state.json").write_text(json.dumps(state))
        states.append([json.dumps({"trial_id": trial_id, "status": status}), "{}"])
    state_file = sweep / "experiment_state-2027-01-15_08-00-00.json"
    state_file.write_text(json.dumps({"trial_data": states}))
    os.utime(state_file, (START + 1000, START + 1000))
    root = tmp_path / "storage"
    return SweepLocation(pafs.LocalFileSystem(), str(root), NAME, root.as_uri() + f"/{NAME}")


def _table(document, table_id: str) -> dict[str, list[str]]:
    """Rows of an HTML table by their data-key: cell texts."""
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    table = document.find(f".//h:table[@id='{table_id}']", ns)
    return {
        row.get("data-key"): ["".join(cell.itertext()) for cell in row.findall("h:td", ns)]
        for row in table.findall(".//h:tr", ns)
        if row.get("data-key")
    }


def test_the_report_of_a_crashed_sweep_shows_every_trial_and_the_numbers_of_its_json(
    tmp_path: Path,
) -> None:
    location = _sweep(tmp_path, TRIALS, _spec(tmp_path))
    data, page = build_report(location)
    out = write_report(location, data, page, tmp_path / "copy")

    stored = tmp_path / "storage" / NAME
    assert (stored / SWEEP_REPORT_HTML).read_text() == page == (out / "report.html").read_text()
    assert json.loads((stored / SWEEP_REPORT_DATA).read_text()) == json.loads(
        (out / "report.json").read_text()
    )
    assert not [p for p in stored.rglob(".*.partial")], "a temporary file was left behind"

    document = html5lib.HTMLParser(strict=True).parse(page)  # raises on any parse error
    assert not re.search(r"(?i)https?://", page), "the page names an external URL"
    assert not re.search(r"(?i)\b(src|href)=['\"](?!data:|#)", page), "it fetches something"
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4  # curves, history, importances, slices
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    headings = re.findall(r"<h2>([^<]+)</h2>", page)
    assert headings == [
        "Learning curves",
        "Optimisation history",
        "Hyperparameter importances",
        "Slice plots",
        "Trials",
        "Budget",
        "Best trial",
    ]
    assert page.count("<img") == page.count("class='caption'") - 2  # + trials and budget

    assert data["state"] == "interrupted"
    ended = {t["trial_id"]: t["ended"] for t in data["trials"]}
    assert ended == {
        "aaaa00000": "completed",
        "bbbb00001": "stopped by ASHA at epoch 1",
        "cccc00002": "stopped by ASHA at epoch 2",
        "dddd00003": "errored",
        "eeee00004": "interrupted",
    }
    assert data["scheduler"]["rungs"] == [1, 2]
    rows = _table(document, "trial-table")
    assert sorted(rows) == sorted(TRIALS)
    for trial in data["trials"]:
        cells = rows[trial["trial_id"]]
        assert cells[2] == trial["ended"] and cells[3] == str(trial["epochs"])
        assert cells[4] == ("–" if trial["best"] is None else f"{trial['best']:.4f}")
        assert cells[5] == f"{trial['wall_time_s']:.1f}"
    assert rows["aaaa00000"][4] == "0.7200" and rows["aaaa00000"][5] == "120.0"

    budget = data["budget"]
    assert budget["full_trial_epochs"] == 6 * 4 and budget["spent_trial_epochs"] == 4 + 1 + 2 + 1
    assert budget["saved_by_asha_trial_epochs"] == 3 + 2 and budget["stopped_by_asha"] == 2
    hours = (120 + 30 + 60 + 30) / 3600
    assert budget["cpu_hours"] == pytest.approx(2 * hours, abs=1e-4)
    assert budget["gpu_hours"] == pytest.approx(0.5 * hours, abs=1e-4)
    shown = _table(document, "budget-table")
    assert shown["trial-epochs spent"][1] == "8"
    assert shown["CPU-hours (2 per trial)"][1] == f"{budget['cpu_hours']:.4f}"
    assert shown["GPU-hours (0.5 per trial)"][1] == f"{budget['gpu_hours']:.4f}"

    # Optuna's fANOVA over the four trials with a value: the errored one is a FAIL
    assert set(data["importances"]) == {"learning_rate", "batch_size"}
    assert sum(data["importances"].values()) == pytest.approx(1.0)
    for key, cells in _table(document, "importance-values").items():
        assert cells[1] == f"{data['importances'][key]:.4f}"

    best = data["best"]
    assert best["trial_id"] == "aaaa00000" and best["value"] == 0.72
    assert best["checkpoint"] == f"{location.uri}/train_aaaa00000/checkpoint_000003"
    root = (tmp_path / "storage").as_uri()
    assert best["pull_command"] == f"chestxpert pull-best {NAME} --to {NAME}-best --storage {root}"
    assert best["pull_command"] in page and best["checkpoint"] in page


@pytest.mark.parametrize(
    ("trials", "words"),
    [
        ({"aaaa00000": TRIALS["aaaa00000"]}, "at least 2 trials with a value; this sweep has 1"),
        (
            {"aaaa00000": TRIALS["aaaa00000"], "bbbb00001": ("TERMINATED", 1e-3, 16, [0.55])},
            "whose value varies; none does",
        ),
    ],
)
def test_importance_is_said_in_words_when_optuna_has_too_little_to_go_on(
    tmp_path: Path, trials: dict, words: str
) -> None:
    _, page = build_report(_sweep(tmp_path, trials, _spec(tmp_path)))
    section = page.split("<h2>Hyperparameter importances</h2>", 1)[1].split("</section>")[0]
    assert words in section and "<img" not in section


@pytest.mark.parametrize(
    ("scheduler", "rungs"),
    [
        ({"type": "asha", "max_t": 10, "grace_period": 1, "reduction_factor": 3}, [1, 3, 9]),
        ({"type": "asha", "max_t": 9, "grace_period": 1, "reduction_factor": 3}, [1, 3]),
        ({"type": "asha", "max_t": 20, "grace_period": 2, "reduction_factor": 2}, [2, 4, 8, 16]),
        ({"type": "none"}, []),
    ],
)
def test_asha_rungs_are_where_rays_bracket_puts_them(
    tmp_path: Path, scheduler: dict, rungs: list[int]
) -> None:
    spec = _spec(tmp_path, trial={"epochs": 20}, scheduler=scheduler)
    assert asha_rungs(spec) == rungs


def test_an_mlflow_that_does_not_answer_costs_one_warning_not_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    location = _sweep(tmp_path, {"aaaa00000": TRIALS["aaaa00000"]}, _spec(tmp_path))
    out = write_report(location, *build_report(location), tmp_path / "out")
    absent = f"http://127.0.0.1:{free_port()}"
    said = log_to_mlflow(location, out, absent, {"parent_run_id": "0123abcd"})
    assert said.startswith(f"warning: not logged to MLflow at {absent}"), said
    assert "report is in storage" in said and "\n" not in said


@pytest.mark.parametrize(
    ("scheduler", "stopped_at", "ended"),
    [
        # ASHA's rungs here are epochs 1 and 2: at epoch 3 it was the time budget, not ASHA
        ({"type": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2}, 3, "early"),
        ({"type": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2}, 2, "ASHA"),
        ({"type": "none"}, 2, "early"),
    ],
)
def test_a_trial_the_time_budget_stopped_is_not_credited_to_asha(
    tmp_path: Path, scheduler: dict, stopped_at: int, ended: str
) -> None:
    spec = _spec(tmp_path, scheduler=scheduler, search={"num_samples": 2, "time_budget_s": 600})
    values = [0.6, 0.62, 0.64, 0.66][:stopped_at]
    trials = {"aaaa00000": TRIALS["aaaa00000"], "bbbb00001": ("TERMINATED", 3e-4, 32, values)}
    data = sweep_report_data(_sweep(tmp_path, trials, spec), spec)

    stopped = next(t for t in data["trials"] if t["trial_id"] == "bbbb00001")
    budget = data["budget"]
    if ended == "ASHA":
        assert stopped["ended"] == f"stopped by ASHA at epoch {stopped_at}"
        assert budget["stopped_by_asha"] == 1 and budget["saved_by_asha_trial_epochs"] == 2
    else:
        assert stopped["ended"] == f"stopped early at epoch {stopped_at}"
        assert budget["stopped_by_asha"] == 0 and budget["saved_by_asha_trial_epochs"] == 0
    assert budget["spent_trial_epochs"] == 4 + stopped_at


def test_the_sweep_report_command_publishes_and_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from chestxpert.cli import main

    location = _sweep(tmp_path, TRIALS, _spec(tmp_path))
    # What main() sets for Ray goes back as it was when the test ends.
    for key, value in (("RAY_AUTH_MODE", "token"), ("RAY_USAGE_STATS_ENABLED", "0")):
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "ray_auth_token"))
    root = str(tmp_path / "storage")
    argv = ["--workspace", str(tmp_path / "ws"), "sweep", "report", NAME, "--storage", root]
    assert main([*argv, "--out", str(tmp_path / "copy"), "--json"]) == 0
    said = capsys.readouterr()
    data = json.loads(said.out)
    assert data["name"] == NAME and data["state"] == "interrupted"
    assert f"report: {location.uri}/{SWEEP_REPORT_HTML}" in said.err
    assert "warning: not logged to MLflow: the sweep has no parent run recorded" in said.err
    stored = (tmp_path / "storage" / NAME / SWEEP_REPORT_HTML).read_text()
    assert (tmp_path / "copy" / "report.html").read_text() == stored


@pytest.mark.services
def test_the_report_of_a_sweep_in_s3_says_what_the_local_one_says(
    tmp_path: Path, s3_filesystem, s3_endpoint
) -> None:
    local = _sweep(tmp_path, TRIALS, _spec(tmp_path))
    prefix = f"{s3_endpoint.bucket}/report-{tmp_path.name}"
    pafs.copy_files(local.path, f"{prefix}/{NAME}", pafs.LocalFileSystem(), s3_filesystem)
    remote = SweepLocation(s3_filesystem, prefix, NAME, f"s3://{prefix}/{NAME}")

    data, page = build_report(remote)
    write_report(remote, data, page)
    expected = sweep_report_data(local, _spec(tmp_path))
    by_id = {t["trial_id"]: t for t in data["trials"]}
    for trial in expected["trials"]:  # S3 keeps no file times of ours: compare by trial
        assert {k: by_id[trial["trial_id"]][k] for k in ("ended", "epochs", "best", "curve")} == {
            k: trial[k] for k in ("ended", "epochs", "best", "curve")
        }
    assert data["budget"] == expected["budget"]
    assert data["best"]["checkpoint"] == f"s3://{prefix}/{NAME}/train_aaaa00000/checkpoint_000003"
    assert f"--storage s3://{prefix}" in data["best"]["pull_command"]
    assert remote.read_bytes(SWEEP_REPORT_HTML) == page.encode()
    # A second report reads the storage the first one wrote its report into.
    again = sweep_report_data(remote, _spec(tmp_path))
    assert sorted(t["trial_id"] for t in again["trials"]) == sorted(TRIALS)
