"""The normal chest of a phantom: soft tissue, lungs, heart and mediastinum, diaphragm, bones and
lung markings, painted into a canvas before any finding.
"""

from __future__ import annotations

import numpy as np

from chestxpert.datasets.synth.anatomy import lung_shape
from chestxpert.datasets.synth.canvas import Canvas, heart_mask, soft_inside
from chestxpert.datasets.synth.textures import vessel_bank


def compose_anatomy(canvas: Canvas, rng: np.random.Generator, marking_keep: np.ndarray) -> None:
    """Paint the normal chest into the density map; `marking_keep` (0..1) masks lung markings."""
    body = _draw_trunk(canvas)
    below_diaphragm = _draw_lungs_and_heart(canvas, body)
    _draw_bones(canvas, below_diaphragm)
    _draw_lung_markings(canvas, rng, marking_keep)


def _per_side(canvas: Canvas, pair: list[float]) -> np.ndarray:
    """A row holding pair[0] over the image's left half and pair[1] over its right half."""
    return np.where(canvas.x > canvas.geo.cx, np.float32(pair[1]), np.float32(pair[0]))


def _draw_trunk(canvas: Canvas) -> np.ndarray:
    """Soft tissue, thicker at the midline, narrowing at neck and waist, plus shoulders and
    breast shadows; returns the body mask."""
    geo, u, y, edge = canvas.geo, canvas.u, canvas.y, canvas.edge
    body_hw = geo.body_hw * (1.0 - 0.2 * (y - 0.5) ** 2)
    thickness = np.sqrt(np.clip(1.0 - (u / body_hw) ** 2, 0.0, 1.0))
    body = soft_inside(body_hw - u, 3 * edge)
    shoulders = np.clip((geo.top + 0.04 - y) / 0.1, 0.0, 1.0) * soft_inside(0.49 - u, 3 * edge)
    canvas.density += geo.tissue * (0.3 + 0.7 * thickness) * body + 0.3 * shoulders * (1.0 - body)
    if geo.breasts:
        for side, sign in ((0, -1.0), (1, 1.0)):
            bx, by = geo.cx + sign * (geo.med + 0.65 * geo.lung_width[side]), geo.base[side] + 0.01
            rows, cols, xs, ys = canvas.window(bx - 0.2, bx + 0.2, by - 0.2, by + 0.12)
            r2 = ((xs - bx) / 0.17) ** 2 + ((ys - by) / 0.13) ** 2
            canvas.density[rows, cols] += 0.09 * np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
    return body


def _draw_lungs_and_heart(canvas: Canvas, body: np.ndarray) -> np.ndarray:
    """Aerated lungs, the mediastinum and heart in front of them, the diaphragm and the stomach
    bubble; stores the lung mask on the canvas and returns the below-the-diaphragm mask."""
    geo, u, y, edge, density = canvas.geo, canvas.u, canvas.y, canvas.edge, canvas.density
    width, base = _per_side(canvas, geo.lung_width), _per_side(canvas, geo.base)
    q = lung_shape(u, y, geo.med, geo.top, width, base)
    dome = np.where(canvas.x > geo.cx, geo.dome_y(1, u), geo.dome_y(0, u)).astype(np.float32)
    lung = soft_inside((1.0 - q) * 0.25 * width, edge) * soft_inside(dome - y, edge)

    # heart, mediastinum and aortic knob lie in front of the lungs: there lung air does not show
    solid = np.zeros_like(density)
    rows, cols, heart = heart_mask(canvas)
    solid[rows, cols] = heart
    _, heart_y, _, heart_half_height = geo.heart()
    heart_top = heart_y - heart_half_height
    rows, cols, xs, ys = canvas.window(
        geo.cx - geo.med - 0.06, geo.cx + geo.med + 0.08, geo.top + 0.1, heart_y
    )
    widening = 0.045 * np.clip((ys - geo.top - 0.12) / (heart_top - geo.top - 0.02), 0.0, 1.0)
    mediastinum = soft_inside(geo.med + widening - np.abs(xs - geo.cx - 0.3 * widening), 3 * edge)
    np.maximum(solid[rows, cols], mediastinum, out=solid[rows, cols])
    knob_x, knob_y, knob_r = geo.cx + geo.med - 0.002, geo.top + 0.1, 0.026
    rows, cols, xs, ys = canvas.window(knob_x - 0.04, knob_x + 0.04, knob_y - 0.04, knob_y + 0.04)
    knob = soft_inside(knob_r - np.sqrt((xs - knob_x) ** 2 + (ys - knob_y) ** 2), 1.5 * edge)
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
    below = soft_inside(y - dome, 3 * edge)
    density += 0.05 * below * body

    # gas in the stomach under the left hemidiaphragm
    gu = geo.med + 0.55 * geo.lung_width[1]
    gx, gy = geo.cx + gu, float(geo.dome_y(1, gu)) + 0.03
    rows, cols, xs, ys = canvas.window(gx - 0.07, gx + 0.07, gy - 0.04, gy + 0.05)
    bubble = soft_inside(1.0 - ((xs - gx) / 0.055) ** 2 - ((ys - gy) / 0.03) ** 2, 0.3)
    density[rows, cols] -= 0.12 * bubble * soft_inside(ys - gy + 0.025, edge)
    return below


def _draw_bones(canvas: Canvas, below_diaphragm: np.ndarray) -> None:
    """Trachea, spine, ribs and clavicles."""
    geo, u, y, edge, density = canvas.geo, canvas.u, canvas.y, canvas.edge, canvas.density
    # trachea: an air column above the carina
    rows, cols, xs, ys = canvas.window(geo.cx - 0.04, geo.cx + 0.04, 0.0, geo.top + 0.16)
    trachea = soft_inside(0.013 - np.abs(xs - geo.cx - 0.004), 1.5 * edge)
    density[rows, cols] -= 0.16 * trachea * np.clip((geo.top + 0.15 - ys) / 0.03, 0.0, 1.0)

    # spine: vertebral bodies separated by darker discs, faint behind the mediastinum
    rows, cols, xs, ys = canvas.window(geo.cx - 0.05, geo.cx + 0.05, 0.0, 1.0)
    discs = np.clip(np.cos(2 * np.pi * ys / (geo.rib_spacing * 0.75)) * 2.0 + 1.0, 0.0, 1.0)
    density[rows, cols] += (
        0.09 * soft_inside(0.03 - np.abs(xs - geo.cx), 2 * edge) * (0.7 + 0.3 * discs)
    )

    # ribs: posterior ribs arch up from the spine then down along the wall; fainter anterior
    # ribs run down towards the sternum; both fade below the diaphragm
    cage = soft_inside(_per_side(canvas, [geo.lateral(0), geo.lateral(1)]) + 0.03 - u, 4 * edge)
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


def _draw_lung_markings(canvas: Canvas, rng: np.random.Generator, marking_keep: np.ndarray) -> None:
    """A vessel tree from each hilum plus hilar shadows, inside the lungs only."""
    geo, size = canvas.geo, canvas.size
    bank = vessel_bank(size)
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


def _paste(target: np.ndarray, patch: np.ndarray, r0: int, c0: int) -> None:
    """Add `patch` into `target` with its top-left at (r0, c0), clipped to the target."""
    h, w = patch.shape
    tr0, tc0 = max(r0, 0), max(c0, 0)
    tr1, tc1 = min(r0 + h, target.shape[0]), min(c0 + w, target.shape[1])
    if tr0 < tr1 and tc0 < tc1:
        target[tr0:tr1, tc0:tc1] += patch[tr0 - r0 : tr1 - r0, tc0 - c0 : tc1 - c0]
