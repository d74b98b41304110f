"""Tests of the synthetic films: they look like chest radiographs at any size, and every
finding's sign is drawn where it belongs, fades with difficulty and is boxed as NIH boxes it."""

from __future__ import annotations

import numpy as np
import pytest

from chestxpert.datasets import synth
from chestxpert.datasets.schema import NIH_LABELS, DatasetError

# --------------------------------------------------------------------------- drawing

SIZE = 128
ANATOMY = synth.sample_anatomy(np.random.default_rng(42), "M")


def render(
    findings: tuple[str, ...], difficulty: float = 0.3, lesion_seed: int = 1, size: int = SIZE
):
    pixels, boxes = synth.draw_radiograph(
        ANATOMY, findings, size, np.random.SeedSequence(9), lesion_seed, difficulty
    )
    return pixels.astype(np.float32), boxes


def sign_of(label: str, difficulty: float = 0.3, lesion_seed: int = 1) -> tuple[np.ndarray, list]:
    """Signed pixel change made by one finding on a fixed patient and film."""
    plain, _ = render((), difficulty, lesion_seed)
    sick, boxes = render((label,), difficulty, lesion_seed)
    return sick - plain, boxes


def share(weight: np.ndarray, region: np.ndarray) -> float:
    return float(weight[region].sum() / weight.sum())


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_films_look_like_chest_radiographs_at_any_size(size):
    pixels, boxes = render((), size=size)
    assert pixels.shape == (size, size) and boxes == []
    cx, top, base = ANATOMY.center_x, ANATOMY.lung_top, ANATOMY.lung_base
    row = slice(int((top + 0.3 * (base - top)) * size), int((top + 0.5 * (base - top)) * size))
    lateral = ANATOMY.mediastinum_half_width + 0.5 * ANATOMY.lung_width
    half = size // 40

    def strip(x: float) -> float:
        column = int(x * size)
        return float(pixels[row, column - half : column + half].mean())

    lungs = [strip(cx - lateral), strip(cx + lateral)]
    heart = pixels[int((base - 0.08) * size), int((cx + 0.05) * size)]
    outside = pixels[:, : max(1, size // 64)].mean()
    # dark lungs, bright mediastinum and heart, darkest air outside the body
    assert max(lungs) + 60 < strip(cx) and max(lungs) + 60 < heart
    assert outside < min(lungs)


@pytest.mark.parametrize("label", NIH_LABELS)
def test_every_finding_is_visible_and_fades_with_difficulty(label):
    change, _ = sign_of(label, difficulty=0.3)
    assert (np.abs(change) >= 8).sum() >= 6, "sign too faint to see"
    easy, _ = sign_of(label, difficulty=0.0)
    hard, _ = sign_of(label, difficulty=1.0)
    assert np.abs(easy).sum() > np.abs(hard).sum() > 0


@pytest.mark.parametrize("label", list(synth.BOX_LABELS))
def test_boxes_contain_the_drawn_lesion(label):
    for lesion_seed in (1, 2, 3):
        change, boxes = sign_of(label, lesion_seed=lesion_seed)
        assert boxes and {box[0] for box in boxes} == {label}
        inside = np.zeros(change.shape, bool)
        for _, x, y, w, h in boxes:
            inside[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = True
        assert share(np.abs(change), inside) >= 0.9
        assert inside.mean() < 0.45  # a box localises, it is not the whole film


@pytest.mark.parametrize("label", sorted(set(NIH_LABELS) - set(synth.BOX_LABELS)))
def test_findings_without_nih_boxes_get_none(label):
    assert sign_of(label)[1] == []


def _zones(size: int = SIZE):
    """Coordinates in image widths and reference lines of the fixed test anatomy."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    top, base = ANATOMY.lung_top, ANATOMY.lung_base
    return x, y, ANATOMY.center_x, top, base, ANATOMY.mediastinum_half_width, ANATOMY.lung_width


def test_cardiomegaly_enlarges_the_heart_past_half_the_chest():
    change, boxes = sign_of("Cardiomegaly")
    x, y, cx, top, base, med, width = _zones()
    near_heart = (np.abs(x - cx - 0.03) < 0.3) & (y > top + 0.3 * (base - top)) & (y < base + 0.05)
    assert share(np.abs(change), near_heart) > 0.9
    assert change[near_heart].sum() > 0  # a bigger white shadow
    ((_, bx, _, bw, _),) = boxes
    assert bw / (2 * (med + width) * SIZE) > 0.5  # cardiothoracic ratio


def test_effusion_opacifies_the_lung_bases():
    change, _ = sign_of("Effusion")
    x, y, cx, top, base, *_ = _zones()
    assert share(np.abs(change), y > top + 0.55 * (base - top)) > 0.9 and change.sum() > 0


def test_pneumothorax_is_peripheral_and_apical():
    change, _ = sign_of("Pneumothorax")
    x, y, cx, top, base, med, width = _zones()
    periphery = (np.abs(x - cx) > med + 0.45 * width) | (y < top + 0.25 * (base - top))
    assert share(np.abs(change), periphery) > 0.8
    assert share(np.abs(change), y < top + 0.75 * (base - top)) > 0.9


def test_edema_is_bilateral_and_perihilar():
    change, _ = sign_of("Edema")
    x, y, cx, top, base, med, width = _zones()
    weight = np.clip(change, 0, None)
    assert min(share(weight, x < cx), share(weight, x > cx)) > 0.3
    inner = np.abs(x - cx) < med + 0.5 * width
    assert share(weight, inner) > share(weight, ~inner)


def test_fibrosis_is_upper_zone_predominant():
    change, _ = sign_of("Fibrosis")
    x, y, cx, top, base, *_ = _zones()
    middle = top + 0.5 * (base - top)
    assert share(np.abs(change), y < middle) > 0.6
    assert min(share(np.abs(change), x < cx), share(np.abs(change), x > cx)) > 0.25


def test_emphysema_darkens_and_enlarges_the_lungs():
    change, _ = sign_of("Emphysema")
    x, y, cx, top, base, med, width = _zones()
    lung_fields = (
        (np.abs(x - cx) > med + 0.1 * width)
        & (np.abs(x - cx) < med + 0.8 * width)
        & (y > top + 0.1)
        & (y < base - 0.1)
    )
    assert change[lung_fields].mean() < -3
    below_old_base = (y > base) & (y < base + 0.06) & (np.abs(x - cx) > med + 0.3 * width)
    assert change[below_old_base].mean() < -3  # the diaphragm moved down


def test_hernia_is_a_lucency_behind_the_heart_above_the_diaphragm():
    change, _ = sign_of("Hernia")
    x, y, cx, top, base, *_ = _zones()
    retrocardiac = (np.abs(x - cx) < 0.12) & (y > top + 0.4 * (base - top)) & (y < base + 0.02)
    assert share(np.abs(change), retrocardiac) > 0.95
    assert change.min() < -20


def test_nodules_are_smaller_than_three_cm_and_masses_larger():
    three_cm = 30 / synth.FIELD_OF_VIEW_MM * SIZE
    for lesion_seed in range(1, 6):
        nodules = sign_of("Nodule", lesion_seed=lesion_seed)[1]
        masses = sign_of("Mass", lesion_seed=lesion_seed)[1]
        assert all(max(w, h) < three_cm + 2 for *_, w, h in nodules)
        assert all(max(w, h) > three_cm for *_, w, h in masses)


@pytest.mark.parametrize(
    "label",
    [
        "Atelectasis",
        "Infiltration",
        "Pneumonia",
        "Consolidation",
        "Nodule",
        "Mass",
        "Pleural_Thickening",
    ],
)
def test_focal_findings_stay_inside_the_chest(label):
    change, _ = sign_of(label)
    x, y, cx, top, base, med, width = _zones()
    chest = (np.abs(x - cx) < med + width + 0.03) & (y > top - 0.03) & (y < base + 0.03)
    assert share(np.abs(change), chest) > 0.97


def test_a_finding_looks_the_same_whatever_else_is_on_the_film():
    alone, _ = render(("Nodule",))
    with_other, _ = render(("Nodule", "Effusion"))
    effusion, _ = render(("Effusion",))
    plain, _ = render(())
    nodule_alone = alone - plain
    nodule_with_effusion = with_other - effusion
    strong = np.abs(nodule_alone) > 8
    assert (
        strong.any()
        and np.abs(nodule_with_effusion[strong]).mean() > 0.5 * np.abs(nodule_alone[strong]).mean()
    )


def test_draw_rejects_unknown_findings():
    with pytest.raises(DatasetError, match="Pneumonitis"):
        synth.draw_radiograph(ANATOMY, ("Pneumonitis",), 64, 0)
