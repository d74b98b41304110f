"""`python -m benchmarks.child MODULE:FUNCTION SPEC_JSON`: call a benchmark's child function in
this fresh interpreter and print its result as one JSON line (see `benchmarks.runner`)."""

from __future__ import annotations

import importlib
import json
import sys

from benchmarks.runner import RESULT_PREFIX


def main(argv: list[str]) -> None:
    if len(argv) != 2 or ":" not in argv[0]:
        raise SystemExit("usage: python -m benchmarks.child MODULE:FUNCTION SPEC_JSON")
    module_name, function_name = argv[0].split(":", 1)
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(json.loads(argv[1]))
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
