"""The CheXpert adapter (datasets.chexpert) on a small real-format fixture: paths, ids, the
uncertainty policy and view filter, and every bad input, named by file, line and expectation.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from chestxpert.datasets.chexpert import read_chexpert
from chestxpert.datasets.schema import CHEXPERT_LABELS, IMAGE_COLUMNS, DatasetError
from tests.source_helpers import CHEXPERT, copy_fixture, edit_lines, labels_of


@pytest.mark.parametrize(
    "root", [CHEXPERT, CHEXPERT / "CheXpert-v1.0-small"], ids=["parent", "dataset-folder"]
)
def test_chexpert_resolves_paths_from_either_root(root: Path) -> None:
    table = read_chexpert(root)

    assert table.source == "chexpert"
    assert table.labels == CHEXPERT_LABELS
    assert list(table.images.columns) == [*IMAGE_COLUMNS, *CHEXPERT_LABELS]
    assert all(Path(path).is_absolute() and Path(path).is_file() for path in table.images["path"])
    assert table.missing == []


def test_chexpert_ids_demographics_and_official_split() -> None:
    table = read_chexpert(CHEXPERT)
    images = table.images.set_index("image_id")

    row = images.loc["train/patient00003/study1/view1_frontal.jpg"]
    assert (row["patient_id"], row["age_years"], row["sex"], row["view"]) == (
        "patient00003",
        41.0,
        "M",
        "PA",
    )
    assert set(images.loc[images.index.str.startswith("train/"), "official_split"]) == {"train_val"}
    assert set(images.loc[images.index.str.startswith("valid/"), "official_split"]) == {"test"}
    assert any("valid.csv" in note and "'test'" in note for note in table.notes)


@pytest.mark.parametrize(
    ("policy", "uncertain_value"), [("ones", 1.0), ("zeros", 0.0), ("ignore", math.nan)]
)
def test_chexpert_uncertainty_policy(policy: str, uncertain_value: float) -> None:
    table = read_chexpert(CHEXPERT, uncertain=policy)
    labels = labels_of(table, "train/patient00002/study2/view1_frontal.jpg")

    # The CSV row: Cardiomegaly -1, Lung Opacity 1, Edema -1, Fracture 1, Pneumothorax blank.
    assert labels["Cardiomegaly"] == pytest.approx(uncertain_value, nan_ok=True)
    assert labels["Edema"] == pytest.approx(uncertain_value, nan_ok=True)
    assert labels["Lung Opacity"] == 1.0 and labels["Fracture"] == 1.0
    assert labels["Pneumothorax"] == 0.0, "blank (not mentioned) is negative whatever the policy"
    assert labels_of(table, "train/patient00001/study1/view1_frontal.jpg")["No Finding"] == 1.0


def test_chexpert_unknown_uncertainty_policy() -> None:
    with pytest.raises(
        DatasetError, match=r"uncertain='maybe': expected one of ones, zeros, ignore"
    ):
        read_chexpert(CHEXPERT, uncertain="maybe")


@pytest.mark.parametrize(
    ("views", "expected_views", "rows"),
    [
        (("PA", "AP"), {"PA", "AP"}, 6),
        (("PA",), {"PA"}, 2),
        (("Lateral",), {"LL"}, 2),
        (("PA", "AP", "LL"), {"PA", "AP", "LL"}, 8),
    ],
)
def test_chexpert_view_filter(views: tuple[str, ...], expected_views: set[str], rows: int) -> None:
    images = read_chexpert(CHEXPERT, views=views).images

    assert len(images) == rows
    assert set(images["view"]) == expected_views


def test_chexpert_unknown_view() -> None:
    with pytest.raises(
        DatasetError,
        match=r"views: 'Oblique' is not a view; expected some of PA, AP, LL, RL or Lateral",
    ):
        read_chexpert(CHEXPERT, views=("PA", "Oblique"))


@pytest.mark.parametrize("bad_value", ["2", "yes", "0.5"])
def test_chexpert_value_outside_the_allowed_set(tmp_path: Path, bad_value: str) -> None:
    root = copy_fixture(CHEXPERT, tmp_path)
    train_csv = root / "CheXpert-v1.0-small" / "train.csv"

    def set_edema(lines: list[str]) -> list[str]:
        values = lines[5].split(",")
        values[5 + CHEXPERT_LABELS.index("Edema")] = bad_value
        return [*lines[:5], ",".join(values), *lines[6:]]

    edit_lines(train_csv, set_edema)

    with pytest.raises(DatasetError) as raised:
        read_chexpert(root)
    message = str(raised.value)
    assert f"{train_csv} line 6" in message
    assert f"column 'Edema' is '{bad_value}'" in message
    assert "expected 1, 0, -1 (uncertain) or blank" in message


def test_chexpert_missing_image_is_an_error_or_reported(tmp_path: Path) -> None:
    root = copy_fixture(CHEXPERT, tmp_path)
    (root / "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg").unlink()

    with pytest.raises(DatasetError) as raised:
        read_chexpert(root)
    assert "train/patient00003/study1/view1_frontal.jpg" in str(raised.value)
    assert "train.csv line 6" in str(raised.value)

    table = read_chexpert(root, skip_missing=True)
    assert table.missing == ["train/patient00003/study1/view1_frontal.jpg"]
    assert len(table.images) == 5


def test_chexpert_patient_in_train_and_valid(tmp_path: Path) -> None:
    root = copy_fixture(CHEXPERT, tmp_path)
    data_dir = root / "CheXpert-v1.0-small"
    edit_lines(
        data_dir / "valid.csv",
        lambda lines: [*lines, lines[1].replace("valid/patient64541", "valid/patient00001")],
    )
    (data_dir / "valid/patient00001/study1").mkdir(parents=True)
    shutil.copy(
        data_dir / "valid/patient64541/study1/view1_frontal.jpg",
        data_dir / "valid/patient00001/study1/",
    )

    with pytest.raises(DatasetError) as raised:
        read_chexpert(root)
    message = str(raised.value)
    assert "patient patient00001 is in both train.csv" in message
    assert "train.csv line 2" in message and "valid.csv line 5" in message


def test_chexpert_missing_required_column(tmp_path: Path) -> None:
    root = copy_fixture(CHEXPERT, tmp_path)
    train_csv = root / "CheXpert-v1.0-small" / "train.csv"
    edit_lines(train_csv, lambda lines: [lines[0].replace("AP/PA", "View"), *lines[1:]])

    with pytest.raises(DatasetError) as raised:
        read_chexpert(root)
    message = str(raised.value)
    assert f"{train_csv} line 1: missing column(s) 'AP/PA'" in message and "'View'" in message


def test_chexpert_no_csv_found(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError,
        match=r"no train\.csv or valid\.csv in .* point at the CheXpert-v1\.0-small folder",
    ):
        read_chexpert(tmp_path)


def test_chexpert_same_image_twice(tmp_path: Path) -> None:
    root = copy_fixture(CHEXPERT, tmp_path)
    data_dir = root / "CheXpert-v1.0-small"
    edit_lines(data_dir / "train.csv", lambda lines: [*lines, lines[1]])

    with pytest.raises(DatasetError) as raised:
        read_chexpert(root)
    message = str(raised.value)
    assert f"{data_dir / 'train.csv'} line 7" in message
    assert (
        "train/patient00001/study1/view1_frontal.jpg is listed again (first on train.csv line 2)"
        in message
    )


@pytest.mark.parametrize(
    "escape",
    [
        "CheXpert-v1.0-small/train/../../../../etc/patient00001/study1/view1_frontal.jpg",
        "/etc/patient00001/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small/valid/patient00001/../../../../secret/patient9/view1_frontal.jpg",
    ],
    ids=["dot-dot", "absolute", "dot-dot-after-the-split-folder"],
)
def test_chexpert_path_outside_the_dataset_folder_is_refused(tmp_path: Path, escape: str) -> None:
    """A label file naming files elsewhere would copy them into a dataset (and its bucket)."""
    root = copy_fixture(CHEXPERT, tmp_path)
    train_csv = root / "CheXpert-v1.0-small" / "train.csv"

    def point_outside(lines: list[str]) -> list[str]:
        values = lines[1].split(",")
        values[0] = escape
        return [lines[0], ",".join(values), *lines[2:]]

    edit_lines(train_csv, point_outside)
    with pytest.raises(DatasetError) as raised:
        read_chexpert(root)
    message = str(raised.value)
    assert f"{train_csv} line 2: Path '{escape}' points outside the dataset folder" in message
