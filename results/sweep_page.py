"""The sweep report's page: learning curves, Optuna's history, importance and slice plots, then the
trial, budget and best-trial sections, as one self-contained HTML file with every figure inlined.
"""

from __future__ import annotations

import base64
import html
import io
import json
import warnings
from typing import Any

from chestxpert.sweeps.spec import SweepSpec

# How a trial ended, as `sweep status` says it, and its colour in the learning curves.
COLOURS = {
    "completed": "#2a9d8f",
    "stopped by ASHA": "#e9a03b",
    "stopped early": "#8a6d3b",  # by search.time_budget_s: ASHA stops trials at rungs only
    "errored": "#d62828",
    "running": "#1d4e89",
    "interrupted": "#7d5ba6",
    "abandoned": "#b0b0b0",
}


def ending_kind(ended: str) -> str:
    """The colour key of an `ended` text: `stopped by ASHA at epoch 3` is `stopped by ASHA`."""
    for kind in ("stopped by ASHA", "stopped early"):
        if ended.startswith(kind):
            return kind
    return ended


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # long axis labels stay whole
    return base64.b64encode(buffer.getvalue()).decode()


def learning_curves_png(data: dict[str, Any]) -> str:
    """Base64 PNG: each trial's validation metric against epoch, coloured by how it ended,
    with ASHA's rungs as dashed vertical lines."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    fig = Figure(figsize=(8, 4.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    for rung in data["scheduler"]["rungs"]:
        ax.axvline(rung, color="0.55", linestyle="--", linewidth=0.9)
        ax.annotate(
            f"rung {rung}",
            (rung, 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color="0.4",
            ha="left",
            va="top",
        )
    shown = set()
    for trial in data["trials"]:
        if not trial["curve"]:
            continue
        kind = ending_kind(trial["ended"])
        epochs, values = zip(*trial["curve"], strict=True)
        ax.plot(
            epochs,
            values,
            marker="o",
            color=COLOURS.get(kind, "0.3"),
            markersize=3,
            linewidth=1.2,
            linestyle=":" if kind == "abandoned" else "-",
            label=None if kind in shown else kind,
        )
        shown.add(kind)
    ax.set_xlabel("epoch")
    ax.set_ylabel(data["metric"])
    ax.set_xlim(0.5, data["budget"]["max_t"] + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if shown:
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def optuna_png(plot, study, **options: Any) -> str:
    """Base64 PNG of one of `optuna.visualization.matplotlib`'s plots of `study`."""
    import matplotlib

    matplotlib.use("Agg")  # Optuna draws through pyplot, which must not look for a display
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning

    # Optuna sets its own style: kept inside this plot, not left on the next figure.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", ExperimentalWarning)  # all of optuna's matplotlib plots
        warnings.simplefilter("ignore", UserWarning)  # matplotlib, on a slice of one value
        axes = plot(study, **options)
        fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        try:
            return _png(fig)
        finally:
            plt.close(fig)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _param(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _figure(heading: str, png: str, caption: str, anchor: str) -> str:
    esc = html.escape
    return (
        f"<section id='{anchor}'><h2>{esc(heading)}</h2>"
        f"<img alt='{esc(heading)}' src='data:image/png;base64,{png}'>"
        f"<p class='caption'>{esc(caption)}</p></section>"
    )


def _words(heading: str, text: str, anchor: str) -> str:
    esc = html.escape
    heading, text = esc(heading), esc(text)
    return f"<section id='{anchor}'><h2>{heading}</h2><p class='note'>{text}</p></section>"


def _table(table_id: str, header: list[str], rows: list[tuple[str | None, list[str]]]) -> str:
    """An HTML table; each row is (its data-key or None, cells)."""
    esc = html.escape
    parts = [f"<table id='{table_id}'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)]
    parts.append("</tr>")
    for key, cells in rows:
        attr = f" data-key='{esc(key)}'" if key else ""
        parts.append(f"<tr{attr}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def render_html(data: dict[str, Any], spec: SweepSpec, study, study_notes: list[str]) -> str:
    """The report page: every figure inlined as a base64 PNG, nothing fetched from elsewhere.

    `study` and its notes are `optuna_study`'s; `data` is `sweep_report_data`'s with the
    importances (`importances`) in it.
    """
    import optuna
    import optuna.visualization.matplotlib as optuna_plots
    from optuna.trial import TrialState

    esc = html.escape
    metric, name = data["metric"], data["name"]
    values, no_importance = data["importances"], data["importance_note"]

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    kept = [t for t in data["trials"] if t["number"] is not None]
    budget = data["budget"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Sweep report: {esc(name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
        "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "td:first-child,th:first-child,td:nth-child(2){text-align:left}"
        "img{max-width:100%}.caption{color:#555;font-style:italic;margin-top:0}"
        "pre{background:#f6f6f6;padding:8px;overflow-x:auto}</style></head><body>",
        f"<h1>Sweep report: {esc(name)}</h1>",
        f"<p>Storage <code>{esc(data['storage'])}</code> · metric <b>{esc(metric)}</b> "
        f"({esc(data['mode'])}) · <b>{esc(data['state'])}</b>: {len(kept)} of "
        f"{budget['num_samples']} trials started · written {esc(data['generated_at'])}</p>",
    ]
    abandoned = [t["trial_id"] for t in data["trials"] if t["number"] is None]
    if abandoned:
        parts.append(
            f"<p class='note'>Abandoned: {esc(', '.join(abandoned))} (started by a driver that "
            "died before Tune recorded them; the resume ran those slots again).</p>"
        )
    rungs = data["scheduler"]["rungs"]
    rung_words = (
        f"ASHA compares trials at epochs {', '.join(map(str, rungs))} (dashed lines)"
        if rungs
        else "no ASHA rungs (scheduler: none)"
    )
    if any(t["curve"] for t in data["trials"]):
        parts.append(
            _figure(
                "Learning curves",
                learning_curves_png(data),
                f"Validation {metric} of every trial at each epoch, coloured by how the trial "
                f"ended; {rung_words}.",
                "learning-curves",
            )
        )
    else:
        nothing = "No trial has reported an epoch yet."
        parts.append(_words("Learning curves", nothing, "learning-curves"))
    if complete:
        history = optuna_png(optuna_plots.plot_optimization_history, study, target_name=metric)
        parts.append(
            _figure(
                "Optimisation history",
                history,
                f"Each trial's best {metric} (dots) and the best so far (line), against the "
                "order trials started (Optuna's plot_optimization_history).",
                "history",
            )
        )
    else:
        parts.append(_words("Optimisation history", "No trial has a value yet.", "history"))
    if values is None:
        parts.append(_words("Hyperparameter importances", no_importance, "importances"))
    else:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        png = optuna_png(
            optuna_plots.plot_param_importances, study, evaluator=evaluator, target_name=metric
        )
        parts.append(
            _figure(
                "Hyperparameter importances",
                png,
                f"How much of the variation in {metric} each hyperparameter explains (Optuna's "
                f"fANOVA, over {len(complete)} trials with a value).",
                "importances",
            )
        )
        parts.append(
            _table(
                "importance-values",
                ["hyperparameter", "importance"],
                [(k, [k, f"{v:.4f}"]) for k, v in values.items()],
            )
        )
    if complete and spec.space:
        png = optuna_png(optuna_plots.plot_slice, study, target_name=metric)
        parts.append(
            _figure(
                "Slice plots",
                png,
                f"Each trial's best {metric} against the value of each searched hyperparameter; "
                "darker dots started later (Optuna's plot_slice).",
                "slices",
            )
        )
    else:
        why = "the spec searches no hyperparameter" if not spec.space else "no trial has a value"
        parts.append(_words("Slice plots", f"No slice plots: {why}.", "slices"))
    for note in study_notes:
        parts.append(f"<p class='note'>{esc(note)}</p>")
    parts.append(_trial_table(data))
    parts.append(_budget_section(budget, spec))
    parts.append(_best_section(data["best"], metric))
    parts.append("</body></html>")
    return "\n".join(parts)


def _trial_table(data: dict[str, Any]) -> str:
    searched = list(data["space"])
    header = ["#", "trial", "how it ended", "epochs", f"best {data['metric']}", "wall time (s)"]
    rows = []
    for t in data["trials"]:
        cells = [
            "–" if t["number"] is None else str(t["number"]),
            t["trial_id"],
            t["ended"],
            str(t["epochs"]),
            _fmt(t["best"]),
            f"{t['wall_time_s']:.1f}",
        ]
        cells += [_param(t["config"].get(key, "–")) for key in searched]
        rows.append((t["trial_id"], cells))
    return (
        "<section id='trials'><h2>Trials</h2>"
        + _table("trial-table", header + searched, rows)
        + "<p class='caption'>Every trial in the order it started: how it ended, the epochs it "
        "ran, its best value, its wall time, and the searched hyperparameters it drew.</p>"
        "</section>"
    )


def _budget_section(budget: dict[str, Any], spec: SweepSpec) -> str:
    rows = [
        ("trials started", f"{budget['trials_started']} of {budget['num_samples']}"),
        (
            "full budget (num_samples × max_t)",
            f"{budget['full_trial_epochs']} trial-epochs "
            f"({budget['num_samples']} × {budget['max_t']})",
        ),
        ("trial-epochs spent", str(budget["spent_trial_epochs"])),
        (
            "saved by ASHA",
            f"{budget['saved_by_asha_trial_epochs']} trial-epochs "
            f"({budget['stopped_by_asha']} trials stopped early)",
        ),
        ("trial time (h)", f"{budget['trial_hours']:.4f}"),
        (f"CPU-hours ({_param(spec.resources.cpus)} per trial)", f"{budget['cpu_hours']:.4f}"),
        (f"GPU-hours ({_param(spec.resources.gpus)} per trial)", f"{budget['gpu_hours']:.4f}"),
    ]
    return (
        "<section id='budget'><h2>Budget</h2>"
        + _table("budget-table", ["", "value"], [(label, [label, v]) for label, v in rows])
        + "<p class='caption'>Trial-epochs spent against every trial running to max_t, what "
        "ASHA saved by stopping trials early, and CPU/GPU-hours as the spec's resources per "
        "trial × each trial's wall time.</p></section>"
    )


def _best_section(best: dict[str, Any] | None, metric: str) -> str:
    esc = html.escape
    if best is None:
        return _words("Best trial", f"No trial has reported {metric} yet.", "best")
    parts = [
        "<section id='best'><h2>Best trial</h2>",
        f"<p>Trial <b class='best-trial'>{esc(best['trial_id'])}</b>: {esc(metric)} = "
        f"<b class='best-value'>{esc(_fmt(best['value']))}</b></p>",
        f"<pre class='best-config'>{esc(json.dumps(best['config'], indent=2, default=str))}</pre>",
        f"<p>Checkpoint: <code>{esc(best['checkpoint'] or 'none kept in storage')}</code></p>",
        f"<p>Fetch it with:</p><pre class='pull'>{esc(best['pull_command'])}</pre>",
    ]
    if best.get("pull_note"):
        parts.append(f"<p class='note'>Note: {esc(best['pull_note'])}.</p>")
    parts.append("</section>")
    return "".join(parts)
