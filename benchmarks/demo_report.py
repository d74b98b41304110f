"""The demo's test macro AUC, and Grad-CAM's pointing-game hit rate and IoU per finding beside the
centre baseline's (a centred Gaussian that knows nothing of the image).

Reads the newest `make demo` report in the workspace (`$CHESTXPERT_WORKSPACE`, else
`./.chestxpert`); without one, runs a scaled-down demo (800 images, 2 trials, 2 epochs)
in a scratch workspace, which smoke mode never does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.runner import run_child
from chestxpert.cluster.processes import free_port
from chestxpert.cluster.workspace import workspace_path

SCALED_DEMO = {"images": 800, "samples": 2, "epochs": 2}


def scaled_demo(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: `chestxpert demo` at a small size on free ports, stopping its services at the end."""
    from chestxpert.cluster.endpoints import prepare_ray_environment
    from chestxpert.cluster.stack import StackOptions
    from chestxpert.demo import run_demo

    ws = Path(spec["workspace"])
    prepare_ray_environment(ws)  # as the console script does before any command
    opts = StackOptions(
        workspace=ws, ray_port=free_port(), dashboard_port=free_port(), mlflow_port=free_port()
    )
    summary = run_demo(opts, spec["images"], spec["samples"], spec["epochs"], stop=True)
    return {"report_dir": summary["final"]["report_dir"]}


def newest_demo_report() -> Path | None:
    """metrics.json of the newest demo report in the workspace, or None."""
    reports = sorted(
        (workspace_path() / "reports").glob("demo-*/metrics.json"),
        key=lambda path: path.stat().st_mtime,
    )
    return reports[-1] if reports else None


def run(smoke: bool = False) -> None:
    metrics_path = newest_demo_report()
    if metrics_path is not None:
        source = f"the newest `make demo` report ({metrics_path.parent})"
    elif smoke:
        print(f"  no demo report in {workspace_path() / 'reports'}; smoke mode runs no demo")
        return
    else:  # no demo has run here; the scratch workspace stays, for its report.html
        ws = Path(tempfile.mkdtemp(prefix="cxbd-"))
        scaled = " ".join(f"{value} {key}" for key, value in SCALED_DEMO.items())
        print(f"  no demo report in the workspace: a scaled-down demo ({scaled}) in {ws}")
        result = run_child(scaled_demo, {"workspace": str(ws), **SCALED_DEMO}, timeout=3600)
        metrics_path = Path(result["report_dir"]) / "metrics.json"
        source = f"a scaled-down demo in {ws}"
    report(json.loads(metrics_path.read_text()), source)


def report(metrics: dict[str, Any], source: str) -> None:
    """Print test AUC and, per finding with boxes, Grad-CAM's scores beside the baseline's."""
    evaluation = metrics["evaluation"]
    print(f"  from {source}")
    print(
        f"  {metrics['image_size']} px; test macro AUC {evaluation['auc_macro']:.3f} (micro "
        f"{evaluation['auc_micro']:.3f}) on {evaluation['counts']['images']} images; "
        f"Grad-CAM layer {metrics['gradcam_layer']}"
    )
    print(
        f"  {'finding':20s} {'boxes':>5s} {'pointing':>9s} {'baseline':>9s} {'IoU':>6s} "
        f"{'baseline':>9s}"
    )
    localization = sorted(metrics["localization"].items())
    for label, item in localization:
        print(
            f"  {label:20s} {item['n']:5d} {item['pointing_hit_rate']:9.2f} "
            f"{item['baseline_pointing_hit_rate']:9.2f} {item['mean_iou']:6.2f} "
            f"{item['baseline_mean_iou']:9.2f}"
        )
    better = [
        label
        for label, item in localization
        if item["pointing_hit_rate"] > item["baseline_pointing_hit_rate"]
    ]
    worse = [
        label
        for label, item in localization
        if item["pointing_hit_rate"] < item["baseline_pointing_hit_rate"]
    ]
    print(
        f"  pointing game above the centre baseline for {len(better)} of {len(localization)} "
        f"findings{', below for ' + ', '.join(worse) if worse else ''}"
    )
