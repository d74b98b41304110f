"""`chestxpert sweep …`: run, resume, watch, sync and submit sweeps."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def _endpoints(args: argparse.Namespace, spec=None):
    from chestxpert.cluster.endpoints import resolve

    return resolve(
        ray_address=getattr(args, "address", None) or (spec.ray_address if spec else None),
        mlflow_tracking_uri=getattr(args, "mlflow_uri", None)
        or (spec.mlflow.tracking_uri if spec else None),
        storage=getattr(args, "storage", None) or (spec.storage if spec else None),
        s3_endpoint_url=getattr(args, "s3_endpoint", None),
        workspace=args.workspace,
    )


SPEC_ENV_PREFIX = "env:"


def _load(spec_arg: str, overrides: dict | None = None):
    """A spec from a file, or from an environment variable (`env:NAME`, how `submit` ships it)."""
    from chestxpert.sweeps.spec import SpecError, load_spec, parse_spec

    if spec_arg.startswith(SPEC_ENV_PREFIX):
        variable = spec_arg[len(SPEC_ENV_PREFIX) :]
        if variable not in os.environ:
            raise SpecError(f"{spec_arg}: environment variable {variable} is not set")
        return parse_spec(os.environ[variable], source=spec_arg, overrides=overrides)
    return load_spec(Path(spec_arg), overrides=overrides)


def cmd_run(args: argparse.Namespace) -> int:
    spec = _load(args.spec, overrides={"name": args.name} if args.name else None)
    endpoints = _endpoints(args, spec)
    if args.dry_run:  # no Ray, no TensorFlow: see sweeps/dry_run.py
        from chestxpert.sweeps.dry_run import check_dataset, plan_lines

        print("\n".join(plan_lines(spec, endpoints, check_dataset(spec, endpoints))))
        return 0
    from chestxpert.sweeps.run import format_summary, run_sweep

    summary = run_sweep(spec, endpoints, mlflow_uri=args.mlflow_uri, force=args.force)
    print(format_summary(summary), end="")
    _after_sweep(args, spec, endpoints)
    return _exit_code(summary)


def _after_sweep(args: argparse.Namespace, spec, endpoints) -> None:
    # What a higher layer wired to the end of `run`/`resume` (the sweep report, results/cli.py).
    if getattr(args, "after_sweep", None) is not None:
        args.after_sweep(args, spec, endpoints)


def _recorded_spec(args: argparse.Namespace):
    from chestxpert.sweeps.layout import SPEC_FILE, locate
    from chestxpert.sweeps.run import SweepError
    from chestxpert.sweeps.spec import spec_from_dict

    endpoints = _endpoints(args)
    location = locate(endpoints, args.name)
    recorded = location.read_json(SPEC_FILE)
    if recorded is None:
        raise SweepError(
            f"no sweep named {args.name!r} in {endpoints.storage_uri} "
            "(pass --storage if it is elsewhere)"
        )
    spec = spec_from_dict(recorded["raw"], source=f"{location.uri}/{SPEC_FILE}")
    return spec, endpoints, location, recorded


def cmd_resume(args: argparse.Namespace) -> int:
    from chestxpert.sweeps.run import format_summary, run_sweep

    spec, endpoints, _, _ = _recorded_spec(args)
    endpoints = _endpoints(args, spec)
    # --mlflow-uri moves the sweep's tracking to that server (and is recorded for later
    # commands); without it the sweep keeps the server it recorded.
    summary = run_sweep(
        spec,
        endpoints,
        resume=True,
        mlflow_uri=args.mlflow_uri,
        force=args.force,
        allow_dataset_change=args.allow_dataset_change,
    )
    print(format_summary(summary), end="")
    _after_sweep(args, spec, endpoints)
    return _exit_code(summary)


def _exit_code(summary: dict) -> int:
    from chestxpert.sweeps.graceful import STOPPED_EXIT_CODE

    if summary.get("stopped"):
        return STOPPED_EXIT_CODE  # `sweep stop` or Ctrl+C: saved, unfinished
    return 0 if summary.get("best_trial_id") else 1


def cmd_status(args: argparse.Namespace) -> int:
    from chestxpert.sweeps.status import sweep_status

    _, _, location, _ = _recorded_spec(args)
    status = sweep_status(location)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print(
        f"sweep {status['name']}  ({status['storage']})  "
        f"metric {status['metric']} ({status['mode']})"
    )
    print(f"{'trial':12s} {'state':11s} {'epochs':>6s} {'best':>8s}  ended")
    for trial in status["trials"]:
        best = f"{trial['best']:.4f}" if trial["best"] is not None else "-"
        print(
            f"{trial['trial_id']:12s} {trial['state']:11s} {trial['epochs']:6d} "
            f"{best:>8s}  {trial['ended']}"
        )
    print(f"{len(status['trials'])} of {status['num_samples']} trials")
    if status["abandoned"]:
        print(
            f"abandoned: {', '.join(status['abandoned'])} (started by a driver that died before "
            "Tune recorded them; the resume ran those slots again)"
        )
    if status["best_so_far"]:
        best = status["best_so_far"]
        print(f"best so far: {best['trial_id']} {status['metric']} = {best['value']:.4f}")
    if status["summary"] and status["summary"].get("best_checkpoint"):
        print(f"best checkpoint: {status['summary']['best_checkpoint']}")
    writer = status["writer"]
    if writer and writer.get("age_s") is not None:
        state = "running" if writer["live"] else "gone? `--force` takes the lease"
        print(
            f"writer: {writer['owner']} pid {writer['pid']} on {writer['host']} "
            f"(`chestxpert {writer['command']}`), heartbeat {writer['age_s']:.0f} s ago, {state}"
        )
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from chestxpert.sweeps.study import (
        STUDY_NAME_KEY,
        STUDY_STORAGE_KEY,
        StudyError,
        format_study,
        study_summary,
    )

    spec, _, _, recorded = _recorded_spec(args)
    if not recorded.get(STUDY_STORAGE_KEY):
        raise StudyError(
            f"sweep {args.name!r} keeps no Optuna study: it searches at random or has no space, "
            "or it began before studies were stored"
        )
    summary = study_summary(recorded[STUDY_STORAGE_KEY], recorded[STUDY_NAME_KEY], args.top)
    if args.json:
        print(json.dumps({"name": args.name, "metric": spec.metric, **summary}, indent=2))
    else:
        print(format_study(summary, spec.metric), end="")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from chestxpert.cluster.endpoints import storage_filesystem
    from chestxpert.sweeps.status import list_sweeps

    endpoints = _endpoints(args)
    fs, root = storage_filesystem(endpoints)
    names = list_sweeps(fs, root)
    if args.json:
        print(json.dumps({"storage": endpoints.storage_uri, "sweeps": names}, indent=2))
        return 0
    print("\n".join(names) if names else f"no sweeps in {endpoints.storage_uri}")
    return 0


def cmd_mlflow_sync(args: argparse.Namespace) -> int:
    from chestxpert.cluster import mlflow_runs
    from chestxpert.cluster.mlflow_runs import safe_uri
    from chestxpert.sweeps.journal import upload_leftovers
    from chestxpert.sweeps.layout import SPEC_FILE
    from chestxpert.sweeps.lease import read_holder
    from chestxpert.sweeps.replay import sync_sweep
    from chestxpert.sweeps.run import SweepError
    from chestxpert.sweeps.sweep_runs import SweepRuns

    spec, endpoints, location, recorded = _recorded_spec(args)
    uri = (
        args.mlflow_uri
        or recorded.get("mlflow_tracking_uri")
        or spec.mlflow.tracking_uri
        or endpoints.mlflow_tracking_uri
    )
    holder = read_holder(location)
    live = holder is not None and holder["live"]
    # A live driver uploads and sends its own session's events; doing it too could race it.
    exclude = (holder["session"],) if live and holder.get("session") else ()
    upload_leftovers(location, endpoints.workspace, exclude)
    runs = SweepRuns(
        uri, spec.mlflow.experiment, spec.name, location.uri, recorded.get("parent_run_id")
    )
    try:
        counts = sync_sweep(
            runs,
            location,
            spec.metric,
            spec.mode,
            spec.scheduler.max_t or spec.epochs(),
            spec.to_plain_dict(),
            exclude=exclude,
            interrupted=not live,
        )
    except mlflow_runs.failures() as err:
        said = " ".join(str(err).replace(uri, safe_uri(uri)).split())[:200]
        raise SweepError(
            f"MLflow at {safe_uri(uri)} failed ({type(err).__name__}: {said}); what was sent so "
            f"far stays: run `chestxpert sweep mlflow-sync {spec.name}` again when it answers "
            "(or pass --mlflow-uri)"
        ) from None
    if (
        not live
        and recorded.get("parent_run_id") is None
        and uri == recorded.get("mlflow_tracking_uri")
    ):
        location.write_json(SPEC_FILE, {**recorded, "parent_run_id": runs.parent_run_id})
    print(
        f"MLflow {safe_uri(uri)}: {counts.values} metric value(s) added, {counts.ended} trial "
        f"run(s) given their final status, for sweep {spec.name}"
    )
    if live:
        print(
            f"{holder['owner']} (pid {holder['pid']} on {holder['host']}) is running the sweep: "
            "its trials stay RUNNING and its own events are left to it"
        )
    if counts.torn:
        print(f"{counts.torn} journal line(s) cut off by a crash were skipped")
    return 0


def ray_token(endpoints, address: str) -> str | None:
    """The Ray auth token to send to `address`: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (the user's
    choice for any cluster), else the workspace's token, but only for the workspace's own
    dashboard."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if (
        path
        and Path(path).is_file()
        and (
            address == endpoints.ray_dashboard_url
            or path != str(endpoints.workspace / "ray_auth_token")
        )
    ):
        return Path(path).read_text().strip()
    if endpoints.ray_auth_token_path and address == endpoints.ray_dashboard_url:
        return Path(endpoints.ray_auth_token_path).read_text().strip()
    return None


def jobs_client(endpoints, address: str):
    """A Ray Jobs API client for the dashboard at `address`, with the Ray token for it."""
    from ray.job_submission import JobSubmissionClient

    token = ray_token(endpoints, address)
    return JobSubmissionClient(
        address, headers={"Authorization": f"Bearer {token}"} if token else None
    )


def _jobs(args: argparse.Namespace, endpoints):
    """A maker of the Jobs API client for --address, else the local stack's dashboard; None
    when neither is known. The client is made (and the cluster asked) on first use only."""
    import functools

    from chestxpert.sweeps.run import SweepError

    address = args.address or endpoints.ray_dashboard_url
    if not address:
        return None

    @functools.cache
    def make():
        try:
            return jobs_client(endpoints, address)
        except (ConnectionError, RuntimeError) as err:
            raise SweepError(f"the Ray Jobs API at {address} does not answer ({err})") from None

    return make


def cmd_stop(args: argparse.Namespace) -> int:
    from chestxpert.sweeps.layout import locate
    from chestxpert.sweeps.operate import stop_sweep

    endpoints = _endpoints(args)
    location = locate(endpoints, args.name)
    return 0 if stop_sweep(location, _jobs(args, endpoints), args.timeout) else 1


def cmd_logs(args: argparse.Namespace) -> int:
    from chestxpert.sweeps.layout import locate
    from chestxpert.sweeps.operate import show_logs

    endpoints = _endpoints(args)
    location = locate(endpoints, args.name)

    def out(text: str) -> None:
        print(text, end="", flush=True)

    show_logs(location, endpoints.workspace, _jobs(args, endpoints), args.follow, out)
    return 0


def _is_loopback(url: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def cmd_submit(args: argparse.Namespace) -> int:
    from chestxpert.cluster.ray_driver import package_for_workers, worker_environment
    from chestxpert.sweeps.operate import JOB_STOP_ENV, SWEEP_METADATA
    from chestxpert.sweeps.run import SweepError
    from chestxpert.sweeps.spec import load_spec

    spec_path = Path(args.spec).resolve()
    # The flags go into the spec that travels, so they win over its keys on the cluster too.
    flags = {"name": args.name, "storage": args.storage, "mlflow.tracking_uri": args.mlflow_uri}
    spec = load_spec(spec_path, overrides={k: v for k, v in flags.items() if v} or None)
    # --address is the dashboard here, not the driver's Ray address.
    endpoints = _endpoints(argparse.Namespace(workspace=args.workspace), spec)
    address = args.address or endpoints.ray_dashboard_url
    if not address:
        raise SweepError(
            "no Ray dashboard address; pass --address http://HEAD:8265 or run `chestxpert up`"
        )
    # Only what the user chose travels: a laptop's default folder or SQLite file
    # means nothing on a remote cluster.
    env = {
        "MLFLOW_TRACKING_URI": endpoints.mlflow_tracking_uri,
        "CHESTXPERT_STORAGE": endpoints.storage_uri,
    }
    sources = {
        "MLFLOW_TRACKING_URI": endpoints.sources["mlflow_tracking_uri"],
        "CHESTXPERT_STORAGE": endpoints.sources["storage"],
    }
    own_stack = address == endpoints.ray_dashboard_url
    env = {k: v for k, v in env.items() if sources[k] in ("flag", "env") or own_stack}
    if not _is_loopback(address):
        local = [f"{k}={v}" for k, v in env.items() if v.startswith(("file:", "sqlite:"))]
        if local:
            raise SweepError(
                f"{', '.join(local)} is local to this machine; give the cluster's storage "
                "(s3://…) and MLflow server (http://…) in the spec or the environment"
            )
    env.update(worker_environment(endpoints))
    env.update(JOB_STOP_ENV)  # `sweep stop`: a graceful stop, as for a local driver
    python = args.python or (sys.executable if _is_loopback(address) else "python")
    # The spec travels in the job's environment (paths in it already made absolute),
    # so it need not be inside the uploaded package.
    import yaml

    env["CHESTXPERT_SPEC_YAML"] = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    # -P: the job's working folder must not shadow the shipped package (Python >= 3.11).
    entrypoint = f"{python} -P -m chestxpert sweep run {SPEC_ENV_PREFIX}CHESTXPERT_SPEC_YAML"
    client = jobs_client(endpoints, address)
    # The code travels with the job (Ray uploads the folder once per content hash), so the
    # driver and every trial run this checkout's ChestXpert, whatever the nodes have installed.
    with tempfile.TemporaryDirectory(prefix="cx-submit-") as staging:
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env={"py_modules": [str(package_for_workers(Path(staging)))], "env_vars": env},
            metadata={SWEEP_METADATA: spec.name},  # how `sweep stop` and `sweep logs` find it
        )
    print(f"submitted {job_id}: {entrypoint}")
    print(f"dashboard: {address}/#/jobs/{job_id}")
    if args.follow:
        import asyncio

        async def follow() -> None:
            async for lines in client.tail_job_logs(job_id):
                print(lines, end="", flush=True)

        asyncio.run(follow())
        status = client.get_job_status(job_id)
        print(f"job {job_id}: {status}")
        return 0 if str(status).endswith("SUCCEEDED") else 1
    return 0


RECORDED_MLFLOW_HELP = "MLflow tracking URI (else the server the sweep recorded, the spec's, …)"


def _service_flags(
    parser: argparse.ArgumentParser,
    mlflow_help: str = "MLflow tracking URI (else MLFLOW_TRACKING_URI, …)",
) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray address (else RAY_ADDRESS, the local stack, in-process)",
    )
    parser.add_argument("--mlflow-uri", default=None, help=mlflow_help)
    _storage_flags(parser)


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    """For the commands that only read the storage."""
    parser.add_argument(
        "--storage", default=None, help="storage URI (else CHESTXPERT_STORAGE, the local stack, …)"
    )
    parser.add_argument(
        "--s3-endpoint",
        default=None,
        help="S3-compatible endpoint URL (else AWS_ENDPOINT_URL_S3, …)",
    )


def _force_flag(parser: argparse.ArgumentParser) -> None:
    from chestxpert.sweeps.lease import STALE_SECONDS

    parser.add_argument(
        "--force",
        action="store_true",
        help=f"take the sweep's lease from a driver that is gone (no heartbeat for "
        f"{STALE_SECONDS:.0f} s, or its pid ended on this host); never from a live one",
    )


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `chestxpert sweep run|resume|status|study|list|mlflow-sync|submit`; return the `sweep`
    subcommands, so the app can add `sweep report` (which is in `results`) beside them."""
    sweep = sub.add_parser("sweep", help="hyperparameter sweeps on Ray Tune")
    sweep_sub = sweep.add_subparsers(dest="sweep_command", required=True, metavar="SWEEP_COMMAND")

    run = sweep_sub.add_parser("run", help="run a sweep spec on Ray (OptunaSearch + ASHA)")
    run.add_argument(
        "spec", help="sweep spec YAML (see sweeps/examples/), or env:VAR to read it from a variable"
    )
    run.add_argument("--name", default=None, help="override the spec's name")
    run.add_argument(
        "--dry-run", action="store_true", help="validate and show the plan; start nothing"
    )
    _service_flags(run)
    _force_flag(run)
    run.set_defaults(func=cmd_run)

    resume = sweep_sub.add_parser("resume", help="continue an interrupted sweep from its storage")
    resume.add_argument("name", help="the sweep's name (its folder in the storage)")
    resume.add_argument(
        "--allow-dataset-change",
        action="store_true",
        help="resume even though `data prepare --force` replaced the dataset since the sweep "
        "began; new and resumed trials then read the current version",
    )
    _service_flags(
        resume,
        "MLflow tracking URI: the sweep's tracking moves there, and later commands use it "
        "(default: the server the sweep recorded)",
    )
    _force_flag(resume)
    resume.set_defaults(func=cmd_resume)

    status = sweep_sub.add_parser(
        "status", help="trials, states, epochs and the best so far, from storage"
    )
    status.add_argument("name", help="the sweep's name (its folder in the storage)")
    status.add_argument("--json", action="store_true", help="print the status as JSON (README)")
    _storage_flags(status)
    status.set_defaults(func=cmd_status)

    study = sweep_sub.add_parser(
        "study",
        help="the sweep's Optuna study: best trials and hyperparameter importances",
        description="Read the sweep's persisted Optuna study (the database its spec record "
        "names; a password comes from CHESTXPERT_STUDY_STORAGE): trial counts by state, the "
        "best complete trials and the hyperparameter importances.",
    )
    study.add_argument("name", help="the sweep's name")
    study.add_argument("--top", type=int, default=5, help="best trials to show (default: 5)")
    study.add_argument("--json", action="store_true", help="print JSON (schema in README)")
    _storage_flags(study)
    study.set_defaults(func=cmd_study)

    listing = sweep_sub.add_parser("list", help="sweeps in the storage")
    listing.add_argument("--json", action="store_true", help="print the list as JSON (README)")
    _storage_flags(listing)
    listing.set_defaults(func=cmd_list)

    sync = sweep_sub.add_parser(
        "mlflow-sync",
        help="send MLflow what it lacks of a sweep (journal, results, final statuses)",
    )
    sync.add_argument("name", help="the sweep's name (its folder in the storage)")
    sync.add_argument("--mlflow-uri", default=None, help=RECORDED_MLFLOW_HELP)
    _storage_flags(sync)
    sync.set_defaults(func=cmd_mlflow_sync)

    register_operate(sweep_sub)

    submit = sweep_sub.add_parser(
        "submit", help="submit `sweep run` to a Ray cluster through the Jobs API"
    )
    submit.add_argument("spec", help="sweep spec YAML; it travels in the job's environment")
    submit.add_argument(
        "--address",
        default=None,
        help="dashboard URL, e.g. http://HEAD:8265 (default: local stack)",
    )
    submit.add_argument("--name", default=None, help="override the spec's name")
    submit.add_argument(
        "--storage",
        default=None,
        help="storage URI the sweep writes to (else the spec's, CHESTXPERT_STORAGE, …)",
    )
    submit.add_argument(
        "--mlflow-uri",
        default=None,
        help="MLflow tracking URI the sweep logs to (else the spec's, MLFLOW_TRACKING_URI, …)",
    )
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument(
        "--python",
        default=None,
        help="interpreter on the cluster (default: ours on loopback, else python)",
    )
    submit.set_defaults(func=cmd_submit)
    return sweep_sub


def register_operate(sweep_sub: argparse._SubParsersAction) -> None:
    """Add `sweep stop` and `sweep logs`."""
    address_help = (
        "Ray dashboard URL for a submitted sweep, e.g. http://HEAD:8265 "
        "(default: the local stack's)"
    )
    stop = sweep_sub.add_parser(
        "stop",
        help="stop a running sweep (local driver or submitted job); `sweep resume` continues it",
        description="Stop a running sweep gracefully: a `sweep run`/`resume` process on this "
        "host gets SIGINT, a submitted job is stopped through the Ray Jobs API. Tune saves the "
        "sweep's state and its trials keep their last checkpoint; `chestxpert sweep resume NAME` "
        "continues. Refused when nothing runs the sweep, or when its driver runs on another host.",
    )
    stop.add_argument("name", help="the sweep's name")
    stop.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds to wait for the driver to end (default: %(default)s)",
    )
    stop.add_argument("--address", default=None, help=address_help)
    stop.add_argument("--storage", default=None, help="storage URI (else CHESTXPERT_STORAGE, …)")
    stop.set_defaults(func=cmd_stop)

    logs = sweep_sub.add_parser(
        "logs",
        help="the driver's console log (the Jobs API's logs for a submitted sweep)",
        description="Print the console log of the sweep's newest driver. A local `sweep run` "
        "writes it to <storage>/<name>/logs/driver-<session>.log (with s3:// storage, to "
        "<workspace>/logs/sweeps/ until the driver ends, then uploaded there); a submitted "
        "sweep's log comes from the Ray Jobs API, with the Ray token.",
    )
    logs.add_argument("name", help="the sweep's name")
    logs.add_argument(
        "--follow", "-f", action="store_true", help="keep printing until the driver ends"
    )
    logs.add_argument("--address", default=None, help=address_help)
    logs.add_argument("--storage", default=None, help="storage URI (else CHESTXPERT_STORAGE, …)")
    logs.set_defaults(func=cmd_logs)
