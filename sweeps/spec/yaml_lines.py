"""Reading a sweep spec's YAML with the line of every key, so each problem can name its line;
a duplicated key is reported rather than silently keeping the last, as PyYAML would.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from chestxpert.sweeps.spec.messages import SpecError

# Key path in the YAML (mapping keys and list indexes) -> its 1-based line.
Lines = dict[tuple[Any, ...], int]
# A real spec holds a few hundred values. Anchors and aliases nested in each other (the
# "billion laughs" document) expand exponentially: past this many values it is refused.
MAX_SPEC_VALUES = 10_000


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus `1e-5` read as a float (as YAML 1.2 does) rather than text."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def compose(text: str, source: str) -> tuple[Any, Lines, list[tuple[int, str]]]:
    """Parse YAML into plain data, a map from key path to its 1-based line, and a
    (line, message) per duplicated key (PyYAML would silently keep the last).

    Raises SpecError, at its line when PyYAML knows it, for text that is not valid YAML.
    """
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        _refuse_expansion_bombs(node, source)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source} line {mark.line + 1}" if mark else source
        raise SpecError(f"{where}: not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{source}: not valid YAML: {err}") from None
    finally:
        loader.dispose()
    lines: Lines = {}
    duplicates: list[tuple[int, str]] = []

    def walk(current: yaml.Node | None, path: tuple[Any, ...]) -> None:
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                key_path = path + (key_node.value,)
                line = key_node.start_mark.line + 1
                if key_path in lines:
                    message = (
                        f"{source} line {line}: duplicate key {key_node.value!r} (first on "
                        f"line {lines[key_path]}); keep one"
                    )
                    duplicates.append((line, message))
                    continue
                lines[key_path] = line
                walk(value_node, key_path)
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                lines[path + (index,)] = item.start_mark.line + 1
                walk(item, path + (index,))

    walk(node, ())
    return data, lines, duplicates


def _refuse_expansion_bombs(node: yaml.Node | None, source: str) -> None:
    """Count the values `node` expands to, aliases included, and stop early past the cap."""
    pending, seen = [node], 0
    while pending:
        current = pending.pop()
        seen += 1
        if seen > MAX_SPEC_VALUES:
            raise SpecError(
                f"{source}: the YAML expands to more than {MAX_SPEC_VALUES:,} values through "
                "anchors and aliases nested in each other; a sweep spec needs a few hundred at "
                "most: write the values out"
            )
        if isinstance(current, yaml.MappingNode):
            pending += [value for pair in current.value for value in pair]
        elif isinstance(current, yaml.SequenceNode):
            pending += current.value


def line_of(path: tuple[Any, ...], lines: Lines) -> int | None:
    """The line of the deepest key of `path` that is in the file (None: top level)."""
    found: tuple[Any, ...] = ()
    for part in path:
        if found + (part,) in lines:
            found += (part,)
        elif found + (str(part),) in lines:  # a YAML key that is not text, e.g. `1:`
            found += (str(part),)
        else:
            break
    return lines.get(found)
