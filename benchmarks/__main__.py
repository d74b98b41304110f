"""`python -m benchmarks [--smoke] [NAME ...]`: run every benchmark, or those whose name contains
one of the NAMEs, printing each one's description, results and ratios."""

from __future__ import annotations

import argparse

from benchmarks import BENCHMARKS


def description(module) -> str:
    """The first paragraph of a benchmark's docstring, on one line."""
    return " ".join((module.__doc__ or "").split("\n\n", 1)[0].split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"part of a name: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks that each runs, measures nothing"
    )
    args = parser.parse_args(argv)
    chosen = [
        name for name in BENCHMARKS if not args.names or any(word in name for word in args.names)
    ]
    if not chosen:
        parser.error(f"no benchmark name contains {' or '.join(args.names)}")
    for name in chosen:
        module = BENCHMARKS[name]
        print(f"{name}{' [smoke]' if args.smoke else ''}: {description(module)}", flush=True)
        module.run(smoke=args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
