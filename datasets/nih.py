"""NIH ChestX-ray14 adapter: the full release (images_NNN/images/, Data_Entry_2017*.csv) or the
Kaggle "NIH sample" (images/, sample_labels.csv), read and checked into the common SourceTable.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chestxpert.datasets.schema import (
    BOX_COLUMNS,
    IMAGE_COLUMNS,
    NIH_LABELS,
    DatasetError,
    SourceTable,
)
from chestxpert.datasets.validate import (
    LabelCsv,
    conform_images,
    did_you_mean,
    missing_images_notes,
    parse_age_years,
    plausible_age,
    read_label_csv,
)

# Looked for in this order: the 2020 revision first (NIH corrected labels and ages in it).
LABEL_FILES: tuple[str, ...] = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
    "sample_labels.csv",
)
BBOX_FILE = "BBox_List_2017.csv"
OFFICIAL_LISTS: dict[str, str] = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
NO_FINDING = "No Finding"
# The box file and the label file name one finding differently.
BOX_LABEL_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})

REQUIRED_LABEL_COLUMNS: dict[str, str] = {
    "imageindex": "Image Index",
    "findinglabels": "Finding Labels",
    "patientid": "Patient ID",
}
REQUIRED_BOX_COLUMNS: dict[str, str] = {
    "imageindex": "Image Index",
    "findinglabel": "Finding Label",
    "bboxx": "Bbox [x]",
    "bboxy": "Bbox [y]",
    "bboxw": "Bbox [w]",
    "bboxh": "Bbox [h]",
}


@dataclass(frozen=True)
class _LabelRow:
    """One parsed row of the label file; `line` is kept apart so duplicates can be compared."""

    image_id: str
    patient_id: str
    findings: frozenset[str]
    age_years: float
    sex: str | None
    view: str | None

    def differences(self, other: _LabelRow) -> list[str]:
        both_nan = math.isnan(self.age_years) and math.isnan(other.age_years)
        pairs = {
            "Finding Labels": (self.findings, other.findings),
            "Patient ID": (self.patient_id, other.patient_id),
            "Patient Age": (None, None) if both_nan else (self.age_years, other.age_years),
            "Patient Gender": (self.sex, other.sex),
            "View Position": (self.view, other.view),
        }
        return [name for name, (mine, theirs) in pairs.items() if mine != theirs]


def read_nih(root: Path, skip_missing: bool = False) -> SourceTable:
    """Read an NIH ChestX-ray14 folder (full release or Kaggle sample) into the common table.

    `root` holds the label file (Data_Entry_2017_v2020.csv, Data_Entry_2017.csv, either
    gzipped, or sample_labels.csv) and the images in `images_NNN/images/` or `images/`; the
    optional BBox_List_2017.csv gives `boxes` and train_val_list.txt / test_list.txt give
    `official_split`. `images` has IMAGE_COLUMNS (image_id is the file name, path absolute,
    age in years, view PA/AP) and the 14 NIH_LABELS as 1.0/0.0 ("No Finding" is all zeros;
    NIH has no uncertain labels, so no NaN). A listed image with no file is a DatasetError
    unless `skip_missing` is True, in which case its row is left out, named in `missing`
    and counted in `notes`. Raises DatasetError, naming file and line, for anything in the
    label files a user must fix.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetError(
            f"{root} is not a folder; "
            f"point at the folder that holds {LABEL_FILES[0]} and the images."
        )
    label_file, notes = _find_label_file(root)
    files_by_name, searched, scan_notes = _scan_image_folders(root)
    rows, row_notes = _read_label_rows(label_file)
    notes += scan_notes + row_notes

    missing = [
        (f"line {line}", row.image_id) for line, row in rows if row.image_id not in files_by_name
    ]
    notes += missing_images_notes(missing, len(rows), str(label_file), searched, skip_missing)
    missing_ids = {image_id for _, image_id in missing}
    kept = [(line, row) for line, row in rows if row.image_id not in missing_ids]

    official, list_notes = _read_official_lists(root)
    notes += list_notes
    images = _images_frame(kept, files_by_name, official)
    if official:
        _check_patients_within_one_list(kept, official)
        unlisted = int(images["official_split"].isna().sum())
        if unlisted:
            notes.append(
                f"{unlisted} images are on neither official list; their official_split is None."
            )

    boxes = _boxes_frame([])
    if (root / BBOX_FILE).is_file():
        boxes, box_notes = _read_boxes(root / BBOX_FILE, {row.image_id: row for _, row in kept})
        notes += box_notes

    layout = "Kaggle NIH sample" if label_file.name == "sample_labels.csv" else "NIH ChestX-ray14"
    notes.insert(
        0,
        f"{layout} from {label_file}: {len(images)} images of "
        f"{images['patient_id'].nunique()} patients, {len(boxes)} boxes.",
    )
    return SourceTable(
        source="nih",
        labels=NIH_LABELS,
        images=images,
        boxes=boxes,
        notes=notes,
        missing=[image_id for _, image_id in missing],
    )


def _find_label_file(root: Path) -> tuple[Path, list[str]]:
    present = [root / name for name in LABEL_FILES if (root / name).is_file()]
    if not present:
        found = sorted(entry.name for entry in root.iterdir())[:20]
        raise DatasetError(
            f"no NIH label file in {root}: expected one of {', '.join(LABEL_FILES)}; "
            f"found {', '.join(found) or 'nothing'}. "
            "Point at the folder you extracted the dataset into."
        )
    notes = (
        [f"used {present[0].name}; ignored {', '.join(p.name for p in present[1:])}."]
        if len(present) > 1
        else []
    )
    return present[0], notes


def _scan_image_folders(root: Path) -> tuple[dict[str, str], str, list[str]]:
    """Map file name → path over images/ and images_NNN/images/ (or images_NNN/ itself), once."""
    folders = [root / "images"]
    for archive in sorted(root.glob("images_*")):
        if archive.is_dir():
            folders.append(archive / "images" if (archive / "images").is_dir() else archive)
    existing = [folder for folder in folders if folder.is_dir()]
    searched = f"{root}/images/ and {root}/images_*/images/"
    files_by_name: dict[str, str] = {}
    duplicates = 0
    for folder in existing:
        with os.scandir(folder) as entries:
            for entry in entries:
                # os.path rather than pathlib: this loop runs once per image (112,120 for NIH).
                if (
                    os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES
                    or not entry.is_file()
                ):
                    continue
                if entry.name in files_by_name:
                    duplicates += 1
                    continue
                files_by_name[entry.name] = entry.path
    if not files_by_name:
        looked_in = ", ".join(str(folder) for folder in existing) or "none of them exists"
        raise DatasetError(
            f"no images (.png/.jpg) found: searched {searched} ({looked_in}). Extract the image "
            "archives so the PNGs sit in images_001/images/ … "
            "or, for the Kaggle sample, in images/."
        )
    notes = (
        [f"{duplicates} image file names occur in more than one folder; the first was used."]
        if duplicates
        else []
    )
    return files_by_name, searched, notes


def _read_label_rows(label_file: Path) -> tuple[list[tuple[int, _LabelRow]], list[str]]:
    """Parse and check every row; collapse identical duplicates, reject conflicting ones."""
    table = read_label_csv(label_file, REQUIRED_LABEL_COLUMNS)
    rows: list[tuple[int, _LabelRow]] = []
    first_seen: dict[str, tuple[int, _LabelRow]] = {}
    collapsed, implausible_ages = 0, []
    for line, values in table.rows:
        row = _parse_label_row(table, line, values)
        if not plausible_age(row.age_years):
            implausible_ages.append(f"line {line}: {row.age_years:g}")
            row = _LabelRow(row.image_id, row.patient_id, row.findings, math.nan, row.sex, row.view)
        if row.image_id in first_seen:
            first_line, first = first_seen[row.image_id]
            differing = first.differences(row)
            if differing:
                raise DatasetError(
                    f"{label_file} line {line}: image {row.image_id} is listed again "
                    f"with a different {', '.join(differing)} than on line {first_line}. "
                    "Each image must appear once; delete the wrong row."
                )
            collapsed += 1
            continue
        first_seen[row.image_id] = (line, row)
        rows.append((line, row))
    notes = []
    if collapsed:
        notes.append(
            f"{collapsed} rows of {label_file.name} repeated an earlier row exactly "
            "and were collapsed."
        )
    if implausible_ages:
        notes.append(
            f"{len(implausible_ages)} ages in {label_file.name} are outside 0–120 years "
            f"and were set to unknown ({', '.join(implausible_ages[:5])})."
        )
    return rows, notes


def _parse_label_row(table: LabelCsv, line: int, values: list[str]) -> _LabelRow:
    where = f"{table.path} line {line}"
    image_id = table.get(values, "imageindex")
    if not image_id:
        raise DatasetError(
            f"{where}: 'Image Index' is blank; expected an image file name like 00000001_000.png."
        )
    patient_id = table.get(values, "patientid")
    if not patient_id:
        raise DatasetError(
            f"{where}: 'Patient ID' of {image_id} is blank; every image needs its patient."
        )
    try:
        age_years = parse_age_years(table.get(values, "patientage"))
    except ValueError as error:
        raise DatasetError(f"{where}: 'Patient Age' of {image_id}: {error}.") from None
    sex = table.get(values, "patientgender").upper() or None
    if sex not in (None, "M", "F"):
        raise DatasetError(
            f"{where}: 'Patient Gender' of {image_id} is {sex!r}; expected M, F or blank."
        )
    return _LabelRow(
        image_id=image_id,
        # NIH writes 1; a hand-made file may write 00001. Both are the same patient.
        patient_id=str(int(patient_id)) if patient_id.isdigit() else patient_id,
        findings=_parse_findings(table.get(values, "findinglabels"), where, image_id),
        age_years=age_years,
        sex=sex,
        view=table.get(values, "viewposition").upper() or None,
    )


def _parse_findings(text: str, where: str, image_id: str) -> frozenset[str]:
    """'Cardiomegaly|Effusion' → {Cardiomegaly, Effusion}; 'No Finding' → the empty set."""
    if not text.strip():
        raise DatasetError(
            f"{where}: 'Finding Labels' of {image_id} is blank; "
            "expected 'No Finding' or findings joined by '|'."
        )
    if text.strip() == NO_FINDING:
        return frozenset()
    names = [name.strip() for name in text.split("|")]
    for name in names:
        if name == NO_FINDING:
            raise DatasetError(
                f"{where}: {image_id} has 'No Finding' together with other labels ({text!r}); "
                "expected either 'No Finding' alone or findings joined by '|'."
            )
        if name not in NIH_LABELS:
            shown = repr(name) if name else "'' (a stray '|')"
            raise DatasetError(
                f"{where}: unknown finding {shown} for {image_id}"
                f"{did_you_mean(name, (*NIH_LABELS, NO_FINDING))}. "
                f"Expected 'No Finding' or labels from {', '.join(NIH_LABELS)} joined by '|'."
            )
    return frozenset(names)


def _read_official_lists(root: Path) -> tuple[dict[str, tuple[str, int, str]], list[str]]:
    """image_id → (split, line, list file name) from train_val_list.txt and test_list.txt."""
    official: dict[str, tuple[str, int, str]] = {}
    present = {
        split: root / name for split, name in OFFICIAL_LISTS.items() if (root / name).is_file()
    }
    for split, path in present.items():
        for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            image_id = text.strip()
            if not image_id:
                continue
            if image_id in official and official[image_id][0] != split:
                _, other_line, other_file = official[image_id]
                raise DatasetError(
                    f"{path} line {line}: {image_id} is also in {other_file} line {other_line}; "
                    "an image belongs to one official list only — remove it from one of them."
                )
            official[image_id] = (split, line, path.name)
    notes: list[str] = []
    if len(present) == 1:
        (found,) = present.values()
        notes.append(f"only {found.name} was found; images not on it have official_split None.")
    elif present:
        notes.append("official_split follows NIH's train_val_list.txt and test_list.txt.")
    return official, notes


def _check_patients_within_one_list(
    rows: list[tuple[int, _LabelRow]], official: dict[str, tuple[str, int, str]]
) -> None:
    """NIH split its lists by patient; a patient on both would leak between train and test."""
    first_by_patient: dict[str, tuple[str, str]] = {}
    for _, row in rows:
        if row.image_id not in official:
            continue
        split, line, list_name = official[row.image_id]
        seen = first_by_patient.setdefault(
            row.patient_id, (split, f"{row.image_id} on {list_name} line {line}")
        )
        if seen[0] != split:
            raise DatasetError(
                f"patient {row.patient_id} is on both official lists: {seen[1]} and "
                f"{row.image_id} on {list_name} line {line}. "
                "All images of a patient must be on one list; "
                "fix the lists or remove them to split by patient instead."
            )


def _images_frame(
    rows: list[tuple[int, _LabelRow]],
    files_by_name: dict[str, str],
    official: dict[str, tuple[str, int, str]],
) -> pd.DataFrame:
    label_matrix = np.zeros((len(rows), len(NIH_LABELS)), dtype=np.float32)
    position = {label: index for index, label in enumerate(NIH_LABELS)}
    for index, (_, row) in enumerate(rows):
        for finding in row.findings:
            label_matrix[index, position[finding]] = 1.0
    images = pd.DataFrame(
        {
            "image_id": [row.image_id for _, row in rows],
            "path": [files_by_name[row.image_id] for _, row in rows],
            "patient_id": [row.patient_id for _, row in rows],
            "age_years": np.array([row.age_years for _, row in rows], dtype=np.float64),
            "sex": [row.sex for _, row in rows],
            "view": [row.view for _, row in rows],
            "official_split": [
                official[row.image_id][0] if row.image_id in official else None for _, row in rows
            ],
        },
        columns=list(IMAGE_COLUMNS),
    )
    labels = pd.DataFrame(label_matrix, columns=list(NIH_LABELS))
    return conform_images(pd.concat([images, labels], axis=1), NIH_LABELS)


def _read_boxes(
    bbox_file: Path, rows_by_image: dict[str, _LabelRow]
) -> tuple[pd.DataFrame, list[str]]:
    """Boxes of the images in the table, labels mapped to the label file's names
    (Infiltrate → Infiltration)."""
    table = read_label_csv(bbox_file, REQUIRED_BOX_COLUMNS)
    records: list[tuple[str, str, float, float, float, float]] = []
    not_in_table, not_among_findings = 0, 0
    for line, values in table.rows:
        where = f"{bbox_file} line {line}"
        image_id = table.get(values, "imageindex")
        written = table.get(values, "findinglabel")
        label = BOX_LABEL_ALIASES.get(written, written)
        if label not in NIH_LABELS:
            raise DatasetError(
                f"{where}: unknown box label {written!r}{did_you_mean(written, NIH_LABELS)}. "
                f"Expected one of {', '.join(NIH_LABELS)} (or Infiltrate)."
            )
        coordinates = []
        for key, shown in (("bboxx", "x"), ("bboxy", "y"), ("bboxw", "w"), ("bboxh", "h")):
            text = table.get(values, key)
            try:
                coordinates.append(float(text))
            except ValueError:
                raise DatasetError(
                    f"{where}: box {shown} is {text!r}; expected a number of pixels."
                ) from None
        if coordinates[2] <= 0 or coordinates[3] <= 0:
            raise DatasetError(
                f"{where}: box of {image_id} has width/height "
                f"{coordinates[2]:g}/{coordinates[3]:g}; expected both > 0."
            )
        if image_id not in rows_by_image:
            not_in_table += 1
            continue
        if label not in rows_by_image[image_id].findings:
            not_among_findings += 1
        records.append((image_id, label, *coordinates))
    notes = []
    if not_in_table:
        notes.append(
            f"{not_in_table} boxes in {bbox_file.name} belong to images not in the table "
            "and were left out."
        )
    if not_among_findings:
        notes.append(
            f"{not_among_findings} boxes carry a finding their image's label row does not list."
        )
    return _boxes_frame(records), notes


def _boxes_frame(records: list[tuple[str, str, float, float, float, float]]) -> pd.DataFrame:
    boxes = pd.DataFrame.from_records(records, columns=list(BOX_COLUMNS))
    return boxes.astype({"image_id": str, "label": str} | dict.fromkeys("xywh", "float64"))
