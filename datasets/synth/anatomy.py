"""A phantom patient's chest: the anatomy drawn once per patient, and the geometry of one image
(that anatomy after per-image jitter, and after findings that reshape it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FIELD_OF_VIEW_MM = 350.0  # image width in mm; sets nodule/mass sizes and the written pixel spacing


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
class Geometry:
    """The anatomy of one image after jitter and after findings that reshape it.

    Lists hold one value per side: index 0 is the image's left half, 1 its right half.
    """

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
        return lung_shape(
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
        """The image point at height fraction v (0 apex..1 base) and width fraction w
        (0 medial..1 lateral) of one lung."""
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


def lung_shape(
    u: np.ndarray | float,
    y: np.ndarray | float,
    med: float,
    top: float,
    width: np.ndarray | float,
    base: np.ndarray | float,
) -> np.ndarray:
    """Lung shape function (< 1 inside): straight medial border, convex lateral wall widening
    downwards, domed apex. Takes scalars or broadcastable arrays (a row for u, a column for y)."""
    uc = med + 0.5 * width
    height = base - top
    lateral_axis = 0.5 * width * (0.86 + 0.14 * np.clip((y - top) / height, 0.0, 1.0))
    # arithmetic on a 0/1 mask rather than np.where, which is far slower on a full image
    lateral = (u > uc).astype(np.float32)
    across = (
        lateral * (u - uc) ** 2 / lateral_axis**2
        + (1.0 - lateral) * ((uc - u) / (0.5 * width)) ** 4
    )
    apex = np.clip((top + 0.5 * height - y) / (0.5 * height), 0.0, None) ** 2
    return across + apex


def image_geometry(anatomy: Anatomy, jitter: np.ndarray, view: str) -> Geometry:
    """One image's geometry: `anatomy` moved by `jitter` (uniform -1..1 values: shift, breath,
    exposure, contrast) and, for an AP `view`, drawn as a supine bedside film."""
    dx, dy, breath, exposure, contrast = (float(value) for value in jitter[:5])
    base = anatomy.lung_base + 0.012 * dy + 0.012 * breath
    ap = view == "AP"  # supine bedside films: shallower breath, magnified heart, higher clavicles
    geo = Geometry(
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
