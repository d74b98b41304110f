"""Post-hoc calibration: per-label Platt scaling fitted on the VALIDATION split, stored beside the
model as calibrator.json, applied by `final`'s report and by `predict`.

The weighted loss inflates probabilities (rare labels are up-weighted), so raw outputs read as
too confident; Platt scaling maps each label's logit through sigmoid(slope · logit + intercept).
A positive slope keeps the order of the scores, so AUCs and the calls at the thresholds chosen
on raw probabilities are unchanged: only what the probabilities say changes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chestxpert.results.inputs import EvaluationError, check_arrays, has_both_classes, known_values
from chestxpert.trainable.checkpoint import CALIBRATOR_FILE

__all__ = ["CALIBRATOR_FILE", "Calibrator", "fit_platt", "read_calibrator"]
# Probabilities are clipped to [eps, 1 - eps] before the logit: a float32 sigmoid reaches 0 and 1.
_EPS = 1e-12


@dataclass
class Calibrator:
    """Per-label Platt scaling: p ↦ sigmoid(slope · logit(p) + intercept).

    `identity` lists the labels left as they are: validation had no positives or no negatives,
    or the fit's slope was not positive (the scores rank backwards on validation).
    """

    labels: list[str]
    slope: dict[str, float]
    intercept: dict[str, float]
    identity: list[str] = field(default_factory=list)
    method: str = "platt"
    fitted_on: str = "validation"

    def apply(self, y_prob: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of an images × labels array in this calibrator's label order."""
        y_prob = np.asarray(y_prob, dtype=np.float64)
        if y_prob.ndim != 2 or y_prob.shape[1] != len(self.labels):
            raise EvaluationError(
                f"the calibrator has {len(self.labels)} labels; probabilities are {y_prob.shape}"
            )
        slope = np.array([self.slope[name] for name in self.labels])
        intercept = np.array([self.intercept[name] for name in self.labels])
        calibrated = _sigmoid(slope * _logit(y_prob) + intercept)
        keep = np.array([name in self.identity for name in self.labels])
        return np.where(keep, y_prob, calibrated)

    def apply_thresholds(self, thresholds: Mapping[str, float]) -> dict[str, float]:
        """Raw-probability thresholds on the calibrated scale: the same calls, other numbers."""
        raw = np.array([[thresholds[name] for name in self.labels]])
        return dict(zip(self.labels, (float(v) for v in self.apply(raw)[0]), strict=True))

    def to_json(self) -> dict[str, Any]:
        """The calibrator as calibrator.json holds it."""
        return {
            "method": self.method,
            "fitted_on": self.fitted_on,
            "labels": self.labels,
            "slope": self.slope,
            "intercept": self.intercept,
            "identity": self.identity,
        }

    def write(self, model_dir: Path) -> Path:
        """Write calibrator.json into `model_dir`, beside model.keras and state.json."""
        path = Path(model_dir) / CALIBRATOR_FILE
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))
        return path


def fit_platt(y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str]) -> Calibrator:
    """Fit per-label Platt scaling on VALIDATION truth (1/0/NaN) and probabilities (N × L).

    Each label's known entries are fitted by unpenalised logistic regression of the truth on
    logit(probability). Labels without both classes, or whose slope comes out <= 0, keep their
    probabilities (listed in `identity`).
    """
    from sklearn.linear_model import LogisticRegression

    y_true, y_prob = check_arrays(y_true, y_prob, labels)
    calibrator = Calibrator(labels=list(labels), slope={}, intercept={})
    for column, name in enumerate(labels):
        truth, scores = known_values(y_true, y_prob, column)
        slope, intercept = 1.0, 0.0
        if has_both_classes(truth):
            model = LogisticRegression(C=1e6, max_iter=1000)
            model.fit(_logit(scores).reshape(-1, 1), truth.astype(int))
            slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
        if not has_both_classes(truth) or slope <= 0:
            calibrator.identity.append(name)
            slope, intercept = 1.0, 0.0
        calibrator.slope[name], calibrator.intercept[name] = slope, intercept
    return calibrator


def read_calibrator(model_dir: Path) -> Calibrator | None:
    """The calibrator.json in `model_dir`, or None when there is none (a trial checkpoint)."""
    path = Path(model_dir) / CALIBRATOR_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return Calibrator(
            labels=list(raw["labels"]),
            slope={k: float(v) for k, v in raw["slope"].items()},
            intercept={k: float(v) for k, v in raw["intercept"].items()},
            identity=list(raw.get("identity", [])),
            method=raw.get("method", "platt"),
            fitted_on=raw.get("fitted_on", "validation"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise EvaluationError(
            f"{path} is not a calibrator ChestXpert wrote ({err}); restore it from the model's "
            "published version, or delete it to use uncalibrated probabilities"
        ) from None


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))
