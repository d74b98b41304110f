"""Tests of the synthetic dataset on disk: the NIH layout and headers, split lists, byte-identical
output for a seed whatever the workers, cleanup on failure, argument checks and the PNG writer."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxpert.datasets import synth
from chestxpert.datasets.schema import NIH_LABELS, SYNTHETIC_MARKER, DatasetError
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
        "SYNTHETIC.json",
        "images_001",
        "test_list.txt",
        "train_val_list.txt",
    ]
    marker = json.loads((out / SYNTHETIC_MARKER).read_text())
    assert marker["synthetic"] is True and marker["seed"] == 3 and marker["images"] == 80
    header, rows = read_rows(out / "Data_Entry_2017.csv")
    assert header == (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
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
    assert len(one) == 48 + 5 and one == two  # images, four tables, the synthetic marker


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


def test_csv_module_reads_data_entry_with_eleven_values(dataset):
    out, _ = dataset
    with open(out / "Data_Entry_2017.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows[0]) == 11 and all(len(row) == 11 for row in rows[1:])
