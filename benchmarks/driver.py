"""Instant trials on an in-process Ray: the sweep driver with NestedMlflowCallback logging to an
MLflow server versus without, both reusing worker processes as sweeps do, and a new worker per
trial (Tune's default) beside them; trials per minute and driver CPU per report.

Trials do no work, so every cost between two reports is Tune's and the callbacks';
the MLflow server's own CPU is measured beside the driver's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.runner import run_child, scratch_dir, services
from chestxpert.cluster.processes import free_port, session_members
from chestxpert.cluster.stack import StackOptions, start_mlflow


@dataclass(frozen=True)
class Size:
    trials: int
    reports: int  # per trial
    warmup: int  # trials run first (each side) and not measured: Ray's worker pool, imports
    new_worker_trials: int  # the slow side (a new worker per trial): fewer, its rate is steady
    repeats: int  # rounds of without/with, alternating: scheduling is asynchronous


FULL = Size(trials=200, reports=10, warmup=4, new_worker_trials=50, repeats=3)
SMOKE = Size(trials=2, reports=2, warmup=1, new_worker_trials=2, repeats=1)
# Issue 14's targets for the side with the callback
RATE_TARGET = 200.0  # trials/min
CPU_RATIO_TARGET = 1.5  # driver CPU per report, with/without
TRIAL_CPUS = 1  # as a sweep's `resources.cpus` default: 2 trials at a time on 2 cores


def session_cpu_seconds(sid: int) -> float:
    """User plus system CPU seconds of every live process in session `sid`."""
    ticks = 0
    for pid in session_members(sid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def driver_fits(spec: dict[str, Any]) -> dict[str, Any]:
    """Child (the driver): an in-process Ray with token auth; the warm-up, then instant trials
    without and with NestedMlflowCallback."""
    import resource

    from chestxpert.cluster.endpoints import apply_client_environment, resolve
    from chestxpert.cluster.stack import ensure_ray_token, ray_temp_dir

    ws = Path(spec["workspace"])
    url = spec["mlflow_url"]
    endpoints = resolve(workspace=ws, mlflow_tracking_uri=url, environ={})
    apply_client_environment(endpoints)  # RAY_AUTH_MODE=token, as connect() sets it
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(ensure_ray_token(ws))  # before Ray is imported
    import ray
    from ray import tune

    from chestxpert.cluster.mlflow_runs import client as mlflow_client
    from chestxpert.cluster.mlflow_runs import parent_run
    from chestxpert.sweeps.journal import Journal
    from chestxpert.sweeps.layout import locate
    from chestxpert.sweeps.tracking import NestedMlflowCallback

    ray.init(
        include_dashboard=False,
        logging_level="WARNING",
        configure_logging=False,
        _temp_dir=str(ray_temp_dir(ws)),
        log_to_driver=False,
    )
    reports = spec["reports"]

    def instant(config):
        for step in range(reports):
            tune.report({"epoch": step + 1, "val_auc_macro": config["x"] * (step + 1) / reports})

    class Count(tune.Callback):
        """On both sides: the results the driver handled, and trials that errored."""

        def __init__(self) -> None:
            self.results = self.errors = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.results += 1

        def on_trial_error(self, iteration, trials, trial, **info):
            self.errors += 1

    def fit(name: str, trials: int, mlflow: bool, reuse: bool = True) -> dict[str, Any]:
        count = Count()
        callbacks: list = [count]
        if mlflow:
            parent = parent_run(url, "bench-driver", name, {"trials": trials}, {})
            logger = NestedMlflowCallback(url, "bench-driver", name, parent, reports)
            # as a sweep runs it: every event journalled in the storage before it is sent
            location = locate(resolve(storage=str(ws / "storage"), environ={}), name)
            logger.attach(Journal(location, f"bench-{name}", ws))
            callbacks.append(logger)
        tuner = tune.Tuner(
            tune.with_resources(instant, {"cpu": spec["cpus"]}),
            param_space={"x": tune.uniform(0.5, 1.0)},
            tune_config=tune.TuneConfig(
                num_samples=trials, metric="val_auc_macro", mode="max", reuse_actors=reuse
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str(ws / "storage"), callbacks=callbacks, verbose=0
            ),
        )
        server = session_cpu_seconds(spec["mlflow_pid"])
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        tuner.fit()
        seconds = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        row = {
            "seconds": seconds,
            "cpu": cpu,
            "server_cpu": session_cpu_seconds(spec["mlflow_pid"]) - server,
            "results": count.results,
            "errors": count.errors,
            "trials": trials,
        }
        if mlflow:
            client = mlflow_client(url)
            experiment = client.get_experiment_by_name("bench-driver").experiment_id
            runs = client.search_runs(
                [experiment],
                f"tags.`chestxpert.sweep` = '{name}' and tags.`chestxpert.role` = 'trial'",
                max_results=1000,
            )
            row["mlflow_runs"] = len(runs)
            row["mlflow_values"] = sum(
                len(client.get_metric_history(run.info.run_id, "val_auc_macro")) for run in runs
            )
            row["pending"] = len(callbacks[1].pending)
        return row

    fit("warmup", spec["warmup"], mlflow=False)
    # and the callback's first use (MLflow's client and entity modules, imported on first call):
    # a sweep pays it once, not per report, so round 1 would otherwise count it against MLflow
    fit("warmup-mlflow", spec["warmup"], mlflow=True)
    new_worker = fit("new", spec["new_worker_trials"], mlflow=False, reuse=False)
    out: dict[str, Any] = {"new worker per trial": new_worker, "without": [], "with": []}
    for round_ in range(spec["repeats"]):
        out["without"].append(fit(f"without-{round_}", spec["trials"], mlflow=False))
        out["with"].append(fit(f"with-{round_}", spec["trials"], mlflow=True))
    ray.shutdown()
    return out


def run(smoke: bool = False) -> None:
    size = SMOKE if smoke else FULL
    with scratch_dir() as ws, services() as records:
        mlflow_options = StackOptions(workspace=ws / "mlflow", mlflow_port=free_port())
        mlflow = start_mlflow(mlflow_options, (ws / "mlflow" / "s").as_uri())
        records.append(mlflow)
        spec = {
            "workspace": str(ws),
            "mlflow_url": mlflow["url"],
            "mlflow_pid": mlflow["pid"],
            "trials": size.trials,
            "reports": size.reports,
            "cpus": TRIAL_CPUS,
            "warmup": size.warmup,
            "new_worker_trials": size.new_worker_trials,
            "repeats": size.repeats,
        }
        print(
            f"  {size.trials} trials x {size.reports} reports, {TRIAL_CPUS} CPU per trial "
            f"(reused workers, as a sweep runs them), MLflow server at {mlflow['url']} "
            f"(SQLite, 2 workers); {size.warmup} warm-up trials first; then a new worker per "
            f"trial (Tune's default, {size.new_worker_trials} trials); then {size.repeats} "
            "rounds of without the callback, with it",
            flush=True,
        )
        result = run_child(driver_fits, spec, timeout=3 * 3600)
    report(result)


def side_rates(side: dict[str, Any]) -> tuple[float, float]:
    """Trials per minute and driver CPU seconds per report of one measured side."""
    return side["trials"] / side["seconds"] * 60, side["cpu"] / max(side["results"], 1)


def print_side(label: str, side: dict[str, Any]) -> None:
    per_minute, per_report = side_rates(side)
    extra = (
        f"; MLflow holds {side['mlflow_runs']} trial runs, {side['mlflow_values']} "
        f"val_auc_macro values, {side['pending']} calls still queued"
        if "mlflow_runs" in side
        else ""
    )
    print(
        f"  {label:34s} {side['seconds']:6.1f} s  {per_minute:6.1f} trials/min"
        f"  driver CPU {side['cpu']:6.1f} s = {per_report * 1000:5.1f} ms/report "
        f"({side['results']} reports, {side['errors']} errored)  MLflow server CPU "
        f"{side['server_cpu']:5.1f} s{extra}"
    )


def report(result: dict[str, Any]) -> None:
    """Print each side's rate and CPU per report, what reached MLflow, and the ratios of each
    round, then the worst round against the targets."""
    print_side("without callback, new worker/trial", result["new worker per trial"])
    new_worker_rate = side_rates(result["new worker per trial"])[0]
    rates, cpu_ratios = [], []
    for round_, (without, with_) in enumerate(zip(result["without"], result["with"], strict=True)):
        print_side(f"round {round_ + 1}: without callback", without)
        print_side(f"round {round_ + 1}: with callback", with_)
        (rate_without, cpu_without), (rate_with, cpu_with) = side_rates(without), side_rates(with_)
        rates.append(rate_with)
        cpu_ratios.append(cpu_with / cpu_without)
        print(
            f"  round {round_ + 1} ratio with/without: trials/min {rate_with / rate_without:.2f}x, "
            f"driver CPU per report {cpu_with / cpu_without:.2f}x "
            f"(+{(cpu_with - cpu_without) * 1000:.1f} ms per report for MLflow); reused "
            f"workers / a new worker per trial (without the callback) "
            f"{rate_without / new_worker_rate:.2f}x"
        )
    met = min(rates) >= RATE_TARGET and max(cpu_ratios) <= CPU_RATIO_TARGET
    print(
        f"  with callback over {len(rates)} rounds: trials/min {min(rates):.1f}-{max(rates):.1f} "
        f"(target >= {RATE_TARGET:.0f}), driver CPU with/without "
        f"{min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}x (target <= {CPU_RATIO_TARGET}); "
        f"{'both targets met in every round' if met else 'target missed in a round'}"
    )
