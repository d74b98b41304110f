"""The flat trial config: every setting a trial reads, its default, and its allowed values.

The sweep spec validates its search space against these names; the trainable
never reads the spec itself.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from chestxpert.cluster.errors import UserError
from chestxpert.datasets.shard_cache import OFF_WORDS

# Text settings whose values include "on" and "off": YAML 1.1 reads a bare on/off as a
# boolean, which these take back as the word.
ON_OFF_SETTINGS = ("mixed_precision",)


class ConfigError(UserError, ValueError):
    """A trial setting that is unknown or out of range; the message names the key."""


@dataclass(frozen=True)
class TrialConfig:
    """One trial's settings, all plain values. Units: learning rates per step, angles in degrees,
    shift/zoom/brightness/contrast as fractions of the image or range."""

    dataset: str = ""  # prepared-dataset URI (folder or s3://)
    dataset_generation: str = ""  # the dataset version to read; "" = the current one
    backbone: str = "densenet121"  # a registered backbone (trainable/backbones.py)
    image_size: int = 0  # 0 = the dataset's size; smaller values resize on the fly
    batch_size: int = 16  # images per training step
    epochs: int = 10  # epochs to train; in a sweep ASHA may stop a trial sooner
    learning_rate: float = 1e-3  # the optimizer's rate (a cosine schedule's peak)
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    weight_decay: float = 0.0  # 0 = none; Keras' decoupled weight decay
    clipnorm: float = 0.0  # 0 = no gradient clipping
    lr_schedule: str = "constant"  # constant | cosine | plateau
    warmup_epochs: float = 0.0  # cosine only
    plateau_factor: float = 0.5  # plateau only
    plateau_patience: int = 2  # plateau only, in epochs
    loss: str = "weighted_bce"  # weighted_bce | bce | focal
    focal_gamma: float = 2.0  # focal loss only
    dropout: float = 0.2  # on the pooled features, in [0, 1)
    augment: bool = True  # false: none of the augmentations below
    rotation_deg: float = 5.0  # random rotation up to ± this many degrees
    shift: float = 0.05  # random shift up to ± this fraction of the side
    zoom: float = 0.1  # random zoom up to ± this fraction
    brightness: float = 0.1  # random brightness up to ± this fraction of the range
    contrast: float = 0.1  # random contrast up to ± this fraction
    hflip: bool = False  # off: a flip puts the heart on the wrong side
    weights: str = ""  # "" = from scratch; "imagenet"; or a local weights file
    seed: int = 0  # initial weights, shuffling and augmentation
    mixed_precision: str = "auto"  # auto (on with a GPU) | on (= mixed_float16) | off | bfloat16
    xla: bool = False  # compile the training step with XLA
    cpus: int = 0  # TF threads, row-group reads; 0 = the Ray trial's/task's CPUs, else all cores
    cpu_devices: int = 1  # > 1 without GPUs: that many logical CPUs, trained as several GPUs are
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always)
    train_splits: str = "train"  # train | train+val (the final retrain may add validation)
    shard_cache: str = ""  # per-node s3:// shard cache: folder | off; "" = $CHESTXPERT_SHARD_CACHE
    shard_cache_gb: float = 0.0  # shard cache cap, LRU; 0 = $CHESTXPERT_SHARD_CACHE_GB, else 20 GB

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "trial config") -> TrialConfig:
        """Build a config from plain values, refusing unknown keys and impossible values."""
        known = {f.name: f for f in fields(cls)}
        clean: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = (
                    f"; did you mean {close[0]!r}?"
                    if close
                    else f"; known keys: {', '.join(sorted(known))}"
                )
                raise ConfigError(f"{where}: unknown key {key!r}{hint}")
            if key in ON_OFF_SETTINGS and isinstance(value, bool):
                value = "on" if value else "off"
            default = known[key].default
            clean[key] = _coerce(key, value, type(default), where)
        config = cls(**clean)
        config.check(where)
        return config

    def check(self, where: str = "trial config") -> None:
        """Refuse values no trial can run with, naming the key and the allowed range."""
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{where}: {item.name} must be a finite number, got {value}")
        choices = {
            "optimizer": ("adam", "adamw", "sgd"),
            "lr_schedule": ("constant", "cosine", "plateau"),
            "loss": ("weighted_bce", "bce", "focal"),
            "mixed_precision": ("auto", "on", "off", "mixed_float16", "bfloat16"),
            "train_splits": ("train", "train+val"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"{where}: {key} {getattr(self, key)!r} is not one of {', '.join(allowed)}"
                )
        positive = ("batch_size", "epochs", "learning_rate", "checkpoint_every", "cpu_devices")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}: {key} must be > 0, got {getattr(self, key)}")
        cache = self.shard_cache.strip()
        relative = not os.path.isabs(os.path.expanduser(cache))
        if cache and cache.lower() not in OFF_WORDS and relative:
            raise ConfigError(
                f"{where}: shard_cache {cache!r} must be an absolute folder (or ~/...), or off: "
                "trials run in other working directories, on other machines"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        for key in (
            "weight_decay",
            "clipnorm",
            "warmup_epochs",
            "focal_gamma",
            "rotation_deg",
            "shift",
            "zoom",
            "brightness",
            "contrast",
            "image_size",
            "cpus",
            "shard_cache_gb",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}: {key} must be >= 0, got {getattr(self, key)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def precision_policy(self, has_gpu: bool) -> str:
        """The Keras dtype policy this trial trains under: `mixed_float16` for `on` (and for
        `auto` when the trial has a GPU), `mixed_bfloat16` for `bfloat16`, else `float32`."""
        if self.mixed_precision in ("on", "mixed_float16") or (
            self.mixed_precision == "auto" and has_gpu
        ):
            return "mixed_float16"
        return "mixed_bfloat16" if self.mixed_precision == "bfloat16" else "float32"


def _coerce(key: str, value: Any, kind: type, where: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is str and value is None:
        return ""
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
    return value
