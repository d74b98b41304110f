"""The Tune searcher that writes a sweep's Optuna study to its database, and keeps the study and
Tune in agreement across a resume (imports Ray: the driver's side of sweeps/study.py).
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from chestxpert.sweeps.study import ABANDONED, TUNE_TRIAL_ID, open_storage, study_exists

logger = logging.getLogger(__name__)


class StudySearch(OptunaSearch):
    """OptunaSearch writing to a study in a database, kept in step with Tune across resumes.

    `storage` is the study's URL without its password (`storage_url` adds it from the
    environment when connecting), so no pickle Tune writes (tuner.pkl, the searcher state)
    holds a secret. Trials ASHA stops before `max_t` are told PRUNED with their last value.
    On a resume, the trials come back from the study itself; those a dead driver started after
    its last snapshot (Tune does not know them and runs the slot again) are told FAIL and
    marked `abandoned`; points to evaluate are not enqueued a second time.
    """

    def __init__(self, storage: str, study_name: str, max_t: int | None, **kwargs: Any):
        super().__init__(study_name=study_name, **kwargs)
        self._study_storage = storage
        self._max_t = max_t

    def _setup_study(self, mode) -> None:
        self._storage = open_storage(self._study_storage)
        points = self._points_to_evaluate
        if study_exists(self._study_storage, self._study_name, self._storage):
            # A resume: the study already has the points (asked, or waiting in its queue).
            self._points_to_evaluate = []
        try:
            super()._setup_study(mode)
        finally:
            self._points_to_evaluate = points

    def suggest(self, trial_id: str) -> dict | None:
        new = trial_id not in self._ot_trials
        params = super().suggest(trial_id)
        if new:
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ID, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            # ended in the study before a resume (Tune runs it again from a checkpoint), or
            # restored by Tune without a searcher state to find it in
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = (result or {}).get(self.metric)
        step = (result or {}).get("training_iteration")
        if error or value is None or not step:
            super().on_trial_complete(trial_id, result, error)
            return
        import optuna

        ot_trial = self._ot_trials[trial_id]
        try:
            # Tune passes the result it stops a trial on (at max_t, or ASHA's rung) to no
            # on_trial_result: report it, so the study's curve has every epoch.
            if int(step) not in self._storage.get_trial(ot_trial._trial_id).intermediate_values:
                ot_trial.report(float(value), int(step))
            if self._max_t and step < self._max_t:  # stopped early by ASHA
                # Optuna keeps the last reported value as the PRUNED trial's value.
                self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
            else:
                self._ot_study.tell(ot_trial, float(value))
        except Exception as err:  # as OptunaSearch does: a study error must not stop the sweep
            logger.warning(err)
        self._completed_trials.add(trial_id)

    _TRANSIENT = ("_storage", "_ot_study", "_ot_trials")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_snapshot_trials"] = sorted(state.get("_ot_trials", {}))
        for key in self._TRANSIENT:
            state[key] = {} if key == "_ot_trials" else None
        return state

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__getstate__(), handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            state = pickle.load(handle)
        known = set(state.pop("_snapshot_trials", []))
        for key in self._TRANSIENT:
            state.pop(key, None)
        self.__dict__.update(state)
        if self._ot_study is not None:  # set up by Tune from the search space before restore
            self._ot_study.sampler = self._sampler
            self._reattach(known)

    def _reattach(self, known: set[str]) -> None:
        import optuna

        running = optuna.trial.TrialState.RUNNING
        self._ot_trials = {}
        for frozen in self._ot_study.get_trials(deepcopy=False):
            tune_id = frozen.user_attrs.get(TUNE_TRIAL_ID)
            if tune_id is None and frozen.state != running:
                continue  # a point to evaluate still waiting in the queue
            if tune_id in known:
                self._ot_trials[tune_id] = optuna.Trial(self._ot_study, frozen._trial_id)
                if frozen.state.is_finished():
                    self._completed_trials.add(tune_id)
            elif frozen.state == running:  # a dead driver's, untied if it died inside suggest
                self._ot_study._storage.set_trial_user_attr(frozen._trial_id, ABANDONED, True)
                self._ot_study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
