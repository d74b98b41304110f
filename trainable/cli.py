"""`chestxpert train`: train one configuration outside a sweep."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    from chestxpert.cluster.endpoints import apply_client_environment, resolve
    from chestxpert.trainable.local import load_config_file, train_local

    config = load_config_file(Path(args.config), args.set)
    endpoints = resolve(mlflow_tracking_uri=args.mlflow_uri, workspace=args.workspace)
    apply_client_environment(endpoints)
    out = Path(args.out or (endpoints.workspace / "train" / Path(args.config).stem))
    print(
        f"training {config.backbone} on {config.dataset}; checkpoints in {out}; "
        f"MLflow {endpoints.mlflow_tracking_uri}"
    )
    metrics = train_local(config, out, endpoints, args.experiment, resume=args.resume)
    if "val_auc_macro" in metrics:
        print(
            f"done: val_auc_macro {metrics['val_auc_macro']:.4f} "
            f"after {int(metrics['epoch'])} epochs"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `chestxpert train` to the command tree."""
    parser = sub.add_parser(
        "train", help="train one configuration (YAML of trial settings) outside a sweep"
    )
    parser.add_argument("config", help="YAML file: a flat mapping of trial settings (see README)")
    parser.add_argument(
        "--out", default=None, help="checkpoint folder (default <workspace>/train/<config name>)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    parser.add_argument(
        "--mlflow-uri", default=None, help="MLflow tracking URI (else MLFLOW_TRACKING_URI, …)"
    )
    parser.add_argument("--experiment", default="chestxpert-train", help="MLflow experiment name")
    parser.set_defaults(func=cmd_train)
