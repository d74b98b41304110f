"""`chestxpert sweep report NAME`: a sweep in one self-contained HTML page (learning curves,
optimisation history, Optuna's importances and slices, the trials, the budget, the best trial).

Built from the sweep's storage alone, so a finished, a running and a crashed sweep all have one;
written to `<storage>/<name>/report/` with the numbers behind it as JSON.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from chestxpert.cluster.endpoints import Endpoints
from chestxpert.cluster.errors import UserError
from chestxpert.sweeps.layout import (
    SPEC_FILE,
    SUMMARY_FILE,
    SWEEP_REPORT_DATA,
    SWEEP_REPORT_HTML,
    SweepLocation,
)
from chestxpert.sweeps.lease import read_holder
from chestxpert.sweeps.space import Choice, LogUniform, QUniform, RandInt, Uniform
from chestxpert.sweeps.spec import SweepSpec, spec_from_dict
from chestxpert.sweeps.status import TrialRow, read_trials

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
# Tune's words for a trial that has not ended; with no live driver it never will on its own.
UNFINISHED = ("running", "pending", "paused")


class SweepReportError(UserError, RuntimeError):
    """No sweep to report on; the message says where we looked."""


def ending_kind(ended: str) -> str:
    """The colour key of an `ended` text: `stopped by ASHA at epoch 3` is `stopped by ASHA`."""
    for kind in ("stopped by ASHA", "stopped early"):
        if ended.startswith(kind):
            return kind
    return ended


def how_it_ended(row: TrialRow, rungs: list[int], live: bool) -> str:
    """`sweep status`'s words for how a trial ended, corrected with what the report knows.

    With no live driver a running or pending trial never ends on its own: interrupted. A
    trial Tune ended before max_t was stopped by ASHA only at one of ASHA's rungs; stopped
    elsewhere (or without ASHA at all), it was `search.time_budget_s` that ended it, and it
    saved nothing ASHA can be credited with.
    """
    if row.ended in UNFINISHED and not live:
        return "interrupted"
    if row.ended.startswith("stopped by ASHA") and row.epochs not in rungs:
        return f"stopped early at epoch {row.epochs}"
    return row.ended


def asha_rungs(spec: SweepSpec) -> list[int]:
    """The epochs at which ASHA compares trials and may stop them, below max_t.

    `grace_period × reduction_factor^k`, as many as Ray's single ASHA bracket makes
    (`ray.tune.schedulers.async_hyperband._Bracket`); none without ASHA.
    """
    scheduler = spec.scheduler
    if scheduler.type != "asha":
        return []
    max_t = scheduler.max_t or spec.epochs()
    count = int(math.log(max_t / scheduler.grace_period) / math.log(scheduler.reduction_factor) + 1)
    milestones = (scheduler.grace_period * scheduler.reduction_factor**k for k in range(count))
    return sorted(m for m in milestones if m < max_t)


def _started_at(row: TrialRow, fs: Any) -> float:
    """When the trial started (seconds since the epoch): its first result less that epoch's
    time, else when Tune wrote its params.json; +inf when neither is known."""
    if row.results and isinstance(row.results[0].get("timestamp"), int | float):
        first = row.results[0]
        return float(first["timestamp"]) - float(first.get("time_this_iter_s") or 0.0)
    modified = fs.get_file_info(f"{row.folder}/params.json").mtime
    return modified.timestamp() if modified is not None else math.inf


def _wall_time_s(row: TrialRow) -> float:
    """Seconds the trial has run: Tune's `time_total_s` at its last report (0 before any)."""
    if not row.results:
        return 0.0
    return float(row.results[-1].get("time_total_s") or 0.0)


def _curve(row: TrialRow, metric: str) -> list[list[float]]:
    return [
        [int(r.get("epoch", r.get("training_iteration", 0))), float(r[metric])]
        for r in row.results
        if isinstance(r.get(metric), int | float) and not isinstance(r.get(metric), bool)
    ]


def _checkpoint_of_best(
    location: SweepLocation, row: TrialRow, metric: str, mode: str
) -> str | None:
    """The URI of the best-scoring checkpoint left in a trial's folder (a sweep with no summary
    yet names none), or None."""
    selector = pafs.FileSelector(row.folder, recursive=False)
    scored = []
    for info in location.fs.get_file_info(selector):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        relative = f"{info.path[len(location.path) + 1 :]}/state.json"
        value = ((location.read_json(relative) or {}).get("metrics") or {}).get(metric)
        if isinstance(value, int | float):
            scored.append((value if mode == "max" else -value, info.path[len(location.path) :]))
    return f"{location.uri}{max(scored)[1]}" if scored else None


def recorded_spec(location: SweepLocation) -> tuple[dict[str, Any], SweepSpec]:
    """The sweep's spec record (parent run, MLflow server, …) and its spec, as it was run.

    Raises SweepReportError when `location` holds no sweep.
    """
    recorded = location.read_json(SPEC_FILE)
    if recorded is None:
        raise SweepReportError(
            f"no sweep named {location.name!r} at {location.uri} (pass --storage if it is "
            "elsewhere; `chestxpert sweep list` shows the sweeps in a storage)"
        )
    return recorded, spec_from_dict(recorded["raw"], source=f"{location.uri}/{SPEC_FILE}")


def sweep_report_data(location: SweepLocation, spec: SweepSpec) -> dict[str, Any]:
    """What the report shows, as plain values: the sweep, every trial, the budget, the best.

    Trials come in the order they started; `number` is that order among the trials Tune
    kept (the Optuna study's trial number), None for a trial a dead driver abandoned.
    """
    metric, mode = spec.metric, spec.mode
    max_t = spec.scheduler.max_t or spec.epochs()
    summary = location.read_json(SUMMARY_FILE)
    holder = read_holder(location)
    live = bool(holder and holder.get("live"))
    rows = read_trials(location, metric, mode, max_t)
    starts = {row.trial_id: _started_at(row, location.fs) for row in rows}
    rows.sort(key=lambda row: (starts[row.trial_id], row.trial_id))

    trials, number, rungs = [], 0, asha_rungs(spec)
    for row in rows:
        ended = how_it_ended(row, rungs, live)
        start = starts[row.trial_id]
        trials.append(
            {
                "trial_id": row.trial_id,
                "number": None if row.state == "ABANDONED" else number,
                "ended": ended,
                "state": row.state,
                "epochs": row.epochs,
                "best": row.best,
                "wall_time_s": round(_wall_time_s(row), 3),
                "started_at": None
                if math.isinf(start)
                else datetime.fromtimestamp(start, UTC).isoformat(timespec="seconds"),
                "config": row.config,
                "curve": _curve(row, metric),
            }
        )
        if row.state != "ABANDONED":
            number += 1

    kept = [t for t in trials if t["number"] is not None]
    stopped = [t for t in kept if t["ended"].startswith("stopped by ASHA")]
    trial_hours = sum(t["wall_time_s"] for t in trials) / 3600
    budget = {
        "num_samples": spec.search.num_samples,
        "max_t": max_t,
        "trials_started": len(kept),
        "full_trial_epochs": spec.search.num_samples * max_t,
        "spent_trial_epochs": sum(t["epochs"] for t in trials),
        "stopped_by_asha": len(stopped),
        "saved_by_asha_trial_epochs": sum(max_t - t["epochs"] for t in stopped),
        "cpus_per_trial": spec.resources.cpus,
        "gpus_per_trial": spec.resources.gpus,
        "trial_hours": round(trial_hours, 4),
        "cpu_hours": round(trial_hours * spec.resources.cpus, 4),
        "gpu_hours": round(trial_hours * spec.resources.gpus, 4),
    }
    return {
        "name": location.name,
        "storage": location.uri,
        "metric": metric,
        "mode": mode,
        "state": "running" if live else ("finished" if summary else "interrupted"),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scheduler": {**spec.scheduler.model_dump(mode="json"), "rungs": rungs},
        "space": {key: dim.model_dump(mode="json") for key, dim in spec.space.items()},
        "trials": trials,
        "budget": budget,
        "best": _best(location, spec, summary, rows, trials),
    }


def _best(
    location: SweepLocation,
    spec: SweepSpec,
    summary: dict[str, Any] | None,
    rows: list[TrialRow],
    trials: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """The best trial: the summary's once the sweep finished, else the best so far in storage."""
    root = location.uri[: -len(location.name) - 1]
    command = f"chestxpert pull-best {location.name} --to {location.name}-best --storage {root}"
    if summary and summary.get("best_trial_id"):
        return {
            "trial_id": summary["best_trial_id"],
            "value": summary["best_metric"],
            "config": summary.get("best_config"),
            "checkpoint": summary.get("best_checkpoint"),
            "pull_command": command,
            "pull_note": None,
        }
    scored = [t for t in trials if t["best"] is not None and t["number"] is not None]
    if not scored:
        return None
    pick = max if spec.mode == "max" else min
    best = pick(scored, key=lambda t: t["best"])
    row = next(r for r in rows if r.trial_id == best["trial_id"])
    return {
        "trial_id": best["trial_id"],
        "value": best["best"],
        "config": best["config"],
        "checkpoint": _checkpoint_of_best(location, row, spec.metric, spec.mode),
        "pull_command": command,
        "pull_note": "the sweep has not finished: pull-best serves the best trial once it has "
        f"(`chestxpert sweep resume {location.name}` continues it)",
    }


def _distributions(spec: SweepSpec) -> dict[str, Any]:
    """The Optuna distribution of each searched key, as Ray's OptunaSearch translates it."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for key, dim in spec.space.items():
        if isinstance(dim, LogUniform):
            out[key] = FloatDistribution(dim.low, dim.high, log=True)
        elif isinstance(dim, Uniform):
            out[key] = FloatDistribution(dim.low, dim.high)
        elif isinstance(dim, QUniform):
            out[key] = FloatDistribution(dim.low, dim.high, step=dim.q)
        elif isinstance(dim, RandInt):
            out[key] = IntDistribution(dim.low, dim.high - 1)  # randint's high is exclusive
        elif isinstance(dim, Choice):
            out[key] = CategoricalDistribution(list(dim.values))
    return out


def optuna_study(spec: SweepSpec, data: dict[str, Any]):
    """An in-memory Optuna study of the sweep's trials, in the order they started.

    Rebuilt from storage, not read from the searcher: OptunaSearch keeps its study in the
    driver's memory and saves it only at Tune's snapshots (random search has none at all), so
    after a crash it is stale or missing, while storage has every trial's config and every
    value it reported. A trial's value is its best metric, the number the trial table shows.
    Every trial that reported a value is COMPLETE, those ASHA stopped too, with the best they
    reached before the stop: Optuna's importance and slice functions read COMPLETE trials
    only, and leaving out what ASHA stopped would leave out the weak configurations, which are
    what importance learns from. Errored trials are FAIL; trials with no value yet RUNNING;
    abandoned ones (run again under a new id) are left out. Returns the study and notes on
    trials whose config lies outside the spec's space.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if spec.mode == "max" else "minimize")
    distributions = _distributions(spec)
    notes = []
    for trial in data["trials"]:
        if trial["number"] is None:
            continue
        if trial["ended"] == "errored":
            state, value = TrialState.FAIL, None
        elif trial["best"] is not None:
            state, value = TrialState.COMPLETE, trial["best"]
        else:
            state, value = TrialState.RUNNING, None
        params = {k: trial["config"][k] for k in distributions if k in trial["config"]}
        attrs = {"trial_id": trial["trial_id"]}
        try:
            frozen = create_trial(
                state=state,
                value=value,
                params=params,
                distributions={k: distributions[k] for k in params},
                user_attrs=attrs,
            )
        except ValueError as err:
            notes.append(f"trial {trial['trial_id']}: its config is outside the space ({err})")
            frozen = create_trial(state=TrialState.FAIL, user_attrs=attrs)
        study.add_trial(frozen)
    return study, notes


def importances(study) -> tuple[dict[str, float] | None, str | None]:
    """Optuna's fANOVA importance of each searched key (fixed seed), or None and why not."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, (
            f"Importance needs at least 2 trials with a value; this sweep has {len(complete)}."
        )
    names = {name for trial in complete for name in trial.params}
    drawn = {n: {json.dumps(t.params.get(n), default=str) for t in complete} for n in names}
    if not any(len(values) > 1 for values in drawn.values()):
        return None, "Importance needs a searched hyperparameter whose value varies; none does."
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {name: float(value) for name, value in values.items()}, None


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
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
