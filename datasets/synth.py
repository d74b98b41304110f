"""Synthetic chest radiographs ("phantoms") written in the NIH ChestX-ray14 layout.

`generate` draws frontal chest films with the 14 NIH findings and writes them exactly like the
NIH release (images_0NN/images/*.png, Data_Entry_2017.csv, BBox_List_2017.csv, train_val_list.txt,
test_list.txt), so the NIH adapter reads them with no special case.

Label statistics come from the shipped table `nih_label_rates.json`. It was computed once from the
real label file Data_Entry_2017_v2020.csv.gz (112,120 images, 30,805 patients) with pandas, rows
sorted by (Patient ID, Follow-up #): per-label prevalence and the 14x14 co-occurrence counts of the
one-hot labels; the 100 most frequent "Finding Labels" strings with their counts ("No Finding"
first; they cover 96.6% of images) and, for the remaining 3.4% ("tail"), each label's rate and the
histogram of label-set sizes; the share of consecutive follow-ups with an identical label string
(0.41) and, from it, the probability that our generator copies the previous label set
(`followup_keep_labels` = (0.41 - sum p_k^2) / (1 - sum p_k^2), with p_k the frequency of each
label string, so that copying plus independent draws repeats labels as often as NIH does); images
per patient (mean, share of single-image patients, quantiles, and the shape r of a negative
binomial for the extra images fitted so that P(1 image) matches at the real mean); ages at the
first image (every 5th percentile); the mean age gain between consecutive follow-ups; the share of
male patients and of PA images.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Collection
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from chestxpert.datasets.schema import NIH_LABELS, DatasetError

LABEL_RATES_PATH = Path(__file__).with_name("nih_label_rates.json")

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h]"

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

IMAGES_PER_FOLDER = 10_000  # NIH ships images_002.. with 10,000 files each
TEST_PATIENT_FRACTION = 0.2
FIELD_OF_VIEW_MM = 350.0  # image width in mm; sets nodule/mass sizes and the written pixel spacing
FALSE_POSITIVE_SHARE = 0.1  # per image, P(one spurious label) = label_noise * this

Box = tuple[str, float, float, float, float]  # NIH label, x, y, w, h in pixels of the written image

# SeedSequence spawn keys: one random stream plans the dataset, one per image draws it
_PLAN_STREAM = 0
_IMAGE_STREAM = 1


# --------------------------------------------------------------------------- label statistics


@lru_cache(maxsize=4)
def load_label_rates(path: Path = LABEL_RATES_PATH) -> dict:
    """Read the NIH label statistics table (see the module docstring for how it was computed).

    Returns the parsed JSON: `prevalence` (fraction of images per label, 0..1),
    `no_finding_fraction`, `cooccurrence` (14x14 image counts in NIH_LABELS order),
    `top_combinations`, `tail`, `images_per_patient`, `age_years_first_image`, and the sex, view
    and follow-up rates. Raises DatasetError if the file is missing or lacks a key.
    """
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot read label rates {path}: {err}; reinstall chestxpert") from err
    required = (
        "labels",
        "prevalence",
        "top_combinations",
        "tail",
        "images_per_patient",
        "age_years_first_image",
        "male_fraction_patients",
        "pa_fraction_images",
        "followup_keep_labels",
        "age_years_step_per_followup_mean",
    )
    missing = [key for key in required if key not in table]
    if missing or tuple(table["labels"]) != NIH_LABELS:
        raise DatasetError(f"{path} lacks keys {missing} or has labels not in NIH order")
    return table


def sample_label_sets(
    rng: np.random.Generator, count: int, rates: dict | None = None
) -> list[tuple[str, ...]]:
    """Draw `count` label sets (tuples in NIH_LABELS order; empty = "No Finding") like NIH's.

    A set is one of the 100 most frequent NIH label strings with its empirical frequency or,
    with the remaining probability (3.4%), a "tail" set: a size from the tail's size histogram
    and that many distinct labels drawn with the tail's per-label rates as weights. This keeps
    each label's prevalence and the common co-occurrences of the real file.
    """
    rates = rates or load_label_rates()
    combos = [
        tuple(label for label in NIH_LABELS if label in text.split("|"))
        for text, _ in rates["top_combinations"]
    ]
    weights = np.array([count for _, count in rates["top_combinations"]], dtype=np.float64)
    tail = rates["tail"]
    weights = weights / weights.sum() * (1.0 - tail["fraction"])
    choice = rng.choice(len(combos) + 1, size=count, p=np.append(weights, tail["fraction"]))
    tail_sizes = np.array([int(k) for k in tail["size_counts"]])
    tail_size_p = np.array(list(tail["size_counts"].values()), dtype=np.float64)
    tail_label_p = np.array([tail["label_rates"][label] for label in NIH_LABELS])
    sets: list[tuple[str, ...]] = []
    for pick in choice:
        if pick < len(combos):
            sets.append(combos[pick])
            continue
        size = int(rng.choice(tail_sizes, p=tail_size_p / tail_size_p.sum()))
        chosen = rng.choice(
            len(NIH_LABELS), size=size, replace=False, p=tail_label_p / tail_label_p.sum()
        )
        sets.append(tuple(NIH_LABELS[i] for i in sorted(chosen)))
    return sets


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class Anatomy:
    """One patient's chest, in units of the image width (x rightwards, y downwards, 0..1).

    Kept for all of a patient's follow-ups; each image adds a small jitter of position,
    inspiration and exposure. The image's left half shows the patient's right lung.
    `heart_ratio` is the cardiothoracic ratio (heart width / inner thoracic width, 0.39..0.47
    when normal); the heart is an ellipse with short/long axis `heart_roundness` whose long axis
    points down to the patient's left at `heart_tilt` radians; `exposure` and `contrast` shape
    the film curve (about 0.9..1.1).
    """

    sex: str
    center_x: float
    body_half_width: float
    lung_top: float
    lung_base: float
    lung_width: float
    mediastinum_half_width: float
    heart_ratio: float
    heart_roundness: float
    heart_tilt: float
    heart_left_share: float
    dome_height: float
    rib_spacing: float
    rib_slope: float
    tissue: float
    exposure: float
    contrast: float


def sample_anatomy(rng: np.random.Generator, sex: str) -> Anatomy:
    """Draw one patient's anatomy; women get slightly smaller chests and breast shadows."""
    small = 0.97 if sex == "F" else 1.0
    u = rng.uniform(0.0, 1.0, 16)
    lerp = lambda lo, hi, t: float(lo + (hi - lo) * t)  # noqa: E731
    return Anatomy(
        sex=sex,
        center_x=lerp(0.485, 0.515, u[0]),
        body_half_width=lerp(0.44, 0.48, u[1]) * small,
        lung_top=lerp(0.09, 0.13, u[2]),
        lung_base=lerp(0.73, 0.80, u[3]),
        lung_width=lerp(0.32, 0.36, u[4]) * small,
        mediastinum_half_width=lerp(0.045, 0.06, u[5]),
        heart_ratio=lerp(0.39, 0.47, u[6]),
        heart_roundness=lerp(0.6, 0.72, u[7]),
        heart_tilt=lerp(0.55, 0.75, u[14]),
        heart_left_share=lerp(0.62, 0.7, u[8]),
        dome_height=lerp(0.05, 0.08, u[9]),
        rib_spacing=lerp(0.058, 0.068, u[10]),
        rib_slope=lerp(0.8, 1.2, u[11]),
        tissue=lerp(0.92, 1.08, u[12]),
        exposure=lerp(0.93, 1.07, u[13]),
        contrast=lerp(0.9, 1.1, u[15]),
    )


@dataclass
class _Geometry:
    """The anatomy of one image after jitter and after findings that reshape it (per side: 0 = image left)."""

    cx: float
    top: float
    med: float
    body_hw: float
    lung_width: list[float]
    base: list[float]
    dome: list[float]
    air: list[float]
    lift: list[float]
    markings: float
    heart_ratio: float
    heart_roundness: float
    heart_tilt: float
    heart_left_share: float
    rib_spacing: float
    rib_slope: float
    tissue: float
    exposure: float
    contrast: float
    breasts: bool
    clavicle_rise: float
    # diaphragm level under the heart, fixed before findings reshape the domes
    heart_floor: float = 0.0
    atelectasis_side: int = 0

    def lateral(self, side: int) -> float:
        return self.med + self.lung_width[side]

    def lung_q(self, side: int, u: np.ndarray, y: np.ndarray, shrink: float = 0.0) -> np.ndarray:
        """The lung shape of one side (< 1 inside); `shrink` pulls the apex and lateral wall in."""
        return _lung_q(
            u, y, self.med, self.top + 1.4 * shrink, self.lung_width[side] - shrink, self.base[side]
        )

    def dome_y(self, side: int, u: np.ndarray | float) -> np.ndarray | float:
        """Height of the hemidiaphragm at distance `u` from the midline (a parabola per side)."""
        width = self.lung_width[side]
        bulge = 1.0 - ((u - (self.med + 0.42 * width)) / (0.62 * width)) ** 2
        return self.base[side] - self.lift[side] - self.dome[side] * np.clip(bulge, 0.0, 1.0)

    def heart(self) -> tuple[float, float, float, float]:
        """Centre x, centre y, half width and half height of the heart's tilted ellipse."""
        long_axis, short_axis = self.heart_axes()
        cos, sin = math.cos(self.heart_tilt), math.sin(self.heart_tilt)
        half_width = math.hypot(long_axis * cos, short_axis * sin)
        half_height = math.hypot(long_axis * sin, short_axis * cos)
        left_edge = self.cx - (1.0 - self.heart_left_share) * 2.0 * half_width
        # it rests on the diaphragm, its lower part hidden in the bright abdomen
        return left_edge + half_width, self.heart_floor - 0.6 * half_height, half_width, half_height

    def heart_axes(self) -> tuple[float, float]:
        """Long and short half-axes of the heart ellipse, sized so its width gives heart_ratio."""
        width = self.heart_ratio * 2.0 * max(self.lateral(0), self.lateral(1))
        cos, sin = math.cos(self.heart_tilt), math.sin(self.heart_tilt)
        scale = 0.5 * width / math.hypot(cos, self.heart_roundness * sin)
        return scale, scale * self.heart_roundness

    def lung_point(self, side: int, v: float, w: float) -> tuple[float, float]:
        """Image point at height fraction v (0 apex..1 base) and width fraction w (0 medial..1 lateral)."""
        width, height = self.lung_width[side], self.base[side] - self.top
        y = self.top + v * height * 0.92
        open_ = max(0.0, 1.0 - max(0.0, (0.5 - v * 0.92) / 0.5) ** 2)
        uc = self.med + 0.5 * width
        outer = uc + 0.5 * width * (0.86 + 0.14 * v) * math.sqrt(open_) - 0.02
        inner = uc - 0.5 * width * open_**0.25 + 0.02
        if v > 0.55:  # below the hilum the heart covers the medial lung
            hx, _, hw, _ = self.heart()
            inner = max(inner, 0.85 * ((hx + hw - self.cx) if side else (self.cx - (hx - hw))))
        u = inner + w * max(outer - inner, 0.02)
        return self.cx + (u if side else -u), y


def _lung_q(u, y, med, top, width, base):
    """Lung shape function (< 1 inside): straight medial border, convex lateral wall widening
    downwards, domed apex. Takes scalars or broadcastable arrays (a row for u, a column for y)."""
    uc = med + 0.5 * width
    height = base - top
    lateral_axis = 0.5 * width * (0.86 + 0.14 * np.clip((y - top) / height, 0.0, 1.0))
    lateral = (u > uc).astype(np.float32)  # np.where on a full image is ~40x slower than arithmetic
    across = (
        lateral * (u - uc) ** 2 / lateral_axis**2
        + (1.0 - lateral) * ((uc - u) / (0.5 * width)) ** 4
    )
    apex = np.clip((top + 0.5 * height - y) / (0.5 * height), 0.0, None) ** 2
    return across + apex


def _geometry(anatomy: Anatomy, jitter: np.ndarray, view: str) -> _Geometry:
    dx, dy, breath, exposure, contrast = (float(value) for value in jitter[:5])
    base = anatomy.lung_base + 0.012 * dy + 0.012 * breath
    ap = view == "AP"  # supine bedside films: shallower breath, magnified heart, higher clavicles
    geo = _Geometry(
        cx=anatomy.center_x + 0.01 * dx,
        top=anatomy.lung_top + 0.01 * dy,
        med=anatomy.mediastinum_half_width,
        body_hw=anatomy.body_half_width,
        lung_width=[anatomy.lung_width] * 2,
        base=[base - (0.02 if ap else 0.0), base + 0.015 - (0.02 if ap else 0.0)],
        dome=[anatomy.dome_height, anatomy.dome_height * 0.9],
        air=[1.0, 1.0],
        lift=[0.0, 0.0],
        markings=1.0,
        heart_ratio=anatomy.heart_ratio * (1.05 if ap else 1.0),
        heart_roundness=anatomy.heart_roundness,
        heart_tilt=anatomy.heart_tilt,
        heart_left_share=anatomy.heart_left_share,
        rib_spacing=anatomy.rib_spacing,
        rib_slope=anatomy.rib_slope,
        tissue=anatomy.tissue,
        exposure=anatomy.exposure * (1.0 + 0.04 * exposure),
        contrast=anatomy.contrast * (1.0 + 0.04 * contrast),
        breasts=anatomy.sex == "F",
        clavicle_rise=0.02 if ap else 0.0,
    )
    geo.heart_floor = float(min(geo.dome_y(0, geo.med), geo.dome_y(1, geo.med)))
    return geo


# --------------------------------------------------------------------------- texture banks


@lru_cache(maxsize=1)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    return centres[None, :], centres[:, None]


def _segment(
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
def _vessel_bank(size: int) -> tuple[np.ndarray, ...]:
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
                line = _segment(xs[:, c0:c1], ys[r0:r1], start, end, max(half_width, 0.8 * pixel))
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
def _noise_fields(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two smooth unit-variance noise fields (blobs ~ size/40 and ~ size/75) for patchy lesions."""
    rng = np.random.default_rng(20170102)
    fields = []
    for sigma in (size / 40, size / 75):
        field = ndimage.gaussian_filter(
            rng.standard_normal((size, size), dtype=np.float32), max(sigma, 0.8), mode="wrap"
        )
        fields.append((field / field.std()).astype(np.float32))
    return fields[0], fields[1]


# --------------------------------------------------------------------------- canvas


class _Canvas:
    """The density map of one image (higher = more attenuating = brighter) and its helpers."""

    def __init__(self, size: int, geo: _Geometry):
        self.size = size
        self.geo = geo
        self.x, self.y = _grid(size)
        self.edge = max(0.006, 0.8 / size)  # soft anatomical borders, never below a pixel
        self.u = np.abs(self.x - geo.cx)  # distance from the midline, a row
        self.density = np.zeros((size, size), np.float32)
        self.lung_mask = np.zeros((size, size), np.float32)  # set by _draw_lungs_and_heart
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

    def side_window(self, side: int, y0: float, y1: float, pad: float = 0.02):
        lateral = self.geo.lateral(side) + pad
        if side:
            return self.window(self.geo.cx, self.geo.cx + lateral, y0, y1)
        return self.window(self.geo.cx - lateral, self.geo.cx, y0, y1)

    def add(
        self, label: str, rows: slice, cols: slice, change: np.ndarray, box: bool = True
    ) -> None:
        """Add `change` to the density in the window and box where it is at least 5% of its peak."""
        self.density[rows, cols] += change
        if not box or label not in BOX_LABELS:
            return
        strong = np.abs(change) >= 0.05 * float(np.abs(change).max() or 1.0)
        self.box_mask(label, rows, cols, strong)

    def box_mask(self, label: str, rows: slice, cols: slice, mask: np.ndarray) -> None:
        hit_rows, hit_cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if hit_rows.size == 0:
            return
        x0, x1 = cols.start + hit_cols[0], cols.start + hit_cols[-1] + 1
        y0, y1 = rows.start + hit_rows[0], rows.start + hit_rows[-1] + 1
        self.boxes.append((label, float(x0), float(y0), float(x1 - x0), float(y1 - y0)))

    def lung(self, rows: slice, cols: slice) -> np.ndarray:
        return self.lung_mask[rows, cols]

    def field(
        self, rng: np.random.Generator, rows: slice, cols: slice, fine: bool = False
    ) -> np.ndarray:
        """A window of a smooth noise field, at a random offset, of the shape of the given window."""
        bank = _noise_fields(self.size)[1 if fine else 0]
        h, w = rows.stop - rows.start, cols.stop - cols.start
        r0 = int(rng.integers(0, self.size - h + 1))
        c0 = int(rng.integers(0, self.size - w + 1))
        return bank[r0 : r0 + h, c0 : c0 + w]


def _soft_inside(value: np.ndarray, edge: float) -> np.ndarray:
    """1 where value > 0 (a signed distance in image widths), 0 where < 0, linear over `edge`."""
    return np.clip(value / edge + 0.5, 0.0, 1.0)


def _compose_anatomy(canvas: _Canvas, rng: np.random.Generator, marking_keep: np.ndarray) -> None:
    """Paint the normal chest into the density map; `marking_keep` (0..1) masks lung markings."""
    body = _draw_trunk(canvas)
    below_diaphragm = _draw_lungs_and_heart(canvas, body)
    _draw_bones(canvas, below_diaphragm)
    _draw_lung_markings(canvas, rng, marking_keep)


def _per_side(canvas: _Canvas, pair: list[float]) -> np.ndarray:
    """A row holding pair[0] over the image's left half and pair[1] over its right half."""
    return np.where(canvas.x > canvas.geo.cx, np.float32(pair[1]), np.float32(pair[0]))


def _draw_trunk(canvas: _Canvas) -> np.ndarray:
    """Soft tissue, thicker at the midline, narrowing at neck and waist, plus shoulders and
    breast shadows; returns the body mask."""
    geo, u, y, edge = canvas.geo, canvas.u, canvas.y, canvas.edge
    body_hw = geo.body_hw * (1.0 - 0.2 * (y - 0.5) ** 2)
    thickness = np.sqrt(np.clip(1.0 - (u / body_hw) ** 2, 0.0, 1.0))
    body = _soft_inside(body_hw - u, 3 * edge)
    shoulders = np.clip((geo.top + 0.04 - y) / 0.1, 0.0, 1.0) * _soft_inside(0.49 - u, 3 * edge)
    canvas.density += geo.tissue * (0.3 + 0.7 * thickness) * body + 0.3 * shoulders * (1.0 - body)
    if geo.breasts:
        for side, sign in ((0, -1.0), (1, 1.0)):
            bx, by = geo.cx + sign * (geo.med + 0.65 * geo.lung_width[side]), geo.base[side] + 0.01
            rows, cols, xs, ys = canvas.window(bx - 0.2, bx + 0.2, by - 0.2, by + 0.12)
            r2 = ((xs - bx) / 0.17) ** 2 + ((ys - by) / 0.13) ** 2
            canvas.density[rows, cols] += 0.09 * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    return body


def _draw_lungs_and_heart(canvas: _Canvas, body: np.ndarray) -> np.ndarray:
    """Aerated lungs, the mediastinum and heart in front of them, the diaphragm and the stomach
    bubble; stores the lung mask on the canvas and returns the below-the-diaphragm mask."""
    geo, u, y, edge, density = canvas.geo, canvas.u, canvas.y, canvas.edge, canvas.density
    width, base = _per_side(canvas, geo.lung_width), _per_side(canvas, geo.base)
    q = _lung_q(u, y, geo.med, geo.top, width, base)
    dome = np.where(canvas.x > geo.cx, geo.dome_y(1, u), geo.dome_y(0, u)).astype(np.float32)
    lung = _soft_inside((1.0 - q) * 0.25 * width, edge) * _soft_inside(dome - y, edge)

    # heart, mediastinum and aortic knob lie in front of the lungs: there lung air does not show
    solid = np.zeros_like(density)
    rows, cols, heart = _heart_mask(canvas)
    solid[rows, cols] = heart
    _, heart_y, _, heart_half_height = geo.heart()
    heart_top = heart_y - heart_half_height
    rows, cols, xs, ys = canvas.window(
        geo.cx - geo.med - 0.06, geo.cx + geo.med + 0.08, geo.top + 0.1, heart_y
    )
    widening = 0.045 * np.clip((ys - geo.top - 0.12) / (heart_top - geo.top - 0.02), 0.0, 1.0)
    mediastinum = _soft_inside(geo.med + widening - np.abs(xs - geo.cx - 0.3 * widening), 3 * edge)
    np.maximum(solid[rows, cols], mediastinum, out=solid[rows, cols])
    knob_x, knob_y, knob_r = geo.cx + geo.med - 0.002, geo.top + 0.1, 0.026
    rows, cols, xs, ys = canvas.window(knob_x - 0.04, knob_x + 0.04, knob_y - 0.04, knob_y + 0.04)
    knob = _soft_inside(knob_r - np.sqrt((xs - knob_x) ** 2 + (ys - knob_y) ** 2), 1.5 * edge)
    np.maximum(solid[rows, cols], knob, out=solid[rows, cols])
    lung *= 1.0 - solid
    canvas.lung_mask = lung

    # more air centrally and laterally than at the bases, where domes and soft tissue overlap
    basal = np.clip(((y - geo.top) / (base - geo.top) - 0.65) / 0.35, 0.0, 1.0)
    air = (
        _per_side(canvas, geo.air)
        * (0.48 + 0.16 * np.clip(1.0 - q, 0.0, 1.0))
        * (1.0 - 0.25 * basal)
    )
    density -= air * lung
    density += 0.06 * solid  # the heart is a little denser than the upper mediastinum
    below = _soft_inside(y - dome, 3 * edge)
    density += 0.05 * below * body

    # gas in the stomach under the left hemidiaphragm
    gu = geo.med + 0.55 * geo.lung_width[1]
    gx, gy = geo.cx + gu, float(geo.dome_y(1, gu)) + 0.03
    rows, cols, xs, ys = canvas.window(gx - 0.07, gx + 0.07, gy - 0.04, gy + 0.05)
    bubble = _soft_inside(1.0 - ((xs - gx) / 0.055) ** 2 - ((ys - gy) / 0.03) ** 2, 0.3)
    density[rows, cols] -= 0.12 * bubble * _soft_inside(ys - gy + 0.025, edge)
    return below


def _draw_bones(canvas: _Canvas, below_diaphragm: np.ndarray) -> None:
    """Trachea, spine, ribs and clavicles."""
    geo, u, y, edge, density = canvas.geo, canvas.u, canvas.y, canvas.edge, canvas.density
    # trachea: an air column above the carina
    rows, cols, xs, ys = canvas.window(geo.cx - 0.04, geo.cx + 0.04, 0.0, geo.top + 0.16)
    trachea = _soft_inside(0.013 - np.abs(xs - geo.cx - 0.004), 1.5 * edge)
    density[rows, cols] -= 0.16 * trachea * np.clip((geo.top + 0.15 - ys) / 0.03, 0.0, 1.0)

    # spine: vertebral bodies separated by darker discs, faint behind the mediastinum
    rows, cols, xs, ys = canvas.window(geo.cx - 0.05, geo.cx + 0.05, 0.0, 1.0)
    discs = np.clip(np.cos(2 * np.pi * ys / (geo.rib_spacing * 0.75)) * 2.0 + 1.0, 0.0, 1.0)
    density[rows, cols] += (
        0.09 * _soft_inside(0.03 - np.abs(xs - geo.cx), 2 * edge) * (0.7 + 0.3 * discs)
    )

    # ribs: posterior ribs arch up from the spine then down along the wall; fainter anterior
    # ribs run down towards the sternum; both fade below the diaphragm
    cage = _soft_inside(_per_side(canvas, [geo.lateral(0), geo.lateral(1)]) + 0.03 - u, 4 * edge)
    cage = cage * np.clip((u - 0.025) / 0.05, 0.0, 1.0)
    cage = cage * (1.0 - 0.6 * below_diaphragm) * np.clip((y - geo.top + 0.04) / 0.04, 0.0, 1.0)
    rib_top = geo.top - 0.035
    depth = y - rib_top - geo.rib_slope * (2.6 * (u - 0.1) ** 2 - 0.02)
    phase = depth / geo.rib_spacing * (1.0 - 0.3 * depth)  # lower ribs are further apart
    wave = np.cos(2 * np.pi * phase)
    cortex = np.clip(1.0 - np.abs(wave - 0.15) * 5.0, 0.0, 1.0)  # brighter rib margins
    posterior = 0.6 * np.clip((wave - 0.15) * 2.5, 0.0, 1.0) + 0.4 * cortex
    posterior *= np.clip(phase * 3.0 + 0.5, 0.0, 1.0) * np.clip((10.3 - phase) * 2.0, 0.0, 1.0)
    phase_a = (y - rib_top - 0.09 + 0.55 * u) / (geo.rib_spacing * 1.3)
    anterior = np.clip((np.cos(2 * np.pi * phase_a) - 0.35) * 2.0, 0.0, 1.0)
    anterior *= np.clip(phase_a * 2.0, 0.0, 1.0) * np.clip((5.5 - phase_a) * 2.0, 0.0, 1.0)
    anterior *= np.clip((u - 0.07) / 0.06, 0.0, 1.0)
    density += cage * (0.12 * posterior + 0.05 * anterior)

    # clavicles: S-shaped bars from the sternum up and out to the shoulders
    for sign, side in ((-1.0, 0), (1.0, 1)):
        u0, u1 = 0.03, geo.lateral(side) * 0.98
        y0, y1 = geo.top + 0.045 - geo.clavicle_rise, geo.top - 0.035 - geo.clavicle_rise
        lo, hi = sorted((geo.cx + sign * u0, geo.cx + sign * u1))
        rows, cols, xs, ys = canvas.window(lo, hi, y1 - 0.04, y0 + 0.04)
        s = np.clip((np.abs(xs - geo.cx) - u0) / (u1 - u0), 0.0, 1.0)
        centre = y0 + (y1 - y0) * s + 0.012 * np.sin(2 * np.pi * s)
        bar = np.clip(1.0 - np.abs(ys - centre) / 0.013, 0.0, 1.0) ** 0.5
        ends = np.clip(s * 10.0, 0.0, 1.0) * np.clip((1.0 - s) * 6.0, 0.0, 1.0)
        density[rows, cols] += 0.13 * bar * ends


def _draw_lung_markings(
    canvas: _Canvas, rng: np.random.Generator, marking_keep: np.ndarray
) -> None:
    """A vessel tree from each hilum plus hilar shadows, inside the lungs only."""
    geo, size = canvas.geo, canvas.size
    bank = _vessel_bank(size)
    picks = rng.integers(0, len(bank), 2)
    markings = np.zeros_like(canvas.density)
    for side, sign in ((0, -1.0), (1, 1.0)):
        tree = bank[picks[side]][:, ::-1] if side else bank[picks[side]]
        hx = geo.cx + sign * (geo.med + 0.04)
        hy = geo.top + 0.42 * (geo.base[side] - geo.top)
        left = hx - (0.10 if side else 0.40)  # the bank's hilum is 0.40 from its left edge
        _paste(markings, tree, round((hy - 0.40) * size), round(left * size))
        rows, cols, xs, ys = canvas.window(hx - 0.1, hx + 0.1, hy - 0.12, hy + 0.12)
        hilum = np.exp(-(((xs - hx - sign * 0.02) / 0.035) ** 2) - ((ys - hy) / 0.06) ** 2)
        markings[rows, cols] += 0.8 * hilum
    markings *= canvas.lung_mask * marking_keep
    canvas.density += 0.2 * geo.markings * markings


def _heart_mask(canvas: _Canvas) -> tuple[slice, slice, np.ndarray]:
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
    return rows, cols, _soft_inside((1.0 - qh) * short_axis * 0.5, 2 * canvas.edge)


def _paste(target: np.ndarray, patch: np.ndarray, r0: int, c0: int) -> None:
    """Add `patch` into `target` with its top-left at (r0, c0), clipped to the target."""
    h, w = patch.shape
    tr0, tc0 = max(r0, 0), max(c0, 0)
    tr1, tc1 = min(r0 + h, target.shape[0]), min(c0 + w, target.shape[1])
    if tr0 < tr1 and tc0 < tc1:
        target[tr0:tr1, tc0:tc1] += patch[tr0 - r0 : tr1 - r0, tc0 - c0 : tc1 - c0]


# --------------------------------------------------------------------------- findings
# Each finding's random choices come from its own stream (lesion seed, label), so a finding looks
# the same whichever other findings share the image, and persists unchanged across follow-ups.
# `strength` is 1 at difficulty 0 and 0.3 at difficulty 1; `grow` scales sizes likewise.


def _reshape_cardiomegaly(geo: _Geometry, rng: np.random.Generator, difficulty: float) -> None:
    geo.heart_ratio = 0.53 + 0.11 * (1.0 - difficulty) + rng.uniform(0.0, 0.03)
    geo.heart_roundness = min(0.85, geo.heart_roundness * 1.12)  # a globular heart


def _reshape_emphysema(geo: _Geometry, rng: np.random.Generator, difficulty: float) -> None:
    strength = 1.0 - 0.7 * difficulty
    for side in (0, 1):
        geo.lung_width[side] = min(
            geo.lung_width[side] * (1.0 + 0.06 * strength), geo.body_hw - geo.med - 0.04
        )
        geo.base[side] += (0.03 + rng.uniform(0.0, 0.02)) * strength
        geo.dome[side] *= 1.0 - 0.75 * strength
        geo.air[side] *= 1.0 + 0.3 * strength
    geo.markings *= 1.0 - 0.45 * strength
    geo.heart_ratio *= 1.0 - 0.08 * strength  # the long narrow heart of hyperinflated lungs


def _reshape_atelectasis(geo: _Geometry, rng: np.random.Generator, difficulty: float) -> None:
    side = int(rng.integers(0, 2))
    geo.lift[side] += (0.015 + rng.uniform(0.0, 0.015)) * (
        1.0 - 0.7 * difficulty
    )  # volume loss lifts the dome
    geo.atelectasis_side = side


def _sign_cardiomegaly(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    rows, cols, heart = _heart_mask(canvas)
    floor = (
        int(canvas.geo.heart_floor * canvas.size) - rows.start
    )  # the shadow ends at the diaphragm
    canvas.box_mask(
        "Cardiomegaly", rows, cols, (heart > 0.5) & (np.arange(heart.shape[0]) < floor)[:, None]
    )


def _sign_effusion(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    strength, grow = 1.0 - 0.7 * difficulty, 1.0 - 0.45 * difficulty
    sides = [0, 1] if rng.uniform() < 0.35 else [int(rng.integers(0, 2))]
    for side in sides:
        height = (geo.base[side] - geo.top) * rng.uniform(0.14, 0.3) * grow
        top = geo.base[side] - height * 1.9
        rows, cols, xs, ys = canvas.side_window(side, top - 0.02, geo.base[side] + 0.03, pad=0.015)
        u = np.abs(xs - geo.cx)
        reach = np.clip((u - geo.med) / geo.lung_width[side], 0.0, 1.0)
        meniscus = (
            geo.base[side] - height - 0.8 * height * reach**3
        )  # fluid climbs the lateral wall
        fluid = np.clip((ys - meniscus) / (0.25 * height), 0.0, 1.0) * canvas.lung(rows, cols)
        canvas.add("Effusion", rows, cols, 0.45 * strength * fluid)


def _pneumothorax_region(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> tuple:
    """Side, window and (pleural space, pleural line) masks of an apical/lateral pneumothorax."""
    geo = canvas.geo
    side = int(rng.integers(0, 2))
    height = geo.base[side] - geo.top
    gap = geo.lung_width[side] * rng.uniform(0.1, 0.2) * (1.0 - 0.5 * difficulty)
    rows, cols, xs, ys = canvas.side_window(side, geo.top - 0.01, geo.top + 0.8 * height)
    u = np.abs(xs - geo.cx)
    q_inner = geo.lung_q(side, u, ys, shrink=gap)
    upper = np.clip(
        (geo.top + 0.7 * height - ys) / (0.15 * height), 0.0, 1.0
    )  # apical and lateral, not basal
    inner_width = 0.25 * (geo.lung_width[side] - gap)
    space = _soft_inside((q_inner - 1.0) * inner_width, canvas.edge) * upper
    line_width = max(0.003, 0.9 / canvas.size)
    line = np.clip(1.0 - np.abs(q_inner - 1.0) * inner_width / line_width, 0.0, 1.0) * upper
    return side, rows, cols, space, line


def _sign_pneumothorax(
    canvas: _Canvas, rng: np.random.Generator, difficulty: float, region: tuple
) -> None:
    side, rows, cols, space, line = region
    lung = canvas.lung(rows, cols)
    strength = 1.0 - 0.7 * difficulty
    change = (-0.12 * strength * space + 0.3 * strength * line) * lung
    canvas.density[rows, cols] += change
    canvas.box_mask("Pneumothorax", rows, cols, ((space > 0.3) | (line > 0.3)) & (lung > 0.3))


def _round_lesion(
    canvas: _Canvas,
    rng: np.random.Generator,
    label: str,
    centre: tuple[float, float],
    radius: float,
    peak: float,
    lobes: float,
) -> None:
    """A sphere-like opacity (soft-tissue ball seen in projection) with a lobulated outline."""
    cx, cy = centre
    rows, cols, xs, ys = canvas.window(
        cx - 1.3 * radius - 0.005,
        cx + 1.3 * radius + 0.005,
        cy - 1.3 * radius - 0.005,
        cy + 1.3 * radius + 0.005,
    )
    angle = np.arctan2(ys - cy, xs - cx)
    outline = radius * (
        1.0
        + lobes * np.cos(3 * angle + rng.uniform(0, 6.3))
        + 0.5 * lobes * np.cos(5 * angle + rng.uniform(0, 6.3))
    )
    r2 = ((xs - cx) ** 2 + (ys - cy) ** 2) / outline**2
    ball = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)) * 0.85 + 0.15 * _soft_inside(
        (1.0 - r2) * radius * 0.5, canvas.edge
    )
    canvas.add(label, rows, cols, peak * ball)


def _sign_nodule(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    strength, grow = 1.0 - 0.7 * difficulty, 1.0 - 0.4 * difficulty
    for _ in range(1 if rng.uniform() < 0.8 else int(rng.integers(2, 4))):
        side = int(rng.integers(0, 2))
        centre = canvas.geo.lung_point(side, rng.uniform(0.12, 0.85), rng.uniform(0.2, 0.8))
        radius_mm = min(14.0, rng.uniform(5.0, 12.0) * grow + 2.5)  # < 3 cm across
        _round_lesion(
            canvas, rng, "Nodule", centre, radius_mm / FIELD_OF_VIEW_MM, 0.32 * strength, 0.03
        )


def _sign_mass(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    strength, grow = 1.0 - 0.7 * difficulty, 1.0 - 0.3 * difficulty
    side = int(rng.integers(0, 2))
    centre = canvas.geo.lung_point(side, rng.uniform(0.2, 0.75), rng.uniform(0.3, 0.7))
    radius_mm = rng.uniform(20.0, 34.0) * grow
    _round_lesion(
        canvas, rng, "Mass", centre, max(radius_mm, 17.0) / FIELD_OF_VIEW_MM, 0.5 * strength, 0.08
    )


def _sign_edema(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    strength = 1.0 - 0.7 * difficulty
    for side, sign in ((0, -1.0), (1, 1.0)):
        hx = geo.cx + sign * (geo.med + 0.3 * geo.lung_width[side])
        hy = geo.top + 0.5 * (geo.base[side] - geo.top)
        rows, cols, xs, ys = canvas.side_window(side, geo.top, geo.base[side] + 0.01)
        sx, sy = 0.11 * rng.uniform(0.9, 1.2), 0.15 * rng.uniform(0.9, 1.2)
        haze = np.exp(-(((xs - hx) / sx) ** 2) - ((ys - hy) / sy) ** 2)
        haze *= 0.8 + 0.2 * canvas.field(rng, rows, cols)
        # Kerley B lines: short horizontal septal lines at the lateral bases
        for _ in range(5):
            ly = geo.base[side] - rng.uniform(0.02, 0.12)
            lx = geo.cx + sign * (geo.lateral(side) - 0.01)
            lx_in = lx - sign * rng.uniform(0.015, 0.03)
            haze += 0.35 * _segment(xs, ys, (lx, ly), (lx_in, ly), max(0.0025, 0.8 / canvas.size))
        canvas.add("Edema", rows, cols, 0.42 * strength * haze * canvas.lung(rows, cols))


def _sign_emphysema(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    strength = 1.0 - 0.7 * difficulty
    for _ in range(int(rng.integers(1, 4))):  # apical bullae: thin-walled lucencies
        side = int(rng.integers(0, 2))
        cx, cy = canvas.geo.lung_point(side, rng.uniform(0.08, 0.35), rng.uniform(0.3, 0.8))
        radius = rng.uniform(0.025, 0.045)
        rows, cols, xs, ys = canvas.window(
            cx - radius - 0.01, cx + radius + 0.01, cy - radius - 0.01, cy + radius + 0.01
        )
        dist = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
        bulla = -0.12 * _soft_inside(radius - dist, canvas.edge) + 0.08 * np.clip(
            1.0 - np.abs(dist - radius) / 0.004, 0.0, 1.0
        )
        canvas.add("Emphysema", rows, cols, strength * bulla * canvas.lung(rows, cols))


def _sign_hernia(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    strength, grow = 1.0 - 0.7 * difficulty, 1.0 - 0.3 * difficulty
    radius = rng.uniform(0.035, 0.055) * grow
    cx = geo.cx + rng.uniform(0.0, 0.04)
    cy = geo.heart_floor - 1.6 * radius
    rows, cols, xs, ys = canvas.window(
        cx - radius - 0.01, cx + radius + 0.01, cy - radius - 0.01, cy + radius + 0.01
    )
    dist = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
    gas = _soft_inside(radius - dist, canvas.edge) * _soft_inside(
        cy + 0.3 * radius - ys, canvas.edge
    )  # air-fluid level
    rim = np.clip(1.0 - np.abs(dist - radius) / max(0.005, 1.0 / canvas.size), 0.0, 1.0)
    canvas.add("Hernia", rows, cols, strength * (-0.45 * gas + 0.25 * rim))


def _sign_atelectasis(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    side = geo.atelectasis_side
    strength, grow = 1.0 - 0.7 * difficulty, 1.0 - 0.4 * difficulty
    cx, cy = geo.lung_point(side, rng.uniform(0.62, 0.82), 0.5)
    length = geo.lung_width[side] * rng.uniform(0.5, 0.8) * grow
    angle = math.radians(rng.uniform(-25, 25))
    half = (0.5 * length * math.cos(angle), 0.5 * length * math.sin(angle))
    thickness = rng.uniform(0.012, 0.022) * (1.4 - 0.6 * difficulty)
    rows, cols, xs, ys = canvas.side_window(side, cy - 0.08, geo.base[side] + 0.06)
    band = _segment(xs, ys, (cx - half[0], cy - half[1]), (cx + half[0], cy + half[1]), thickness)
    canvas.add(
        "Atelectasis", rows, cols, 0.38 * strength * band * canvas.lung(rows, cols), box=False
    )
    # the box covers the band and the lifted hemidiaphragm below it (the volume loss)
    canvas.box_mask(
        "Atelectasis",
        rows,
        cols,
        (band > 0.05) | ((ys > cy) & (np.abs(xs - geo.cx) > geo.med - 0.01)),
    )


def _sign_infiltration(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    strength, grow = 1.0 - 0.7 * difficulty, 1.0 - 0.35 * difficulty
    for _ in range(1 if rng.uniform() < 0.6 else 2):
        side = int(rng.integers(0, 2))
        cx, cy = geo.lung_point(side, rng.uniform(0.25, 0.85), rng.uniform(0.3, 0.7))
        radius = rng.uniform(0.07, 0.11) * grow
        rows, cols, xs, ys = canvas.window(cx - radius, cx + radius, cy - radius, cy + radius)
        fade = np.clip(1.0 - (((xs - cx) ** 2 + (ys - cy) ** 2) / radius**2), 0.0, 1.0)
        patches = np.clip(canvas.field(rng, rows, cols) * 0.7 + 0.35, 0.0, 1.0) * fade
        canvas.add("Infiltration", rows, cols, 0.5 * strength * patches * canvas.lung(rows, cols))


def _sign_pneumonia(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    strength = 1.0 - 0.7 * difficulty
    side = int(rng.integers(0, 2))
    zone = int(rng.integers(0, 3))  # upper, middle, lower lobe
    span = geo.base[side] - geo.top
    y0, y1 = [(0.0, 0.38), (0.38, 0.62), (0.6, 1.0)][zone]
    top, bottom = geo.top + y0 * span, geo.top + y1 * span
    rows, cols, xs, ys = canvas.side_window(side, top - 0.05, bottom + 0.05)
    soft = 0.04 * (1.0 + difficulty)
    # one border follows a fissure (sharp), the other fades into aerated lung
    if zone == 0:
        band = _soft_inside(bottom - ys, canvas.edge) * np.clip((ys - top + soft) / soft, 0.0, 1.0)
    else:
        band = _soft_inside(ys - top, canvas.edge) * np.clip((bottom - ys + soft) / soft, 0.0, 1.0)
    u = np.abs(xs - geo.cx)
    medial_fade = np.clip((u - geo.med - rng.uniform(0.0, 0.08)) / 0.05, 0.0, 1.0)
    patch = band * medial_fade * np.clip(0.8 + 0.25 * canvas.field(rng, rows, cols), 0.0, 1.0)
    canvas.add("Pneumonia", rows, cols, 0.45 * strength * patch * canvas.lung(rows, cols))


def _sign_consolidation(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    strength, grow = 1.0 - 0.7 * difficulty, 1.0 - 0.35 * difficulty
    side = int(rng.integers(0, 2))
    cx, cy = geo.lung_point(side, rng.uniform(0.35, 0.85), rng.uniform(0.35, 0.65))
    radius = rng.uniform(0.06, 0.09) * grow
    rows, cols, xs, ys = canvas.window(
        cx - 1.2 * radius, cx + 1.2 * radius, cy - 1.2 * radius, cy + 1.2 * radius
    )
    stretch = rng.uniform(0.7, 1.0)
    r2 = ((xs - cx) ** 2 + ((ys - cy) / stretch) ** 2) / radius**2
    dense = np.clip((1.0 - r2) * 1.8 + 0.9 * canvas.field(rng, rows, cols), 0.0, 1.0)
    # air bronchograms: dark branching tubes pointing back to the hilum
    hilum = (
        geo.cx + (1 if side else -1) * (geo.med + 0.03),
        geo.top + 0.42 * (geo.base[side] - geo.top),
    )
    toward = math.atan2(hilum[1] - cy, hilum[0] - cx)
    bronchi = np.zeros_like(dense)
    for turn in (-0.5, 0.0, 0.45):
        end = (
            cx + radius * math.cos(toward + math.pi + turn),
            cy + radius * math.sin(toward + math.pi + turn),
        )
        start = (cx + 0.6 * radius * math.cos(toward), cy + 0.6 * radius * math.sin(toward))
        np.maximum(
            bronchi, _segment(xs, ys, start, end, max(0.004, 1.0 / canvas.size)), out=bronchi
        )
    change = strength * (0.42 * dense - 0.16 * bronchi * dense) * canvas.lung(rows, cols)
    canvas.add("Consolidation", rows, cols, change)


def _sign_fibrosis(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    strength = 1.0 - 0.7 * difficulty
    line_width = 0.16
    for side in (0, 1):
        rows, cols, xs, ys = canvas.side_window(side, geo.top, geo.base[side])
        net = np.clip(1.0 - np.abs(canvas.field(rng, rows, cols, fine=True)) / line_width, 0.0, 1.0)
        height = (ys - geo.top) / (geo.base[side] - geo.top)
        upper = np.clip(1.2 - 1.5 * height, 0.1, 1.0)  # upper-zone predominant
        canvas.add("Fibrosis", rows, cols, 0.35 * strength * net * upper * canvas.lung(rows, cols))


def _sign_pleural_thickening(canvas: _Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    strength = 1.0 - 0.7 * difficulty
    sides = [0, 1] if rng.uniform() < 0.3 else [int(rng.integers(0, 2))]
    for side in sides:
        thickness = rng.uniform(0.012, 0.022) * (1.5 - 0.6 * difficulty)
        height = geo.base[side] - geo.top
        rows, cols, xs, ys = canvas.side_window(side, geo.top - 0.01, geo.base[side] - 0.02)
        u = np.abs(xs - geo.cx)
        inside = (
            (1.0 - geo.lung_q(side, u, ys)) * 0.25 * geo.lung_width[side]
        )  # ~ distance from the wall
        band = np.clip(1.0 - inside / thickness, 0.0, 1.0) * _soft_inside(inside, canvas.edge)
        uc = geo.med + 0.5 * geo.lung_width[side]
        lateral = np.clip((u - uc) / (0.15 * geo.lung_width[side]) + 0.3, 0.0, 1.0)
        apex = np.clip((geo.top + 0.2 * height - ys) / (0.1 * height), 0.0, 1.0)
        canvas.add(
            "Pleural_Thickening", rows, cols, 0.5 * strength * band * np.maximum(lateral, apex)
        )


_RESHAPE = {
    "Cardiomegaly": _reshape_cardiomegaly,
    "Emphysema": _reshape_emphysema,
    "Atelectasis": _reshape_atelectasis,
}
_SIGNS = {
    "Cardiomegaly": _sign_cardiomegaly,
    "Effusion": _sign_effusion,
    "Infiltration": _sign_infiltration,
    "Mass": _sign_mass,
    "Nodule": _sign_nodule,
    "Pneumonia": _sign_pneumonia,
    "Consolidation": _sign_consolidation,
    "Edema": _sign_edema,
    "Emphysema": _sign_emphysema,
    "Fibrosis": _sign_fibrosis,
    "Pleural_Thickening": _sign_pleural_thickening,
    "Hernia": _sign_hernia,
    "Atelectasis": _sign_atelectasis,
}


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
    geo = _geometry(anatomy, rng.uniform(-1.0, 1.0, 8), view)
    lesion_rngs = {
        label: np.random.default_rng(
            np.random.SeedSequence(lesion_seed, spawn_key=(NIH_LABELS.index(label),))
        )
        for label in NIH_LABELS
        if label in findings
    }
    for label, reshape in _RESHAPE.items():
        if label in lesion_rngs:
            reshape(geo, lesion_rngs[label], difficulty)
    canvas = _Canvas(size, geo)

    marking_keep = np.ones((size, size), np.float32)
    pneumothorax = None
    if "Pneumothorax" in lesion_rngs:  # the pleural space has no lung markings: cut them first
        pneumothorax = _pneumothorax_region(canvas, lesion_rngs["Pneumothorax"], difficulty)
        _, rows, cols, space, _ = pneumothorax
        marking_keep[rows, cols] -= space
    _compose_anatomy(canvas, rng, marking_keep)
    for label in NIH_LABELS:
        if label == "Pneumothorax" and pneumothorax is not None:
            _sign_pneumothorax(canvas, lesion_rngs[label], difficulty, pneumothorax)
        elif label in lesion_rngs:
            _SIGNS[label](canvas, lesion_rngs[label], difficulty)
    return _develop(canvas, rng), canvas.boxes


def _develop(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Film-like characteristic curve, a slight exposure gradient, quantum noise, and 8 bits."""
    geo = canvas.geo
    gradient = 1.0 + 0.04 * (canvas.y - 0.5) + rng.uniform(-0.03, 0.03) * (canvas.x - 0.5)
    film = 1.0 / (
        1.0 + np.exp(-3.6 * geo.contrast * (canvas.density * geo.exposure * gradient - 0.55))
    )
    noise = rng.random((canvas.size, canvas.size), dtype=np.float32)
    film += (noise - 0.5) * 0.05
    return np.clip(film * 262.0 - 6.0, 0.0, 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- dataset plan


@dataclass(frozen=True)
class PlannedImage:
    """Everything needed to draw and list one image; `drawn` are the findings painted on it,
    `written` the (noisy) labels written to Data_Entry_2017.csv, both in NIH_LABELS order."""

    index: int
    name: str
    folder: str
    patient_id: int
    follow_up: int
    age_years: int
    sex: str
    view: str
    anatomy: Anatomy
    drawn: tuple[str, ...]
    written: tuple[str, ...]
    lesion_seed: int
    rgba: bool
    test: bool


def plan_dataset(
    images: int,
    seed: int = 0,
    label_noise: float = 0.1,
    images_per_patient: float = 3.0,
    rgba_fraction: float = 0.02,
    rates: dict | None = None,
) -> list[PlannedImage]:
    """Decide every image's patient, labels, view and seeds without drawing anything.

    Patients get 1 + NegBin(r, mean images_per_patient - 1) images (r from the NIH table, so most
    patients have one image and a few have many; no patient takes more than max(3 x mean, 5% of
    the images)); a follow-up repeats the previous image's findings (same lesions) with NIH's
    repeat probability, else draws a new label set; with probability `label_noise` each drawn
    finding is left out of the written labels (text-mined reports miss findings) and with
    probability label_noise x FALSE_POSITIVE_SHARE an undrawn label is added; ~20% of patients
    form the test list. Deterministic in `seed`.
    """
    rates = rates or load_label_rates()
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PLAN_STREAM,)))
    fresh_sets = sample_label_sets(rng, images, rates)
    per_patient = rates["images_per_patient"]
    shape = per_patient["extra_images_negbin_shape"]
    extra_mean = max(images_per_patient - 1.0, 0.0)
    cap = max(math.ceil(3 * images_per_patient), math.ceil(0.05 * images))
    age_quantiles = rates["age_years_first_image"]["quantiles"]
    age_step = rates["age_years_step_per_followup_mean"]
    prevalence = np.array([rates["prevalence"][label] for label in NIH_LABELS])

    plans: list[PlannedImage] = []
    patient_id = 0
    while len(plans) < images:
        patient_id += 1
        extra = rng.negative_binomial(shape, shape / (shape + extra_mean)) if extra_mean > 0 else 0
        count = min(1 + int(extra), cap, images - len(plans))
        sex = "M" if rng.uniform() < rates["male_fraction_patients"] else "F"
        anatomy = sample_anatomy(rng, sex)
        age = float(
            np.interp(rng.uniform(), np.linspace(0.0, 1.0, len(age_quantiles)), age_quantiles)
        )
        drawn: tuple[str, ...] = ()
        lesion_seed = 0
        for follow_up in range(count):
            index = len(plans)
            if follow_up:
                age = min(age + rng.poisson(age_step), 95.0)
            if follow_up == 0 or rng.uniform() >= rates["followup_keep_labels"]:
                drawn, lesion_seed = fresh_sets[index], int(rng.integers(0, 2**63))
            kept = [label for label in drawn if rng.uniform() >= label_noise]
            if rng.uniform() < label_noise * FALSE_POSITIVE_SHARE:
                weights = np.where(np.isin(NIH_LABELS, drawn), 0.0, prevalence)
                kept.append(NIH_LABELS[int(rng.choice(len(NIH_LABELS), p=weights / weights.sum()))])
            plans.append(
                PlannedImage(
                    index=index,
                    name=f"{patient_id:08d}_{follow_up:03d}.png",
                    folder=f"images_{index // IMAGES_PER_FOLDER + 1:03d}",
                    patient_id=patient_id,
                    follow_up=follow_up,
                    age_years=int(round(age)),
                    sex=sex,
                    view="PA" if rng.uniform() < rates["pa_fraction_images"] else "AP",
                    anatomy=anatomy,
                    drawn=drawn,
                    written=tuple(label for label in NIH_LABELS if label in kept),
                    lesion_seed=lesion_seed,
                    rgba=bool(rng.uniform() < rgba_fraction),
                    test=False,
                )
            )
    test_count = round(TEST_PATIENT_FRACTION * patient_id) if patient_id > 1 else 0
    test_patients = set((rng.permutation(patient_id)[:test_count] + 1).tolist())
    return [replace(plan, test=plan.patient_id in test_patients) for plan in plans]


def finding_labels(labels: tuple[str, ...]) -> str:
    """The "Finding Labels" cell: names joined by "|" in alphabetical order, as the real
    Data_Entry_2017 file writes them (99.95% of its rows), or "No Finding"."""
    return "|".join(sorted(labels)) if labels else "No Finding"


# --------------------------------------------------------------------------- writing


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) grey or (H, W, 4) RGBA array as an 8-bit PNG file.

    Written here rather than with Pillow because Pillow's adaptive filtering plus deflate takes
    ~2 ms for a noisy 256 x 256 film, more than drawing it; the "Up" filter with Huffman-only
    coding takes ~0.3 ms and gives smaller files. Any PNG reader (Pillow, TensorFlow) reads it.
    """
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), np.uint8)
    filtered[:, 0] = 2  # PNG filter type "Up": each byte minus the byte above, modulo 256
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    packer = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    data = packer.compress(filtered.tobytes()) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, {1: 0, 4: 6}[channels], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def _image_seed(seed: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=(_IMAGE_STREAM, index))


def _draw_and_write(
    plans: list[PlannedImage], root: str, size: int, seed: int, difficulty: float
) -> list[tuple[int, list[Box]]]:
    """Draw a chunk of images into `root` (runs in a worker process, or inline for workers=1)."""
    results = []
    for plan in plans:
        pixels, boxes = draw_radiograph(
            plan.anatomy,
            plan.drawn,
            size,
            _image_seed(seed, plan.index),
            plan.lesion_seed,
            difficulty,
            plan.view,
        )
        if plan.rgba:  # like 519 real NIH files: grey stored as RGBA, fully opaque
            pixels = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
        Path(root, plan.folder, "images", plan.name).write_bytes(png_bytes(pixels))
        results.append((plan.index, boxes))
    return results


def _worker_setup() -> None:
    """Initializer of our worker processes: let glibc keep freed image-sized buffers.

    By default glibc returns every freed block above 128 KiB to the kernel, so each numpy
    temporary of a 256 x 256 float32 film is a fresh mmap whose pages fault in on first touch;
    that doubled drawing time. Raising the thresholds (32 MiB is glibc's maximum) removes it.
    Only done in processes we start, never in the caller's.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: only slower


def _check_arguments(
    out_dir: Path,
    images: int,
    size: int,
    seed: int,
    fractions: dict[str, float],
    images_per_patient: float,
    workers: int | None,
) -> None:
    problems = []
    if not isinstance(images, int) or images < 1:
        problems.append(f"images={images!r} (expected an integer >= 1)")
    if not isinstance(size, int) or not 32 <= size <= 4096:
        problems.append(f"size={size!r} (expected an integer from 32 to 4096 pixels)")
    if not isinstance(seed, int) or seed < 0:
        problems.append(f"seed={seed!r} (expected an integer >= 0)")
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name}={value!r} (expected 0..1)")
    if not images_per_patient >= 1.0:
        problems.append(f"images_per_patient={images_per_patient!r} (expected >= 1)")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        problems.append(f"workers={workers!r} (expected an integer >= 1, or None for all cores)")
    if problems:
        raise DatasetError("synthetic dataset: bad " + "; ".join(problems))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(
            f"{out_dir} already exists and is not an empty folder; "
            "choose a new output folder or delete this one first"
        )


def _draw_all(
    plans: list[PlannedImage],
    root: Path,
    size: int,
    seed: int,
    difficulty: float,
    workers: int,
    progress: bool,
) -> list[list[Box]]:
    """Draw and write every planned image, in this process or in `workers` spawned ones."""
    boxes: list[list[Box]] = [[] for _ in plans]
    # a small single-worker job runs here: starting a worker process costs ~0.5 s
    in_process = workers == 1 and len(plans) * size * size < 2**24
    chunk = 64 if in_process else max(1, min(256, len(plans) // (workers * 8)))
    chunks = [plans[start : start + chunk] for start in range(0, len(plans), chunk)]
    with tqdm(
        total=len(plans), unit="img", desc="synth", disable=not progress, file=sys.stderr
    ) as bar:
        if in_process:
            for part in chunks:
                for index, image_boxes in _draw_and_write(part, str(root), size, seed, difficulty):
                    boxes[index] = image_boxes
                bar.update(len(part))
            return boxes
        # spawn, not fork: the caller may hold threads (TensorFlow, Ray) that fork copies mid-lock
        pool = ProcessPoolExecutor(workers, get_context("spawn"), initializer=_worker_setup)
        try:
            futures = [
                pool.submit(_draw_and_write, part, str(root), size, seed, difficulty)
                for part in chunks
            ]
            for future in as_completed(futures):
                done = future.result()
                for index, image_boxes in done:
                    boxes[index] = image_boxes
                bar.update(len(done))
        finally:
            pool.shutdown(cancel_futures=True)  # on failure, do not draw the queued rest
    return boxes


def _write_tables(root: Path, plans: list[PlannedImage], boxes: list[list[Box]], size: int) -> None:
    spacing = f"{FIELD_OF_VIEW_MM / size:.6g}"
    rows = [DATA_ENTRY_HEADER]
    for plan in plans:
        rows.append(
            f"{plan.name},{finding_labels(plan.written)},{plan.follow_up},{plan.patient_id},"
            f"{plan.age_years},{plan.sex},{plan.view},{size},{size},{spacing},{spacing}"
        )
    (root / "Data_Entry_2017.csv").write_bytes(("\n".join(rows) + "\n").encode())
    lines = [BBOX_HEADER]
    for plan, image_boxes in zip(plans, boxes, strict=True):
        for label, x, y, w, h in image_boxes:
            lines.append(f"{plan.name},{BOX_LABELS[label]},{x:.4f},{y:.4f},{w:.4f},{h:.4f}")
    # the real BBox_List_2017.csv has Windows line ends; Data_Entry_2017 has Unix ones
    (root / "BBox_List_2017.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    for file_name, test in (("train_val_list.txt", False), ("test_list.txt", True)):
        names = sorted(plan.name for plan in plans if plan.test == test)
        (root / file_name).write_bytes("".join(name + "\n" for name in names).encode())


def generate(
    out_dir: Path,
    images: int,
    size: int = 256,
    seed: int = 0,
    difficulty: float = 0.5,
    label_noise: float = 0.1,
    images_per_patient: float = 3.0,
    rgba_fraction: float = 0.02,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write `images` synthetic chest films of size x size pixels in the NIH ChestX-ray14 layout.

    Creates out_dir/images_0NN/images/{patient:08d}_{follow-up:03d}.png (10,000 per folder),
    Data_Entry_2017.csv, BBox_List_2017.csv (one box per drawn lesion of the eight box labels,
    including lesions whose label the label noise removed: boxes record what was drawn, the
    label file what a report would say), train_val_list.txt and test_list.txt (~20% of patients).
    `difficulty` 0..1 makes signs subtler, `label_noise` 0..1 is the chance a drawn finding is
    missing from the labels, `images_per_patient` (>= 1) is the mean number of images per
    patient, `rgba_fraction` 0..1 the share of RGBA files, `workers` the processes (None = all
    cores; workers are spawned, so a script calling this needs an `if __name__ == "__main__":`
    guard). The same seed gives byte-identical files whatever `workers` is. Everything is written
    to a hidden sibling folder and renamed at the end, so a failed run leaves nothing at out_dir.
    Raises DatasetError if out_dir exists and is not empty or an argument is out of range.
    Returns a summary: images, patients, label counts, boxes, seconds, images_per_second.
    """
    out_dir = Path(out_dir)
    fractions = {
        "difficulty": difficulty,
        "label_noise": label_noise,
        "rgba_fraction": rgba_fraction,
    }
    _check_arguments(out_dir, images, size, seed, fractions, images_per_patient, workers)
    started = time.perf_counter()
    plans = plan_dataset(images, seed, label_noise, images_per_patient, rgba_fraction)
    workers = min(workers or os.cpu_count() or 1, max(1, images // 16))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent)
    )
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a dataset should read like any folder
        for folder in sorted({plan.folder for plan in plans}):
            (staging / folder / "images").mkdir(parents=True)
        boxes = _draw_all(plans, staging, size, seed, difficulty, workers, progress)
        _write_tables(staging, plans, boxes, size)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    written = Counter(label for plan in plans for label in plan.written)
    drawn = Counter(label for plan in plans for label in plan.drawn)
    return {
        "out_dir": str(out_dir),
        "images": images,
        "patients": plans[-1].patient_id,
        "test_patients": len({plan.patient_id for plan in plans if plan.test}),
        "test_images": sum(plan.test for plan in plans),
        "label_counts": {label: written[label] for label in NIH_LABELS},
        "drawn_label_counts": {label: drawn[label] for label in NIH_LABELS},
        "no_finding": sum(not plan.written for plan in plans),
        "boxes": sum(len(image_boxes) for image_boxes in boxes),
        "rgba_images": sum(plan.rgba for plan in plans),
        "size": size,
        "seed": seed,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 1) if seconds > 0 else float("inf"),
    }
