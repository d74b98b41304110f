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
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
from ray.tune import Callback

from chestxpert.sweeps.layout import SweepLocation
from chestxpert.sweeps.status import newest_experiment_state

if TYPE_CHECKING:
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)


def score(metrics: dict[str, Any], metric: str) -> float | None:
    """`metric`'s value in a reported result, or None when it is missing or not finite (a
    diverged epoch's NaN ranks nowhere)."""
    value = metrics.get(metric)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def surplus_checkpoints(
    results: list[_TrainingResult],
    latest: _TrainingResult | None,
    keep: int,
    metric: str,
    mode: str,
) -> list[Checkpoint]:
    """The checkpoints of `results` (one trial's, as Tune's checkpoint manager holds them) that
    are neither `latest`'s nor among the best `keep` by `metric` (`mode` "max" or "min"). Ties
    with the `keep`-th stay, since a pick of the best may name any of them; a checkpoint whose
    result has no finite `metric` ranks below all others."""
    ranked = sorted(
        (result for result in results if result.checkpoint is not None),
        key=lambda result: (
            (value := score(result.metrics, metric)) is not None,
            0.0 if value is None else value if mode == "max" else -value,
        ),
        reverse=True,
    )
    kept = [score(result.metrics, metric) for result in ranked[:keep]]
    threshold = kept[-1] if len(kept) == keep else None
    latest_path = latest.checkpoint.path if latest is not None and latest.checkpoint else None
    return [
        result.checkpoint
        for result in ranked[keep:]
        if result.checkpoint.path != latest_path
        and (threshold is None or score(result.metrics, metric) != threshold)
    ]


class CheckpointRetention(Callback):
    """Keeps each trial's best `keep` checkpoints by `metric` and its latest, as Tune's
    `num_to_keep` would, and deletes the others once the experiment state in storage was saved
    after they stopped being their trial's latest, so that it cannot name them. Run Tune with
    `num_to_keep=None`. `location` None: a copy Tune unpickled, which does nothing.

    Tune saves its state at the end of a loop iteration, after that iteration registered its
    checkpoints, and records the iteration (`_iteration`) in it; a resume restores the counter
    with the state. Uploads go one at a time (unless one outlives Tune's sync timeout, 30
    minutes), so the state in storage only moves forward. A checkpoint that stopped being the
    latest in iteration i can go once storage holds a state of a later iteration.
    """

    def __init__(self, location: SweepLocation | None, keep: int, metric: str, mode: str) -> None:
        self.location = location
        self.keep = keep
        self.metric = metric
        self.mode = mode
        self._trials: dict[str, Trial] = {}
        # checkpoint path -> the loop iteration in which it stopped being its trial's latest
        self._superseded: dict[str, int] = {}
        self._saved: tuple[tuple, int] | None = None  # the state file read last, its iteration

    def __getstate__(self) -> dict[str, Any]:
        return {}  # Tune pickles its callbacks; a resume attaches a new one

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(None, 1, "", "max")

    def on_checkpoint(
        self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Checkpoint, **info
    ) -> None:
        # Called before Tune registers `checkpoint`: every other one of the trial's is now
        # superseded, as of this iteration at the latest.
        self._trials[trial.trial_id] = trial
        for result in trial.run_metadata.checkpoint_manager.best_checkpoint_results:
            if result.checkpoint is not None and result.checkpoint.path != checkpoint.path:
                self._superseded.setdefault(result.checkpoint.path, iteration)
        self._prune_or_warn()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # Tune has just saved its last state (and waited for the upload, unless that failed). A
        # trial this driver saw no checkpoint of was restored with checkpoints superseded
        # before the state it was restored from.
        self._trials.update({trial.trial_id: trial for trial in trials})
        self._prune_or_warn()

    def _prune_or_warn(self) -> None:
        # Housekeeping: a storage error here must not stop Tune registering the checkpoint.
        try:
            self.prune()
        except Exception as err:
            logger.warning(
                "checkpoint retention: %s: %s; trying again later", type(err).__name__, err
            )

    def prune(self) -> None:
        """Delete the surplus checkpoints no state in storage can name any more."""
        if self.location is None:
            return
        surplus: list[tuple[Trial, Checkpoint]] = []
        for trial_id, trial in list(self._trials.items()):
            manager = trial.run_metadata.checkpoint_manager
            found = surplus_checkpoints(
                manager.best_checkpoint_results,
                manager.latest_checkpoint_result,
                self.keep,
                self.metric,
                self.mode,
            )
            surplus += [(trial, checkpoint) for checkpoint in found]
            if not found and trial.status in ("TERMINATED", "ERROR"):
                del self._trials[trial_id]  # nothing left to delete, and it trains no more
        if not surplus:
            return
        saved = self._saved_iteration()
        if saved is None:
            return
        for trial, checkpoint in surplus:
            if self._superseded.get(checkpoint.path, -1) >= saved:
                continue  # the state in storage may name it: a resume would restore from it
            # Under this sweep's folder, whatever path Tune recorded (storage may have moved).
            trial_folder, folder = checkpoint.path.rstrip("/").rsplit("/", 2)[-2:]
            path = f"{self.location.path}/{trial_folder}/{folder}"
            # Tune still lists what an earlier driver of this sweep deleted.
            if self.location.fs.get_file_info(path).type != pafs.FileType.NotFound:
                self.location.fs.delete_dir(path)
            # Out of Tune's list too, so its saved state and `best_checkpoints` stay the
            # checkpoints that exist (Tune removes what its own num_to_keep deletes the same way).
            manager = trial.run_metadata.checkpoint_manager
            manager._checkpoint_results = [
                result
                for result in manager._checkpoint_results
                if result.checkpoint is None or result.checkpoint.path != checkpoint.path
            ]

    def _saved_iteration(self) -> int | None:
        """The loop iteration of Tune's newest experiment state in storage (the one a resume
        restores), read again only when the file changed; None when there is none yet or it
        cannot be read (mid-upload). A stale answer is an older iteration: it deletes less."""
        info = newest_experiment_state(self.location)
        if info is None:
            return None
        key = (info.path, info.size, info.mtime)
        if self._saved is None or self._saved[0] != key:
            try:
                with self.location.fs.open_input_stream(info.path) as stream:
                    iteration = int(json.loads(stream.read())["runner_data"]["_iteration"])
            except (ValueError, KeyError, TypeError) as err:
                logger.debug("experiment state %s unreadable: %s", info.path, err)
                return None
            self._saved = (key, iteration)
        return self._saved[1]
