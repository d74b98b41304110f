"""convnet_small sweeps over several seeds, the two effects apart: ASHA against no stopping on
the same random configurations (trial-epochs and best validation macro AUC), and TPE against
random search, both under ASHA (best AUC).

Targets, as a mean over the seeds: ASHA spends at most a third of the full-length
trial-epochs, and its best AUC is within 0.01 of the full-length sweep's on the same
configurations. Asynchronous promotion depends on which trial reports first, so one run
proves nothing: each seed is printed, then the mean and the spread. The full-length curves
are then replayed through Ray's own ASHA bookkeeping in many arrival orders, which shows how
much of the spread is the order alone and what the scheduler's settings change.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.runner import run_child, scratch_dir


@dataclass(frozen=True)
class Size:
    images: int  # synthetic films, generated and prepared at image_size
    trials: int
    epochs: int  # ASHA's max_t; rungs at 1, 3, 9... (grace 1, reduction factor 3)
    image_size: int
    seeds: tuple[int, ...]
    # The quickest backbone to build: a trial's graph is traced anew for every trial, and
    # with densenet_tiny that cost up to a minute per trial on a busy 2-core machine.
    backbone: str = "convnet_small"
    orders: int = 500  # arrival orders replayed per seed
    sides: tuple[str, ...] = ("tpe", "asha", "full")  # labels of SIDES to run


FULL = Size(images=1000, trials=24, epochs=9, image_size=64, seeds=(0, 1, 2))
# Smoke mode runs the two sides the headline ratio needs: tpe's sweep (OptunaSearch + ASHA)
# is the one every sweep test and the demo already run.
SMOKE = Size(
    images=120, trials=1, epochs=2, image_size=32, seeds=(0,), orders=5, sides=("asha", "full")
)
EPOCH_RATIO_TARGET = 1 / 3
AUC_GAP_TARGET = -0.01
METRIC = "val_auc_macro"
# (label, search algorithm, scheduler), run in this order for every seed
SIDES = (
    ("tpe", "optuna", "asha"),
    ("asha", "random", "asha"),
    ("full", "random", "none"),
)


def sweep_spec(name: str, dataset: str, size: Size, seed: int, algorithm: str, scheduler: str):
    """One sweep as its YAML would read; the sides differ in search and scheduler only.
    ASHA's settings are the spec's defaults (grace period 1, reduction factor 3)."""
    return {
        "name": name,
        "dataset": dataset,
        "trial": {
            "backbone": size.backbone,
            "image_size": size.image_size,
            "epochs": size.epochs,
            "batch_size": 16,
            "seed": 0,
        },
        "resources": {"cpus": 1, "gpus": 0},
        "search": {
            "algorithm": algorithm,
            "seed": seed,
            "num_samples": size.trials,
            "max_concurrent": 2,
        },
        "space": {
            "learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
            "dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
        },
        "scheduler": {"type": scheduler},
        "metric": METRIC,
        "mode": "max",
        "max_retries": 0,
    }


def seed_sweeps(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: one seed's sweeps, one after the other, with `run_sweep` against an in-process
    Ray; per sweep its wall time, and per trial (in start order) its config and curve."""
    from chestxpert.cluster.endpoints import prepare_ray_environment, resolve

    work = Path(spec["work"])
    # Ray fixes its auth mode at import and caches the token for the process: one
    # workspace (one token) serves every sweep; storage and MLflow are per sweep.
    prepare_ray_environment(work / "ws")
    # Imported before the clocks start: every sweep finds them loaded.
    from ray import tune  # noqa: F401
    from ray.tune.search.optuna import OptunaSearch  # noqa: F401

    from chestxpert.sweeps.layout import locate
    from chestxpert.sweeps.run import run_sweep
    from chestxpert.sweeps.spec import spec_from_dict
    from chestxpert.sweeps.status import read_trials

    out = {}
    for label, data in spec["sweeps"].items():
        name = data["name"]
        endpoints = resolve(
            workspace=work / "ws",
            storage=str(work / f"storage-{name}"),
            mlflow_tracking_uri=f"sqlite:///{work / f'mlflow-{name}.db'}",
            environ={},
        )
        sweep = spec_from_dict(data, source=data["name"])
        started = time.monotonic()
        summary = run_sweep(sweep, endpoints)
        wall = time.monotonic() - started
        location = locate(endpoints, sweep.name)
        rows = read_trials(location, METRIC, "max", sweep.trial["epochs"], tune_running=False)
        rows.sort(key=lambda row: row.trial_id)  # Tune numbers its trials in start order
        out[label] = {
            "wall": wall,
            "errors": summary["errors"],
            "configs": [
                {key: row.config[key] for key in ("learning_rate", "dropout")} for row in rows
            ],
            "curves": [[result[METRIC] for result in row.results] for row in rows],
        }
    return out


def run(smoke: bool = False) -> None:
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.synth import generate

    size = SMOKE if smoke else FULL
    with scratch_dir() as work:
        side = size.image_size
        generate(work / "raw", images=size.images, size=side, seed=0, progress=False)
        # A third of the patients for validation: every trial's metric comes from it, and a
        # 0.01 AUC target needs a few hundred images (the test split is not used here).
        opts = PrepareOptions(
            source="nih", image_size=side, val_fraction=0.3, test_fraction=0.05, progress=False
        )
        endpoints = resolve(workspace=work / "ws", environ={})
        manifest = prepare(str(work / "raw"), str(work / "prepared"), opts, endpoints)
        splits = manifest["splits"]
        print(
            f"  {size.images} images at {side} px ({splits['train']['images']} train, "
            f"{splits['val']['images']} val), {size.trials} {size.backbone} trials x up to "
            f"{size.epochs} epochs, 1 CPU each, 2 at a time, seeds {list(size.seeds)}; per "
            f"seed the sides {', '.join(size.sides)} of: tpe = Optuna TPE + ASHA, asha = "
            "random + ASHA, full = the same random configurations, no stopping (ASHA: grace 1, "
            "reduction factor 3)",
            flush=True,
        )
        dataset = str(work / "prepared")
        runs = []
        for seed in size.seeds:
            sweeps = {
                label: sweep_spec(f"bench-{label}-{seed}", dataset, size, seed, algo, sched)
                for label, algo, sched in SIDES
                if label in size.sides
            }
            # A fresh child (driver and in-process Ray) per seed
            result = run_child(seed_sweeps, {"work": str(work), "sweeps": sweeps}, timeout=3 * 3600)
            report_seed(seed, result, size)
            runs.append(result)
    report_spread(runs, size)


def best(curves: list[list[float]]) -> float:
    return max((value for curve in curves for value in curve), default=float("nan"))


def epochs(side: dict[str, Any]) -> int:
    return sum(len(curve) for curve in side["curves"])


def report_seed(seed: int, result: dict[str, Any], size: Size) -> None:
    """One seed's sides, ASHA's rung counts, and whether asha and full drew the same configs."""
    for label in result:
        side = result[label]
        reached = [len(curve) for curve in side["curves"]]
        print(
            f"  seed {seed} {label:4s}: trial-epochs {epochs(side):3d}, best {METRIC} "
            f"{best(side['curves']):.4f}, wall {side['wall']:6.1f} s, errors {side['errors']}, "
            f"epochs per trial (start order) {' '.join(map(str, reached))}",
            flush=True,
        )
    same = result["asha"]["configs"] == result["full"]["configs"]
    print(f"  seed {seed}: asha and full ran the same configurations: {'yes' if same else 'NO'}")
    for label in [side for side in ("tpe", "asha") if side in size.sides]:
        reached = [len(curve) for curve in result[label]["curves"]]
        top = [index for index, count in enumerate(reached) if count >= size.epochs]
        print(
            f"  seed {seed} {label}: {len(top)} of {len(reached)} trials ran all "
            f"{size.epochs} epochs; their start positions {[index + 1 for index in top]}"
        )


def mean_spread(values: list[float], digits: int = 3) -> str:
    shown = ", ".join(f"{value:.{digits}f}" for value in values)
    return (
        f"{statistics.fmean(values):.{digits}f} (runs {shown}; spread "
        f"{max(values) - min(values):.{digits}f})"
    )


def report_spread(runs: list[dict[str, Any]], size: Size) -> None:
    """The means over the seeds against the targets, TPE against random, and the replays."""
    ratios = [epochs(run["asha"]) / max(epochs(run["full"]), 1) for run in runs]
    gaps = [best(run["asha"]["curves"]) - best(run["full"]["curves"]) for run in runs]
    ratio, gap = statistics.fmean(ratios), statistics.fmean(gaps)
    met = ratio <= EPOCH_RATIO_TARGET + 1e-9 and gap >= AUC_GAP_TARGET
    print(
        f"  ratio asha/full: trial-epochs {mean_spread(ratios)}, target <= "
        f"{EPOCH_RATIO_TARGET:.2f}; best AUC asha-full {mean_spread(gaps, 4)}, target >= "
        f"{AUC_GAP_TARGET}; {'both targets met' if met else 'target missed'} "
        f"(mean of {len(runs)} seeds)"
    )
    if "tpe" in size.sides:
        tpe_gaps = [best(run["tpe"]["curves"]) - best(run["asha"]["curves"]) for run in runs]
        tpe_ratios = [epochs(run["tpe"]) / max(epochs(run["full"]), 1) for run in runs]
        print(
            f"  tpe against random, both under ASHA: best AUC tpe-asha "
            f"{mean_spread(tpe_gaps, 4)}; tpe's trial-epochs / full {mean_spread(tpe_ratios)}"
        )
    rng = random.Random(0)
    for label, reduction, revisit in (
        ("Ray's ASHA, reduction factor 3", 3, False),
        ("Ray's ASHA, reduction factor 4", 4, False),
        ("promotions on fewer than rf results revisited, rf 3", 3, True),
    ):
        replays = [
            replay(run["full"]["curves"], size.epochs, reduction, revisit, rng)
            for run in runs
            for _ in range(size.orders)
        ]
        replay_ratios = sorted(ratio for ratio, _ in replays)
        tenth = replay_ratios[len(replay_ratios) // 10]
        ninetieth = replay_ratios[(len(replay_ratios) * 9) // 10]
        worst_gap = min(gap for _, gap in replays)
        print(
            f"  replay, {label}: trial-epochs/full mean {statistics.fmean(replay_ratios):.3f}, "
            f"10th-90th percentile {tenth:.3f}-{ninetieth:.3f}; best AUC change mean "
            f"{statistics.fmean(gap for _, gap in replays):+.4f}, worst {worst_gap:+.4f} "
            f"({size.orders} shuffled start orders of each seed's full-length curves, 2 workers)"
        )


def replay(
    curves: list[list[float]], max_t: int, reduction: int, revisit: bool, rng: random.Random
) -> tuple[float, float]:
    """ASHA's decisions (Ray's own `_Bracket`) on measured curves started in a shuffled order
    by 2 workers whose epochs take 1 ± 5% time units; returns the trial-epochs over full
    length and the change in best AUC. `revisit`: a trial promoted while its rung held fewer
    than `reduction` results is stopped once the rung's later results leave it below the cut."""
    import heapq

    from ray.tune.schedulers.async_hyperband import _Bracket

    class Trial:
        def __init__(self, index: int) -> None:
            self.trial_id = str(index)

    bracket = _Bracket(1, max_t, reduction, 0, True)
    order = list(range(len(curves)))
    rng.shuffle(order)
    queue: list[tuple[float, int, int]] = []  # (time the epoch ends, trial, epoch)
    ran = dict.fromkeys(order, 0)
    waiting = iter(order)
    for trial in [next(waiting, None), next(waiting, None)]:
        if trial is not None:
            heapq.heappush(queue, (rng.uniform(0.95, 1.05), trial, 1))
    while queue:
        now, trial, epoch = heapq.heappop(queue)
        ran[trial] = epoch
        full = epoch >= min(max_t, len(curves[trial]))
        go_on = not full and decide(bracket, Trial(trial), epoch, curves[trial][epoch - 1], revisit)
        if go_on:
            heapq.heappush(queue, (now + rng.uniform(0.95, 1.05), trial, epoch + 1))
        elif (following := next(waiting, None)) is not None:
            heapq.heappush(queue, (now + rng.uniform(0.95, 1.05), following, 1))
    spent = sum(ran.values()) / max(sum(len(curve) for curve in curves), 1)
    kept = max(max(curves[trial][:count]) for trial, count in ran.items())
    return spent, kept - best(curves)


def decide(bracket, trial, epoch: int, value: float, revisit: bool) -> bool:
    """True when the trial goes on."""
    if bracket.on_result(trial, epoch, value) != "CONTINUE":
        return False
    if revisit:
        for _, recorded in bracket._rungs:  # highest rung first
            if trial.trial_id in recorded and len(recorded) >= bracket.rf:
                return recorded[trial.trial_id] >= bracket.cutoff(recorded)
    return True
