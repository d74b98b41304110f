"""`chestxpert demo`: the whole path on this machine — stack, synthetic data, prepare, a DenseNet121
sweep, then the final retrain and its clinical report, and the sweep report.

Sized for 2 CPU cores (about 22 minutes with the defaults); it prints where to
look afterwards and leaves the services up for looking, unless `--stop`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from chestxpert.cluster.stack import StackOptions, down, up

# 128 px so the report's Grad-CAM can localise (at 64 px DenseNet121's maps are too coarse);
# the image count is what keeps the whole demo within its time budget on 2 cores at that
# size (the README states the measured time).
DEMO_IMAGE_SIZE = 128
DEMO_IMAGES = 1600
# Package data, found the same way in a checkout and in an installed wheel.
DEMO_SPEC = Path(str(resources.files("chestxpert.sweeps") / "examples" / "demo-cpu.yaml"))


@contextlib.contextmanager
def _timed(stages: dict[str, float], stage: str) -> Iterator[None]:
    mark = time.monotonic()
    yield
    stages[stage] = time.monotonic() - mark


def format_stages(stages: dict[str, float]) -> str:
    """`services 0.2 min, [1/4] draw 0.3 min, ...`: what each stage of the demo took. Data
    drawn and prepared by an earlier demo is reused, so those stages can be absent."""
    return ", ".join(f"{stage} {seconds / 60:.1f} min" for stage, seconds in stages.items())


def run_demo(
    opts: StackOptions,
    images: int,
    samples: int,
    epochs: int,
    stop: bool,
    image_size: int = DEMO_IMAGE_SIZE,
) -> dict:
    """Start the stack, make and prepare synthetic data (once), run the demo sweep.

    Prints where to look at the end.
    """
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.synth import generate
    from chestxpert.sweeps.run import format_summary, run_sweep
    from chestxpert.sweeps.spec import load_spec

    clock = time.monotonic()
    stages: dict[str, float] = {}
    with _timed(stages, "services"):
        state, started = up(opts)
    try:
        ws = opts.workspace
        raw, prepared = (
            ws / "data" / f"synth-{images}",
            ws / "data" / f"synth-{images}-{image_size}",
        )
        endpoints = resolve(workspace=ws)
        if not (raw / "Data_Entry_2017.csv").exists():
            print(
                f"\n[1/4] drawing {images} synthetic chest radiographs into {raw} ...", flush=True
            )
            with _timed(stages, "[1/4] draw"):
                generate(raw, images=images, size=256, seed=0, difficulty=0.2)
        if not (prepared / "manifest.json").exists():
            print(
                f"\n[2/4] preparing {prepared} ({image_size}×{image_size}, split by patient) ...",
                flush=True,
            )
            with _timed(stages, "[2/4] prepare"):
                prepare(
                    str(raw),
                    str(prepared),
                    PrepareOptions(source="nih", image_size=image_size, split="official"),
                    endpoints,
                )
        name = time.strftime("demo-%Y%m%d-%H%M%S")
        overrides = {
            "name": name,
            "dataset": str(prepared),
            "search.num_samples": samples,
            "mlflow.experiment": "chestxpert-demo",
            "trial.epochs": epochs,
            "scheduler.max_t": epochs,
            "trial.image_size": image_size,
        }
        if epochs < 2:  # one epoch leaves ASHA nothing to stop
            overrides.update({"scheduler.type": "none", "scheduler.max_t": None})
        spec = load_spec(DEMO_SPEC, overrides=overrides)
        print(
            f"\n[3/4] sweep {name}: {samples} DenseNet121 trials, up to {epochs} epochs, "
            "OptunaSearch + ASHA",
            flush=True,
        )
        with _timed(stages, "[3/4] sweep"):
            summary = run_sweep(spec, endpoints)
        print()
        print(format_summary(summary), end="")
        print(
            "\n[4/4] final: retrain the best configuration as a Ray task, evaluate on test, "
            "report ...",
            flush=True,
        )
        from chestxpert.results.final import FinalOptions, run_final

        # The final job runs alone: it gets every CPU the stack's node has, not one trial's share.
        cpus = int(state["ray"].get("resources", {}).get("CPU") or os.cpu_count() or 1)
        with _timed(stages, "[4/4] final"):
            final = run_final(name, FinalOptions(bootstrap=500, cpus=cpus), endpoints)
        summary["final"] = {k: final[k] for k in ("report_dir", "storage_dir", "mlflow")}
        from chestxpert.results.sweep_report import report_sweep
        from chestxpert.sweeps.layout import SWEEP_REPORT_HTML, locate

        print("\nthe sweep report: curves, history, importances, trials, budget ...", flush=True)
        with _timed(stages, "sweep report"):
            location = locate(endpoints, name)
            _, logged = report_sweep(location, endpoints)
            print(logged)
        summary["sweep_report"] = f"{location.uri}/{SWEEP_REPORT_HTML}"
        summary["stage_seconds"] = stages
        minutes = (time.monotonic() - clock) / 60
        print(f"\ndemo finished in {minutes:.1f} min: {format_stages(stages)}")
        print("Where to look:")
        print(
            f"  Ray dashboard   {state['ray']['dashboard_url']}  "
            f"(token: {state['ray']['auth_token_path']})"
        )
        from chestxpert.cluster.mlflow_runs import client, experiment_page, failures

        try:  # opened on the experiment's runs: MLflow's UI otherwise opens on GenAI's overview
            page = experiment_page(client(state["mlflow"]["url"]), spec.mlflow.experiment)
        except failures():
            page = None
        print(f"  MLflow          {page or state['mlflow']['url']}")
        print(f"  storage         {endpoints.storage_uri}/{name}")
        print(f"  sweep status    .venv/bin/chestxpert sweep status {name}")
        print(f"  final report    {final['report_dir']}/report.html")
        print(f"  sweep report    {summary['sweep_report']}")
        print(
            f"  model           {final['mlflow']['uri']}  "
            f"(or .venv/bin/chestxpert pull-best {name} --final --to DIR)"
        )
        if not stop:
            print("  stop services   .venv/bin/chestxpert down")
        return summary
    finally:
        if stop:  # only what this demo started: a stack the user had running stays up
            down(opts.workspace, only=started)
