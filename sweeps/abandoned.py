"""A resumed driver's record of the trials its dead predecessor abandoned.

Tune's resume reuses the dead driver's staging folder and uploads it at every snapshot, so a
trial that driver started after its last snapshot may reach storage only after the resume
began, too late for `status.record_abandoned`. This callback knows every trial the running
Tune has (restored or started) and records, every RECORD_SECONDS, the trial folders in storage
that are none of them.
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from chestxpert.sweeps.layout import SweepLocation
from chestxpert.sweeps.status import add_abandoned, trial_folder_ids

RECORD_SECONDS = 30.0


class RecordAbandoned(Callback):
    """Attached by `sweep resume` only: a new sweep has no dead predecessor."""

    def __init__(self, location: SweepLocation | None = None) -> None:
        self.location = location
        self._last = float("-inf")

    def __getstate__(self) -> dict[str, Any]:
        return {}  # Tune pickles its callbacks; this one belongs to one driver

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if self.location is None or now - self._last < RECORD_SECONDS:
            return
        self._last = now
        running = {trial.trial_id for trial in trials}
        add_abandoned(self.location, trial_folder_ids(self.location) - running)
