"""Optimisers and learning-rate schedules for a trial, from its flat config."""

from __future__ import annotations

import keras

from chestxpert.trainable.config import TrialConfig


def make_optimizer(config: TrialConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam, AdamW or SGD (momentum, Nesterov) with weight decay, clipping and the LR schedule.

    `cosine` warms up linearly over `warmup_epochs`, then decays to zero at the
    last epoch; `plateau` keeps a constant rate that `ReduceLROnPlateau` lowers.
    """
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = config.learning_rate
    if config.lr_schedule == "cosine":
        total = max(1, config.epochs * steps_per_epoch)
        warmup = min(total - 1, int(round(config.warmup_epochs * steps_per_epoch)))
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=config.learning_rate * (0.01 if warmup else 1.0),
            decay_steps=max(1, total - warmup),
            warmup_target=config.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    common = {"learning_rate": learning_rate}
    if config.clipnorm > 0:
        common["clipnorm"] = config.clipnorm
    if config.weight_decay > 0:
        common["weight_decay"] = config.weight_decay
    if config.optimizer == "adam":
        return keras.optimizers.Adam(**common)
    if config.optimizer == "adamw":
        common.setdefault("weight_decay", 0.0)
        return keras.optimizers.AdamW(**common)
    return keras.optimizers.SGD(momentum=config.momentum, nesterov=config.nesterov, **common)
