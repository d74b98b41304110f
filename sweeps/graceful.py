"""A graceful stop of a sweep driver: SIGINT (`chestxpert sweep stop`, Ctrl+C, a Ray job stopped
with RAY_JOB_STOP_SIGNAL=SIGINT) or SIGTERM (Ray's default job stop, `kill`) ends Tune's loop.

Tune saves the experiment state, running trials keep their last checkpoint and stay unfinished
in it, and `chestxpert sweep resume` continues them. The driver writes no summary for a stopped
sweep (it has not finished) and marks its MLflow parent run KILLED until the resume ends it.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from ray.tune import Callback

STOPPED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a process Ctrl+C ended


# How long a stop waits for a checkpoint Tune is still recording (see GracefulStop).
SAVE_WAIT_SECONDS = 60.0


class GracefulStop(Callback):
    """Tune callback noting that a stop was asked (`requested`), and turning SIGTERM into the
    SIGINT Tune handles. Installed when Tune sets up, after Tune's own SIGINT handler, which it
    calls: Tune then ends its loop at the next step, saves its state and returns from `fit`.

    Tune writes an epoch's result to the trial's `result.json` first and records the checkpoint
    that came with it a step later (a separate `save` call to the trial's actor). A stop in
    between would save a state whose checkpoint is one epoch behind its results, and the
    resumed trial would train that epoch again; so the request reaches Tune at the end of the
    first step with no checkpoint in flight (or after SAVE_WAIT_SECONDS). A second signal
    passes it on at once; a third ends the driver."""

    def __init__(self, sweep: str = "") -> None:
        self.sweep = sweep
        self.requested = False
        self._pending: Any = None  # Tune's handler call, held while a checkpoint is recorded
        self._deadline = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {"sweep": self.sweep}  # Tune pickles callbacks; a stop belongs to one driver

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def setup(self, **info: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; Tune's own handler is not there either
        tune_handler = signal.getsignal(signal.SIGINT)
        term_handler = signal.getsignal(signal.SIGTERM)

        def stop(signum: int, frame: Any) -> None:
            if self.requested:  # a second signal: no more waiting for checkpoints
                self._pass_on()
                return
            self.requested = True
            print(
                f"stop requested ({signal.Signals(signum).name}): Tune saves the sweep's state "
                "and stops its trials at their last checkpoint; "
                f"`chestxpert sweep resume {self.sweep}` continues them",
                flush=True,
            )
            if callable(tune_handler):  # Tune's: it restores the SIGINT handler before it
                self._pending = lambda: tune_handler(signal.SIGINT, frame)
                self._deadline = time.monotonic() + SAVE_WAIT_SECONDS

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        self._restore = (tune_handler, term_handler)

    def _pass_on(self) -> None:
        signal.signal(signal.SIGTERM, self._restore[1])
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._pending is None:
            return
        if time.monotonic() >= self._deadline or not any(t.is_saving for t in trials):
            self._pass_on()

    def on_experiment_end(self, trials, **info: Any) -> None:
        # Tune's loop is over: a signal now is no longer a request to stop it
        restore = getattr(self, "_restore", None)
        if restore is not None and threading.current_thread() is threading.main_thread():
            if not self.requested or self._pending is not None:  # else Tune put back its own
                signal.signal(signal.SIGINT, restore[0])
            self._pending = None
            signal.signal(signal.SIGTERM, restore[1])


def unfinished(spec, location) -> bool:
    """True when Tune's saved state has trials to continue or to start; a stop that came after
    the last trial ended leaves a finished sweep. (Tune marks the trials it stops at the end
    TERMINATED in memory, after saving them as RUNNING: storage is what a resume reads.)"""
    from chestxpert.sweeps.status import read_trials

    max_epochs = spec.scheduler.max_t or spec.epochs()
    trials = [
        trial
        for trial in read_trials(location, spec.metric, spec.mode, max_epochs, tune_running=False)
        if trial.state != "ABANDONED"  # Tune ran that slot again as a new trial
    ]
    ended = [trial for trial in trials if trial.state in ("TERMINATED", "ERROR")]
    return len(ended) < len(trials) or len(trials) < spec.search.num_samples


def end_stopped(spec_name: str, callback) -> dict[str, Any]:
    """What a stopped driver returns instead of a summary: the MLflow parent run is KILLED (the
    resume reopens it and ends it FINISHED); nothing is written to the sweep's summary file."""
    try:
        if callback.runs.parent_run_id is not None:
            callback.runs.end_parent("KILLED")
    except Exception as err:  # MLflow away: `sweep resume` or `mlflow-sync` settles the parent
        print(f"warning: MLflow did not take the parent run's end ({type(err).__name__})")
    return {"name": spec_name, "stopped": True}
