"""What MLflow lacks of a sweep, sent from storage: for `sweep mlflow-sync`, and for `sweep resume`
before its own events. Every step is idempotent, so running it twice adds nothing.

Sources, in order: the tracking journal (every event a driver had, including those a killed
driver never sent), Tune's result.json per trial (metrics, even when a journal buffer was lost
with its machine), Tune's trial states (FINISHED / KILLED / FAILED), and the sweep's summary
(the parent run's best metric and status).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chestxpert.sweeps.journal import read_segments, record_acked
from chestxpert.sweeps.layout import SUMMARY_FILE, SweepLocation
from chestxpert.sweeps.status import read_trials, tune_trial_states
from chestxpert.sweeps.sweep_runs import SweepRuns, metric_rows, terminal_status

INTERRUPTED = "interrupted: the driver stopped; `chestxpert sweep resume` continues it"
ABANDONED = (
    "abandoned: started by a driver that died before Tune recorded it; the resume ran that "
    "slot again as a new trial"
)
_ENDED_STATES = ("TERMINATED", "ERROR")


@dataclass
class SyncCounts:
    """What a replay did, for its one line of output."""

    values: int = 0  # metric values added
    ended: int = 0  # times a trial run's status or ended tag changed
    events: int = 0  # journal events replayed (sent or found already there)
    torn: int = 0  # journal lines cut by a crash, skipped


def sync_sweep(
    runs: SweepRuns,
    location: SweepLocation,
    metric: str,
    mode: str,
    max_epochs: int,
    params: dict[str, Any],
    exclude: tuple[str, ...] = (),
    interrupted: bool = False,
) -> SyncCounts:
    """Bring `runs`' server up to date with the sweep at `location`.

    `params` (the spec) make the parent run if the server has none; `exclude` names journal
    sessions to leave alone (this driver's own, or a live driver's); `interrupted` (no driver
    holds the sweep) marks trials Tune left running, and the parent, KILLED.
    """
    counts = SyncCounts()
    segments = read_segments(location, exclude)
    # The parent first (found by the recorded id or its tags; made from the spec and the tags
    # the first driver journalled if this server has none), so trial runs nest under it.
    first = next((e for s in segments for e in s.events if e.get("kind") == "parent"), {})
    runs.ensure_parent(
        params,
        first.get("tags", {}),
        runs.parent_run_id or first.get("run_id"),
        dataset=first.get("dataset"),
    )
    for segment in segments:
        counts.torn += segment.torn
        last = 0
        metrics: list[dict[str, Any]] = []  # consecutive metric events, sent together
        for event in segment.unsent(runs.tracking_uri):
            kind = event.get("kind")
            if kind != "metrics":
                counts.values += runs.apply_metrics(metrics)
                metrics = []
            if kind == "metrics":
                metrics.append(event)
            elif kind == "end":
                counts.ended += runs.end_trial(
                    event["trial_id"], event.get("config", {}), event["reason"], event["status"]
                )
            elif kind != "parent":  # the parent is the one ensured above
                counts.values += runs.apply(event)
            elif event.get("dataset"):  # a resume that moved to a new dataset version
                runs.ensure_parent(params, {}, runs.parent_run_id, dataset=event["dataset"])
            counts.events += 1
            last = event["seq"]
        counts.values += runs.apply_metrics(metrics)
        if last:
            record_acked(location, segment.session, runs.tracking_uri, last)
    seen = set()  # trials storage shows with results (or an error)
    # Not the lease: a driver catching up runs Tune itself, whatever its heartbeat says.
    for trial in read_trials(location, metric, mode, max_epochs, tune_running=not interrupted):
        if not trial.results and trial.state != "ERROR":
            continue  # no results in storage yet: the journal may have some (below)
        seen.add(trial.trial_id)
        counts.values += runs.log_metrics(trial.trial_id, trial.config, metric_rows(trial.results))
        if trial.state in _ENDED_STATES or trial.ended == "completed":  # all epochs reported
            reason = trial.ended
        elif trial.state == "ABANDONED":
            reason = ABANDONED
        elif interrupted:
            reason = INTERRUPTED
        else:
            continue  # running now, under this driver
        status = "KILLED" if reason in (INTERRUPTED, ABANDONED) else terminal_status(reason)
        counts.ended += runs.end_trial(trial.trial_id, trial.config, reason, status)
    # A trial a killed driver journalled whose results never reached storage (Tune syncs them
    # every few seconds), or that it started after Tune's last snapshot: its run would stay
    # RUNNING forever otherwise. One Tune's state knows is continued by a resume.
    known = tune_trial_states(location) or {}
    for trial_id, config in _journal_only_trials(segments, seen).items():
        if trial_id not in known:
            counts.ended += runs.end_trial(trial_id, config, ABANDONED, "KILLED")
        elif interrupted:
            counts.ended += runs.end_trial(trial_id, config, INTERRUPTED, "KILLED")
    summary = location.read_json(SUMMARY_FILE)
    if summary is not None:
        runs.end_parent("FINISHED", summary)
    elif interrupted:
        runs.end_parent("KILLED")
    return counts


def _journal_only_trials(segments, seen: set[str]) -> dict[str, dict[str, Any]]:
    """Trials the journal has reports of and no end for, which storage shows no results of:
    id -> config."""
    reported: dict[str, dict[str, Any]] = {}
    ended: set[str] = set()
    for segment in segments:
        for event in segment.events:
            trial_id = event.get("trial_id")
            if not trial_id:
                continue
            if event.get("kind") == "end":
                ended.add(trial_id)
            else:
                reported.setdefault(trial_id, event.get("config", {}))
    return {t: c for t, c in reported.items() if t not in ended and t not in seen}
