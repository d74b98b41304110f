"""densenet_tiny sweeps: Optuna + ASHA versus random search with every trial at full
length; trial-epochs spent, wall time and the best validation macro AUC of each.

Targets: ASHA spends at most a third of the trial-epochs and its best AUC is within 0.01
of the full-length sweep's. Sized so both can be judged: ASHA promotes the first trial
to reach each rung unconditionally, so with few trials it cannot cut to a third; and a
small validation split makes 0.01 AUC noise.
"""

from __future__ import annotations

import os
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
    # smoke mode checks the harness, not the figures: the quickest backbone to build
    backbone: str = "densenet_tiny"


FULL = Size(images=1500, trials=24, epochs=9, image_size=64)
SMOKE = Size(images=120, trials=1, epochs=2, image_size=32, backbone="convnet_small")
EPOCH_RATIO_TARGET = 1 / 3
AUC_GAP_TARGET = -0.01


def sweep_spec(name: str, dataset: str, size: Size, algorithm: str, scheduler: dict) -> dict:
    """The sweep both sides run, as its YAML would read; only search and scheduler differ."""
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
            "seed": 0,
            "num_samples": size.trials,
            "max_concurrent": 2,
        },
        "space": {
            "learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
            "dropout": {"type": "uniform", "low": 0.0, "high": 0.5},
        },
        "scheduler": scheduler,
        "metric": "val_auc_macro",
        "mode": "max",
        "max_retries": 0,
    }


def two_sweeps(spec: dict[str, Any]) -> dict[str, Any]:
    """Child: both sweeps, one after the other, with `run_sweep` against an in-process Ray."""
    from chestxpert.cluster.endpoints import prepare_ray_environment, resolve

    work = Path(spec["work"])
    # Ray fixes its auth mode at import and caches the token for the process: one
    # workspace (one token) serves both sweeps; storage and MLflow are per sweep.
    prepare_ray_environment(work / "ws")
    # Imported before the clocks start: both sweeps find them loaded.
    from ray import tune  # noqa: F401
    from ray.tune.search.optuna import OptunaSearch  # noqa: F401

    from chestxpert.sweeps.layout import locate
    from chestxpert.sweeps.run import run_sweep
    from chestxpert.sweeps.spec import spec_from_dict
    from chestxpert.sweeps.status import read_trials

    out = {}
    for label, data in spec["sweeps"].items():
        endpoints = resolve(
            workspace=work / "ws",
            storage=str(work / f"storage-{label}"),
            mlflow_tracking_uri=f"sqlite:///{work / f'mlflow-{label}.db'}",
            environ={},
        )
        sweep = spec_from_dict(data, source=data["name"])
        cpu = os.times()
        started = time.monotonic()
        summary = run_sweep(sweep, endpoints)
        wall = time.monotonic() - started
        driver_cpu = sum(os.times()[:2]) - sum(cpu[:2])
        location = locate(endpoints, sweep.name)
        rows = read_trials(location, sweep.metric, sweep.mode, sweep.trial["epochs"])
        out[label] = {
            "wall": wall,
            "driver_cpu": driver_cpu,
            "trials": len(rows),
            "errors": summary["errors"],
            "epochs": [row.epochs for row in rows],
            "best_metric": summary.get("best_metric"),
            "best_config": summary.get("best_config") or {},
        }
    return out


def run(smoke: bool = False) -> None:
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare
    from chestxpert.datasets.synth import generate

    size = SMOKE if smoke else FULL
    asha = {"type": "asha", "max_t": size.epochs, "grace_period": 1, "reduction_factor": 3}
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
        rungs = ", ".join(f"{key} {value}" for key, value in asha.items() if key != "type")
        print(
            f"  {size.images} images at {side} px ({splits['train']['images']} train, "
            f"{splits['val']['images']} val), {size.trials} trials x up to {size.epochs} "
            f"epochs, 1 CPU per trial, 2 at a time; (a) optuna + ASHA ({rungs}), (b) random, "
            "no scheduler",
            flush=True,
        )
        dataset = str(work / "prepared")
        # Both sweeps in one child process (a fresh driver whatever ran before in this one);
        # ASHA first, so any warm-cache advantage goes to the random side.
        sweeps = {
            "asha": sweep_spec("bench-asha", dataset, size, "optuna", asha),
            "random": sweep_spec("bench-random", dataset, size, "random", {"type": "none"}),
        }
        result = run_child(two_sweeps, {"work": str(work), "sweeps": sweeps}, timeout=3 * 3600)
    report(result, size)


def report(result: dict[str, Any], size: Size) -> None:
    """Print each sweep's trial-epochs, wall time and best AUC, then the ratios and targets."""
    for label, name in (("asha", "(a) optuna + ASHA"), ("random", "(b) random, full length")):
        side = result[label]
        best = f"{side['best_metric']:.4f}" if side["best_metric"] is not None else "none"
        per_trial = " ".join(str(epochs) for epochs in side["epochs"])
        print(
            f"  {name:24s} trial-epochs {sum(side['epochs']):3d} (per trial {per_trial})  "
            f"wall {side['wall']:6.1f} s  best val_auc_macro {best}  errors {side['errors']}  "
            f"driver CPU {side['driver_cpu']:.1f} s"
        )
        config = side["best_config"]
        print(
            f"  {'':24s} best config: lr {config.get('learning_rate', 0):.2e}, "
            f"dropout {config.get('dropout', 0):.3f}"
        )
    a, b = result["asha"], result["random"]
    if a["best_metric"] is None or b["best_metric"] is None:
        print("  a side reported no val_auc_macro: no ratio")
        return
    epoch_ratio = sum(a["epochs"]) / max(sum(b["epochs"]), 1)
    auc_gap = a["best_metric"] - b["best_metric"]
    met = epoch_ratio <= EPOCH_RATIO_TARGET + 1e-9 and auc_gap >= AUC_GAP_TARGET
    print(
        f"  ratio a/b: trial-epochs {epoch_ratio:.2f} (target <= {EPOCH_RATIO_TARGET:.2f}), "
        f"wall {a['wall'] / b['wall']:.2f}; AUC a-b {auc_gap:+.4f} (target >= {AUC_GAP_TARGET}); "
        f"{'both targets met' if met else 'target missed'}"
    )
    print(
        "  the two sides sample different configurations (TPE versus random, same seed): with "
        f"{size.trials} trials the AUC gap holds sampling luck as well as ASHA's early stops"
    )
