"""Train-time augmentation for chest radiographs: small geometric and photometric changes only.

Horizontal flip exists but is off by default: a flipped frontal film puts the
heart on the right (dextrocardia), which teaches anatomy that patients rarely have.
"""

from __future__ import annotations

import keras

from chestxpert.trainable.config import TrialConfig


def make_augmentation(config: TrialConfig) -> keras.Sequential | None:
    """Keras preprocessing layers (active in training only) for gray images in 0..255, or None."""
    if not config.augment:
        return None
    seed = config.seed
    layers: list[keras.layers.Layer] = []
    if config.rotation_deg > 0:
        layers.append(
            keras.layers.RandomRotation(
                config.rotation_deg / 360.0, fill_mode="constant", seed=seed + 1
            )
        )
    if config.shift > 0:
        layers.append(
            keras.layers.RandomTranslation(
                config.shift, config.shift, fill_mode="constant", seed=seed + 2
            )
        )
    if config.zoom > 0:
        layers.append(
            keras.layers.RandomZoom(
                (-config.zoom, config.zoom), fill_mode="constant", seed=seed + 3
            )
        )
    if config.brightness > 0:
        layers.append(
            keras.layers.RandomBrightness(
                config.brightness, value_range=(0.0, 255.0), seed=seed + 4
            )
        )
    if config.contrast > 0:
        layers.append(
            keras.layers.RandomContrast(config.contrast, value_range=(0.0, 255.0), seed=seed + 5)
        )
    if config.hflip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 6))
    return keras.Sequential(layers, name="augmentation") if layers else None
