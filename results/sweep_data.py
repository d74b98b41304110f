"""What a sweep report holds (its report.json), from the sweep's storage alone: every trial and how
it ended, ASHA's rungs, the budget, the best trial, and the Optuna study rebuilt from them.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs

from chestxpert.cluster.errors import UserError
from chestxpert.sweeps.layout import SPEC_FILE, SUMMARY_FILE, SweepLocation
from chestxpert.sweeps.lease import read_holder
from chestxpert.sweeps.space import Choice, LogUniform, QUniform, RandInt, Uniform
from chestxpert.sweeps.spec import SweepSpec, spec_from_dict
from chestxpert.sweeps.status import TrialRow, read_trials

# Tune's words for a trial that has not ended; with no live driver it never will on its own.
UNFINISHED = ("running", "pending", "paused")


class SweepReportError(UserError, RuntimeError):
    """No sweep to report on; the message says where we looked."""


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
    rows = read_trials(location, metric, mode, max_t, live)
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

    Rebuilt from storage, not read from the sweep's persisted study (sweeps/study.py): random
    search has no study, a sweep begun before studies were stored has none, and the study
    keeps ASHA's stops PRUNED, which Optuna's importance functions leave out; storage has
    every trial's config and every value it reported. A trial's value is its best metric,
    the number the trial table shows.
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
