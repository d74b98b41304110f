"""The command line's own contract, checked in-process with no cluster: global options before or
after the subcommand, help on every subcommand and option, exit codes, `--json` schemas."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chestxpert.cli import build_parser, main
from chestxpert.cli_options import (
    EXIT_USAGE,
    EXIT_USER_ERROR,
    HelpFormatter,
    subcommand_parsers,
)
from chestxpert.cluster.quiet import VERBOSE_ENV

PARSER = build_parser()
COMMANDS = list(subcommand_parsers(PARSER))


pytestmark = pytest.mark.usefixtures("cli_env")


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


def _spec(tmp_path: Path, dataset: Path, trial: str) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: dry\ndataset: {dataset}\ntrial: {trial}\n"
        "space:\n"
        "  learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-2}\n"
        "  batch_size: {type: choice, values: [16, 32]}\n"
        "  dropout: {type: quniform, low: 0.0, high: 0.4, q: 0.1}\n"
    )
    return spec


def test_dry_run_checks_the_dataset_and_imports_neither_tensorflow_nor_ray(
    synthetic_dataset, tmp_path: Path
) -> None:
    """A separate interpreter, so what the dry run imports is all that is imported."""
    spec = _spec(tmp_path, synthetic_dataset.prepared, "{backbone: densenet121, epochs: 2}")
    argv = ["--workspace", str(tmp_path / "ws"), "sweep", "run", str(spec), "--dry-run"]
    script = (
        "import sys\nfrom chestxpert.cli import main\n"
        f"code = main({argv!r})\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'ray'})\n"
        "print('imported:', heavy)\nsys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "imported: []" in out
    assert "learning_rate: loguniform(1e-5, 0.01)" in out
    assert "batch_size: choice([16, 32])" in out and "dropout: quniform(0, 0.4, 0.1)" in out
    assert f"{synthetic_dataset.prepared.as_uri()}: 64 px, 14 labels" in out
    assert "<ray.tune" not in out and "object at 0x" not in out


def test_dry_run_refuses_a_missing_dataset_and_images_too_small(
    synthetic_dataset, tmp_path: Path, capsys
) -> None:
    ws = ["--workspace", str(tmp_path / "ws")]
    missing = _spec(tmp_path, tmp_path / "nowhere", "{backbone: densenet121}")
    assert main([*ws, "sweep", "run", str(missing), "--dry-run"]) == EXIT_USER_ERROR
    assert "has no manifest.json" in capsys.readouterr().err
    # The dataset's 64 px reach the trials (no image_size): below InceptionResNetV2's 75.
    small = _spec(tmp_path, synthetic_dataset.prepared, "{backbone: inceptionresnetv2}")
    assert main([*ws, "sweep", "run", str(small), "--dry-run"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "backbone inceptionresnetv2 needs at least 75 px" in err and "64 px" in err


def test_tensorflow_start_up_lines_are_dropped_and_other_lines_kept(capfd) -> None:
    from chestxpert.cluster.quiet import filtered_stderr

    with filtered_stderr():
        os.write(2, b"I0000 00:00:1.2 port.cc:153] oneDNN custom operations are on.\n")
        os.write(2, b"E0000 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called\n")
        os.write(2, b"a real problem\n")
    assert capfd.readouterr().err == "a real problem\n"


def test_verbose_keeps_tensorflow_start_up_as_it_is() -> None:
    """With CHESTXPERT_VERBOSE=1 (what --verbose sets, for workers too) TensorFlow imports
    unfiltered and with its own log level (the quiet path is checked on a real sweep and final
    in test_final)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env[VERBOSE_ENV] = "1"
    script = (
        "import os, chestxpert, tensorflow as tf\n"
        "print('filtered' if 'exec_module' in vars(tf.__spec__.loader) else 'as it is',"
        " os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["as", "it", "is", "None"]
