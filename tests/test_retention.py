"""Which checkpoints a sweep's retention may delete (sweeps/retention.py), ranked by Tune's own
checkpoint bookkeeping. The drill that kills a driver in the window Tune's own `num_to_keep`
loses a trial in is in tests/test_sweep_drills.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest


def _surplus(scores: list[float | None], keep: int, mode: str) -> list[int]:
    """Register one checkpoint per epoch (score None: not reported) with a Tune checkpoint
    manager keeping every one, as sweeps.run configures it; return the surplus epochs."""
    from ray import tune
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    from chestxpert.sweeps.retention import surplus_checkpoints

    manager = _CheckpointManager(
        tune.CheckpointConfig(
            num_to_keep=None,
            checkpoint_score_attribute="val_auc_macro",
            checkpoint_score_order=mode,
        )
    )
    for epoch, score in enumerate(scores, start=1):
        metrics = {"epoch": epoch} if score is None else {"epoch": epoch, "val_auc_macro": score}
        checkpoint = tune.Checkpoint(f"/sweeps/s/train_a/checkpoint_{epoch - 1:06d}")
        manager.register_checkpoint(_TrainingResult(checkpoint=checkpoint, metrics=metrics))
    surplus = surplus_checkpoints(
        manager.best_checkpoint_results,
        manager.latest_checkpoint_result,
        keep,
        "val_auc_macro",
        mode,
    )
    return sorted(int(c.path.rsplit("_", 1)[1]) + 1 for c in surplus)


@pytest.mark.parametrize(
    ("scores", "keep", "mode", "surplus"),
    [
        ([0.9, 0.1, 0.5], 2, "max", [2]),  # the drill's case: the second ranks below the best two
        ([0.9, 0.1, 0.5], 2, "min", [1]),  # lower is better: the first is the worst
        ([0.5, 0.6, 0.7, 0.8], 2, "max", [1, 2]),  # improving: the latest two are the best two
        ([0.8, 0.7, 0.6, 0.5], 1, "max", [2, 3]),  # worsening: the best and the latest stay
        ([0.9, 0.1], 2, "max", []),  # no more than `keep`: nothing to delete
        ([0.7, 0.7, 0.7, 0.2], 1, "max", []),  # all tie for the best; the last is the latest
        ([0.7, 0.7, 0.2, 0.3], 1, "max", [3]),  # a tie for the best: both stay
        ([0.6, None, 0.2, 0.9], 1, "max", [1, 2, 3]),  # no metric: below every score
        ([0.6, float("nan"), 0.2, 0.9], 1, "max", [1, 2, 3]),  # a NaN (diverged) likewise
        ([0.3, float("nan"), 0.1, 0.2], 1, "min", [1, 2]),  # and with lower better
        ([None, None, None], 1, "max", [2]),  # none ranked: the latest and one more stay
    ],
)
def test_surplus_is_what_lies_outside_the_best_keep_and_is_not_the_latest(
    scores: list[float | None], keep: int, mode: str, surplus: list[int]
) -> None:
    assert _surplus(scores, keep, mode) == surplus


def test_a_superseded_checkpoint_is_deleted_once_a_later_saved_state_is_in_storage(
    tmp_path: Path,
) -> None:
    """The retention callback against a real Tune checkpoint manager and sweep folder: the
    second checkpoint (below the best two once the third registers, in loop iteration 7) stays
    while the state in storage is of iteration 7 or before, and goes once it is of a later one."""
    from ray import tune
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    from chestxpert.sweeps.layout import SweepLocation
    from chestxpert.sweeps.retention import CheckpointRetention

    sweep = tmp_path / "s"
    sweep.mkdir()
    location = SweepLocation(pafs.LocalFileSystem(), str(tmp_path), "s", sweep.as_uri())
    manager = _CheckpointManager(
        tune.CheckpointConfig(
            num_to_keep=None,
            checkpoint_score_attribute="val_auc_macro",
            checkpoint_score_order="max",
        )
    )
    trial = SimpleNamespace(
        trial_id="a", status="RUNNING", run_metadata=SimpleNamespace(checkpoint_manager=manager)
    )
    retention = CheckpointRetention(location, 2, "val_auc_macro", "max")

    state_file = sweep / "experiment_state-2026-12-04_00-00-00.json"

    def saved(iteration: int) -> None:
        state = {"trial_data": [], "runner_data": {"_iteration": iteration}}
        state_file.write_text(json.dumps(state))
        os.utime(state_file, (iteration, iteration))  # as saves seconds apart (it is cached)

    def register(index: int, score: float, iteration: int) -> None:
        folder = sweep / "train_a" / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        checkpoint = tune.Checkpoint(str(folder))
        # Tune's order: the callbacks, then the registration
        retention.on_checkpoint(
            iteration=iteration, trials=[trial], trial=trial, checkpoint=checkpoint
        )
        manager.register_checkpoint(
            _TrainingResult(checkpoint=checkpoint, metrics={"val_auc_macro": score})
        )

    def left() -> list[str]:
        return sorted(p.name for p in (sweep / "train_a").iterdir())

    saved(3)
    register(0, 0.9, 3)
    register(1, 0.1, 5)
    saved(6)  # names checkpoint_000001, the latest then
    register(2, 0.5, 7)
    assert left() == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]
    saved(7)  # saved in iteration 7, after its checkpoint registered: still waits one more
    retention.prune()
    assert left() == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]
    saved(8)
    retention.prune()
    assert left() == ["checkpoint_000000", "checkpoint_000002"]
    register(3, 0.6, 9)  # checkpoint_000002 (0.5) is surplus now, superseded in iteration 9
    state_file.write_text('{"trial_data": [')
    retention.prune()  # a state mid-upload cannot be read: nothing goes
    assert left() == ["checkpoint_000000", "checkpoint_000002", "checkpoint_000003"]
    assert len(manager.best_checkpoint_results) == 3  # Tune's list: what exists
    trial.status = "TERMINATED"
    saved(10)
    retention.on_experiment_end(trials=[trial])
    assert left() == ["checkpoint_000000", "checkpoint_000003"]
    assert [r.checkpoint.path[-6:] for r in manager.best_checkpoint_results] == ["000003", "000000"]
