"""`make demo` at its defaults from nothing (fresh workspace, data drawn and prepared anew): the
minutes each stage took against the 12-minute target, and each trial's start-up (process start,
or the reused worker's trial start, to its first training step done) against 15 s.

One demo takes its whole time (about 12 minutes on 2 cores); smoke mode runs none, since
tests/test_demo.py runs a small demo and checks the stage line it prints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.runner import run_child, scratch_dir
from chestxpert.cluster.processes import free_port

TARGET_MINUTES = 12.0
TARGET_STARTUP_SECONDS = 15.0


def default_demo(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: `chestxpert demo --stop` at its defaults on free ports; the stage times and each
    trial's first-epoch record."""
    from chestxpert.cluster.endpoints import prepare_ray_environment, resolve
    from chestxpert.cluster.stack import StackOptions
    from chestxpert.demo import DEMO_IMAGE_SIZE, DEMO_IMAGES, run_demo
    from chestxpert.sweeps.layout import locate
    from chestxpert.sweeps.status import read_trials

    ws = Path(spec["workspace"])
    prepare_ray_environment(ws)  # as the console script does before any command
    opts = StackOptions(
        workspace=ws, ray_port=free_port(), dashboard_port=free_port(), mlflow_port=free_port()
    )
    summary = run_demo(opts, DEMO_IMAGES, 4, 3, stop=True, image_size=DEMO_IMAGE_SIZE)
    location = locate(resolve(workspace=ws, environ={}), summary["name"])
    trials = []
    for row in read_trials(location, "val_auc_macro", "max", 3, tune_running=False):
        first = row.results[0] if row.results else None  # the trial's first epoch, if any
        trials.append(
            {
                "trial_id": row.trial_id,
                "epochs": row.epochs,
                "startup_seconds": first.get("startup_seconds") if first else None,
                "pid": first.get("pid") if first else None,
                # Tune's clock: the first report's time less the trial's time until then.
                "started": first["timestamp"] - first["time_total_s"] if first else None,
            }
        )
    # In start order, so that a worker counts as reused only after the trial that had it first.
    trials.sort(key=lambda trial: math.inf if trial["started"] is None else trial["started"])
    return {"stages": summary["stage_seconds"], "trials": trials}


def run(smoke: bool = False) -> None:
    if smoke:
        print("  smoke mode runs no demo (tests/test_demo.py checks the stage line)")
        return
    with scratch_dir("cxds-") as ws:
        print(f"  the default demo (4 DenseNet121 trials, 3 epochs, 128 px) in {ws}", flush=True)
        result = run_child(default_demo, {"workspace": str(ws)}, timeout=3 * 3600)
    report(result)


def report(result: dict[str, Any]) -> None:
    """Each stage in minutes, the total against the target, each trial's start-up."""
    stages = result["stages"]
    for stage, seconds in stages.items():
        print(f"  {stage:16s} {seconds / 60:5.1f} min")
    total = sum(stages.values()) / 60
    verdict = "within" if total <= TARGET_MINUTES else "over"
    print(f"  {'total':16s} {total:5.1f} min ({verdict} the {TARGET_MINUTES:g}-minute target)")
    seen: set[int] = set()
    for trial in result["trials"]:
        startup = trial["startup_seconds"]
        reused = trial["pid"] in seen
        seen.add(trial["pid"])
        shown = "no epoch" if startup is None else f"{startup:5.1f} s"
        print(
            f"  trial {trial['trial_id']}: start-up {shown} "
            f"({'reused worker' if reused else 'new worker'}), {trial['epochs']} epoch(s)"
        )
    startups = [t["startup_seconds"] for t in result["trials"] if t["startup_seconds"]]
    if startups:
        print(
            f"  start-up: mean {sum(startups) / len(startups):.1f} s, max {max(startups):.1f} s "
            f"(target {TARGET_STARTUP_SECONDS:g} s)"
        )
