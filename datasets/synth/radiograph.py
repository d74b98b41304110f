"""One synthetic frontal chest film: the patient's anatomy with the chosen findings, painted as
densities and developed through a film curve into an 8-bit image, with the boxes drawn.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from chestxpert.datasets.schema import NIH_LABELS, DatasetError
from chestxpert.datasets.synth.anatomy import Anatomy, image_geometry
from chestxpert.datasets.synth.canvas import Box, Canvas
from chestxpert.datasets.synth.chest import compose_anatomy
from chestxpert.datasets.synth.findings import (
    RESHAPE,
    SIGNS,
    pneumothorax_region,
    sign_pneumothorax,
)


def draw_radiograph(
    anatomy: Anatomy,
    findings: Collection[str],
    size: int,
    image_seed: np.random.SeedSequence | int,
    lesion_seed: int = 0,
    difficulty: float = 0.5,
    view: str = "PA",
) -> tuple[np.ndarray, list[Box]]:
    """Draw one frontal chest film: a (size, size) uint8 array and the boxes of what was drawn.

    `findings` are NIH label names; `image_seed` fixes the per-image jitter, vessel pattern and
    film noise (the same seed with and without a finding differs only by that finding's sign);
    `lesion_seed` fixes where and how each finding is drawn; `difficulty` in 0..1 shrinks size
    and contrast of every sign (0 = obvious, 1 = subtle). Boxes are (label, x, y, w, h) in pixels
    for the eight NIH box labels, one per drawn lesion.
    """
    unknown = sorted(set(findings) - set(NIH_LABELS))
    if unknown:
        raise DatasetError(f"unknown findings {unknown}; expected names from {NIH_LABELS}")
    rng = np.random.default_rng(image_seed)
    geo = image_geometry(anatomy, rng.uniform(-1.0, 1.0, 8), view)
    lesion_rngs = {
        label: np.random.default_rng(
            np.random.SeedSequence(lesion_seed, spawn_key=(NIH_LABELS.index(label),))
        )
        for label in NIH_LABELS
        if label in findings
    }
    for label, reshape in RESHAPE.items():
        if label in lesion_rngs:
            reshape(geo, lesion_rngs[label], difficulty)
    canvas = Canvas(size, geo)

    marking_keep = np.ones((size, size), np.float32)
    pneumothorax = None
    if "Pneumothorax" in lesion_rngs:  # the pleural space has no lung markings: cut them first
        pneumothorax = pneumothorax_region(canvas, lesion_rngs["Pneumothorax"], difficulty)
        _, rows, cols, space, _ = pneumothorax
        marking_keep[rows, cols] -= space
    compose_anatomy(canvas, rng, marking_keep)
    for label in NIH_LABELS:
        if label == "Pneumothorax" and pneumothorax is not None:
            sign_pneumothorax(canvas, lesion_rngs[label], difficulty, pneumothorax)
        elif label in lesion_rngs:
            SIGNS[label](canvas, lesion_rngs[label], difficulty)
    return _develop(canvas, rng), canvas.boxes


def _develop(canvas: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Film-like characteristic curve, a slight exposure gradient, quantum noise, and 8 bits."""
    geo = canvas.geo
    gradient = 1.0 + 0.04 * (canvas.y - 0.5) + rng.uniform(-0.03, 0.03) * (canvas.x - 0.5)
    film = 1.0 / (
        1.0 + np.exp(-3.6 * geo.contrast * (canvas.density * geo.exposure * gradient - 0.55))
    )
    noise = rng.random((canvas.size, canvas.size), dtype=np.float32)
    film += (noise - 0.5) * 0.05
    return np.clip(film * 262.0 - 6.0, 0.0, 255.0).astype(np.uint8)
