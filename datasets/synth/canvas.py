"""The canvas a phantom is painted on: a density map with coordinate windows, the lung mask, and
the boxes recorded for the eight findings NIH drew boxes for.
"""

from __future__ import annotations

import math

import numpy as np

from chestxpert.datasets.synth.anatomy import Geometry
from chestxpert.datasets.synth.textures import grid, noise_fields

# The eight findings NIH drew boxes for, spelled as BBox_List_2017.csv spells them.
BOX_LABELS: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Effusion",
    "Infiltration": "Infiltrate",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}

Box = tuple[str, float, float, float, float]  # NIH label, x, y, w, h in pixels of the written image


class Canvas:
    """The density map of one image (higher = more attenuating = brighter) and its helpers."""

    def __init__(self, size: int, geo: Geometry):
        self.size = size
        self.geo = geo
        self.x, self.y = grid(size)
        self.edge = max(0.006, 0.8 / size)  # soft anatomical borders, never below a pixel
        self.u = np.abs(self.x - geo.cx)  # distance from the midline, a row
        self.density = np.zeros((size, size), np.float32)
        self.lung_mask = np.zeros((size, size), np.float32)  # set when the lungs are drawn
        self.boxes: list[Box] = []

    def window(
        self, x0: float, x1: float, y0: float, y1: float
    ) -> tuple[slice, slice, np.ndarray, np.ndarray]:
        """Pixel slices and coordinate grids of the normalised rectangle [x0, x1] x [y0, y1]."""
        s = self.size
        c0, c1 = max(0, int(x0 * s)), min(s, int(math.ceil(x1 * s)))
        r0, r1 = max(0, int(y0 * s)), min(s, int(math.ceil(y1 * s)))
        c1, r1 = max(c1, c0 + 1), max(r1, r0 + 1)
        return slice(r0, r1), slice(c0, c1), self.x[:, c0:c1], self.y[r0:r1]

    def side_window(
        self, side: int, y0: float, y1: float, pad: float = 0.02
    ) -> tuple[slice, slice, np.ndarray, np.ndarray]:
        """`window` over one side's lung, from the midline to `pad` beyond its lateral wall."""
        lateral = self.geo.lateral(side) + pad
        if side:
            return self.window(self.geo.cx, self.geo.cx + lateral, y0, y1)
        return self.window(self.geo.cx - lateral, self.geo.cx, y0, y1)

    def add(
        self, label: str, rows: slice, cols: slice, change: np.ndarray, box: bool = True
    ) -> None:
        """Add `change` to the density in the window; box where it is at least 5% of its peak."""
        self.density[rows, cols] += change
        if not box or label not in BOX_LABELS:
            return
        strong = np.abs(change) >= 0.05 * float(np.abs(change).max() or 1.0)
        self.box_mask(label, rows, cols, strong)

    def box_mask(self, label: str, rows: slice, cols: slice, mask: np.ndarray) -> None:
        """Record the bounding box of `mask` (a window's shape) as a box of `label`."""
        hit_rows, hit_cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if hit_rows.size == 0:
            return
        x0, x1 = cols.start + hit_cols[0], cols.start + hit_cols[-1] + 1
        y0, y1 = rows.start + hit_rows[0], rows.start + hit_rows[-1] + 1
        self.boxes.append((label, float(x0), float(y0), float(x1 - x0), float(y1 - y0)))

    def lung(self, rows: slice, cols: slice) -> np.ndarray:
        """The lung mask (0..1) over a window."""
        return self.lung_mask[rows, cols]

    def field(
        self, rng: np.random.Generator, rows: slice, cols: slice, fine: bool = False
    ) -> np.ndarray:
        """A window-shaped piece of a smooth noise field, at a random offset."""
        bank = noise_fields(self.size)[1 if fine else 0]
        h, w = rows.stop - rows.start, cols.stop - cols.start
        r0 = int(rng.integers(0, self.size - h + 1))
        c0 = int(rng.integers(0, self.size - w + 1))
        return bank[r0 : r0 + h, c0 : c0 + w]


def soft_inside(value: np.ndarray, edge: float) -> np.ndarray:
    """1 where value > 0 (a signed distance in image widths), 0 where < 0, linear over `edge`."""
    return np.clip(value / edge + 0.5, 0.0, 1.0)


def heart_mask(canvas: Canvas) -> tuple[slice, slice, np.ndarray]:
    """The heart silhouette: an ellipse tilted so its apex points down and to the patient's left."""
    geo = canvas.geo
    hx, hy, hw, hh = geo.heart()
    long_axis, short_axis = geo.heart_axes()
    rows, cols, xs, ys = canvas.window(
        hx - hw - 0.01, hx + hw + 0.01, hy - hh - 0.01, hy + hh + 0.01
    )
    cos, sin = math.cos(geo.heart_tilt), math.sin(geo.heart_tilt)
    along, across = (xs - hx) * cos + (ys - hy) * sin, (ys - hy) * cos - (xs - hx) * sin
    qh = (along / long_axis) ** 2 + (across / short_axis) ** 2
    return rows, cols, soft_inside((1.0 - qh) * short_axis * 0.5, 2 * canvas.edge)
