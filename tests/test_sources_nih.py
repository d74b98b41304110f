"""The NIH adapter (datasets.nih) on small real-format fixtures of the full release and the Kaggle
sample, and every bad input a user can hand it: each error must name the file, the row and what
was expected.
"""

from __future__ import annotations

import gzip
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxpert.datasets.nih import read_nih
from chestxpert.datasets.schema import IMAGE_COLUMNS, NIH_LABELS, DatasetError
from chestxpert.datasets.validate import check_image, parse_age_years
from tests.source_helpers import NIH_FULL, NIH_SAMPLE, copy_fixture, edit_lines, labels_of

DATA_ENTRY = "Data_Entry_2017_v2020.csv"


def positives(labels: dict[str, float]) -> set[str]:
    return {name for name, value in labels.items() if value == 1.0}


# --- NIH, full release layout -------------------------------------------------------------


def test_nih_full_layout_reads_every_listed_image() -> None:
    table = read_nih(NIH_FULL)

    assert table.source == "nih"
    assert table.labels == NIH_LABELS
    assert list(table.images.columns) == [*IMAGE_COLUMNS, *NIH_LABELS]
    assert table.missing == []
    assert len(table.images) == 5
    assert all(Path(path).is_absolute() and Path(path).is_file() for path in table.images["path"])
    # Two archives are scanned: images_001/images and images_002/images.
    assert {Path(path).parent.parent.name for path in table.images["path"]} == {
        "images_001",
        "images_002",
    }


def test_nih_label_vectors_follow_the_label_file() -> None:
    table = read_nih(NIH_FULL)

    assert positives(labels_of(table, "00013125_000.png")) == {"Cardiomegaly", "Effusion"}
    assert positives(labels_of(table, "00020259_002.png")) == {
        "Consolidation",
        "Infiltration",
        "Pneumonia",
    }
    no_finding = labels_of(table, "00000129_000.png")
    assert set(no_finding.values()) == {0.0}, "'No Finding' is all zeros"
    assert table.images[list(NIH_LABELS)].dtypes.eq(np.float32).all()


def test_nih_demographics_view_and_official_split() -> None:
    images = read_nih(NIH_FULL).images.set_index("image_id")

    row = images.loc["00013125_000.png"]
    assert (row["patient_id"], row["age_years"], row["sex"], row["view"]) == (
        "13125",
        37.0,
        "F",
        "AP",
    )
    assert images.loc["00000129_000.png", "official_split"] == "train_val"
    assert images.loc["00022084_000.png", "official_split"] == "test"


def test_nih_rgba_image_is_listed_and_passes_the_image_check() -> None:
    images = read_nih(NIH_FULL).images.set_index("image_id")

    rgba_path = Path(images.loc["00001369_000.png", "path"])
    with Image.open(rgba_path) as image:
        assert image.mode == "RGBA"
    assert check_image(rgba_path) is None


def test_nih_boxes_use_the_label_file_names() -> None:
    table = read_nih(NIH_FULL)
    boxes = table.boxes

    assert list(boxes.columns) == ["image_id", "label", "x", "y", "w", "h"]
    assert len(boxes) == 5
    # BBox_List_2017.csv writes "Infiltrate"; the label file and NIH_LABELS say "Infiltration".
    assert set(boxes.loc[boxes["image_id"] == "00020259_002.png", "label"]) == {
        "Infiltration",
        "Pneumonia",
    }
    box = boxes[boxes["image_id"] == "00001369_000.png"].iloc[0]
    assert box["label"] == "Cardiomegaly"
    assert (box["x"], box["y"], box["w"], box["h"]) == pytest.approx(
        (336.9989418, 276.3174603, 553.7185185, 386.8444444)
    )


@pytest.mark.parametrize(
    "label_file", ["Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv", "Data_Entry_2017.csv.gz"]
)
def test_nih_label_file_variants_read_the_same(tmp_path: Path, label_file: str) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    text = (root / DATA_ENTRY).read_bytes()
    (root / DATA_ENTRY).unlink()
    target = root / label_file
    target.write_bytes(gzip.compress(text) if label_file.endswith(".gz") else text)

    table = read_nih(root)

    expected = read_nih(NIH_FULL).images.drop(columns="path")
    assert table.images.drop(columns="path").equals(expected)
    assert label_file in table.notes[0]


def test_nih_label_files_with_trailing_commas_read_the_same(tmp_path: Path) -> None:
    # Kaggle's copies of Data_Entry_2017.csv and BBox_List_2017.csv end every line with a comma.
    root = copy_fixture(NIH_FULL, tmp_path)
    for name in (DATA_ENTRY, "BBox_List_2017.csv"):
        edit_lines(root / name, lambda lines: [line + ",,," for line in lines])

    table = read_nih(root)

    expected = read_nih(NIH_FULL)
    assert table.images.drop(columns="path").equals(expected.images.drop(columns="path"))
    assert table.boxes.equals(expected.boxes)


def test_nih_without_official_lists_has_no_official_split(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    (root / "train_val_list.txt").unlink()
    (root / "test_list.txt").unlink()

    assert read_nih(root).images["official_split"].tolist() == [None] * 5


# --- NIH, Kaggle sample layout ------------------------------------------------------------


def test_nih_kaggle_sample_layout() -> None:
    table = read_nih(NIH_SAMPLE)
    images = table.images.set_index("image_id")

    assert len(images) == 5
    assert "Kaggle NIH sample" in table.notes[0]
    assert images["official_split"].isna().all()
    assert positives(labels_of(table, "00000013_005.png")) == {
        "Emphysema",
        "Infiltration",
        "Pleural_Thickening",
        "Pneumothorax",
    }
    assert images.loc["00000013_005.png", "age_years"] == 60.0  # written "060Y"
    assert images.loc["00019045_003.png", "age_years"] == pytest.approx(13 / 12)  # "013M"
    assert images.loc["00024680_000.png", "age_years"] == pytest.approx(1 / 365.25)  # "001D"
    assert math.isnan(images.loc["00020900_002.png", "age_years"])  # "411Y" is a data-entry error
    assert any("411" in note and "sample_labels.csv" in note for note in table.notes)


@pytest.mark.parametrize(
    ("written", "years"),
    [
        ("57", 57.0),
        ("060Y", 60.0),
        ("013M", 13 / 12),
        ("001D", 1 / 365.25),
        ("002W", 14 / 365.25),
        ("", math.nan),
    ],
)
def test_parse_age_years(written: str, years: float) -> None:
    assert parse_age_years(written) == pytest.approx(years, nan_ok=True)


def test_nih_unreadable_age_names_file_and_line(tmp_path: Path) -> None:
    root = copy_fixture(NIH_SAMPLE, tmp_path)
    edit_lines(
        root / "sample_labels.csv",
        lambda lines: [lines[0], lines[1].replace("060Y", "sixty"), *lines[2:]],
    )

    with pytest.raises(DatasetError) as raised:
        read_nih(root)
    message = str(raised.value)
    assert "sample_labels.csv line 2" in message and "'sixty'" in message and "060Y" in message


# --- NIH, bad inputs ----------------------------------------------------------------------


def test_nih_missing_image_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    (root / "images_002" / "images" / "00022084_000.png").unlink()

    with pytest.raises(DatasetError) as raised:
        read_nih(root)
    message = str(raised.value)
    assert "00022084_000.png (line 6)" in message and DATA_ENTRY in message
    assert "skip_missing=True" in message


def test_nih_missing_image_file_is_reported_when_skipping(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    (root / "images_002" / "images" / "00022084_000.png").unlink()

    table = read_nih(root, skip_missing=True)

    assert table.missing == ["00022084_000.png"]
    assert "00022084_000.png" not in set(table.images["image_id"])
    assert "00022084_000.png" not in set(table.boxes["image_id"]), (
        "boxes of skipped images are left out"
    )
    assert any("skipped 1 of 5" in note and "00022084_000.png" in note for note in table.notes)


def test_nih_no_images_found_names_the_folders_searched(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    for archive in ("images_001", "images_002"):
        shutil.rmtree(root / archive)

    with pytest.raises(DatasetError) as raised:
        read_nih(root)
    message = str(raised.value)
    assert (
        "no images" in message
        and f"{root}/images/" in message
        and f"{root}/images_*/images/" in message
    )


def test_nih_images_that_match_no_listed_name(tmp_path: Path) -> None:
    root = copy_fixture(NIH_SAMPLE, tmp_path)
    for image in (root / "images").iterdir():
        image.rename(image.with_name("x" + image.name))

    with pytest.raises(
        DatasetError, match=r"none of the 5 images listed in .*sample_labels\.csv was found"
    ):
        read_nih(root, skip_missing=True)


def test_nih_label_csv_missing_a_required_column(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    # Drop "Finding Labels" (second value) from the header and from every row.
    edit_lines(
        root / DATA_ENTRY,
        lambda lines: [",".join(line.split(",")[:1] + line.split(",")[2:]) for line in lines],
    )

    with pytest.raises(DatasetError) as raised:
        read_nih(root)
    message = str(raised.value)
    assert f"{DATA_ENTRY} line 1" in message
    assert "missing column(s) 'Finding Labels'" in message
    assert "found 'Image Index', 'Follow-up #'" in message


def test_nih_unknown_label_suggests_the_closest(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    edit_lines(
        root / DATA_ENTRY,
        lambda lines: [
            line.replace("Cardiomegaly|Effusion", "Cardiomegaly|Efusion") for line in lines
        ],
    )

    with pytest.raises(DatasetError) as raised:
        read_nih(root)
    message = str(raised.value)
    assert f"{DATA_ENTRY} line 4" in message
    assert "unknown finding 'Efusion' for 00013125_000.png" in message
    assert "did you mean 'Effusion'?" in message
    assert "joined by '|'" in message


def test_nih_same_image_twice_with_different_labels(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    edit_lines(root / DATA_ENTRY, lambda lines: [*lines, lines[2].replace("Cardiomegaly", "Mass")])

    with pytest.raises(DatasetError) as raised:
        read_nih(root)
    message = str(raised.value)
    assert f"{DATA_ENTRY} line 7" in message and "00001369_000.png" in message
    assert "different Finding Labels than on line 3" in message


def test_nih_identical_duplicate_rows_are_collapsed(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    edit_lines(root / DATA_ENTRY, lambda lines: [*lines, lines[2]])

    table = read_nih(root)

    assert len(table.images) == 5
    assert any("1 rows" in note and "collapsed" in note for note in table.notes)


@pytest.mark.parametrize(
    ("content", "expected"), [("", "is empty"), ("HEADER", "has a header but no rows")]
)
def test_nih_empty_label_csv(tmp_path: Path, content: str, expected: str) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    header = (root / DATA_ENTRY).read_text().splitlines()[0]
    (root / DATA_ENTRY).write_text(header + "\n" if content == "HEADER" else "")

    with pytest.raises(DatasetError) as raised:
        read_nih(root)
    message = str(raised.value)
    assert DATA_ENTRY in message and expected in message and "one row per image" in message


def test_nih_row_with_wrong_number_of_values(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    edit_lines(
        root / DATA_ENTRY, lambda lines: [*lines[:3], lines[3].rsplit(",", 2)[0], *lines[4:]]
    )

    with pytest.raises(DatasetError, match=rf"{DATA_ENTRY} line 4: 9 values, expected 11"):
        read_nih(root)


def test_nih_patient_in_both_official_lists(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    # A second image of patient 129, whose first image is on train_val_list.txt, goes on
    # test_list.txt.
    edit_lines(
        root / DATA_ENTRY,
        lambda lines: [*lines, lines[1].replace("00000129_000.png", "00000129_001.png")],
    )
    shutil.copy(
        root / "images_001/images/00000129_000.png", root / "images_001/images/00000129_001.png"
    )
    edit_lines(root / "test_list.txt", lambda lines: [*lines, "00000129_001.png"])

    with pytest.raises(DatasetError) as raised:
        read_nih(root)
    message = str(raised.value)
    assert "patient 129 is on both official lists" in message
    assert "00000129_000.png on train_val_list.txt line 1" in message
    assert "00000129_001.png on test_list.txt line 3" in message


def test_nih_image_in_both_official_lists(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    edit_lines(root / "test_list.txt", lambda lines: [*lines, "00000129_000.png"])

    with pytest.raises(
        DatasetError,
        match=r"test_list\.txt line 3: 00000129_000\.png is also in train_val_list\.txt line 1",
    ):
        read_nih(root)


def test_nih_unknown_box_label_suggests_the_closest(tmp_path: Path) -> None:
    root = copy_fixture(NIH_FULL, tmp_path)
    edit_lines(
        root / "BBox_List_2017.csv",
        lambda lines: [line.replace("Pneumonia", "Pneumonai") for line in lines],
    )

    with pytest.raises(DatasetError) as raised:
        read_nih(root)
    message = str(raised.value)
    assert "BBox_List_2017.csv line 5" in message and "did you mean 'Pneumonia'?" in message
