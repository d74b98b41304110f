"""The clinical-style report: report.md and a standalone report.html from metrics.json and figures.

What a team shows a radiologist and what reporting checklists (CLAIM, TRIPOD-AI) ask for: the
intended use, the data's provenance, a per-label table of counts, prevalence, AUC and the
operating point's rates with patient-bootstrap CIs, calibration before and after Platt scaling,
curves, localisation against a baseline, Grad-CAM examples; every figure with a heading and a
one-line caption. Both files are built from the same rows, so they say the same numbers.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INTENDED_USE = (
    "Intended use: research use only. This model and report are not a medical device and must "
    "not be used for diagnosis, triage or any decision about a patient."
)
SYNTHETIC_BANNER = (
    "Synthetic phantoms: for testing the pipeline, not a clinical result. The images were drawn "
    "by `chestxpert data synth`; no number here says anything about real radiographs."
)
CHEXNET_HEADER = "CheXNet AUROC (CheXNet's own test split)†"
RATE_COLUMNS = (
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
)
HEADER = [
    "Pathology",
    "Positives",
    "Negatives",
    "Prevalence",
    "AUC (95% CI)",
    *(f"{title} (95% CI)" for _, title in RATE_COLUMNS),
    "F1",
    "Threshold",
]
CALIBRATION_HEADER = ["Pathology", "ECE", "ECE calibrated", "Brier", "Brier calibrated"]
POINT_HEADER = [
    "Pathology",
    "Threshold",
    *(f"{title} (95% CI)" for _, title in RATE_COLUMNS),
    "F1",
]


@dataclass(frozen=True)
class ReportFigure:
    """One figure of the report: a heading, a one-line caption, and its PNG (relative path)."""

    heading: str
    caption: str
    path: str


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_ci(value: Any, low: Any, high: Any) -> str:
    if value is None:
        return "–"
    if low is None or high is None:
        return _fmt(value)
    return f"{_fmt(value)} ({_fmt(low)}–{_fmt(high)})"


def shows_chexnet(metrics: dict[str, Any]) -> bool:
    """Whether the CheXNet reference column belongs: real data only, never synthetic phantoms."""
    return not metrics.get("synthetic")


def headline_header(metrics: dict[str, Any]) -> list[str]:
    """The headline table's column titles (the CheXNet column only for real data)."""
    return HEADER + ([CHEXNET_HEADER] if shows_chexnet(metrics) else [])


def headline_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row of the headline table per label, in `headline_header`'s columns.

    A label that cannot be scored says why in its AUC cell: "no positives in test", "no
    negatives in test" or "no known labels in test".
    """
    ev = metrics["evaluation"]
    rows = []
    for label, item in ev["per_label"].items():
        op = item.get("operating_point") or {}
        scorable = item.get("scorable", "yes" if item.get("auc") is not None else "not scorable")
        auc = (
            _with_ci(item["auc"], item.get("auc_low"), item.get("auc_high"))
            if item.get("auc") is not None
            else scorable
        )
        row = [
            label.replace("_", " "),
            str(ev["counts"]["positives"].get(label)),
            str(ev["counts"]["negatives"].get(label)),
            _fmt((ev["counts"].get("prevalence") or {}).get(label)),
            auc,
            *(
                _with_ci(op.get(key), op.get(f"{key}_low"), op.get(f"{key}_high"))
                for key, _ in RATE_COLUMNS
            ),
            _fmt(op.get("f1")),
            _fmt(op.get("threshold")),
        ]
        if shows_chexnet(metrics):
            row.append(_fmt(item.get("chexnet_reference_auc")))
        rows.append(row)
    return rows


def point_rows(metrics: dict[str, Any], point: str) -> list[list[str]]:
    """One row per label at a further operating point (e.g. "spec=0.9"), in POINT_HEADER."""
    rows = []
    for label, op in metrics["evaluation"]["operating_points"][point].items():
        rows.append(
            [
                label.replace("_", " "),
                _fmt(op.get("threshold")),
                *(
                    _with_ci(op.get(key), op.get(f"{key}_low"), op.get(f"{key}_high"))
                    for key, _ in RATE_COLUMNS
                ),
                _fmt(op.get("f1")),
            ]
        )
    return rows


def point_caption(point: str) -> str:
    """What a further operating point is, in words."""
    kind, _, target = point.partition("=")
    what = {
        "spec": f"the most sensitive threshold whose validation specificity is at least {target}",
        "sens": f"the highest threshold whose validation sensitivity is at least {target}",
    }.get(kind, "the threshold maximising Youden's J on validation")
    return (
        f"Operating point {point}: {what}; its rates on the test split with 95% patient-"
        "bootstrap CIs (specificity on test can fall below the target: it was met on validation)."
    )


SUBGROUP_HEADER = [
    "Pathology",
    "Attribute",
    "Group",
    "Images",
    "Positives",
    "Negatives",
    "AUC (95% CI)",
    "Largest gap",
]


def subgroup_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row per (label, attribute, group) whose counts allowed an AUC, label by label.

    The "Largest gap" cell of a label's two groups that differ most (within one attribute)
    holds the gap, flagged with ◆; other rows leave it empty.
    """
    subgroups = metrics.get("subgroups") or {}
    gaps = subgroups.get("largest_gap") or {}
    rows = []
    for row in sorted(subgroups.get("rows") or [], key=lambda r: r["label"]):
        gap = gaps.get(row["label"])
        flagged = (
            gap is not None
            and gap["attribute"] == row["attribute"]
            and row["group"] in gap["groups"]
        )
        rows.append(
            [
                row["label"].replace("_", " "),
                row["attribute"],
                row["group"],
                str(row["images"]),
                str(row["positives"]),
                str(row["negatives"]),
                _with_ci(row["auc"], row["auc_low"], row["auc_high"]),
                f"◆ {_fmt(gap['gap'])}" if flagged else "",
            ]
        )
    return rows


def subgroup_caption(metrics: dict[str, Any]) -> str:
    """What the subgroup table shows and which subgroups it leaves out, in words."""
    subgroups = metrics.get("subgroups") or {}
    if not subgroups:
        return "No subgroup analysis was run."
    caption = (
        "AUC with 95% patient-bootstrap CI within subgroups of the test split by sex, view and "
        "age band; ◆ marks, per pathology, the two groups of one attribute whose AUCs differ "
        f"most. A subgroup needs at least {subgroups['min_positives']} positives and "
        f"{subgroups['min_negatives']} negatives for a row."
    )
    skipped = subgroups.get("skipped") or []
    if skipped:
        caption += (
            f" {len(skipped)} pathology × subgroup pairs are skipped for too few cases; the "
            "table of skipped subgroups lists each with its counts."
        )
    return caption


SKIPPED_HEADER = ["Pathology", "Attribute", "Group", "Positives", "Negatives"]


def skipped_subgroup_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """One row per pathology × subgroup left out of the subgroup table, with its counts."""
    return [
        [
            s["label"].replace("_", " "),
            s["attribute"],
            str(s["group"]),
            str(s["positives"]),
            str(s["negatives"]),
        ]
        for s in (metrics.get("subgroups") or {}).get("skipped") or []
    ]


def calibration_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Pooled, then per label: ECE and Brier of the raw and of the calibrated probabilities."""
    ev = metrics["evaluation"]
    before = ev["calibration"]
    after = ev.get("calibration_calibrated") or {"pooled": {}, "labels": {}}
    rows = []
    for name, raw, calibrated in [
        ("all labels (pooled)", before["pooled"], after["pooled"]),
        *(
            (label.replace("_", " "), raw, after["labels"].get(label, {}))
            for label, raw in before["labels"].items()
        ),
    ]:
        rows.append(
            [
                name,
                _fmt(raw.get("ece")),
                _fmt(calibrated.get("ece")),
                _fmt(raw.get("brier")),
                _fmt(calibrated.get("brier")),
            ]
        )
    return rows


def summary_line(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers as (name, value) pairs: macro/micro AUC with CIs, PR AUC, ECE, Brier."""
    ev = metrics["evaluation"]
    pooled = ev["calibration"]["pooled"]
    after = (ev.get("calibration_calibrated") or {}).get("pooled") or {}
    pairs = [
        (
            "Macro AUC",
            _with_ci(ev.get("auc_macro"), ev.get("auc_macro_low"), ev.get("auc_macro_high")),
        ),
        (
            "micro AUC",
            _with_ci(ev.get("auc_micro"), ev.get("auc_micro_low"), ev.get("auc_micro_high")),
        ),
        ("macro PR AUC", _fmt(ev.get("pr_auc_macro"))),
        ("ECE (pooled)", _fmt(pooled.get("ece"))),
        ("Brier (pooled)", _fmt(pooled.get("brier"))),
    ]
    if after:
        pairs += [
            ("ECE calibrated", _fmt(after.get("ece"))),
            ("Brier calibrated", _fmt(after.get("brier"))),
        ]
    return pairs


def _notes(metrics: dict[str, Any]) -> list[str]:
    ev = metrics["evaluation"]
    notes = [
        f"Data: {metrics.get('dataset')} ({_provenance(metrics)}).",
        f"Test split: {ev['counts']['images']} images of {ev['counts']['patients']} patients; "
        f"95% CIs (AUC, sensitivity, specificity, PPV, NPV, macro and micro AUC) from the same "
        f"{metrics['bootstrap_resamples']} bootstrap resamples of patients (not images).",
        f"Operating thresholds chosen on the validation split ({metrics['threshold_method']}); "
        "test labels were used for nothing but scoring.",
        "Calibration: per-label Platt scaling fitted on the validation split only; the calibrated "
        "columns apply it to the test split. It changes what the probabilities say, not their "
        "order: AUCs and the calls at each threshold are the same.",
        f"Model: {metrics['config'].get('backbone')} at "
        f"{metrics['image_size']}×{metrics['image_size']}, "
        f"trained {metrics['epochs']} epochs on {metrics['train_splits']}.",
    ]
    if shows_chexnet(metrics):
        notes.append(
            "† CheXNet (Rajpurkar et al., 2017) per-class AUROCs, measured on CheXNet's own test "
            "split of NIH ChestX-ray14, another split with other images than ours: a reference "
            "point, not a comparison on the same images."
        )
        if metrics["source"] != "nih":
            notes.append("The CheXNet column applies to NIH labels only.")
    if metrics.get("thresholds_defaulted"):
        notes.append(
            "Threshold 0.5 (not chosen: validation had no positives or no negatives) for: "
            + ", ".join(label.replace("_", " ") for label in metrics["thresholds_defaulted"])
            + "."
        )
    if metrics["train_splits"] == "train+val":
        notes.append(
            "Validation images were also training images here, so the thresholds and the "
            "calibration fitted on them are optimistic."
        )
    if metrics.get("gradcam_note"):
        notes.append(metrics["gradcam_note"])
    return notes


def _provenance(metrics: dict[str, Any]) -> str:
    if metrics.get("synthetic"):
        return "synthetic phantoms drawn by `chestxpert data synth`"
    return {"nih": "NIH ChestX-ray14", "chexpert": "CheXpert"}.get(
        metrics.get("source"), str(metrics.get("source"))
    )


def _banners(metrics: dict[str, Any]) -> list[str]:
    return [INTENDED_USE] + ([SYNTHETIC_BANNER] if metrics.get("synthetic") else [])


def _localisation_rows(metrics: dict[str, Any]) -> list[list[str]]:
    return [
        [
            label,
            str(item["n"]),
            _fmt(item["pointing_hit_rate"], 2),
            _fmt(item["mean_iou"], 2),
            _fmt(item["baseline_pointing_hit_rate"], 2),
            _fmt(item["baseline_mean_iou"], 2),
        ]
        for label, item in (metrics.get("localization") or {}).items()
    ]


LOCALISATION_HEADER = [
    "Finding",
    "Boxes",
    "Pointing game",
    "Mean IoU",
    "Centre baseline: pointing",
    "Centre baseline: IoU",
]
TABLE_CAPTION = (
    "Per pathology on the test split: positives, negatives and prevalence among known labels; "
    "AUC with its 95% patient-bootstrap CI; sensitivity, specificity, PPV, NPV (95% CIs) and F1 "
    "at the threshold chosen on validation (positive when probability ≥ threshold)."
)
CALIBRATION_CAPTION = (
    "Expected calibration error (10 equal-width bins) and Brier score on the test split, of the "
    "raw probabilities and after Platt scaling fitted on validation; lower is better."
)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def write_markdown(metrics: dict[str, Any], figures: list[ReportFigure], path: Path) -> Path:
    """report.md: banners, notes, the headline and calibration tables, localisation, figures."""
    lines = [f"# ChestXpert report: {metrics['sweep']}", ""]
    lines += [f"> **{banner}**" for banner in _banners(metrics)] + [""]
    lines += [f"- {note}" for note in _notes(metrics)] + [""]
    lines += [" · ".join(f"**{name}** {value}" for name, value in summary_line(metrics)), ""]
    lines += ["## Per-pathology results", "", TABLE_CAPTION, ""]
    lines += _md_table(headline_header(metrics), headline_rows(metrics))
    for point in metrics["evaluation"].get("operating_points") or {}:
        lines += ["", f"## Operating point {point}", "", point_caption(point), ""]
        lines += _md_table(POINT_HEADER, point_rows(metrics, point))
    lines += ["", "## Calibration", "", CALIBRATION_CAPTION, ""]
    lines += _md_table(CALIBRATION_HEADER, calibration_rows(metrics))
    lines += ["", "## Subgroups", "", subgroup_caption(metrics), ""]
    if subgroup_rows(metrics):
        lines += _md_table(SUBGROUP_HEADER, subgroup_rows(metrics))
    if skipped_subgroup_rows(metrics):
        lines += ["", "### Skipped subgroups (too few cases)", ""]
        lines += _md_table(SKIPPED_HEADER, skipped_subgroup_rows(metrics))
    if metrics.get("localization"):
        lines += ["", f"## Localisation (Grad-CAM layer `{metrics['gradcam_layer']}`)", ""]
        lines += _md_table(LOCALISATION_HEADER, _localisation_rows(metrics))
    lines += ["", "## Figures", ""]
    for figure in figures:
        lines += [f"### {figure.heading}", "", f"![{figure.heading}]({figure.path})", ""]
        lines += [f"*{figure.caption}*", ""]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_html(
    metrics: dict[str, Any], figures: list[ReportFigure], root: Path, path: Path
) -> Path:
    """report.html: the same content with every figure embedded, so the one file can be mailed.

    Self-contained: no link, script, font or image is fetched from anywhere.
    """
    esc = html.escape

    def table(header: list[str], rows: list[list[str]], css: str) -> str:
        head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows
        )
        return f"<table class='{css}'><thead>{head}</thead><tbody>{body}</tbody></table>"

    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>ChestXpert report: {esc(metrics['sweep'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1300px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        "figure{margin:1.5em 0}figcaption{color:#555;font-style:italic}"
        ".gallery{display:flex;flex-wrap:wrap;gap:8px}.gallery figure{width:256px;margin:0}"
        ".gallery h4{font-size:80%;margin:0}"
        ".banner{padding:.6em 1em;border-radius:4px;font-weight:bold;margin:.5em 0}"
        ".intended-use{background:#eef3fb;border:1px solid #9bb4dc}"
        ".synthetic{background:#fff1d6;border:2px solid #d08a00}</style></head><body>",
        f"<h1>ChestXpert report: {esc(metrics['sweep'])}</h1>",
        f"<p class='banner intended-use'>{esc(INTENDED_USE)}</p>",
    ]
    if metrics.get("synthetic"):
        parts.append(f"<p class='banner synthetic'>{esc(SYNTHETIC_BANNER)}</p>")
    parts += ["<ul>", *(f"<li>{esc(note)}</li>" for note in _notes(metrics)), "</ul>"]
    parts.append(
        "<p class='summary'>"
        + " · ".join(f"<b>{esc(name)}</b> {esc(value)}" for name, value in summary_line(metrics))
        + "</p>"
    )
    parts += ["<h2>Per-pathology results</h2>", f"<p>{esc(TABLE_CAPTION)}</p>"]
    parts.append(table(headline_header(metrics), headline_rows(metrics), "headline"))
    for point in metrics["evaluation"].get("operating_points") or {}:
        parts += [f"<h2>Operating point {esc(point)}</h2>", f"<p>{esc(point_caption(point))}</p>"]
        parts.append(table(POINT_HEADER, point_rows(metrics, point), f"point {point}"))
    parts += ["<h2>Calibration</h2>", f"<p>{esc(CALIBRATION_CAPTION)}</p>"]
    parts.append(table(CALIBRATION_HEADER, calibration_rows(metrics), "calibration"))
    parts += ["<h2>Subgroups</h2>", f"<p>{esc(subgroup_caption(metrics))}</p>"]
    if subgroup_rows(metrics):
        parts.append(table(SUBGROUP_HEADER, subgroup_rows(metrics), "subgroups"))
    if skipped_subgroup_rows(metrics):  # folded: at a small test split it is most pairs
        parts.append(
            f"<details><summary>Skipped subgroups (too few cases): "
            f"{len(skipped_subgroup_rows(metrics))}</summary>"
            + table(SKIPPED_HEADER, skipped_subgroup_rows(metrics), "skipped subgroups")
            + "</details>"
        )
    if metrics.get("localization"):
        parts.append(
            f"<h2>Localisation (Grad-CAM layer <code>{esc(metrics['gradcam_layer'])}</code>)</h2>"
        )
        parts.append(table(LOCALISATION_HEADER, _localisation_rows(metrics), "localisation"))

    def embedded(figure: ReportFigure, level: str) -> str:
        data = base64.b64encode((root / figure.path).read_bytes()).decode()
        return (
            f"<figure><{level}>{esc(figure.heading)}</{level}>"
            f"<img alt='{esc(figure.heading)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{esc(figure.caption)}</figcaption></figure>"
        )

    main = [f for f in figures if not f.path.startswith("gradcam/")]
    gallery = [f for f in figures if f.path.startswith("gradcam/")]
    parts += ["<h2>Figures</h2>", *(embedded(figure, "h3") for figure in main)]
    if gallery:
        parts += [
            "<h2>Grad-CAM: most confident true positives and worst false positives</h2>",
            "<div class='gallery'>",
            *(embedded(figure, "h4") for figure in gallery),
            "</div>",
        ]
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path
