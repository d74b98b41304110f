"""Reading a sweep spec: YAML text, a file or an already-parsed mapping validated into a
SweepSpec, with every problem placed at its file and line (or named as an override).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from chestxpert.sweeps.spec.messages import Problem, SpecError, problems_of, spec_error
from chestxpert.sweeps.spec.model import SweepSpec, known_keys
from chestxpert.sweeps.spec.yaml_lines import Lines, compose, line_of

# Where to point when a problem's own key is not in the file (its default was used).
_FALLBACK_PATHS = {("mode",): ("metric",), ("scheduler", "grace_period"): ("trial", "epochs")}


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Set `section.key` → value overrides into the parsed spec; return the overridden paths."""
    paths = []
    for dotted_key, value in overrides.items():
        path = tuple(str(dotted_key).split("."))
        target = data
        for depth, part in enumerate(path[:-1]):
            if target.get(part) is None:
                target[part] = {}
            if not isinstance(target[part], dict):
                where = ".".join(path[: depth + 1])
                raise SpecError(
                    f"override {dotted_key!r}: {where} is {target[part]!r}, not a section"
                )
            target = target[part]
        target[path[-1]] = value
        paths.append(path)
    return paths


def parse_spec(
    text: str, source: str = "<spec>", overrides: Mapping[str, Any] | None = None
) -> SweepSpec:
    """Validate YAML text as a sweep spec; `source` names it in messages (the file name).

    `overrides` maps dotted keys (`name`, `trial.epochs`, `search.num_samples`) to plain
    values that replace the file's. Raises SpecError listing every problem found, sorted by
    line, one per line as `<source> line N: <what is wrong>; <what to do>` (the first
    MAX_REPORTED of them; all are in `SpecError.problems`).
    """
    data, lines, duplicates = compose(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: expected a mapping of spec keys (name, dataset, trial, space, ...), "
            f"got {type(data).__name__}"
        )
    overridden = _apply_overrides(data, overrides or {})
    return _validate(data, source, lines, duplicates, overridden)


def spec_from_dict(data: Mapping[str, Any], source: str = "<spec>") -> SweepSpec:
    """Validate an already-parsed spec (e.g. the copy a sweep records in its storage),
    raising SpecError with the same messages as `parse_spec`, without line numbers."""
    return _validate(dict(data), source, {}, [], [])


def _validate(
    data: dict[str, Any],
    source: str,
    lines: Lines,
    duplicates: list[tuple[int, str]],
    overridden: list[tuple[str, ...]],
) -> SweepSpec:
    try:
        spec = SweepSpec.model_validate(data)
        problems: list[Problem] = []
    except ValidationError as err:
        problems = problems_of(err, known_keys)
    if not problems and not duplicates:
        return spec
    located = list(duplicates)
    for path, message in problems:
        override = next((o for o in overridden if tuple(map(str, path[: len(o)])) == o), None)
        line = None if override else line_of(path, lines)
        if not override and line is None and path in _FALLBACK_PATHS:
            line = line_of(_FALLBACK_PATHS[path], lines)
        if override:
            located.append((0, f"{source} (override {'.'.join(override)}): {message}"))
        elif line:
            located.append((line, f"{source} line {line}: {message}"))
        else:
            located.append((0, f"{source}: {message}"))
    raise spec_error(located)


def load_spec(path: Path | str, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep spec file; see `parse_spec` for `overrides` and errors."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; example specs are in sweeps/examples/") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder; give the sweep spec's YAML file") from None
    return parse_spec(text, source=str(path), overrides=overrides)
