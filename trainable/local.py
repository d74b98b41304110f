"""`chestxpert train CONFIG.yaml`: one configuration, the trial loop outside Ray Tune.

For debugging a single config: metrics go to MLflow (step = epoch) and
checkpoints to a folder, from which `--resume` continues.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import yaml

from chestxpert.cluster import mlflow_runs
from chestxpert.cluster.endpoints import Endpoints
from chestxpert.trainable.config import ConfigError, TrialConfig

log = logging.getLogger("chestxpert.train")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d{4,})$")


def load_config_file(path: Path, overrides: list[str] | None = None) -> TrialConfig:
    """Read a flat YAML mapping of trial settings, apply `key=value` overrides, validate."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"{path}: expected a mapping of trial settings (key: value), "
            f"got {type(values).__name__}"
        )
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        values[key.strip()] = yaml.safe_load(raw)
    return TrialConfig.from_dict(values, where=str(path))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The highest-numbered `checkpoint_NNNN` folder in `out_dir`, or None."""
    if not out_dir.exists():
        return None
    found = [
        (int(m.group(1)), p) for p in out_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return max(found)[1] if found else None


def train_local(
    config: TrialConfig,
    out_dir: Path,
    endpoints: Endpoints,
    experiment: str = "chestxpert-train",
    resume: bool = False,
) -> dict[str, Any]:
    """Run the trial loop here, checkpoint to `out_dir`, log to MLflow; return the last metrics.

    With `resume`, continue from the newest checkpoint in `out_dir`. An MLflow
    server that does not answer costs a warning, not the run.
    """
    from chestxpert.trainable.checkpoint import copy_checkpoint
    from chestxpert.trainable.train import run_trial

    out_dir.mkdir(parents=True, exist_ok=True)
    restore = latest_checkpoint(out_dir) if resume else None
    if resume and restore is None:
        print(f"no checkpoint in {out_dir}; starting from scratch")
    tracker = _MlflowRun(endpoints.mlflow_tracking_uri, experiment, config)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        epoch = int(metrics["epoch"])
        line = (
            f"epoch {epoch}/{config.epochs}  train_loss {metrics['train_loss']:.4f}"
            f"  val_loss {metrics['val_loss']:.4f}"
        )
        if "val_auc_macro" in metrics:
            line += f"  val_auc_macro {metrics['val_auc_macro']:.4f}"
        print(
            f"{line}  {metrics['epoch_seconds']:.1f} s ({metrics['images_per_second']:.0f} img/s)",
            flush=True,
        )
        tracker.log(metrics, epoch)
        if checkpoint_dir is not None:
            copy_checkpoint(checkpoint_dir, out_dir / f"checkpoint_{epoch:04d}")

    try:
        return run_trial(config, report, restore=restore, endpoints=endpoints)
    finally:
        tracker.close()


class _MlflowRun:
    """One MLflow run for a local training; failures to log are warned about once and skipped."""

    def __init__(self, tracking_uri: str, experiment: str, config: TrialConfig) -> None:
        self.run_id: str | None = None
        self.warned = False
        try:
            self.client = mlflow_runs.client(tracking_uri)
            self.run_id = mlflow_runs.train_run(
                self.client, experiment, f"train-{config.backbone}", config.to_dict()
            )
        except Exception as err:
            self._warn(err)

    def _warn(self, err: Exception) -> None:
        if not self.warned:
            print(f"warning: MLflow logging is off for this run ({type(err).__name__}: {err})")
            self.warned = True

    def log(self, metrics: dict[str, float], epoch: int) -> None:
        if self.run_id is None:
            return
        try:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(key, float(value), now, epoch) for key, value in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as err:
            self._warn(err)

    def close(self) -> None:
        if self.run_id is not None:
            try:
                self.client.set_terminated(self.run_id)
            except Exception as err:
                self._warn(err)
