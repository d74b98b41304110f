"""`chestxpert compare A B`: two models on one prepared dataset's test split, label by label.

Both models' AUCs are resampled with the SAME patient-bootstrap draws, so the interval of their
difference is a paired one; the report is compare.html (self-contained), compare.md and
compare.json, published together into one folder.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestxpert.cluster.endpoints import Endpoints
from chestxpert.cluster.errors import UserError
from chestxpert.results.bootstrap import AucInterval, Interval, patient_bootstrap
from chestxpert.results.evaluate import to_json_ready
from chestxpert.results.inputs import check_arrays

DIFFERENCE = "B - A"  # every difference in the report is model B's AUC minus model A's
FILES = ("compare.html", "compare.md", "compare.json")
MACRO = "macro"


class CompareError(UserError, RuntimeError):
    """Two models that cannot be compared, or nothing to compare them on; says what to do."""


@dataclass(frozen=True)
class ComparedModel:
    """One side of a comparison: what the user named, the local folder, and its state.json."""

    ref: str
    folder: Path
    what: str  # in words: "sweep tiny-final's final model, version 1 (...)", "folder …"
    state: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return list(self.state.get("labels") or [])


def paired_auc_difference(
    y_true: np.ndarray,
    prob_a: np.ndarray,
    prob_b: np.ndarray,
    patient_ids: Sequence[Any],
    labels: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Per-label and macro ROC AUC of models A and B and their paired difference B − A.

    Both models go through `patient_bootstrap` with the same patients, n_boot and seed, so
    through the same patient resamples, and each resample's B − A is one paired difference.
    Per label: `auc_a`, `auc_b` (sklearn on the whole split) with their percentile intervals,
    `difference` (B − A) with its (1 − alpha) percentile interval `low`/`high`, a two-sided
    bootstrap `p_value` (twice the smaller share of resample differences at or beyond zero on
    either side, each share counted as (k + 1) / (n + 1) so it is never 0; capped at 1),
    `excludes_zero` and `n_used` (resamples where the label had both classes). A label without
    both classes in the split has None throughout. The macro row averages the scorable labels,
    in each resample over those with both classes in it. Returns JSON-ready values (NaN → None).
    """
    y_true, prob_a = check_arrays(y_true, prob_a, labels)  # patient_bootstrap checks the rest
    a, b = (
        patient_bootstrap(
            y_true, prob, patient_ids, n_boot, seed, alpha, labels=labels, micro=False
        )
        for prob in (prob_a, prob_b)
    )
    per_label: dict[str, dict[str, Any]] = {}
    for column, name in enumerate(labels):
        truth = y_true[~np.isnan(y_true[:, column]), column]
        per_label[name] = {
            **_row(
                a.auc[name],
                b.auc[name],
                a.resample_auc[:, column],
                b.resample_auc[:, column],
                alpha,
            ),
            "positives": int(np.sum(truth == 1)),
            "negatives": int(np.sum(truth == 0)),
        }
    macro = _row(a.auc_macro, b.auc_macro, a.resample_macro, b.resample_macro, alpha)
    return to_json_ready(
        {
            "difference": DIFFERENCE,
            "labels": list(labels),
            "per_label": per_label,
            MACRO: macro,
            "differing_labels": [n for n in labels if per_label[n]["excludes_zero"]],
            "bootstrap": {"unit": "patient", "n_boot": n_boot, "seed": seed, "alpha": alpha},
            "counts": {
                "images": int(len(y_true)),
                "patients": int(len(np.unique(np.asarray(patient_ids)))),
            },
        }
    )


def _row(
    a: AucInterval | Interval,
    b: AucInterval | Interval,
    boot_a: np.ndarray,
    boot_b: np.ndarray,
    alpha: float,
) -> dict[str, Any]:
    """One label's (or the macro's) numbers: each model's AUC and interval from its
    `patient_bootstrap`, and B − A with the percentile interval and p-value of the paired
    resample differences, row by row where both are defined (with one truth, both or neither)."""
    auc_a, auc_b = a[0], b[0]  # AucInterval.auc or Interval.value
    usable = ~(np.isnan(boot_a) | np.isnan(boot_b))
    diffs = boot_b[usable] - boot_a[usable]
    row: dict[str, Any] = {
        "auc_a": auc_a,
        "auc_a_low": a.low,
        "auc_a_high": a.high,
        "auc_b": auc_b,
        "auc_b_low": b.low,
        "auc_b_high": b.high,
        "difference": None if auc_a is None or auc_b is None else auc_b - auc_a,
        "low": None,
        "high": None,
        "p_value": None,
        "excludes_zero": False,
        "n_used": int(diffs.size),
    }
    if row["difference"] is None or not diffs.size:
        return row
    low, high = (float(q) for q in np.quantile(diffs, [alpha / 2, 1 - alpha / 2]))
    n = diffs.size
    below, above = (np.sum(diffs <= 0) + 1) / (n + 1), (np.sum(diffs >= 0) + 1) / (n + 1)
    row.update(
        low=low,
        high=high,
        p_value=float(min(1.0, 2 * min(below, above))),
        excludes_zero=bool(low > 0 or high < 0),
    )
    return row


# --------------------------------------------------------------------------------------------------
# Which models, which data


def resolve_compared(ref: str, endpoints: Endpoints, work: Path) -> ComparedModel:
    """The model `ref` names, as a local folder with its state: a local checkpoint folder; a
    `models:/NAME@ALIAS`, `models:/NAME/VERSION` or storage URI (`results.pull.resolve_model`);
    else a sweep name, whose final model (the champion, as `pull-best NAME --final` serves it)
    is downloaded into `work`, a folder of this side's own. Raises CompareError when it is
    none of these."""
    from chestxpert.results.pull import PullError, pull_final, resolve_model
    from chestxpert.trainable.checkpoint import CheckpointError, read_state

    folder = Path(ref).expanduser()
    if ref.startswith(("models:/", "s3://", "file://")) or folder.is_dir():
        local = resolve_model(ref, endpoints, progress=False)
        what = f"folder {local}" if folder.is_dir() else ref
    elif "/" in ref or folder.exists():
        raise CompareError(
            f"{ref!r} is not a model folder here; give a checkpoint folder, a sweep name, "
            "models:/NAME@ALIAS, models:/NAME/VERSION or a storage URI"
        )
    else:
        try:
            local, what = pull_final(ref, work, endpoints, progress=False)
        except PullError as err:
            raise CompareError(
                f"{ref!r} is not a folder here, so it was taken as a sweep name: {err}"
            ) from None
        what = f"sweep {ref}'s final model, {what}"
    try:
        state = read_state(local)
    except CheckpointError as err:
        raise CompareError(str(err)) from None
    return ComparedModel(ref, local, what, state)


def check_same_labels(a: ComparedModel, b: ComparedModel) -> list[str]:
    """The label list both models predict, in order; CompareError naming what differs if not."""
    if not a.labels or not b.labels:
        missing = a if not a.labels else b
        raise CompareError(
            f"{missing.what} names no labels in its state.json; not a ChestXpert model"
        )
    if a.labels != b.labels:
        only_a = [label for label in a.labels if label not in b.labels]
        only_b = [label for label in b.labels if label not in a.labels]
        detail = (
            f"only A has {only_a or 'none'}, only B has {only_b or 'none'}"
            if only_a or only_b
            else "the same labels in another order"
        )
        raise CompareError(
            f"A and B predict different labels ({detail}): A ({a.what}) predicts "
            f"{len(a.labels)}, B ({b.what}) {len(b.labels)}. Compare models trained on the "
            "same label set"
        )
    return a.labels


def open_test_split(uri: str | None, generation: str, endpoints: Endpoints, default_from: str):
    """The prepared dataset to compare on, checked to have test images.

    `uri` None means none was given and A recorded none: CompareError asking for --dataset.
    """
    from chestxpert.datasets.reader import open_dataset

    if not uri:
        raise CompareError(
            f"A ({default_from}) does not record the dataset it was trained on; pass --dataset URI"
        )
    try:
        dataset = open_dataset(uri, endpoints, generation)
    except UserError as err:
        raise CompareError(f"dataset {uri}: {err}") from None
    test = dataset.manifest.get("splits", {}).get("test") or {}
    if not int(test.get("images") or 0):
        raise CompareError(
            f"dataset {uri} has no test split (0 test images): a comparison scores held-out "
            "images only. Prepare it with a test split, or pass another --dataset"
        )
    return dataset


def _predict(model: ComparedModel, images: np.ndarray, dataset_size: int) -> np.ndarray:
    from chestxpert.datasets.images import resize_uint8
    from chestxpert.trainable.checkpoint import load_model
    from chestxpert.trainable.train import predict

    size = int((model.state.get("preprocessing") or {}).get("image_size") or dataset_size)
    if size != dataset_size:
        images = resize_uint8(images, size).numpy()
    keras_model = load_model(model.folder, compile=False)
    probabilities = predict(keras_model, images, 64)
    return np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)


def compare_models(
    ref_a: str,
    ref_b: str,
    endpoints: Endpoints,
    dataset_uri: str | None = None,
    out: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], Path]:
    """Compare model A with model B on one dataset's test split; write and publish the report.

    The dataset is `dataset_uri`, else the one A's final model was trained on (its recorded
    generation). The report folder `out` (default `<workspace>/reports/compare/A-vs-B`) is
    written under a temporary name and renamed into place once all three files are there.
    Returns the report's data (compare.json) and the folder.
    """
    from chestxpert.datasets.reader import read_split
    from chestxpert.results.download import replace_folder

    work = Path(tempfile.mkdtemp(prefix="cx-compare-"))
    try:
        a = resolve_compared(ref_a, endpoints, work / "a")
        b = resolve_compared(ref_b, endpoints, work / "b")
        labels = check_same_labels(a, b)
        config = a.state.get("config") or {}
        generation = "" if dataset_uri else str(config.get("dataset_generation") or "")
        dataset = open_test_split(
            dataset_uri or config.get("dataset"), generation, endpoints, a.what
        )
        if dataset.labels != labels:
            raise CompareError(
                f"dataset {dataset.uri} has labels {dataset.labels}, the models predict {labels}"
            )
        test = read_split(dataset, "test", ("image", "labels", "patient_id"))
        prob_a = _predict(a, test["image"], dataset.image_size)
        prob_b = _predict(b, test["image"], dataset.image_size)
        data = paired_auc_difference(
            test["labels"], prob_a, prob_b, test["patient_id"], labels, n_boot, seed
        )
        data["a"] = _describe(a)
        data["b"] = _describe(b)
        data["dataset"] = {
            "uri": dataset.uri,
            "generation": dataset.generation,
            "digest": dataset.digest,
            "source": dataset.manifest.get("source"),
        }
        folder = Path(out) if out else endpoints.workspace / "reports" / "compare" / _slug(a, b)
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
        try:
            (partial / "compare.json").write_text(json.dumps(data, indent=2, allow_nan=False))
            (partial / "compare.md").write_text(render_markdown(data))
            (partial / "compare.html").write_text(render_html(data))
            replace_folder(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return data, folder
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _describe(model: ComparedModel) -> dict[str, Any]:
    config = model.state.get("config") or {}
    return {
        "ref": model.ref,
        "what": model.what,
        "backbone": config.get("backbone"),
        "image_size": (model.state.get("preprocessing") or {}).get("image_size"),
        "trained_on": config.get("dataset"),
    }


def _slug(a: ComparedModel, b: ComparedModel) -> str:
    def one(ref: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.@-]+", "-", ref.strip("/")).strip("-")[-60:]

    return f"{one(a.ref)}-vs-{one(b.ref)}"


# --------------------------------------------------------------------------------------------------
# The report


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def table_rows(data: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(key, cells) per label and the macro row: label, AUC A (CI), AUC B (CI), B − A (CI),
    p-value, differs. The HTML and Markdown tables both show exactly these strings."""
    rows = []
    for key, item in [*data["per_label"].items(), (MACRO, data[MACRO])]:
        if item["difference"] is None:
            why = "no positives in test" if not item.get("positives") else "no negatives in test"
            cells = [why if key != MACRO else "no scorable label", "–", "–", "–", "–"]
        else:
            cells = [
                f"{_fmt(item['auc_a'])} ({_fmt(item['auc_a_low'])}–{_fmt(item['auc_a_high'])})",
                f"{_fmt(item['auc_b'])} ({_fmt(item['auc_b_low'])}–{_fmt(item['auc_b_high'])})",
                f"{item['difference']:+.4f} ({_fmt(item['low'])} to {_fmt(item['high'])})",
                _p(item["p_value"]),
                _verdict(item),
            ]
        name = "Macro AUC" if key == MACRO else key.replace("_", " ")
        rows.append((key, [name, *cells]))
    return rows


def _verdict(item: dict[str, Any]) -> str:
    if not item["excludes_zero"]:
        return "no (CI contains 0)"
    return "yes: B higher" if item["low"] > 0 else "yes: A higher"


def header(data: dict[str, Any]) -> list[str]:
    level = round(100 * (1 - data["bootstrap"]["alpha"]))
    return [
        "Pathology",
        f"AUC A ({level}% CI)",
        f"AUC B ({level}% CI)",
        f"B − A ({level}% CI)",
        "p (two-sided)",
        "Differs",
    ]


def _notes(data: dict[str, Any]) -> list[str]:
    boot, counts = data["bootstrap"], data["counts"]
    differing = ", ".join(label.replace("_", " ") for label in data["differing_labels"])
    return [
        f"A: {data['a']['what']} ({data['a']['backbone']}, {data['a']['image_size']} px).",
        f"B: {data['b']['what']} ({data['b']['backbone']}, {data['b']['image_size']} px).",
        f"Both scored on the test split of {data['dataset']['uri']} (generation "
        f"{data['dataset']['generation']}): {counts['images']} images of {counts['patients']} "
        "patients.",
        f"Differences are B − A. Intervals and p-values come from {boot['n_boot']} bootstrap "
        "resamples of patients (not images), the same resamples for both models, so each "
        "interval is of the paired difference; a p-value is twice the smaller share of "
        "resample differences on either side of zero.",
        f"Differences whose interval excludes zero: {differing or 'none'}.",
    ]


def render_markdown(data: dict[str, Any]) -> str:
    """compare.md: the notes and the table."""
    head = header(data)
    lines = ["# Model comparison: A vs B", ""]
    lines += [f"- {note}" for note in _notes(data)]
    lines += ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for _, cells in table_rows(data)]
    return "\n".join(lines) + "\n"


def difference_png(data: dict[str, Any]) -> str | None:
    """Base64 PNG: each label's B − A with its interval (a forest plot), zero marked."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    rows = [*data["per_label"].items(), (MACRO, data[MACRO])]
    shown = [(key, item) for key, item in rows if item["low"] is not None]
    if not shown:
        return None
    fig = Figure(figsize=(7, 0.32 * len(shown) + 1.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    for y, (_, item) in enumerate(reversed(shown)):
        colour = "#d62828" if item["excludes_zero"] else "#1d4e89"
        ax.plot([item["low"], item["high"]], [y, y], color=colour, linewidth=2)
        ax.plot([item["difference"]], [y], "o", color=colour, markersize=4)
    ax.axvline(0.0, color="0.4", linestyle="--", linewidth=0.9)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels(["Macro AUC" if k == MACRO else k for k, _ in reversed(shown)], fontsize=8)
    ax.set_xlabel("AUC difference B − A")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # long axis labels stay whole
    return base64.b64encode(buffer.getvalue()).decode()


def render_html(data: dict[str, Any]) -> str:
    """compare.html: one page, the figure inlined as a base64 PNG, nothing fetched."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>Model comparison: A vs B</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
        "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        ".caption{color:#555;font-style:italic;margin-top:0}</style></head><body>",
        "<h1>Model comparison: A vs B</h1>",
        "<ul>" + "".join(f"<li>{esc(note)}</li>" for note in _notes(data)) + "</ul>",
        "<section id='table'><h2>AUC per label</h2><table id='compare-table'><tr>",
        "".join(f"<th>{esc(h)}</th>" for h in header(data)) + "</tr>",
    ]
    for key, cells in table_rows(data):
        parts.append(
            f"<tr data-key='{esc(key)}'>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
        )
    parts.append(
        "</table><p class='caption'>Each model's test AUC with its patient-bootstrap interval, "
        "their paired difference B − A with its interval and p-value, and whether the interval "
        "excludes zero.</p></section>"
    )
    png = difference_png(data)
    if png:
        parts.append(
            "<section id='differences'><h2>Differences</h2>"
            f"<img alt='AUC difference B − A per label' src='data:image/png;base64,{png}'>"
            "<p class='caption'>B − A per label with its interval; red where the interval "
            "excludes zero.</p></section>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
