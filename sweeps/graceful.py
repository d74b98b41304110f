"""A graceful stop of a sweep driver: SIGINT (`chestxpert sweep stop`, Ctrl+C, a Ray job stopped
with RAY_JOB_STOP_SIGNAL=SIGINT) or SIGTERM (Ray's default job stop, `kill`) ends Tune's loop.

Tune saves the experiment state, running trials keep their last checkpoint and stay unfinished
in it, and `chestxpert sweep resume` continues them. The driver writes no summary for a stopped
sweep (it has not finished) and marks its MLflow parent run KILLED until the resume ends it.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from ray.tune import Callback

STOPPED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a process Ctrl+C ended


class GracefulStop(Callback):
    """Tune callback noting that a stop was asked (`requested`), and turning SIGTERM into the
    SIGINT Tune handles. Installed when Tune sets up, after Tune's own SIGINT handler, which it
    calls: Tune then ends its loop at the next step, saves its state and returns from `fit`.
    A second signal is not caught: it ends the driver at once."""

    def __init__(self, sweep: str = "") -> None:
        self.sweep = sweep
        self.requested = False

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
            self.requested = True
            signal.signal(signal.SIGTERM, term_handler)
            print(
                f"stop requested ({signal.Signals(signum).name}): Tune saves the sweep's state "
                "and stops its trials at their last checkpoint; "
                f"`chestxpert sweep resume {self.sweep}` continues them",
                flush=True,
            )
            if callable(tune_handler):
                tune_handler(signal.SIGINT, frame)  # Tune's: it restores the handler before it

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        self._restore = (tune_handler, term_handler)

    def on_experiment_end(self, trials, **info: Any) -> None:
        # Tune's loop is over: a signal now is no longer a request to stop it
        restore = getattr(self, "_restore", None)
        if restore is not None and threading.current_thread() is threading.main_thread():
            if not self.requested:  # else Tune already put back the handler it found
                signal.signal(signal.SIGINT, restore[0])
            signal.signal(signal.SIGTERM, restore[1])


def unfinished(spec, location) -> bool:
    """True when Tune's saved state has trials to continue or to start; a stop that came after
    the last trial ended leaves a finished sweep. (Tune marks the trials it stops at the end
    TERMINATED in memory, after saving them as RUNNING: storage is what a resume reads.)"""
    from chestxpert.sweeps.status import read_trials

    max_epochs = spec.scheduler.max_t or spec.epochs()
    trials = read_trials(location, spec.metric, spec.mode, max_epochs)
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
