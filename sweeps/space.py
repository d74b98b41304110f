"""Search-space dimensions of a sweep spec: their YAML models, their legality for the trial
setting they search, and the Ray Tune sampling objects they become.

A dimension is legal when every value it can draw is a value `TrialConfig` accepts for its key,
so an impossible range fails when the spec is read, not hours later inside a trial.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chestxpert.trainable.config import ConfigError, TrialConfig

DIMENSION_TYPES = ("loguniform", "uniform", "quniform", "randint", "choice")

# Each trial setting's value type, from its default: str, int, float or bool.
SETTING_KINDS: dict[str, type] = {f.name: type(f.default) for f in fields(TrialConfig)}

# Trial settings a sweep fixes for every trial, with the reason a user reads.
NOT_SEARCHABLE = {
    "dataset": "dataset is the sweep's prepared dataset; set it with the top-level `dataset` key",
    "dataset_generation": "dataset_generation is chosen by the sweep: the dataset's version "
    "when the sweep starts",
    "epochs": "epochs is every trial's training budget (ASHA's max_t), not a search dimension; "
    "set trial.epochs and let the scheduler stop weak trials early",
    "shard_cache": "shard_cache is where each node keeps the dataset's shards, not a search "
    "dimension; set trial.shard_cache",
    "shard_cache_gb": "shard_cache_gb caps each node's shard cache, not a search dimension; "
    "set trial.shard_cache_gb",
}

Scalar = str | bool | int | float | None


class _Dimension(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class LogUniform(_Dimension):
    """Floats spread evenly in log space over [low, high], low > 0: for rates spanning decades."""

    type: Literal["loguniform"]
    low: float
    high: float


class Uniform(_Dimension):
    """Floats spread evenly over [low, high]."""

    type: Literal["uniform"]
    low: float
    high: float


class QUniform(_Dimension):
    """Multiples of q spread evenly over [low, high], both ends included; low and high are
    multiples of q so Optuna and random search draw from the same grid."""

    type: Literal["quniform"]
    low: float
    high: float
    q: float


class RandInt(_Dimension):
    """Whole numbers in [low, high): high is exclusive, as in `ray.tune.randint`."""

    type: Literal["randint"]
    low: int
    high: int


class Choice(_Dimension):
    """One of the listed values, each drawn with equal probability."""

    type: Literal["choice"]
    values: list[Scalar]


Dimension = Annotated[
    LogUniform | Uniform | QUniform | RandInt | Choice, Field(discriminator="type")
]
DIMENSION_MODELS: dict[str, type[_Dimension]] = {
    "loguniform": LogUniform,
    "uniform": Uniform,
    "quniform": QUniform,
    "randint": RandInt,
    "choice": Choice,
}


def did_you_mean(word: Any, known: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the known name closest to `word` (or the one name it
    abbreviates, e.g. `grace` for `grace_period`), or "" when none is close."""
    known = list(known)
    close = difflib.get_close_matches(str(word), known, n=1)
    if not close and len(str(word)) >= 3:
        close = [name for name in known if name.startswith(str(word))][:2]
        close = close if len(close) == 1 else []
    return f"; did you mean {close[0]!r}?" if close else ""


def backbone_problem(name: Any, where: str) -> str | None:
    """Why `name` is not a registered backbone (with the closest registered name), or None.

    Imports the backbone registry (and so Keras) only when a spec names a backbone.
    """
    from chestxpert.trainable.backbones import BACKBONES

    if name in BACKBONES:
        return None
    hint = did_you_mean(str(name).lower(), BACKBONES)
    return f"{where}: backbone {name!r} is not registered{hint} (known: {', '.join(BACKBONES)})"


def dimension_problems(key: str, dim: _Dimension) -> list[str]:
    """Everything wrong with searching trial setting `key` over `dim`, one message each.

    Checks that `key` is a searchable trial setting, that the dimension type fits the
    setting's value type (text and true/false settings take `choice`; whole-number settings
    take `randint`, whole-number `quniform` or `choice`), that ranges are ordered and
    non-empty, and that the values at both ends (every value, for `choice`) pass
    `TrialConfig.from_dict` — e.g. `dropout` high must be < 1 and `learning_rate` low > 0.
    """
    where = f"space.{key}"
    if key not in SETTING_KINDS:
        hint = did_you_mean(key, SETTING_KINDS) or f"; trial settings: {', '.join(SETTING_KINDS)}"
        return [f"space key {key!r} is not a trial setting{hint}"]
    if key in NOT_SEARCHABLE:
        return [f"{where}: {NOT_SEARCHABLE[key]}"]
    if isinstance(dim, Choice):
        return _choice_problems(key, dim)
    kind = SETTING_KINDS[key]
    if kind in (str, bool):
        what = "a text" if kind is str else "a true/false"
        return [
            f"{where}: {key} is {what} setting, so it is searched with "
            f"{{type: choice, values: [...]}}, not {dim.type}"
        ]
    if kind is int and isinstance(dim, LogUniform | Uniform):
        return [
            f"{where}: {key} is a whole number; search it with randint, choice or quniform "
            f"with a whole q, not {dim.type}"
        ]
    problems = []
    if dim.low >= dim.high:
        exclusive = " (high is exclusive)" if isinstance(dim, RandInt) else ""
        problems.append(f"{where}: low must be < high{exclusive} (got {dim.low} >= {dim.high})")
    if isinstance(dim, LogUniform) and dim.low <= 0:
        problems.append(
            f"{where}: loguniform needs low > 0 (got {dim.low}); "
            "use uniform or quniform to include 0"
        )
    if isinstance(dim, QUniform) and (grid_problem := _grid_problem(key, dim, kind)):
        problems.append(grid_problem)
    if problems:  # one message per mistake: the ends are checked once the range is sound
        return problems
    largest = ("high - 1", dim.high - 1) if isinstance(dim, RandInt) else ("high", dim.high)
    for label, value in (("low", dim.low), largest):
        try:
            TrialConfig.from_dict({key: value}, where=f"{where} {label}")
        except ConfigError as err:
            problems.append(str(err))
    return problems


def _grid_problem(key: str, dim: QUniform, kind: type) -> str | None:
    where = f"space.{key}"
    if dim.q <= 0:
        return f"{where}: q must be > 0 (got {dim.q})"
    if kind is int and not all(float(v).is_integer() for v in (dim.low, dim.high, dim.q)):
        return (
            f"{where}: {key} is a whole number, so low, high and q must be whole numbers "
            f"(got low {dim.low:g}, high {dim.high:g}, q {dim.q:g})"
        )
    off_grid = [
        name for name, value in (("low", dim.low), ("high", dim.high)) if not _on_grid(value, dim.q)
    ]
    if off_grid:
        return (
            f"{where}: {' and '.join(off_grid)} must be "
            f"{'multiples' if len(off_grid) == 2 else 'a multiple'} of q {dim.q:g} "
            f"(got low {dim.low:g}, high {dim.high:g})"
        )
    return None


def _on_grid(value: float, q: float) -> bool:
    steps = value / q
    return math.isclose(steps, round(steps), rel_tol=1e-9, abs_tol=1e-9)


def _choice_problems(key: str, dim: Choice) -> list[str]:
    where = f"space.{key}"
    if not dim.values:
        return [f"{where}: choice needs at least one value"]
    problems = []
    seen: set[tuple[type, Any]] = set()
    for value in dim.values:
        if (type(value), value) in seen:
            problems.append(f"{where}: value {value!r} is listed twice")
            continue
        seen.add((type(value), value))
        try:
            TrialConfig.from_dict({key: value}, where=where)
        except ConfigError as err:
            problems.append(str(err))
            continue
        if key == "backbone":
            problem = backbone_problem(value, where)
            if problem:
                problems.append(problem)
    return problems


def value_problem(dim: _Dimension, value: Any) -> str | None:
    """Why `value` is not one `dim` can draw (outside the range, off the grid, not a choice),
    or None."""
    if isinstance(dim, Choice):
        # 16 and 16.0 are the same batch size, but true is not 1
        if any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in dim.values):
            return None
        return f"{value!r} is not one of the choices {dim.values}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{value!r} is not a number"
    if isinstance(dim, RandInt):
        if not float(value).is_integer():
            return f"{value!r} is not a whole number (randint draws whole numbers)"
        if not dim.low <= value < dim.high:
            return f"{value!r} is outside [{dim.low}, {dim.high}) (randint's high is exclusive)"
        return None
    if not dim.low <= value <= dim.high:
        return f"{value!r} is outside [{dim.low}, {dim.high}]"
    if isinstance(dim, QUniform) and dim.q > 0 and not _on_grid(value, dim.q):
        return f"{value!r} is not a multiple of q {dim.q}"
    return None


def to_tune(dim: _Dimension) -> Any:
    """The Ray Tune sampling object for a dimension: `tune.loguniform`, `tune.uniform`,
    `tune.quniform`, `tune.randint` (high exclusive) or `tune.choice`.

    OptunaSearch translates each into the matching Optuna distribution.
    """
    from ray import tune

    if isinstance(dim, LogUniform):
        return tune.loguniform(dim.low, dim.high)
    if isinstance(dim, Uniform):
        return tune.uniform(dim.low, dim.high)
    if isinstance(dim, QUniform):
        return tune.quniform(dim.low, dim.high, dim.q)
    if isinstance(dim, RandInt):
        return tune.randint(dim.low, dim.high)
    if isinstance(dim, Choice):
        return tune.choice(list(dim.values))
    raise TypeError(f"not a search dimension: {dim!r}")
