"""What the test_spec_* files share: a short valid spec to build on and the problems
parse_spec reports for a spec text."""

from __future__ import annotations

import textwrap

import pytest

from chestxpert.sweeps.spec import SpecError, parse_spec

# Four lines, so a `space:` block appended to it starts on line 5 and its first key on line 6.
HEADER = """\
name: test-sweep
dataset: s3://bucket/prepared/nih-64
trial:
  epochs: 4
"""


def problems_of(text: str, **overrides) -> list[str]:
    """The problems parse_spec reports for `text` (read as sweep.yaml), one string each."""
    with pytest.raises(SpecError) as caught:
        parse_spec(textwrap.dedent(text), source="sweep.yaml", overrides=overrides or None)
    return caught.value.problems


def only_problem(text: str) -> str:
    """The one problem parse_spec reports for `text`; fails if there are more or none."""
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]
