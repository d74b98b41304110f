"""The clinical-style report: report.md and a standalone report.html from metrics.json and figures.

What a team shows a radiologist: the Pathology | AUC (95% CI) | Sensitivity |
Specificity table, calibration, curves, localisation against a baseline, Grad-CAM examples.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def headline_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row of the headline table per label.

    Columns: pathology, AUC (95% CI), sensitivity, specificity, threshold, positives, CheXNet.
    """
    rows = []
    for label, item in metrics["evaluation"]["per_label"].items():
        op = item.get("operating_point") or {}
        auc = (
            "no positives in test"
            if item.get("auc") is None
            else (f"{item['auc']:.3f} ({_fmt(item.get('auc_low'))}–{_fmt(item.get('auc_high'))})")
        )
        positives = metrics["evaluation"]["counts"]["positives"].get(label)
        rows.append(
            [
                label.replace("_", " "),
                auc,
                _fmt(op.get("sensitivity")),
                _fmt(op.get("specificity")),
                _fmt(op.get("threshold")),
                str(positives),
                _fmt(item.get("chexnet_reference_auc")),
            ]
        )
    return rows


HEADER = [
    "Pathology",
    "AUC (95% CI)",
    "Sensitivity",
    "Specificity",
    "Threshold",
    "Positives (test)",
    "CheXNet AUROC†",
]


def _notes(metrics: dict[str, Any]) -> list[str]:
    ev = metrics["evaluation"]
    notes = [
        f"Test split: {ev['counts']['images']} images of {ev['counts']['patients']} patients; "
        f"95% CIs from {metrics['bootstrap_resamples']} bootstrap resamples of patients "
        "(not images).",
        f"Operating thresholds chosen on the validation split ({metrics['threshold_method']}); "
        "test labels were used for nothing but scoring.",
        f"Model: {metrics['config'].get('backbone')} at "
        f"{metrics['image_size']}×{metrics['image_size']}, "
        f"trained {metrics['epochs']} epochs on {metrics['train_splits']}.",
        "† CheXNet (Rajpurkar et al., 2017) per-class AUROCs, measured on CheXNet's own split of "
        "NIH ChestX-ray14: a reference point, not a comparison on the same images.",
    ]
    if metrics.get("thresholds_defaulted"):
        notes.append(
            "Threshold 0.5 (not chosen: validation had no positives or no negatives) for: "
            + ", ".join(label.replace("_", " ") for label in metrics["thresholds_defaulted"])
            + "."
        )
    if metrics["train_splits"] == "train+val":
        notes.append(
            "Validation images were also training images here, so the thresholds chosen on them "
            "are optimistic."
        )
    if metrics.get("gradcam_note"):
        notes.append(metrics["gradcam_note"])
    if metrics["source"] != "nih":
        notes.append("The CheXNet column applies to NIH data only.")
    return notes


def write_markdown(metrics: dict[str, Any], figures: dict[str, str], path: Path) -> Path:
    """report.md: the headline table, summary numbers, localisation, and links to the figures."""
    ev = metrics["evaluation"]
    lines = [f"# ChestXpert report: {metrics['sweep']}", ""]
    lines += [f"- {note}" for note in _notes(metrics)] + [""]
    lines += [
        f"**Macro AUC** {_fmt(ev.get('auc_macro'))} · **micro AUC** {_fmt(ev.get('auc_micro'))} · "
        f"**macro PR AUC** {_fmt(ev.get('pr_auc_macro'))} · "
        f"**ECE (pooled)** {_fmt(ev['calibration']['pooled'].get('ece'))}",
        "",
    ]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in headline_rows(metrics)]
    if metrics.get("localization"):
        lines += [
            "",
            f"## Localisation (Grad-CAM layer `{metrics['gradcam_layer']}`)",
            "",
            "| Finding | Boxes | Pointing game | Mean IoU "
            "| Centre baseline: pointing | Centre baseline: IoU |",
            "|---|---|---|---|---|---|",
        ]
        for label, item in metrics["localization"].items():
            lines.append(
                f"| {label} | {item['n']} | {_fmt(item['pointing_hit_rate'], 2)} "
                f"| {_fmt(item['mean_iou'], 2)} "
                f"| {_fmt(item['baseline_pointing_hit_rate'], 2)} "
                f"| {_fmt(item['baseline_mean_iou'], 2)} |"
            )
    lines += ["", "## Figures", ""] + [f"![{name}]({rel})" for name, rel in figures.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_html(metrics: dict[str, Any], figures: dict[str, str], root: Path, path: Path) -> Path:
    """report.html: the same content with every figure embedded, so the one file can be mailed."""
    ev = metrics["evaluation"]
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>ChestXpert report: {esc(metrics['sweep'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:4px}"
        ".gallery img{width:180px}</style></head><body>",
        f"<h1>ChestXpert report: {esc(metrics['sweep'])}</h1><ul>",
    ]
    parts += [f"<li>{esc(note)}</li>" for note in _notes(metrics)] + ["</ul>"]
    parts.append(
        f"<p><b>Macro AUC</b> {_fmt(ev.get('auc_macro'))} · "
        f"<b>micro AUC</b> {_fmt(ev.get('auc_micro'))} · "
        f"<b>macro PR AUC</b> {_fmt(ev.get('pr_auc_macro'))} · <b>ECE (pooled)</b> "
        f"{_fmt(ev['calibration']['pooled'].get('ece'))}</p>"
    )
    parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in HEADER) + "</tr>")
    parts += [
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
        for row in headline_rows(metrics)
    ]
    parts.append("</table>")
    if metrics.get("localization"):
        parts.append(
            f"<h2>Localisation (Grad-CAM layer <code>{esc(metrics['gradcam_layer'])}</code>)</h2>"
            "<table>"
            "<tr><th>Finding</th><th>Boxes</th><th>Pointing game</th><th>Mean IoU</th>"
            "<th>Centre baseline: pointing</th><th>Centre baseline: IoU</th></tr>"
        )
        for label, item in metrics["localization"].items():
            cells = [
                label,
                str(item["n"]),
                _fmt(item["pointing_hit_rate"], 2),
                _fmt(item["mean_iou"], 2),
                _fmt(item["baseline_pointing_hit_rate"], 2),
                _fmt(item["baseline_mean_iou"], 2),
            ]
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    gallery = []
    for name, rel in figures.items():
        data = base64.b64encode((root / rel).read_bytes()).decode()
        tag = f"<img alt='{esc(name)}' title='{esc(name)}' src='data:image/png;base64,{data}'>"
        (gallery if rel.startswith("gradcam/") else parts).append(tag)
    if gallery:
        parts += [
            "<h2>Grad-CAM: most confident true positives and worst false positives</h2>",
            "<div class='gallery'>",
            *gallery,
            "</div>",
        ]
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path
