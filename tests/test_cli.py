"""The command line's own contract, checked in-process with no cluster: global options before or
after the subcommand, help on every subcommand and option, exit codes, `--json` schemas."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from chestxpert.cli import build_parser, main
from chestxpert.cli_options import (
    EXIT_USAGE,
    EXIT_USER_ERROR,
    HelpFormatter,
    subcommand_parsers,
)

PARSER = build_parser()
COMMANDS = list(subcommand_parsers(PARSER))


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
    ]


@pytest.mark.parametrize(
    "words, parser",
    [(w, p) for w, p, _ in COMMANDS],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else "",
)
def test_every_subcommand_has_a_description_and_every_argument_help(
    words: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    assert parser.description and len(parser.description) > 10, f"`{' '.join(words)}` has none"
    for action in _options(parser):
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"`{' '.join(words)}` {name} has no help"
    # Where an option has a default worth saying, its rendered help says it.
    text = parser.format_help()
    assert parser.formatter_class is HelpFormatter
    for action in _options(parser):
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            shown = HelpFormatter("x")._get_help_string(action)
            assert "default" in shown, f"`{' '.join(words)}` {action.option_strings[0]}"
    assert "usage: chestxpert " + " ".join(words) in " ".join(text.split())


def test_the_tree_covers_every_command() -> None:
    names = {" ".join(words) for words, _, _ in COMMANDS}
    assert {"status", "sweep run", "sweep status", "sweep list", "final", "predict"} <= names


@pytest.mark.parametrize(
    "argv",
    [
        ["--workspace", "WS", "sweep", "status", "x"],
        ["sweep", "--workspace", "WS", "status", "x"],
        ["sweep", "status", "x", "--workspace", "WS"],
        ["--workspace", "other", "sweep", "status", "--workspace", "WS", "x"],
    ],
)
def test_workspace_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = PARSER.parse_args(argv)
    assert args.workspace == "WS" and args.name == "x"


@pytest.mark.parametrize("flag, dest", [("--storage", "storage"), ("--mlflow-uri", "mlflow_uri")])
def test_service_options_before_or_after_the_subcommand(flag: str, dest: str) -> None:
    before = PARSER.parse_args([flag, "V", "final", "demo"])
    after = PARSER.parse_args(["final", "demo", flag, "V"])
    neither = PARSER.parse_args(["final", "demo"])
    assert getattr(before, dest) == getattr(after, dest) == "V"
    assert getattr(neither, dest) is None


def test_a_service_option_a_command_does_not_take_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--mlflow-uri", "http://x", "sweep", "list"])
    assert exit_info.value.code == EXIT_USAGE
    assert "--mlflow-uri does not apply to `chestxpert sweep list`" in capsys.readouterr().err


def test_status_with_its_workspace_after_it(tmp_path: Path, capsys) -> None:
    ws = tmp_path / "ws"
    assert main(["status", "--workspace", str(ws)]) == 0
    assert f"no services recorded in {ws}" in capsys.readouterr().out


def test_exit_codes_usage_2_user_error_3(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "run"])  # the spec is missing
    assert exit_info.value.code == EXIT_USAGE == 2
    assert "the following arguments are required: spec" in capsys.readouterr().err
    missing = tmp_path / "missing.yaml"
    assert main(["--workspace", str(tmp_path / "ws"), "sweep", "run", str(missing)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
    assert EXIT_USER_ERROR == 3


def test_verbose_is_global(tmp_path: Path) -> None:
    assert PARSER.parse_args(["--verbose", "status"]).verbose
    assert PARSER.parse_args(["status", "--verbose"]).verbose
    assert not PARSER.parse_args(["status"]).verbose


def _json_out(capsys, argv: list[str]) -> dict | list:
    code = main(argv)
    out = capsys.readouterr().out
    assert code in (0, 1), out
    return json.loads(out)


def test_status_json(tmp_path: Path, capsys) -> None:
    data = _json_out(capsys, ["status", "--workspace", str(tmp_path / "ws"), "--json"])
    assert set(data) == {"workspace", "services", "storage", "mlflow", "ray_token_path"}
    assert data["services"] == [] and set(data["storage"]) == {"uri", "from"}


def test_sweep_list_json_on_an_empty_storage(tmp_path: Path, capsys) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    argv = ["sweep", "list", "--json", "--storage", str(storage), "--workspace", str(tmp_path)]
    data = _json_out(capsys, argv)
    assert data == {"storage": storage.as_uri(), "sweeps": []}
