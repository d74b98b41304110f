"""The 14 NIH findings drawn on a phantom: some reshape the anatomy before it is painted
(RESHAPE), every one then adds its sign to the canvas (SIGNS) and boxes it where NIH would.

Each finding's random choices come from its own stream (lesion seed, label), so a finding looks
the same whichever other findings share the image, and persists unchanged across follow-ups.
`strength` is 1 at difficulty 0 and 0.3 at difficulty 1; `grow` scales sizes likewise.
"""

from __future__ import annotations

import math

import numpy as np

from chestxpert.datasets.synth.anatomy import FIELD_OF_VIEW_MM, Geometry
from chestxpert.datasets.synth.canvas import Canvas, heart_mask, soft_inside
from chestxpert.datasets.synth.textures import segment


def _reshape_cardiomegaly(geo: Geometry, rng: np.random.Generator, difficulty: float) -> None:
    geo.heart_ratio = 0.53 + 0.11 * (1.0 - difficulty) + rng.uniform(0.0, 0.03)
    geo.heart_roundness = min(0.85, geo.heart_roundness * 1.12)  # a globular heart


def _reshape_emphysema(geo: Geometry, rng: np.random.Generator, difficulty: float) -> None:
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


def _reshape_atelectasis(geo: Geometry, rng: np.random.Generator, difficulty: float) -> None:
    side = int(rng.integers(0, 2))
    geo.lift[side] += (0.015 + rng.uniform(0.0, 0.015)) * (
        1.0 - 0.7 * difficulty
    )  # volume loss lifts the dome
    geo.atelectasis_side = side


def _sign_cardiomegaly(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
    rows, cols, heart = heart_mask(canvas)
    floor = (
        int(canvas.geo.heart_floor * canvas.size) - rows.start
    )  # the shadow ends at the diaphragm
    canvas.box_mask(
        "Cardiomegaly", rows, cols, (heart > 0.5) & (np.arange(heart.shape[0]) < floor)[:, None]
    )


def _sign_effusion(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
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


def pneumothorax_region(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> tuple:
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
    space = soft_inside((q_inner - 1.0) * inner_width, canvas.edge) * upper
    line_width = max(0.003, 0.9 / canvas.size)
    line = np.clip(1.0 - np.abs(q_inner - 1.0) * inner_width / line_width, 0.0, 1.0) * upper
    return side, rows, cols, space, line


def sign_pneumothorax(
    canvas: Canvas, rng: np.random.Generator, difficulty: float, region: tuple
) -> None:
    """Darken the pleural space and draw the pleural line of a `pneumothorax_region`."""
    side, rows, cols, space, line = region
    lung = canvas.lung(rows, cols)
    strength = 1.0 - 0.7 * difficulty
    change = (-0.12 * strength * space + 0.3 * strength * line) * lung
    canvas.density[rows, cols] += change
    canvas.box_mask("Pneumothorax", rows, cols, ((space > 0.3) | (line > 0.3)) & (lung > 0.3))


def _round_lesion(
    canvas: Canvas,
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
    ball = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)) * 0.85 + 0.15 * soft_inside(
        (1.0 - r2) * radius * 0.5, canvas.edge
    )
    canvas.add(label, rows, cols, peak * ball)


def _sign_nodule(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
    strength, grow = 1.0 - 0.7 * difficulty, 1.0 - 0.4 * difficulty
    for _ in range(1 if rng.uniform() < 0.8 else int(rng.integers(2, 4))):
        side = int(rng.integers(0, 2))
        centre = canvas.geo.lung_point(side, rng.uniform(0.12, 0.85), rng.uniform(0.2, 0.8))
        radius_mm = min(14.0, rng.uniform(5.0, 12.0) * grow + 2.5)  # < 3 cm across
        _round_lesion(
            canvas, rng, "Nodule", centre, radius_mm / FIELD_OF_VIEW_MM, 0.32 * strength, 0.03
        )


def _sign_mass(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
    strength, grow = 1.0 - 0.7 * difficulty, 1.0 - 0.3 * difficulty
    side = int(rng.integers(0, 2))
    centre = canvas.geo.lung_point(side, rng.uniform(0.2, 0.75), rng.uniform(0.3, 0.7))
    radius_mm = rng.uniform(20.0, 34.0) * grow
    _round_lesion(
        canvas, rng, "Mass", centre, max(radius_mm, 17.0) / FIELD_OF_VIEW_MM, 0.5 * strength, 0.08
    )


def _sign_edema(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
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
            haze += 0.35 * segment(xs, ys, (lx, ly), (lx_in, ly), max(0.0025, 0.8 / canvas.size))
        canvas.add("Edema", rows, cols, 0.42 * strength * haze * canvas.lung(rows, cols))


def _sign_emphysema(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
    strength = 1.0 - 0.7 * difficulty
    for _ in range(int(rng.integers(1, 4))):  # apical bullae: thin-walled lucencies
        side = int(rng.integers(0, 2))
        cx, cy = canvas.geo.lung_point(side, rng.uniform(0.08, 0.35), rng.uniform(0.3, 0.8))
        radius = rng.uniform(0.025, 0.045)
        rows, cols, xs, ys = canvas.window(
            cx - radius - 0.01, cx + radius + 0.01, cy - radius - 0.01, cy + radius + 0.01
        )
        dist = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
        bulla = -0.12 * soft_inside(radius - dist, canvas.edge) + 0.08 * np.clip(
            1.0 - np.abs(dist - radius) / 0.004, 0.0, 1.0
        )
        canvas.add("Emphysema", rows, cols, strength * bulla * canvas.lung(rows, cols))


def _sign_hernia(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    strength, grow = 1.0 - 0.7 * difficulty, 1.0 - 0.3 * difficulty
    radius = rng.uniform(0.035, 0.055) * grow
    cx = geo.cx + rng.uniform(0.0, 0.04)
    cy = geo.heart_floor - 1.6 * radius
    rows, cols, xs, ys = canvas.window(
        cx - radius - 0.01, cx + radius + 0.01, cy - radius - 0.01, cy + radius + 0.01
    )
    dist = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
    gas = soft_inside(radius - dist, canvas.edge) * soft_inside(
        cy + 0.3 * radius - ys, canvas.edge
    )  # air-fluid level
    rim = np.clip(1.0 - np.abs(dist - radius) / max(0.005, 1.0 / canvas.size), 0.0, 1.0)
    canvas.add("Hernia", rows, cols, strength * (-0.45 * gas + 0.25 * rim))


def _sign_atelectasis(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    side = geo.atelectasis_side
    strength, grow = 1.0 - 0.7 * difficulty, 1.0 - 0.4 * difficulty
    cx, cy = geo.lung_point(side, rng.uniform(0.62, 0.82), 0.5)
    length = geo.lung_width[side] * rng.uniform(0.5, 0.8) * grow
    angle = math.radians(rng.uniform(-25, 25))
    half = (0.5 * length * math.cos(angle), 0.5 * length * math.sin(angle))
    thickness = rng.uniform(0.012, 0.022) * (1.4 - 0.6 * difficulty)
    rows, cols, xs, ys = canvas.side_window(side, cy - 0.08, geo.base[side] + 0.06)
    band = segment(xs, ys, (cx - half[0], cy - half[1]), (cx + half[0], cy + half[1]), thickness)
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


def _sign_infiltration(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
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


def _sign_pneumonia(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
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
        band = soft_inside(bottom - ys, canvas.edge) * np.clip((ys - top + soft) / soft, 0.0, 1.0)
    else:
        band = soft_inside(ys - top, canvas.edge) * np.clip((bottom - ys + soft) / soft, 0.0, 1.0)
    u = np.abs(xs - geo.cx)
    medial_fade = np.clip((u - geo.med - rng.uniform(0.0, 0.08)) / 0.05, 0.0, 1.0)
    patch = band * medial_fade * np.clip(0.8 + 0.25 * canvas.field(rng, rows, cols), 0.0, 1.0)
    canvas.add("Pneumonia", rows, cols, 0.45 * strength * patch * canvas.lung(rows, cols))


def _sign_consolidation(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
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
        np.maximum(bronchi, segment(xs, ys, start, end, max(0.004, 1.0 / canvas.size)), out=bronchi)
    change = strength * (0.42 * dense - 0.16 * bronchi * dense) * canvas.lung(rows, cols)
    canvas.add("Consolidation", rows, cols, change)


def _sign_fibrosis(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
    geo = canvas.geo
    strength = 1.0 - 0.7 * difficulty
    line_width = 0.16
    for side in (0, 1):
        rows, cols, xs, ys = canvas.side_window(side, geo.top, geo.base[side])
        net = np.clip(1.0 - np.abs(canvas.field(rng, rows, cols, fine=True)) / line_width, 0.0, 1.0)
        height = (ys - geo.top) / (geo.base[side] - geo.top)
        upper = np.clip(1.2 - 1.5 * height, 0.1, 1.0)  # upper-zone predominant
        canvas.add("Fibrosis", rows, cols, 0.35 * strength * net * upper * canvas.lung(rows, cols))


def _sign_pleural_thickening(canvas: Canvas, rng: np.random.Generator, difficulty: float) -> None:
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
        band = np.clip(1.0 - inside / thickness, 0.0, 1.0) * soft_inside(inside, canvas.edge)
        uc = geo.med + 0.5 * geo.lung_width[side]
        lateral = np.clip((u - uc) / (0.15 * geo.lung_width[side]) + 0.3, 0.0, 1.0)
        apex = np.clip((geo.top + 0.2 * height - ys) / (0.1 * height), 0.0, 1.0)
        canvas.add(
            "Pleural_Thickening", rows, cols, 0.5 * strength * band * np.maximum(lateral, apex)
        )


RESHAPE = {
    "Cardiomegaly": _reshape_cardiomegaly,
    "Emphysema": _reshape_emphysema,
    "Atelectasis": _reshape_atelectasis,
}
SIGNS = {
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
