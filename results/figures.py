"""The report's PNG figures: reliability diagrams and per-label ROC or precision-recall panels.

They draw the output of `evaluate.calibration` and `evaluate.curves`, as returned or after
`evaluate`'s JSON conversion; matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chestxpert.results.inputs import EvaluationError


def reliability_figure(calib: Mapping[str, Any], path: str | Path) -> Path:
    """Save a PNG of reliability diagrams (pooled, then each label) from `calibration()` output.

    Accepts the output either as returned or after `evaluate`'s JSON conversion (None for NaN).
    """
    panels = [("pooled", calib["pooled"]), *calib["labels"].items()]
    fig, axes = _panel_grid(len(panels))
    for ax, (name, reliability) in zip(axes, panels, strict=False):
        bins = [b for b in reliability["bins"] if b["count"] and b["mean_pred"] is not None]
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
        ax.plot([b["mean_pred"] for b in bins], [b["frac_pos"] for b in bins], "o-", markersize=2)
        ece = reliability["ece"]
        ece_text = "n/a" if ece is None or not math.isfinite(ece) else f"{ece:.3f}"
        ax.set_title(f"{name}\nECE {ece_text}", fontsize=6)
    fig.supxlabel("mean predicted probability", fontsize=7)
    fig.supylabel("fraction positive", fontsize=7)
    return _save(fig, path)


# Marker styles of the operating points on ROC panels, in the order the points are given.
POINT_MARKERS = ("o", "s", "^", "D")


def curves_figure(
    curves_by_label: Mapping[str, Any],
    path: str | Path,
    kind: str = "roc",
    *,
    points: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    subtitles: Mapping[str, str] | None = None,
) -> Path:
    """Save a PNG of one small ROC (kind="roc") or precision-recall (kind="pr") panel per label.

    `points` ({point name: {label: operating point with sensitivity and specificity}}) are
    marked on ROC panels, one marker style per point, with a legend; `subtitles` (label → text,
    e.g. "AUC 0.81 (0.75–0.86)") go under each panel's title.
    """
    if kind not in ("roc", "pr"):
        raise EvaluationError(f"curve kind {kind!r} is unknown; use 'roc' or 'pr'")
    x_key, y_key = ("fpr", "tpr") if kind == "roc" else ("recall", "precision")
    fig, axes = _panel_grid(len(curves_by_label))
    for ax, (name, label_curves) in zip(axes, curves_by_label.items(), strict=False):
        curve = label_curves[kind]
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
        if curve is None:
            ax.text(0.5, 0.5, "not scorable", ha="center", va="center", fontsize=6)
        else:
            ax.plot(curve[x_key], curve[y_key], linewidth=1)
            for (point_name, by_label), marker in zip(
                (points or {}).items() if kind == "roc" else (), POINT_MARKERS, strict=False
            ):
                op = by_label.get(name) or {}
                if op.get("sensitivity") is not None and op.get("specificity") is not None:
                    ax.plot(
                        1 - op["specificity"],
                        op["sensitivity"],
                        marker,
                        markersize=4,
                        fillstyle="none",
                        label=point_name,
                    )
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=4, loc="lower right")
        subtitle = (subtitles or {}).get(name)
        ax.set_title(f"{name}\n{subtitle}" if subtitle else str(name), fontsize=6)
    x_title, y_title = (
        ("1 - specificity", "sensitivity") if kind == "roc" else ("recall", "precision")
    )
    fig.supxlabel(x_title, fontsize=7)
    fig.supylabel(y_title, fontsize=7)
    return _save(fig, path)


def _panel_grid(n_panels: int):
    """A Figure with one small square axes per panel (2 in each, at most 4 across) and its axes."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, safe in workers

    n_cols = min(4, max(1, n_panels))
    n_rows = max(1, math.ceil(n_panels / n_cols))
    fig = Figure(figsize=(2.0 * n_cols, 2.0 * n_rows), dpi=100, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=5)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
