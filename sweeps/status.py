"""`chestxpert sweep status|list`: what a sweep did, from its storage alone (no cluster needed)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs as pafs

from chestxpert.sweeps.layout import ABANDONED_FILE, SPEC_FILE, SUMMARY_FILE, SweepLocation
from chestxpert.sweeps.lease import read_holder
from chestxpert.sweeps.spec import spec_from_dict
from chestxpert.sweeps.sweep_runs import ended_reason


@dataclass
class TrialRow:
    """One trial as storage records it."""

    trial_id: str
    state: str  # TERMINATED, ERROR, RUNNING, PENDING, PAUSED (Tune's words), or ABANDONED
    epochs: int  # epochs reported
    best: float | None  # best value of the sweep metric
    ended: str  # completed / stopped by ASHA at epoch k / errored / running
    config: dict[str, Any]
    results: list[dict[str, Any]]
    folder: str


def _read_text(fs, path: str) -> str | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def newest_experiment_state(location: SweepLocation) -> pafs.FileInfo | None:
    """Tune's newest experiment_state file in storage (the one a resume restores), or None."""
    selector = pafs.FileSelector(location.path, recursive=False)
    states = [
        info
        for info in location.fs.get_file_info(selector)
        if info.base_name.startswith("experiment_state") and info.base_name.endswith(".json")
    ]
    return max(states, key=lambda info: info.path, default=None)


def tune_trial_states(location: SweepLocation) -> dict[str, dict[str, Any]] | None:
    """Tune's own record of each trial (status, folder), from the newest experiment_state file;
    None when Tune has saved none yet."""
    newest = newest_experiment_state(location)
    if newest is None:
        return None
    data = json.loads(_read_text(location.fs, newest.path) or "{}")
    out = {}
    for entry in data.get("trial_data", []):
        raw = entry[0] if isinstance(entry, list) else entry
        state = json.loads(raw) if isinstance(raw, str) else raw
        out[state.get("trial_id")] = state
    return out


def read_trials(
    location: SweepLocation,
    metric: str,
    mode: str,
    max_epochs: int,
    tune_running: bool,
) -> list[TrialRow]:
    """Every trial folder of the sweep with its results, state and how it ended.

    A folder Tune's newest state lacks was started by a driver killed before its next snapshot,
    and the resume ran that slot again as a new trial: ABANDONED. While a driver may be running
    Tune (`tune_running`: the caller's own Tune, or a live lease), a folder it lacks may also be
    a trial started since, so only those a resume recorded (`record_abandoned`) count.
    """
    fs = location.fs
    saved = tune_trial_states(location)
    states = saved or {}
    recorded = set((location.read_json(ABANDONED_FILE) or {}).get("trial_ids", []))
    rows = []
    selector = pafs.FileSelector(location.path, recursive=False)
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.Directory:
            continue
        params = _read_text(fs, f"{info.path}/params.json")
        if params is None:
            continue
        results_text = _read_text(fs, f"{info.path}/result.json") or ""
        results = [json.loads(line) for line in results_text.splitlines() if line.strip()]
        trial_id = results[-1]["trial_id"] if results else info.base_name.split("_", 1)[1]
        state = states.get(trial_id, {}).get("status", "UNKNOWN")
        # Not by file times: a resumed driver reuses the dead one's staging folder and uploads
        # the abandoned folder again at every snapshot.
        if state == "UNKNOWN" and saved is not None:
            if trial_id in recorded or not tune_running:
                state = "ABANDONED"
        errored = (
            state == "ERROR"
            or _read_text(fs, f"{info.path}/error.txt") is not None
            and state != "TERMINATED"
        )
        epochs = int(
            max((r.get("epoch", r.get("training_iteration", 0)) for r in results), default=0)
        )
        values = [r[metric] for r in results if isinstance(r.get(metric), int | float)]
        best = (max(values) if mode == "max" else min(values)) if values else None
        # A trial that reported its last epoch has completed, even if the driver died before
        # Tune's next snapshot said so (reused workers start the next trial at once).
        if state in ("RUNNING", "PENDING", "PAUSED", "ABANDONED") and not (
            state == "RUNNING" and not errored and epochs >= max_epochs
        ):
            ended = state.lower()
        else:
            ended = ended_reason(epochs, max_epochs, errored)
        rows.append(
            TrialRow(trial_id, state, epochs, best, ended, json.loads(params), results, info.path)
        )
    return sorted(rows, key=lambda row: row.trial_id)


def record_abandoned(location: SweepLocation) -> None:
    """At a resume, before Tune restores (no Tune runs the sweep): record the trial folders
    Tune's newest state lacks, which the dead driver abandoned, so they stay ABANDONED while the
    resumed driver runs."""
    saved = tune_trial_states(location)
    if saved is not None:
        add_abandoned(location, trial_folder_ids(location) - set(saved))


def add_abandoned(location: SweepLocation, ids: set[str]) -> None:
    """Add `ids` to the sweep's record of abandoned trials (written only when it grows)."""
    known = set((location.read_json(ABANDONED_FILE) or {}).get("trial_ids", []))
    if not ids <= known:
        location.write_json(ABANDONED_FILE, {"trial_ids": sorted(ids | known)})


def trial_folder_ids(location: SweepLocation) -> set[str]:
    """The trial ids of the sweep's trial folders (`train_<id>` holding a params.json)."""
    fs = location.fs
    selector = pafs.FileSelector(location.path, recursive=False)
    return {
        info.base_name.split("_", 1)[1]
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.Directory
        and "_" in info.base_name
        and fs.get_file_info(f"{info.path}/params.json").type == pafs.FileType.File
    }


def sweep_status(location: SweepLocation) -> dict[str, Any]:
    """The sweep's spec, summary (if finished) and trials: plain values for printing or `--json`."""
    recorded = location.read_json(SPEC_FILE)
    if recorded is None:
        return {}
    spec = spec_from_dict(recorded["raw"], source=f"{location.uri}/{SPEC_FILE}")
    metric, mode = spec.metric, spec.mode
    max_epochs = spec.scheduler.max_t or spec.epochs()
    holder = read_holder(location)
    rows = read_trials(location, metric, mode, max_epochs, bool(holder and holder["live"]))
    trials = [t for t in rows if t.state != "ABANDONED"]
    scored = [t for t in trials if t.best is not None]
    best = (max if mode == "max" else min)(scored, key=lambda t: t.best) if scored else None
    return {
        "name": location.name,
        "storage": location.uri,
        "metric": metric,
        "mode": mode,
        "num_samples": spec.search.num_samples,
        "summary": location.read_json(SUMMARY_FILE),
        "writer": holder,
        "best_so_far": {"trial_id": best.trial_id, "value": best.best, "config": best.config}
        if best
        else None,
        "trials": [{k: v for k, v in asdict(t).items() if k != "results"} for t in trials],
        # started by a driver that died before Tune recorded them; run again under a new id
        "abandoned": [t.trial_id for t in rows if t.state == "ABANDONED"],
    }


def list_sweeps(fs, root: str) -> list[str]:
    """Names of the sweeps under a storage root (folders holding a ChestXpert spec record)."""
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    names = []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if (
            info.type == pafs.FileType.Directory
            and fs.get_file_info(f"{info.path}/{SPEC_FILE}").type == pafs.FileType.File
        ):
            names.append(info.base_name)
    return sorted(names)
