"""`chestxpert final | pull-best | predict`: the final model, its report, and using it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _endpoints(args: argparse.Namespace):
    from chestxpert.cluster.endpoints import apply_client_environment, resolve

    endpoints = resolve(
        ray_address=getattr(args, "address", None),
        storage=getattr(args, "storage", None),
        mlflow_tracking_uri=getattr(args, "mlflow_uri", None),
        workspace=args.workspace,
    )
    apply_client_environment(endpoints)
    return endpoints


def cmd_final(args: argparse.Namespace) -> int:
    if args.finish:
        return _finish(args)
    from chestxpert.results.final import FinalOptions, run_final

    opts = FinalOptions(
        epochs=args.epochs,
        train_on=args.train_on,
        threshold_method="sensitivity" if args.target_sensitivity else "youden",
        target_sensitivity=args.target_sensitivity,
        operating_points=tuple(args.operating_point or ("spec=0.9",)),
        bootstrap=args.bootstrap,
        gradcam_layer=args.gradcam_layer,
        on_cluster=False if args.local else None,
        cpus=args.cpus,
        gpus=args.gpus,
        allow_dataset_change=args.allow_dataset_change,
        promote=args.promote,
    )
    metrics = run_final(args.name, opts, _endpoints(args))
    ev = metrics["evaluation"]
    print(
        f"test macro AUC {ev['auc_macro']:.4f} (micro {ev['auc_micro']:.4f}) "
        f"on {ev['counts']['images']} images"
    )
    print(f"report: {metrics['report_dir']}/report.html   storage: {metrics['storage_dir']}")
    print(f"registered: {metrics['mlflow']['uri']} (version {metrics['mlflow']['version']})")
    print(metrics["promotion"])
    return 0


def _finish(args: argparse.Namespace) -> int:
    from chestxpert.results.publish import finish

    outcomes, removed = finish(args.name, _endpoints(args), promote=args.promote)
    for attempt in removed:
        print(f"removed final/staging/{attempt}: a retrain that was interrupted, never published")
    for outcome in outcomes:
        print(outcome.message(args.name))
    if not outcomes:
        print(f"nothing to finish: no published version of {args.name} is newer than the champion")
    return 0


def cmd_pull_best(args: argparse.Namespace) -> int:
    from chestxpert.results.pull import PullError, load_lines, pull_best, pull_final

    verify = not args.no_verify
    if args.final or args.version is not None:
        if not args.final:
            raise PullError(
                f"--version {args.version} names a final model version; add --final: "
                f"`chestxpert pull-best {args.name} --final --version {args.version} --to DIR`"
            )
        path, what = pull_final(args.name, Path(args.to), _endpoints(args), args.version, verify)
        print(f"final model of {args.name}: {what}")
    else:
        path = pull_best(args.name, Path(args.to), endpoints=_endpoints(args), verify=verify)
    print(f"pulled to {path}\n{load_lines(path)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from chestxpert.results.predict import format_predictions, predict
    from chestxpert.results.pull import resolve_model

    model_dir = resolve_model(args.model, _endpoints(args))
    results = predict(
        model_dir,
        [Path(p) for p in args.images],
        Path(args.gradcam) if args.gradcam else None,
        calibrated=not args.uncalibrated,
    )
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", default=None, help="storage URI (else CHESTXPERT_STORAGE, the local stack, …)"
    )
    parser.add_argument(
        "--mlflow-uri", default=None, help="MLflow tracking URI (else MLFLOW_TRACKING_URI, …)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add `chestxpert final`, `pull-best` and `predict`."""
    final = sub.add_parser(
        "final", help="retrain the sweep's best config, evaluate on test, report, register"
    )
    final.add_argument("name", help="sweep name")
    final.add_argument(
        "--epochs", type=int, default=None, help="epochs (default: the best trial's)"
    )
    final.add_argument("--train-on", default="train", choices=["train", "train+val"])
    final.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        help="choose thresholds reaching this sensitivity on validation (default: Youden's J)",
    )
    final.add_argument(
        "--operating-point",
        action="append",
        default=None,
        metavar="POINT",
        help="a further operating point to report, chosen on validation: spec=0.9 (sensitivity "
        "at specificity 0.9, the default), sens=0.8, youden; repeat for more",
    )
    final.add_argument(
        "--bootstrap", type=int, default=1000, help="patient bootstrap resamples for the CIs"
    )
    final.add_argument(
        "--gradcam-layer",
        default=None,
        help="layer to explain (default: last conv layer, or "
        "the deepest one with a map of at least 7×7)",
    )
    final.add_argument(
        "--address", default=None, help="Ray address to retrain on (default: local stack if up)"
    )
    final.add_argument(
        "--local", action="store_true", help="retrain in this process even if a cluster is up"
    )
    final.add_argument(
        "--cpus",
        type=float,
        default=None,
        help="CPUs for the retrain task (default: the sweep's per-trial CPUs)",
    )
    final.add_argument(
        "--gpus",
        type=float,
        default=None,
        help="GPUs for the retrain task (default: the sweep's per-trial GPUs)",
    )
    final.add_argument(
        "--allow-dataset-change",
        action="store_true",
        help="retrain even though `data prepare --force` replaced the dataset since the sweep "
        "began (on the current version)",
    )
    final.add_argument(
        "--promote",
        action="store_true",
        help="make the new version the champion even if its validation metric is worse",
    )
    final.add_argument(
        "--finish",
        action="store_true",
        help="no retrain: register and promote published versions an MLflow failure or a crash "
        "left behind, remove interrupted retrains' staging",
    )
    _flags(final)
    final.set_defaults(func=cmd_final)

    pull = sub.add_parser(
        "pull-best", help="download the best trial checkpoint (or --final model), checksum-verified"
    )
    pull.add_argument("name")
    pull.add_argument("--to", required=True)
    pull.add_argument(
        "--final",
        action="store_true",
        help="the final model (MLflow's champion) instead of the best trial's checkpoint",
    )
    pull.add_argument(
        "--version",
        type=int,
        default=None,
        metavar="N",
        help="with --final: published version N, champion or not",
    )
    pull.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the checksum checks: take a checkpoint without model.keras.sha256, or a "
        "version whose SHA256SUMS is missing",
    )
    _flags(pull)
    pull.set_defaults(func=cmd_pull_best)

    pred = sub.add_parser(
        "predict", help="probabilities and calls per label, optional Grad-CAM overlays"
    )
    pred.add_argument("model", help="model folder, storage URI, or models:/NAME@champion")
    pred.add_argument(
        "images", nargs="+", help="PNG/JPEG (8/16-bit, gray/RGB/RGBA); DICOM with pydicom"
    )
    pred.add_argument(
        "--gradcam", default=None, metavar="OUT", help="write overlays for the top findings here"
    )
    pred.add_argument("--json", action="store_true")
    pred.add_argument(
        "--uncalibrated",
        action="store_true",
        help="report the network's own probabilities, not the final model's calibrated ones "
        "(the calls are the same)",
    )
    _flags(pred)
    pred.set_defaults(func=cmd_predict)
