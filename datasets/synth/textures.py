"""Pixel grids and texture banks shared by every phantom: soft line segments, vessel trees and
smooth noise fields, each drawn once per process and image size from a fixed seed.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import ndimage


@lru_cache(maxsize=1)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image widths: x as a (1, size) row, y as a (size, 1) column."""
    centres = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    return centres[None, :], centres[:, None]


def segment(
    xs: np.ndarray,
    ys: np.ndarray,
    p0: tuple[float, float],
    p1: tuple[float, float],
    half_width: float,
) -> np.ndarray:
    """A soft line from p0 to p1: 1 on the centre line, falling to 0 at `half_width` away."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    length2 = max(dx * dx + dy * dy, 1e-12)
    t = np.clip(((xs - p0[0]) * dx + (ys - p0[1]) * dy) / length2, 0.0, 1.0)
    dist = np.sqrt((xs - p0[0] - t * dx) ** 2 + (ys - p0[1] - t * dy) ** 2)
    return np.clip(1.0 - dist / half_width, 0.0, 1.0)


@lru_cache(maxsize=2)
def vessel_bank(size: int) -> tuple[np.ndarray, ...]:
    """Six vessel trees for a right lung, hilum at (0.40, 0.40) of a 0.5 x 0.8 (image widths) patch.

    Drawn once per process and size from a fixed seed (so every worker has the same ones); each
    image picks one per lung, flipped for the left, which is far cheaper than growing trees per
    image. Vessels wander, fork and taper as they run out from the hilum.
    """
    rng = np.random.default_rng(20170101)
    height, width = round(0.8 * size), round(0.5 * size)
    xs = ((np.arange(width, dtype=np.float32) + 0.5) / size)[None, :]
    ys = ((np.arange(height, dtype=np.float32) + 0.5) / size)[:, None]
    pixel = 1.0 / size
    trees = []
    for _ in range(6):
        tree = np.zeros((height, width), np.float32)
        stack = [
            (
                (0.40 + rng.uniform(-0.01, 0.02), 0.40 + rng.uniform(-0.05, 0.05)),
                math.radians(rng.uniform(75, 285)),
                0.006 * rng.uniform(0.8, 1.2),
            )
            for _ in range(11)
        ]
        while stack:
            start, angle, half_width = stack.pop()
            if half_width < 0.0012:
                continue
            angle += math.radians(rng.normal(0.0, 6.0))
            length = rng.uniform(0.02, 0.035)
            end = (start[0] + length * math.cos(angle), start[1] - length * math.sin(angle))
            pad = half_width + pixel
            c0, c1 = (
                max(0, int((min(start[0], end[0]) - pad) * size)),
                min(width, int((max(start[0], end[0]) + pad) * size) + 1),
            )
            r0, r1 = (
                max(0, int((min(start[1], end[1]) - pad) * size)),
                min(height, int((max(start[1], end[1]) + pad) * size) + 1),
            )
            if c0 < c1 and r0 < r1:
                # a vessel thinner than a pixel stays one pixel wide but fainter
                line = segment(xs[:, c0:c1], ys[r0:r1], start, end, max(half_width, 0.8 * pixel))
                line *= min(1.0, half_width / (0.8 * pixel)) * (half_width / 0.006) ** 0.3
                np.maximum(tree[r0:r1, c0:c1], line, out=tree[r0:r1, c0:c1])
            stack.append((end, angle, half_width * 0.9))
            if rng.uniform() < 0.4:
                stack.append(
                    (
                        end,
                        angle + math.radians(rng.choice([-1, 1]) * rng.uniform(20, 40)),
                        half_width * 0.7,
                    )
                )
        trees.append(ndimage.gaussian_filter(tree, 0.7 * size / 256))
    return tuple(trees)


@lru_cache(maxsize=2)
def noise_fields(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two smooth unit-variance noise fields (blobs ~ size/40 and ~ size/75) for patchy lesions."""
    rng = np.random.default_rng(20170102)
    fields = []
    for sigma in (size / 40, size / 75):
        field = ndimage.gaussian_filter(
            rng.standard_normal((size, size), dtype=np.float32), max(sigma, 0.8), mode="wrap"
        )
        fields.append((field / field.std()).astype(np.float32))
    return fields[0], fields[1]
