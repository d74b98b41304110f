"""The sweep spec: one YAML file validated into a typed model before anything starts.

Every problem is reported at once, each with its file, line and a suggestion; `param_space()`
turns a valid spec into the fixed trial settings plus Ray Tune sampling objects. The parts:
`model` (the sections and their checks), `yaml_lines` (YAML read with the line of every
key), `messages` (how each problem is worded) and `load` (text or file to a SweepSpec).
"""

from chestxpert.sweeps.spec.load import load_spec, parse_spec, spec_from_dict
from chestxpert.sweeps.spec.messages import MAX_REPORTED, SpecError
from chestxpert.sweeps.spec.model import (
    MlflowSettings,
    Resources,
    Scheduler,
    Search,
    SweepSpec,
)

__all__ = [
    "MAX_REPORTED",
    "MlflowSettings",
    "Resources",
    "Scheduler",
    "Search",
    "SpecError",
    "SweepSpec",
    "load_spec",
    "parse_spec",
    "spec_from_dict",
]
