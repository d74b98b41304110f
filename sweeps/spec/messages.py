"""How a sweep spec's problems are worded: each pydantic error as a sentence a user can act on,
at its key path in the YAML, and the SpecError that lists them in line order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from pydantic import ValidationError

from chestxpert.cluster.errors import UserError
from chestxpert.sweeps.space import DIMENSION_TYPES, did_you_mean

MAX_REPORTED = 10
Problem = tuple[tuple[Any, ...], str]  # (key path in the YAML, message)
# The keys allowed in the mapping at a pydantic error location (for suggestions).
KnownKeys = Callable[[tuple[Any, ...]], list[str]]


class SpecError(UserError, ValueError):
    """A sweep spec that cannot run: one line per problem, each with file, line and what to do.

    `problems` holds every problem found (the message shows the first MAX_REPORTED).
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class Problems(ValueError):
    """Problems found by one validator, each at its own key path so each gets its own line."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


def raise_if_any(problems: list[Problem]) -> None:
    """Raise `Problems` for a validator that found any; pydantic carries them to the report."""
    if problems:
        raise Problems(problems)


def fail_at(path: tuple[Any, ...], message: str) -> NoReturn:
    """Raise one problem at key path `path` from inside a validator."""
    raise Problems([(path, message)])


def _yaml_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A pydantic error location as a key path in the YAML: drops the dimension type that
    pydantic inserts after `space.<key>`."""
    if len(loc) >= 3 and loc[0] == "space" and loc[2] in DIMENSION_TYPES:
        return loc[:2] + loc[3:]
    return loc


def _dotted(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_REQUIRED_HINTS = {
    "name": " (the sweep's name, e.g. `name: nih-densenet121-224`)",
    "dataset": " (a prepared dataset: the folder or s3:// URI `chestxpert data prepare` wrote)",
}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(error: Mapping[str, Any], known_keys: KnownKeys) -> str:
    """One pydantic error as a sentence a user can act on."""
    loc = tuple(error["loc"])
    path = _yaml_path(loc)
    dotted, section = _dotted(path), _dotted(path[:-1])
    inside = f" in {section}" if section else ""
    kind, ctx, given = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden":
        known = known_keys(loc[:-1])
        hint = did_you_mean(path[-1], known) or (f"; expected {', '.join(known)}" if known else "")
        return f"unknown key {path[-1]!r}{inside}{hint}"
    if kind == "missing":
        if len(loc) == 4 and loc[0] == "space":
            return f"{section}: {loc[2]} needs {path[-1]!r}"
        hint = _REQUIRED_HINTS.get(path[-1], "") if not section else ""
        return f"missing required key {path[-1]!r}{inside}{hint}"
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        hint = did_you_mean(given, expected)
        return f"{dotted} {given!r} is not one of {', '.join(expected)}{hint}"
    if kind == "union_tag_invalid":
        hint = did_you_mean(ctx.get("tag"), DIMENSION_TYPES)
        return f"{dotted}: type {ctx.get('tag')!r} is not one of {', '.join(DIMENSION_TYPES)}{hint}"
    if kind == "union_tag_not_found":
        return (
            f"{dotted} needs a type, one of {', '.join(DIMENSION_TYPES)} "
            "(e.g. {type: loguniform, low: 1.0e-5, high: 1.0e-2})"
        )
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{dotted} must be a mapping of key: value, got {_shown(given)}"
    if kind == "value_error":
        cause = ctx.get("error") or error["msg"]
        return f"{dotted}: {cause}" if dotted else str(cause)
    message = error["msg"]
    if message.startswith("Input should be"):
        return f"{dotted} must be{message.removeprefix('Input should be')} (got {_shown(given)})"
    return f"{dotted}: {message} (got {_shown(given)})"


def problems_of(
    err: ValidationError, known_keys: KnownKeys, prefix: tuple[Any, ...] = ()
) -> list[Problem]:
    """Every problem in a pydantic error, at its YAML path; `prefix` is where the validated
    value sits in the spec."""
    problems: list[Problem] = []
    for error in err.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, Problems):
            problems.extend(cause.problems)
        else:
            error = {**error, "loc": prefix + tuple(error["loc"])}
            problems.append((_yaml_path(error["loc"]), describe(error, known_keys)))
    return problems


def spec_error(located: list[tuple[int, str]]) -> SpecError:
    """The SpecError for (line, message) pairs (line 0: no line): sorted by line, each message
    once, the first MAX_REPORTED shown and the rest counted."""
    ordered = list(dict.fromkeys(message for _, message in sorted(located, key=lambda x: x[0])))
    shown = ordered[:MAX_REPORTED]
    if len(ordered) > MAX_REPORTED:
        shown.append(f"... and {len(ordered) - MAX_REPORTED} more; fix these first")
    return SpecError("\n".join(shown), problems=ordered)
