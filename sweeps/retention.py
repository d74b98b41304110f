"""Which checkpoints of a trial a sweep keeps, deleted only once a killed driver's resume can no
longer need them (imports Ray: the driver's side).

Tune's own `CheckpointConfig(num_to_keep=k)` deletes a trial's checkpoints outside its best k
the moment a new one registers. A resume restores from Tune's experiment state in storage, a
snapshot written every so often that names each trial's latest checkpoint as of then. When that
checkpoint ranks below the best k, Tune deletes it before the next snapshot, and a driver killed
in between leaves a state that names a deleted checkpoint: the resumed trial fails with "Could
not recover from checkpoint as it does not exist on storage anymore" (Ray 2.60) and its epochs
are lost. So Tune keeps every checkpoint, and CheckpointRetention deletes one only when the
experiment state in storage was saved after a newer checkpoint of its trial registered.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pyarrow.fs as pafs
from ray.tune import Callback

from chestxpert.sweeps.layout import SweepLocation
from chestxpert.sweeps.status import newest_experiment_state

logger = logging.getLogger(__name__)


def surplus_checkpoints(results: list, latest: Any, keep: int, metric: str, mode: str) -> list:
    """The checkpoints of `results` (Tune's `_TrainingResult`s of one trial) outside the best
    `keep` by `metric` (ties with the `keep`-th kept: Tune's `get_best_checkpoint` may pick any
    of them), other than `latest`'s. One without a finite `metric` is kept: it cannot be ranked.
    """
    scored = [
        (float(result.metrics[metric]), result.checkpoint)
        for result in results
        if result.checkpoint is not None
        and isinstance(result.metrics.get(metric), int | float)
        and math.isfinite(result.metrics[metric])
    ]
    if len(scored) <= keep:
        return []
    scored.sort(key=lambda item: item[0], reverse=mode == "max")
    threshold = scored[keep - 1][0]
    latest_path = latest.checkpoint.path if latest is not None and latest.checkpoint else None
    return [
        checkpoint
        for value, checkpoint in scored[keep:]
        if value != threshold and checkpoint.path != latest_path
    ]


class CheckpointRetention(Callback):
    """Keeps each trial's best `keep` checkpoints by `metric` and its latest, as Tune's
    `num_to_keep` would, and deletes the others once the experiment state in storage was saved
    after they stopped being their trial's latest, so it cannot name them. Run with Tune's
    `num_to_keep=None`.

    Tune saves its state at the end of a loop iteration, after that iteration registered its
    checkpoints, and records the iteration (`_iteration`) in it; uploads go one at a time, so
    the state in storage only moves forward. A checkpoint that stopped being the latest in
    iteration i is safe to delete once storage holds a state of a later iteration.
    """

    def __init__(
        self,
        location: SweepLocation | None = None,
        keep: int = 1,
        metric: str = "",
        mode: str = "max",
    ) -> None:
        self.location = location
        self.keep = keep
        self.metric = metric
        self.mode = mode
        self._trials: dict[str, Any] = {}
        # checkpoint path -> the loop iteration in which it stopped being its trial's latest
        self._superseded: dict[str, int] = {}
        self._deleted: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # Tune pickles its callbacks; a resume attaches a new one

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint, **info) -> None:
        self._trials[trial.trial_id] = trial
        for result in trial.run_metadata.checkpoint_manager.best_checkpoint_results:
            if result.checkpoint is not None and result.checkpoint.path != checkpoint.path:
                self._superseded.setdefault(result.checkpoint.path, iteration)
        self.prune()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Tune has just saved its last state and waited for the upload. A trial this driver saw
        # no checkpoint of was restored with checkpoints superseded before it began.
        self._trials.update({trial.trial_id: trial for trial in trials})
        self.prune()

    def prune(self) -> None:
        """Delete the surplus checkpoints no state in storage can name any more."""
        if self.location is None:
            return
        surplus = []
        for trial_id, trial in list(self._trials.items()):
            manager = trial.run_metadata.checkpoint_manager
            found = [
                checkpoint
                for checkpoint in surplus_checkpoints(
                    manager.best_checkpoint_results,
                    manager.latest_checkpoint_result,
                    self.keep,
                    self.metric,
                    self.mode,
                )
                if checkpoint.path not in self._deleted
            ]
            surplus += found
            if not found and trial.status in ("TERMINATED", "ERROR"):
                del self._trials[trial_id]  # nothing left to delete, and it trains no more
        if not surplus:
            return
        saved = saved_iteration(self.location)
        if saved is None:
            return
        for checkpoint in surplus:
            if self._superseded.get(checkpoint.path, -1) >= saved:
                continue  # the state in storage may name it: a resume would restore from it
            # Under this sweep's folder, whatever path Tune recorded (storage may have moved).
            trial_folder, folder = checkpoint.path.rstrip("/").rsplit("/", 2)[-2:]
            path = f"{self.location.path}/{trial_folder}/{folder}"
            try:
                # Tune still lists what an earlier driver of this sweep deleted.
                if self.location.fs.get_file_info(path).type != pafs.FileType.NotFound:
                    self.location.fs.delete_dir(path)
            except OSError as err:
                logger.warning("could not delete %s (%s); trying again later", path, err)
                continue
            self._deleted.add(checkpoint.path)


def saved_iteration(location: SweepLocation) -> int | None:
    """The loop iteration of Tune's newest experiment state in storage (the one a resume
    restores); None when there is none yet, or it cannot be read (mid-upload)."""
    info = newest_experiment_state(location)
    if info is None:
        return None
    try:
        with location.fs.open_input_stream(info.path) as stream:
            return int(json.loads(stream.read())["runner_data"]["_iteration"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.debug("experiment state %s unreadable: %s", info.path, err)
        return None
