"""`chestxpert final | pull-best | predict | compare | sweep report`: the final model, its
report, using it, comparing two models, and the sweep's own report."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
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
    # With --json the summary is stdout's; the progress goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        metrics = run_final(args.name, opts, _endpoints(args))
    ev = metrics["evaluation"]
    if args.json:
        print(json.dumps(final_summary(metrics), indent=2, default=str))
        return 0
    print(
        f"test macro AUC {ev['auc_macro']:.4f} (micro {ev['auc_micro']:.4f}) "
        f"on {ev['counts']['images']} images"
    )
    print(f"report: {metrics['report_dir']}/report.html   storage: {metrics['storage_dir']}")
    print(f"registered: {metrics['mlflow']['uri']} (version {metrics['mlflow']['version']})")
    print(metrics["promotion"])
    return 0


def final_summary(metrics: dict) -> dict:
    """`chestxpert final --json`: the schema in the README's JSON table (metrics.json in the
    report holds everything)."""
    ev = metrics["evaluation"]
    return {
        "sweep": metrics["sweep"],
        "version": metrics["version"],
        "auc_macro": ev["auc_macro"],
        "auc_micro": ev["auc_micro"],
        "test_images": ev["counts"]["images"],
        "report": f"{metrics['report_dir']}/report.html",
        "storage": metrics["storage_dir"],
        "mlflow": metrics["mlflow"],
        "promotion": metrics["promotion"],
    }


def _finish(args: argparse.Namespace) -> int:
    from chestxpert.results.publish import finish

    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        outcomes, removed = finish(args.name, _endpoints(args), promote=args.promote)
    if args.json:
        said = [outcome.message(args.name) for outcome in outcomes]
        print(json.dumps({"sweep": args.name, "removed_staging": removed, "finished": said}))
        return 0
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
    if args.version is not None and not args.final:
        raise PullError(
            f"--version {args.version} names a final model version; add --final: "
            f"`chestxpert pull-best {args.name} --final --version {args.version} --to DIR`"
        )
    what = None
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        if args.final:
            path, what = pull_final(
                args.name, Path(args.to), _endpoints(args), args.version, verify
            )
        else:
            path = pull_best(args.name, Path(args.to), endpoints=_endpoints(args), verify=verify)
    if args.json:
        kind = "final" if args.final else "best"
        pulled = {"sweep": args.name, "kind": kind, "path": str(path), "final_model": what}
        print(json.dumps({**pulled, "verified": verify, "load": load_lines(path)}, indent=2))
        return 0
    if what:
        print(f"final model of {args.name}: {what}")
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


def cmd_compare(args: argparse.Namespace) -> int:
    import sys

    from chestxpert.results.compare import compare_models

    data, folder = compare_models(
        args.a,
        args.b,
        _endpoints(args),
        dataset_uri=args.dataset,
        out=Path(args.out) if args.out else None,
        n_boot=args.bootstrap,
    )
    # With --json the data is stdout's; the summary goes to stderr.
    say = sys.stderr if args.json else sys.stdout
    if args.json:
        print(json.dumps(data, indent=2))
    macro = data["macro"]
    if macro["difference"] is not None:
        print(
            f"macro AUC: A {macro['auc_a']:.4f}, B {macro['auc_b']:.4f}, B − A "
            f"{macro['difference']:+.4f} (95% CI {macro['low']:.4f} to {macro['high']:.4f}, "
            f"p {macro['p_value']:.4f}) on {data['counts']['images']} test images",
            file=say,
        )
    differing = ", ".join(data["differing_labels"]) or "none"
    print(f"labels whose difference excludes zero: {differing}", file=say)
    print(f"report: {folder}/compare.html (also compare.md, compare.json)", file=say)
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    import sys

    from chestxpert.results.sweep_report import report_sweep
    from chestxpert.sweeps.layout import SWEEP_REPORT_DATA, SWEEP_REPORT_HTML, locate

    endpoints = _endpoints(args)
    location = locate(endpoints, args.name)
    out = Path(args.out) if args.out else None
    data, logged = report_sweep(location, endpoints, args.mlflow_uri, out)
    # With --json the data is stdout's; where things went goes to stderr.
    say = sys.stderr if args.json else sys.stdout
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    kept = [t for t in data["trials"] if t["number"] is not None]
    best = data["best"]
    found = f", best {data['metric']} {best['value']:.4f} ({best['trial_id']})" if best else ""
    print(
        f"sweep {data['name']} ({data['state']}): {len(kept)} of "
        f"{data['budget']['num_samples']} trials{found}",
        file=say,
    )
    print(f"report: {location.uri}/{SWEEP_REPORT_HTML}", file=say)
    print(f"data:   {location.uri}/{SWEEP_REPORT_DATA}", file=say)
    if args.out:
        print(f"copied to {out}/", file=say)
    print(logged, file=sys.stderr if logged.startswith("warning") else say)
    return 0


def report_after_sweep(args: argparse.Namespace, spec, endpoints) -> None:
    """After `sweep run`/`resume`: the sweep report, published to storage and logged to the
    sweep's MLflow parent run. A report that cannot be made warns; the sweep stands."""
    import sys

    from chestxpert.results.sweep_report import report_sweep
    from chestxpert.sweeps.layout import SWEEP_REPORT_HTML, locate

    location = locate(endpoints, spec.name)
    try:
        _, logged = report_sweep(location, endpoints, args.mlflow_uri)
    except Exception as err:
        print(
            f"warning: no sweep report ({type(err).__name__}: {err}); "
            f"`chestxpert sweep report {spec.name}` makes it",
            file=sys.stderr,
        )
        return
    print(f"sweep report: {location.uri}/{SWEEP_REPORT_HTML}")
    print(logged, file=sys.stderr if logged.startswith("warning") else sys.stdout)


def register_sweep_report(sweep_sub: argparse._SubParsersAction) -> None:
    """Add `chestxpert sweep report` to the `sweep` subcommands (it is here: it reads results),
    and make `sweep run` and `sweep resume` end with the report (`report_after_sweep`)."""
    for command in ("run", "resume"):
        sweep_sub.choices[command].set_defaults(after_sweep=report_after_sweep)
    report = sweep_sub.add_parser(
        "report",
        help="the sweep in one self-contained HTML page (curves, history, importances, trials, "
        "budget, best trial), from storage; also logged to the sweep's MLflow parent run",
    )
    report.add_argument("name", help="sweep name")
    report.add_argument(
        "--out", default=None, metavar="DIR", help="also write report.html and report.json here"
    )
    report.add_argument(
        "--json", action="store_true", help="print the report's data (trials, budget, best)"
    )
    _flags(report)
    report.set_defaults(func=cmd_sweep_report)


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", default=None, help="storage URI (else CHESTXPERT_STORAGE, the local stack, …)"
    )
    parser.add_argument(
        "--mlflow-uri", default=None, help="MLflow tracking URI (else MLFLOW_TRACKING_URI, …)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add `chestxpert final`, `pull-best`, `predict` and `compare`."""
    final = sub.add_parser(
        "final", help="retrain the sweep's best config, evaluate on test, report, register"
    )
    final.add_argument("name", help="sweep name")
    final.add_argument(
        "--epochs", type=int, default=None, help="epochs (default: the best trial's)"
    )
    final.add_argument(
        "--train-on",
        default="train",
        choices=["train", "train+val"],
        help="split(s) the final model is retrained on",
    )
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
    final.add_argument(
        "--json", action="store_true", help="print the summary as JSON (README); progress to stderr"
    )
    _flags(final)
    final.set_defaults(func=cmd_final)

    pull = sub.add_parser(
        "pull-best", help="download the best trial checkpoint (or --final model), checksum-verified"
    )
    pull.add_argument("name", help="sweep name")
    pull.add_argument("--to", required=True, help="folder to download into")
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
    pull.add_argument("--json", action="store_true", help="print what was pulled as JSON (README)")
    _flags(pull)
    pull.set_defaults(func=cmd_pull_best)

    pred = sub.add_parser(
        "predict", help="probabilities and calls per label, optional Grad-CAM overlays"
    )
    pred.add_argument(
        "model", help="model folder, storage URI, models:/NAME@ALIAS or models:/NAME/VERSION"
    )
    pred.add_argument(
        "images", nargs="+", help="PNG/JPEG (8/16-bit, gray/RGB/RGBA); DICOM with pydicom"
    )
    pred.add_argument(
        "--gradcam", default=None, metavar="OUT", help="write overlays for the top findings here"
    )
    pred.add_argument("--json", action="store_true", help="print the predictions as JSON (README)")
    pred.add_argument(
        "--uncalibrated",
        action="store_true",
        help="report the network's own probabilities, not the final model's calibrated ones "
        "(the calls are the same)",
    )
    _flags(pred)
    pred.set_defaults(func=cmd_predict)

    compare = sub.add_parser(
        "compare",
        help="two models on one dataset's test split: per-label AUC of each, the paired "
        "difference B − A with a patient-bootstrap CI and p-value",
    )
    for side in ("a", "b"):
        compare.add_argument(
            side,
            metavar=side.upper(),
            help="a sweep name (its final model), models:/NAME@ALIAS, models:/NAME/VERSION, "
            "a storage URI or a model folder",
        )
    compare.add_argument(
        "--dataset",
        default=None,
        metavar="URI",
        help="prepared dataset whose test split both are scored on (default: the one A was "
        "trained on)",
    )
    compare.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="report folder (default: <workspace>/reports/compare/A-vs-B)",
    )
    compare.add_argument(
        "--bootstrap", type=int, default=1000, help="patient bootstrap resamples (default 1000)"
    )
    compare.add_argument("--json", action="store_true", help="print compare.json")
    _flags(compare)
    compare.set_defaults(func=cmd_compare)
