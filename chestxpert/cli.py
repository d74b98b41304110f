"""The `chestxpert` console script: one entry point, one subcommand per job.

Each package contributes its subcommands; user errors end as one readable line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from chestxpert import __version__
from chestxpert.cli_options import (
    EXIT_USER_ERROR,
    add_top_level_options,
    finish_tree,
    refuse_misplaced,
)
from chestxpert.cluster.errors import UserError
from chestxpert.cluster.quiet import VERBOSE_ENV, quiet_environment
from chestxpert.cluster.workspace import workspace_path
from chestxpert.demo import DEMO_IMAGE_SIZE, DEMO_IMAGES


def _stack_options(args: argparse.Namespace):
    from chestxpert.cluster.stack import StackOptions

    return StackOptions(
        workspace=workspace_path(args.workspace),
        ray_port=args.ray_port,
        dashboard_port=args.dashboard_port,
        mlflow_port=args.mlflow_port,
        s3_port=args.s3_port,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        s3=args.s3,
        storage=args.storage,
        host=args.host,
    )


def cmd_up(args: argparse.Namespace) -> int:
    from chestxpert.cluster.stack import up

    up(_stack_options(args))
    return 0


def status_data(ws: Path, rows: list[dict], endpoints) -> dict:
    """`chestxpert status --json`: the schema in the README's JSON table."""
    return {
        "workspace": str(ws),
        "services": rows,
        "storage": {"uri": endpoints.storage_uri, "from": endpoints.sources["storage"]},
        "mlflow": {
            "uri": endpoints.mlflow_tracking_uri,
            "from": endpoints.sources["mlflow_tracking_uri"],
        },
        "ray_token_path": endpoints.ray_auth_token_path,
    }


def cmd_status(args: argparse.Namespace) -> int:
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.cluster.stack import health

    ws = workspace_path(args.workspace)
    rows = health(ws)
    endpoints = resolve(workspace=ws)
    code = 0 if all(row["healthy"] for row in rows) else 1
    if args.json:
        print(json.dumps(status_data(ws, rows, endpoints), indent=2))
        return code
    if not rows:
        print(f"no services recorded in {ws}; start them with `chestxpert up`")
    for row in rows:
        state = (
            "healthy"
            if row["healthy"]
            else ("running, not answering" if row["alive"] else "stopped")
        )
        print(
            f"{row['service']:7s} {state:22s} {row['url']:28s} pid {row['pid']:<8d} {row['detail']}"
        )
    print(f"storage {endpoints.storage_uri}  (from {endpoints.sources['storage']})")
    print(
        f"mlflow  {endpoints.mlflow_tracking_uri}  "
        f"(from {endpoints.sources['mlflow_tracking_uri']})"
    )
    if endpoints.ray_auth_token_path:
        print(
            "ray token: export RAY_AUTH_MODE=token "
            f"RAY_AUTH_TOKEN_PATH={endpoints.ray_auth_token_path}"
        )
    if any(row["service"] == "ray" for row in rows):
        print("dashboard login: `chestxpert dashboard` prints its URL and token (--open)")
    return code


def cmd_down(args: argparse.Namespace) -> int:
    from chestxpert.cluster.stack import down

    ws = workspace_path(args.workspace)
    stopped = down(ws)
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the main job end to end on the embedded default."""
    from chestxpert.demo import run_demo

    summary = run_demo(
        _stack_options(args), args.images, args.samples, args.epochs, args.stop, args.image_size
    )
    return 0 if summary.get("best_trial_id") else 1


def _add_stack_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port (default 6379)")
    parser.add_argument(
        "--dashboard-port", type=int, default=8265, help="Ray dashboard port (default 8265)"
    )
    parser.add_argument(
        "--mlflow-port", type=int, default=5000, help="MLflow server port (default 5000)"
    )
    parser.add_argument(
        "--s3-port", type=int, default=9000, help="S3 endpoint port with --s3 (default 9000)"
    )
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)"
    )
    parser.add_argument(
        "--num-gpus", type=int, default=0, help="GPUs Ray advertises (logical; default 0)"
    )
    parser.add_argument(
        "--s3",
        action="store_true",
        help="also start an in-memory S3 endpoint (moto) and store there",
    )
    parser.add_argument(
        "--storage", default=None, help="storage URI (folder or s3://bucket/prefix)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface the services listen on (default 127.0.0.1)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; `chestxpert COMMAND --help` documents each subcommand."""
    parser = argparse.ArgumentParser(
        prog="chestxpert",
        description="Hyperparameter sweeps for multi-label chest X-ray classification on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"chestxpert {__version__}")
    add_top_level_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up_parser = sub.add_parser("up", help="start Ray, MLflow (and --s3) on this machine")
    _add_stack_flags(up_parser)
    up_parser.set_defaults(func=cmd_up)

    status_parser = sub.add_parser("status", help="show each local service, its URL and health")
    status_parser.add_argument(
        "--json", action="store_true", help="print the services and endpoints as JSON (README)"
    )
    status_parser.set_defaults(func=cmd_status)

    down_parser = sub.add_parser("down", help="stop exactly the services `up` started")
    down_parser.set_defaults(func=cmd_down)

    demo_parser = sub.add_parser("demo", help="run the main job end to end on the embedded default")
    _add_stack_flags(demo_parser)
    demo_parser.add_argument(
        "--images", type=int, default=DEMO_IMAGES, help=f"synthetic images (default {DEMO_IMAGES})"
    )
    demo_parser.add_argument("--samples", type=int, default=4, help="sweep trials (default 4)")
    demo_parser.add_argument(
        "--epochs", type=int, default=3, help="max epochs per trial (default 3)"
    )
    demo_parser.add_argument(
        "--image-size",
        type=int,
        default=DEMO_IMAGE_SIZE,
        help=f"prepared image side in pixels (default {DEMO_IMAGE_SIZE})",
    )
    demo_parser.add_argument(
        "--stop",
        action="store_true",
        help="at the end, stop the services this demo started (a stack already up stays up)",
    )
    demo_parser.set_defaults(func=cmd_demo)

    from chestxpert.dashboard import register as register_dashboard

    register_dashboard(sub)
    from chestxpert.dataset_gc import register as register_dataset_gc
    from chestxpert.datasets.cli import register as register_datasets

    register_dataset_gc(register_datasets(sub))
    from chestxpert.trainable.cli import register as register_trainable

    register_trainable(sub)
    from chestxpert.results.cli import register as register_results
    from chestxpert.results.cli import register_sweep_report
    from chestxpert.sweeps.cli import register as register_sweeps

    register_sweep_report(register_sweeps(sub))
    register_results(sub)
    finish_tree(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `chestxpert` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_misplaced(parser, args)
    from chestxpert.cluster.endpoints import prepare_ray_environment

    prepare_ray_environment(args.workspace)
    # TensorFlow's start-up chatter hides our output (chestxpert/__init__ filters the rest);
    # --verbose keeps it, here and in every process started from here.
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    for key, value in quiet_environment().items():
        os.environ.setdefault(key, value)
    if getattr(args, "sweep_command", None) in ("run", "resume") and not getattr(
        args, "dry_run", False
    ):
        # Which code runs matters on a cluster (a submitted job ships its own copy).
        print(f"chestxpert {__version__} ({Path(__file__).resolve().parent})", flush=True)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
