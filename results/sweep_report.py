"""`chestxpert sweep report NAME`: build a sweep's report from its storage alone (finished, running
or crashed), publish it to `<storage>/<name>/report/` with its JSON, and log it to MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from chestxpert.cluster.endpoints import Endpoints
from chestxpert.results.sweep_data import (
    importances,
    optuna_study,
    recorded_spec,
    sweep_report_data,
)
from chestxpert.results.sweep_page import render_html
from chestxpert.sweeps.layout import SWEEP_REPORT_DATA, SWEEP_REPORT_HTML, SweepLocation


def build_report(location: SweepLocation) -> tuple[dict[str, Any], str]:
    """The report's data and its HTML page, from the sweep's storage alone."""
    _, spec = recorded_spec(location)
    data = sweep_report_data(location, spec)
    study, notes = optuna_study(spec, data)
    data["importances"], data["importance_note"] = importances(study)
    return data, render_html(data, spec, study, notes)


def write_report(
    location: SweepLocation, data: dict[str, Any], page: str, out: Path | None = None
) -> Path:
    """Publish report.html and report.json to `<storage>/<name>/report/` (each file whole: a
    temporary name, then the real one) and to `out` when given; returns a local folder holding
    both (`out`, or a new temporary folder the caller removes)."""
    payload = json.dumps(data, indent=2, default=str).encode()
    location.write_bytes(SWEEP_REPORT_DATA, payload)
    location.write_bytes(SWEEP_REPORT_HTML, page.encode())
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="cx-sweep-report-"))
    folder.mkdir(parents=True, exist_ok=True)
    for relative, content in ((SWEEP_REPORT_DATA, payload), (SWEEP_REPORT_HTML, page.encode())):
        target = folder / Path(relative).name
        partial = folder / f".{target.name}.partial"
        partial.write_bytes(content)
        os.replace(partial, target)
    return folder


def log_to_mlflow(
    location: SweepLocation, folder: Path, tracking_uri: str, recorded: dict[str, Any]
) -> str:
    """Log the report folder to the sweep's MLflow parent run (artifact path `report`).

    Returns one line saying where it went, or, when MLflow does not answer or the sweep has
    no parent run recorded, one warning line; never raises for MLflow's sake.
    """
    from chestxpert.cluster import mlflow_runs

    parent = recorded.get("parent_run_id")
    where = mlflow_runs.safe_uri(tracking_uri)
    if not parent:
        return (
            f"warning: not logged to MLflow: the sweep has no parent run recorded "
            f"(`chestxpert sweep mlflow-sync {location.name}` makes it; then report again)"
        )
    try:
        client = mlflow_runs.client(tracking_uri)
        client.get_run(parent)
        client.log_artifacts(parent, str(folder), "report")
    except mlflow_runs.failures() as err:
        said = " ".join(str(err).replace(tracking_uri, where).split())[:160]
        return (
            f"warning: not logged to MLflow at {where} ({type(err).__name__}: {said}); the "
            "report is in storage; run the report again when MLflow answers"
        )
    return f"MLflow {where}: logged to the sweep's parent run {parent} as report/"


def report_sweep(
    location: SweepLocation,
    endpoints: Endpoints,
    mlflow_uri: str | None = None,
    out: Path | None = None,
) -> tuple[dict[str, Any], str]:
    """`chestxpert sweep report` as a function: build the report, publish it to storage (and a
    copy to `out`), log it to MLflow; returns its data and the line saying where MLflow has it
    (or why not). The MLflow server is `mlflow_uri`, else the one the sweep recorded, its
    spec's, or the endpoints'.
    """
    recorded, spec = recorded_spec(location)
    data, page = build_report(location)
    folder = write_report(location, data, page, out)
    try:
        tracking_uri = (
            mlflow_uri
            or recorded.get("mlflow_tracking_uri")
            or spec.mlflow.tracking_uri
            or endpoints.mlflow_tracking_uri
        )
        logged = log_to_mlflow(location, folder, tracking_uri, recorded)
    finally:
        if out is None:
            shutil.rmtree(folder, ignore_errors=True)
    return data, logged
