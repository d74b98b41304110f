"""`sweep status` reads a sweep from its storage alone: which trials Tune knows, and which a
killed driver started but Tune never recorded (run again by the resume under a new id).

Not by file times: a resumed driver uploads the dead one's trial folders again."""

from __future__ import annotations

import json
import os
from pathlib import Path

from chestxpert.cluster.endpoints import Endpoints, resolve
from chestxpert.sweeps import lease
from chestxpert.sweeps.layout import SPEC_FILE, SweepLocation, locate
from chestxpert.sweeps.spec import SweepSpec
from chestxpert.sweeps.status import record_abandoned, sweep_status


def _trial(folder: Path, trial_id: str, values: list[float], started: float) -> None:
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"learning_rate": 0.001}))
    rows = [
        {"trial_id": trial_id, "epoch": epoch, "val_auc_macro": value}
        for epoch, value in enumerate(values, start=1)
    ]
    (folder / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.utime(folder / "params.json", (started, started))


def _endpoints(tmp_path: Path) -> Endpoints:
    return resolve(storage=str(tmp_path), workspace=str(tmp_path / "ws"))


def _killed_then_resumed(tmp_path: Path) -> SweepLocation:
    """A sweep whose first driver was killed after it started dead0002 and before its next
    snapshot; trial bbbb0003 is newer than the snapshot on storage."""
    sweep = tmp_path / "resumed"
    sweep.mkdir()
    spec = SweepSpec.model_validate(
        {"name": "resumed", "dataset": str(tmp_path / "data"), "trial": {"epochs": 2}}
    )
    (sweep / SPEC_FILE).write_text(json.dumps({"raw": spec.model_dump(mode="json")}))
    snapshot = 1_800_000_000.0
    _trial(sweep / "train_aaaa0001", "aaaa0001", [0.6, 0.7], snapshot - 300)
    # started by the killed driver after its last snapshot; the resumed driver, which reuses
    # the dead one's staging folder, uploaded it again after the newest snapshot
    _trial(sweep / "train_dead0002", "dead0002", [0.4], snapshot + 20)
    # reported its last epoch; killed before Tune's next snapshot said it had ended
    _trial(sweep / "train_cccc0004", "cccc0004", [0.5, 0.55], snapshot - 200)
    # still in its first epoch when the snapshot was written
    _trial(sweep / "train_dddd0005", "dddd0005", [0.5], snapshot - 150)
    state = sweep / "experiment_state-2026-12-02_15-00-00.json"
    recorded = [
        {"trial_id": "aaaa0001", "status": "TERMINATED"},
        {"trial_id": "cccc0004", "status": "RUNNING"},
        {"trial_id": "dddd0005", "status": "RUNNING"},
    ]
    state.write_text(json.dumps({"trial_data": [[json.dumps(t), "{}"] for t in recorded]}))
    os.utime(state, (snapshot, snapshot))
    location = locate(_endpoints(tmp_path), "resumed")
    record_abandoned(location)  # what the resume does before Tune restores
    # started by the resumed driver after the snapshot it has written so far
    _trial(sweep / "train_bbbb0003", "bbbb0003", [0.65], snapshot + 50)
    return location


def test_a_trial_tune_never_recorded_is_abandoned_unless_a_running_driver_started_it(
    tmp_path: Path,
) -> None:
    location = _killed_then_resumed(tmp_path)
    held = lease.acquire(location, _endpoints(tmp_path), "sweep resume resumed", "resumed-session")
    try:
        running = sweep_status(location)
    finally:
        held.release()
    stopped = sweep_status(location)

    # Whatever the file times say: the resume recorded dead0002 before Tune restored
    assert running["abandoned"] == ["dead0002"]
    rows = {row["trial_id"]: row for row in running["trials"]}
    assert sorted(rows) == ["aaaa0001", "bbbb0003", "cccc0004", "dddd0005"]
    assert rows["aaaa0001"]["state"] == "TERMINATED" and rows["aaaa0001"]["ended"] == "completed"
    assert rows["cccc0004"]["state"] == "RUNNING" and rows["cccc0004"]["ended"] == "completed"
    assert rows["dddd0005"]["ended"] == "running"
    assert rows["bbbb0003"]["state"] == "UNKNOWN" and rows["bbbb0003"]["epochs"] == 1
    assert running["best_so_far"]["trial_id"] == "aaaa0001"
    # With no driver running, nothing can start a trial the newest snapshot lacks
    assert stopped["abandoned"] == ["bbbb0003", "dead0002"]
    assert sorted(row["trial_id"] for row in stopped["trials"]) == [
        "aaaa0001",
        "cccc0004",
        "dddd0005",
    ]


def test_sweep_status_and_list_json_keys(tmp_path: Path, cli_env, capsys) -> None:
    """The README's JSON schemas of `sweep status --json` and `sweep list --json`."""
    from chestxpert.cli import main

    spec = SweepSpec.model_validate({"name": "done", "dataset": str(tmp_path / "data")})
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / SPEC_FILE).write_text(json.dumps({"raw": spec.model_dump(mode="json")}))
    _trial(tmp_path / "done" / "train_aaaa0001", "aaaa0001", [0.6, 0.7], 1_800_000_000.0)
    where = ["--storage", str(tmp_path), "--workspace", str(tmp_path / "ws")]

    assert main(["sweep", "status", "done", "--json", *where]) == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status) == {
        "name",
        "storage",
        "metric",
        "mode",
        "num_samples",
        "summary",
        "writer",
        "best_so_far",
        "trials",
        "abandoned",
    }
    assert set(status["best_so_far"]) == {"trial_id", "value", "config"}
    [trial] = status["trials"]
    assert set(trial) == {"trial_id", "state", "epochs", "best", "ended", "config", "folder"}
    assert trial["best"] == 0.7 and trial["epochs"] == 2

    assert main(["--storage", str(tmp_path), "sweep", "list", "--json", *where[2:]]) == 0
    assert json.loads(capsys.readouterr().out) == {"storage": tmp_path.as_uri(), "sweeps": ["done"]}


def test_a_resumed_driver_records_folders_its_tune_does_not_have(tmp_path: Path) -> None:
    """A folder the dead driver's staging area uploads only after the resume began is
    recorded by the resumed driver's callback, which knows every trial its Tune has."""
    import pickle
    from types import SimpleNamespace

    from chestxpert.sweeps.abandoned import RecordAbandoned

    location = _killed_then_resumed(tmp_path)
    _trial(tmp_path / "resumed" / "train_late0006", "late0006", [0.3], 1_800_000_030.0)
    recorder = RecordAbandoned(location)
    tune_has = ("aaaa0001", "bbbb0003", "cccc0004", "dddd0005")
    recorder.on_step_end(iteration=1, trials=[SimpleNamespace(trial_id=i) for i in tune_has])
    held = lease.acquire(location, _endpoints(tmp_path), "sweep resume resumed", "resumed-session")
    try:
        running = sweep_status(location)
    finally:
        held.release()
    assert running["abandoned"] == ["dead0002", "late0006"]
    assert {row["trial_id"]: row["state"] for row in running["trials"]}["bbbb0003"] == "UNKNOWN"
    # Tune pickles its callbacks into the experiment folder: nothing of the storage goes with it
    assert pickle.loads(pickle.dumps(recorder)).location is None
