"""Conventions every `chestxpert` subcommand shares: the global options work before or after
the subcommand, every help text shows its default, every subcommand has a description.

`finish_tree` applies them to the whole command tree once the parts have added their commands.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

# Exit codes (README "Exit codes"): argparse itself exits with EXIT_USAGE.
EXIT_OK = 0
EXIT_FAILED = 1  # the work ran and failed (a sweep with no finished trial, an unhealthy stack)
EXIT_USAGE = 2  # the command line does not parse
EXIT_USER_ERROR = 3  # bad input or a refused action; the one-line message says what to do

# Service options a subcommand takes where they mean something; given before the subcommand,
# they reach it only if it takes them.
SERVICE_OPTIONS = {
    "address": "--address",
    "storage": "--storage",
    "mlflow_uri": "--mlflow-uri",
}


class HelpFormatter(argparse.HelpFormatter):
    """Appends `(default: …)` to an option's help unless the help already says its default, or
    there is none to say (a flag off, an option that falls back to the environment)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default in (None, False, [], argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


def _global_options(parser: argparse.ArgumentParser, default) -> None:
    """--workspace and --verbose; on subcommands with `default=SUPPRESS`, so a value given after
    the subcommand wins and a value given before it is not overwritten by the sub-level default."""
    parser.add_argument(
        "--workspace",
        default=default if default is argparse.SUPPRESS else os.environ.get("CHESTXPERT_WORKSPACE"),
        help="runtime state folder (default: $CHESTXPERT_WORKSPACE or ./.chestxpert)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="keep TensorFlow's, absl's and CUDA's start-up lines (hidden by default)",
    )


def add_top_level_options(parser: argparse.ArgumentParser) -> None:
    """The options `chestxpert` takes before its subcommand."""
    _global_options(parser, None)
    for dest, flag in SERVICE_OPTIONS.items():
        parser.add_argument(
            flag,
            dest=dest,
            default=None,
            help=f"for the subcommands that take {flag}: the same as giving it after them",
        )


def subcommand_parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every subcommand parser under `parser`: (its words, e.g. ("sweep", "run"), the parser,
    the one-line help it was added with)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name)
                yield from subcommand_parsers(sub, (*path, name))


def is_leaf(parser: argparse.ArgumentParser) -> bool:
    return not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def finish_tree(top: argparse.ArgumentParser) -> None:
    """Give every subcommand the global options, the help formatter, and its one-line help as
    its description when it has none; record which service options each command takes."""
    top.formatter_class = HelpFormatter
    for words, parser, summary in subcommand_parsers(top):
        parser.formatter_class = HelpFormatter
        if not parser.description and summary:
            parser.description = summary[0].upper() + summary[1:] + "."
        _global_options(parser, argparse.SUPPRESS)
        if not is_leaf(parser):
            continue
        takes = set()
        for action in parser._actions:
            if action.dest in SERVICE_OPTIONS and action.option_strings:
                # Unset after the subcommand, the value given before it (or None) stands.
                action.default = argparse.SUPPRESS
                takes.add(action.dest)
        parser.set_defaults(_service_options=frozenset(takes), _command_words=" ".join(words))


def refuse_misplaced(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A service option given before a subcommand that does not take it is a usage error, not
    something silently ignored."""
    takes = getattr(args, "_service_options", frozenset(SERVICE_OPTIONS))
    for dest, flag in SERVICE_OPTIONS.items():
        if getattr(args, dest, None) is not None and dest not in takes:
            parser.error(f"{flag} does not apply to `chestxpert {args._command_words}`")
