"""Tests of the synthetic phantom generator: NIH layout, determinism, label statistics, and that
every finding's sign is drawn where it belongs."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxpert.datasets import synth
from chestxpert.datasets.schema import NIH_LABELS, DatasetError
from chestxpert.datasets.synth import plan as plan_module
from chestxpert.datasets.synth import write as write_module

NAME = re.compile(r"^\d{8}_\d{3}\.png$")
BOX_NAME_TO_LABEL = {spelling: label for label, spelling in synth.BOX_LABELS.items()}


def read_rows(path: Path) -> tuple[str, list[list[str]]]:
    """Header line and comma-split rows, read the way the real NIH files must be read."""
    text = path.read_bytes().decode()
    lines = text.splitlines()
    return lines[0], [line.split(",") for line in lines[1:]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "nih"
    summary = synth.generate(
        out,
        images=80,
        size=64,
        seed=3,
        label_noise=0.0,
        rgba_fraction=0.3,
        workers=1,
        progress=False,
    )
    return out, summary


# --------------------------------------------------------------------------- layout


def test_layout_and_headers_are_nih_shaped(dataset):
    out, summary = dataset
    assert sorted(p.name for p in out.iterdir()) == [
        "BBox_List_2017.csv",
        "Data_Entry_2017.csv",
        "images_001",
        "test_list.txt",
        "train_val_list.txt",
    ]
    header, rows = read_rows(out / "Data_Entry_2017.csv")
    assert header == (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    )
    assert len(rows) == 80 and all(len(row) == 11 for row in rows)
    files = sorted(p.name for p in (out / "images_001" / "images").iterdir())
    assert files == sorted(row[0] for row in rows)
    for name, labels, follow_up, patient, age, sex, view, width, height, sx, sy in rows:
        assert NAME.match(name) and name == f"{int(patient):08d}_{int(follow_up):03d}.png"
        assert labels == "No Finding" or (
            set(labels.split("|")) <= set(NIH_LABELS)
            and labels.split("|") == sorted(labels.split("|"))
        )
        assert age.isdigit() and 0 <= int(age) <= 95
        assert sex in ("M", "F") and view in ("PA", "AP")
        assert (width, height) == ("64", "64") and float(sx) == float(sy) == pytest.approx(
            350 / 64, rel=1e-4
        )
    box_header, boxes = read_rows(out / "BBox_List_2017.csv")
    assert box_header == "Image Index,Finding Label,Bbox [x,y,w,h]"
    assert boxes and all(len(row) == 6 for row in boxes)
    assert (out / "BBox_List_2017.csv").read_bytes().count(b"\r\n") == len(
        boxes
    ) + 1  # like the real file
    for name, label, *xywh in boxes:
        x, y, w, h = map(float, xywh)
        assert name in files and label in BOX_NAME_TO_LABEL
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
    assert "Infiltration" not in {row[1] for row in boxes}  # the BBox file spells it "Infiltrate"


def test_pandas_reads_it_like_the_real_file(dataset):
    pd = pytest.importorskip("pandas")
    out, _ = dataset
    entries = pd.read_csv(out / "Data_Entry_2017.csv")
    assert list(entries.columns) == [
        "Image Index",
        "Finding Labels",
        "Follow-up #",
        "Patient ID",
        "Patient Age",
        "Patient Gender",
        "View Position",
        "OriginalImage[Width",
        "Height]",
        "OriginalImagePixelSpacing[x",
        "y]",
    ]
    assert entries["Patient Age"].dtype.kind == "i" and entries["Patient ID"].dtype.kind == "i"
    boxes = pd.read_csv(out / "BBox_List_2017.csv")
    assert list(boxes.columns) == ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]


def test_images_are_8bit_grey_or_opaque_rgba(dataset):
    out, summary = dataset
    modes = {}
    for path in (out / "images_001" / "images").iterdir():
        with Image.open(path) as image:
            modes[path.name] = image.mode
            pixels = np.asarray(image)
            assert image.size == (64, 64)
            if image.mode == "RGBA":
                assert (pixels[..., 3] == 255).all()
                assert (pixels[..., 0] == pixels[..., 1]).all() and (
                    pixels[..., 1] == pixels[..., 2]
                ).all()
            else:
                assert image.mode == "L" and pixels.dtype == np.uint8
    rgba = sum(mode == "RGBA" for mode in modes.values())
    assert rgba == summary["rgba_images"] and 10 <= rgba <= 40  # rgba_fraction=0.3 of 80


def test_split_lists_are_by_patient(dataset):
    out, summary = dataset
    _, rows = read_rows(out / "Data_Entry_2017.csv")
    patient_of = {row[0]: row[3] for row in rows}
    train = (out / "train_val_list.txt").read_text().splitlines()
    test = (out / "test_list.txt").read_text().splitlines()
    assert sorted(train + test) == sorted(patient_of) and not set(train) & set(test)
    assert train == sorted(train) and test == sorted(test)
    test_patients = {patient_of[name] for name in test}
    assert not test_patients & {patient_of[name] for name in train}
    assert len(test_patients) == round(0.2 * summary["patients"])


def test_summary_matches_files(dataset):
    out, summary = dataset
    _, rows = read_rows(out / "Data_Entry_2017.csv")
    _, boxes = read_rows(out / "BBox_List_2017.csv")
    counts = {label: sum(label in row[1].split("|") for row in rows) for label in NIH_LABELS}
    assert summary["label_counts"] == counts
    assert summary["no_finding"] == sum(row[1] == "No Finding" for row in rows)
    assert summary["patients"] == len({row[3] for row in rows})
    assert summary["boxes"] == len(boxes) and summary["images"] == 80
    assert summary["images_per_second"] > 0 and summary["seconds"] > 0


def test_without_label_noise_every_box_is_labelled(dataset):
    out, _ = dataset
    _, rows = read_rows(out / "Data_Entry_2017.csv")
    labels = {row[0]: row[1].split("|") for row in rows}
    _, boxes = read_rows(out / "BBox_List_2017.csv")
    assert all(BOX_NAME_TO_LABEL[label] in labels[name] for name, label, *_ in boxes)


def test_boxes_record_drawn_findings_even_when_the_label_was_dropped(tmp_path):
    summary = synth.generate(
        tmp_path / "ds", images=40, size=64, seed=5, label_noise=1.0, workers=1, progress=False
    )
    _, rows = read_rows(tmp_path / "ds" / "Data_Entry_2017.csv")
    labels = {row[0]: row[1].split("|") for row in rows}
    _, boxes = read_rows(tmp_path / "ds" / "BBox_List_2017.csv")
    unlabelled = [name for name, label, *_ in boxes if BOX_NAME_TO_LABEL[label] not in labels[name]]
    assert summary["boxes"] > 0 and len(unlabelled) == len(boxes)
    assert sum(summary["drawn_label_counts"].values()) > sum(summary["label_counts"].values())


def test_folders_hold_at_most_images_per_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "IMAGES_PER_FOLDER", 12)
    synth.generate(tmp_path / "ds", images=30, size=32, seed=0, workers=1, progress=False)
    folders = sorted(p.name for p in (tmp_path / "ds").glob("images_*"))
    assert folders == ["images_001", "images_002", "images_003"]
    assert [len(list((tmp_path / "ds" / f / "images").iterdir())) for f in folders] == [12, 12, 6]


# --------------------------------------------------------------------------- determinism and safety


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_bytes_whatever_the_workers(tmp_path):
    synth.generate(
        tmp_path / "one", images=48, size=64, seed=11, rgba_fraction=0.2, workers=1, progress=False
    )
    synth.generate(
        tmp_path / "two", images=48, size=64, seed=11, rgba_fraction=0.2, workers=2, progress=False
    )
    one, two = _file_bytes(tmp_path / "one"), _file_bytes(tmp_path / "two")
    assert len(one) == 48 + 4 and one == two


def test_different_seed_gives_different_data(tmp_path):
    synth.generate(tmp_path / "a", images=10, size=64, seed=1, workers=1, progress=False)
    synth.generate(tmp_path / "b", images=10, size=64, seed=2, workers=1, progress=False)
    a, b = _file_bytes(tmp_path / "a"), _file_bytes(tmp_path / "b")
    assert a["Data_Entry_2017.csv"] != b["Data_Entry_2017.csv"]
    shared = set(a) & set(b) - {
        "Data_Entry_2017.csv",
        "BBox_List_2017.csv",
        "train_val_list.txt",
        "test_list.txt",
    }
    assert shared and all(a[name] != b[name] for name in shared)


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    real_draw = synth.draw_radiograph
    calls = []

    def draw_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("injected failure")
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(write_module, "draw_radiograph", draw_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        synth.generate(tmp_path / "ds", images=20, size=32, seed=0, workers=1, progress=False)
    assert len(calls) == 7
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor the staging folder


def test_refuses_a_non_empty_out_dir(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not an empty folder"):
        synth.generate(out, images=4, size=32, workers=1, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_fills_an_existing_empty_out_dir(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    synth.generate(out, images=4, size=32, workers=1, progress=False)
    assert (out / "Data_Entry_2017.csv").is_file() and [p.name for p in tmp_path.iterdir()] == [
        "ds"
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"images": 0},
        {"size": 8},
        {"seed": -1},
        {"difficulty": 1.5},
        {"label_noise": -0.1},
        {"images_per_patient": 0.5},
        {"rgba_fraction": 2.0},
        {"workers": 0},
    ],
)
def test_rejects_bad_arguments_with_a_dataset_error(tmp_path, bad):
    arguments = {"images": 4, "size": 32, "workers": 1, "progress": False} | bad
    with pytest.raises(DatasetError, match=next(iter(bad))):
        synth.generate(tmp_path / "ds", **arguments)
    assert not (tmp_path / "ds").exists()


def test_png_writer_round_trips_grey_and_rgba():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    rgba = rng.integers(0, 256, (9, 5, 4), dtype=np.uint8)
    for pixels, mode in ((grey, "L"), (rgba, "RGBA")):
        with Image.open(io.BytesIO(synth.png_bytes(pixels))) as image:
            assert image.mode == mode and np.array_equal(np.asarray(image), pixels)


# --------------------------------------------------------------------------- label statistics


def test_sampled_label_sets_reproduce_nih_prevalence():
    rates = synth.load_label_rates()
    sets = synth.sample_label_sets(np.random.default_rng(0), 3000)
    for label in NIH_LABELS:
        expected = rates["prevalence"][label]
        observed = sum(label in labels for labels in sets) / len(sets)
        assert abs(observed - expected) <= 4 * np.sqrt(expected * (1 - expected) / 3000) + 0.003, (
            label
        )
    no_finding = sum(not labels for labels in sets) / len(sets)
    assert abs(no_finding - rates["no_finding_fraction"]) < 0.03
    both = sum({"Effusion", "Infiltration"} <= set(labels) for labels in sets) / len(sets)
    expected_both = rates["cooccurrence"][2][3] / rates["images"]
    assert (
        abs(both - expected_both) < 0.012
    )  # co-occurrence, not independent draws (0.021 if independent)
    assert all(list(labels) == [name for name in NIH_LABELS if name in labels] for labels in sets)


def test_label_rates_table_is_small_and_consistent():
    rates = synth.load_label_rates()
    assert synth.LABEL_RATES_PATH.stat().st_size < 10_000
    assert rates["images"] == 112_120 and tuple(rates["labels"]) == NIH_LABELS
    diagonal = [rates["cooccurrence"][i][i] / rates["images"] for i in range(14)]
    assert diagonal == pytest.approx([rates["prevalence"][label] for label in NIH_LABELS], abs=1e-4)


@pytest.fixture(scope="module")
def big_plan() -> list[synth.PlannedImage]:
    return synth.plan_dataset(3000, seed=7, label_noise=0.3)


def test_label_noise_mostly_drops_drawn_findings(big_plan):
    drawn = sum(len(plan.drawn) for plan in big_plan)
    missed = sum(len(set(plan.drawn) - set(plan.written)) for plan in big_plan)
    invented = sum(len(set(plan.written) - set(plan.drawn)) for plan in big_plan)
    assert abs(missed / drawn - 0.3) < 0.04
    assert 0 < invented < missed / 3
    clean = synth.plan_dataset(500, seed=7, label_noise=0.0)
    assert all(plan.written == plan.drawn for plan in clean)


def test_patients_are_consistent_across_follow_ups(big_plan):
    by_patient: dict[int, list[synth.PlannedImage]] = {}
    for plan in big_plan:
        by_patient.setdefault(plan.patient_id, []).append(plan)
    assert list(by_patient) == list(range(1, len(by_patient) + 1))
    for plans in by_patient.values():
        assert [plan.follow_up for plan in plans] == list(range(len(plans)))
        assert len({(plan.sex, plan.anatomy, plan.test) for plan in plans}) == 1
        ages = [plan.age_years for plan in plans]
        assert ages == sorted(ages)
    mean_images = len(big_plan) / len(by_patient)
    assert 2.3 < mean_images < 3.6
    single = sum(len(plans) == 1 for plans in by_patient.values()) / len(by_patient)
    assert single > 0.4  # as in NIH, most patients have one image


def test_findings_sometimes_persist_across_follow_ups(big_plan):
    rates = synth.load_label_rates()
    follow_ups = [
        (before, after)
        for before, after in zip(big_plan[:-1], big_plan[1:], strict=True)
        if after.follow_up > 0
    ]
    same = sum(before.drawn == after.drawn for before, after in follow_ups) / len(follow_ups)
    assert abs(same - rates["followup_same_labels"]) < 0.06
    persisted = [
        after
        for before, after in follow_ups
        if before.drawn and before.lesion_seed == after.lesion_seed
    ]
    assert persisted and all(
        before.drawn == after.drawn
        for before, after in follow_ups
        if before.lesion_seed == after.lesion_seed
    )


def test_one_image_per_patient_when_asked():
    plans = synth.plan_dataset(200, seed=1, images_per_patient=1.0)
    assert [plan.follow_up for plan in plans] == [0] * 200


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


def test_csv_module_reads_data_entry_with_eleven_values(dataset):
    out, _ = dataset
    with open(out / "Data_Entry_2017.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows[0]) == 11 and all(len(row) == 11 for row in rows[1:])
