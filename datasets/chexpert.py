"""CheXpert adapter: train.csv / valid.csv of CheXpert-v1.0(-small) read and checked into the
common SourceTable, with a chosen view filter and policy for uncertain (-1) labels.
"""

from __future__ import annotations

import math
import re
from pathlib import Path, PurePosixPath

import pandas as pd

from chestxpert.datasets.schema import CHEXPERT_LABELS, IMAGE_COLUMNS, DatasetError, SourceTable
from chestxpert.datasets.validate import (
    LabelCsv,
    column_key,
    conform_images,
    missing_images_notes,
    parse_age_years,
    plausible_age,
    read_label_csv,
)

# train.csv is the large report-mined set; valid.csv is small and labelled by radiologists,
# so it is the closest thing CheXpert publishes to a held-out test set.
CSV_SPLITS: dict[str, str] = {"train.csv": "train_val", "valid.csv": "test"}
UNCERTAIN_POLICIES: dict[str, float] = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}
KNOWN_VIEWS = ("PA", "AP", "LL", "RL")
# Blank means the report did not mention the observation; CheXpert's convention reads that as
# negative.
BLANK_VALUE = 0.0

REQUIRED_COLUMNS: dict[str, str] = {
    "path": "Path",
    "frontallateral": "Frontal/Lateral",
    "appa": "AP/PA",
    **{column_key(label): label for label in CHEXPERT_LABELS},
}
_PATIENT = re.compile(r"^patient\d+$")
_SEX = {"male": "M", "female": "F", "unknown": None, "": None}


def read_chexpert(
    root: Path,
    views: tuple[str, ...] = ("PA", "AP"),
    uncertain: str = "ones",
    skip_missing: bool = False,
) -> SourceTable:
    """Read CheXpert's train.csv and valid.csv into the common table, keeping the chosen views.

    `root` is the CheXpert-v1.0-small (or CheXpert-v1.0) folder or the folder containing it;
    CSV paths are resolved below it. `views` keeps rows whose view is listed: PA/AP come from
    the AP/PA column; laterals are kept only when "LL", "RL" or "Lateral" (all laterals) is
    asked for, and a lateral with a blank AP/PA is recorded as LL, the usual projection.
    `uncertain` maps -1 labels: "ones" → 1.0, "zeros" → 0.0, "ignore" → NaN (masked out of
    the loss); blank labels are 0.0 (not mentioned in the report = negative). train.csv rows
    get official_split "train_val" and valid.csv rows "test". image_id is the path below the
    dataset folder (train/patient00001/study1/view1_frontal.jpg), because file names repeat
    across studies. Missing files are a DatasetError unless `skip_missing`, as for NIH.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise DatasetError(
            f"uncertain={uncertain!r}: expected one of {', '.join(UNCERTAIN_POLICIES)}."
        )
    wanted_views = _wanted_views(views)
    data_dir = _find_data_dir(Path(root).expanduser().absolute())
    notes = [
        f"uncertain (-1) labels → {uncertain} ({UNCERTAIN_POLICIES[uncertain]}); "
        "blank labels → 0.0 "
        "(CheXpert convention: an observation the report does not mention is negative).",
        "official_split: train.csv rows are 'train_val', "
        "valid.csv rows (radiologist-labelled) are 'test'.",
    ]
    rows: list[dict] = []
    for csv_name, split in CSV_SPLITS.items():
        csv_path = data_dir / csv_name
        if not csv_path.is_file():
            notes.append(f"{csv_name} not found in {data_dir}; there are no '{split}' rows.")
            continue
        table = read_label_csv(csv_path, REQUIRED_COLUMNS)
        read = _read_rows(table, data_dir, UNCERTAIN_POLICIES[uncertain], split)
        kept = [row for row in read if row["view"] in wanted_views]
        if len(kept) < len(read):
            notes.append(
                f"{len(read) - len(kept)} of {len(read)} rows of {csv_name} dropped: "
                f"view not in {', '.join(views)}."
            )
        rows += kept
    if not rows:
        raise DatasetError(
            f"no images left in {data_dir}: no row of train.csv/valid.csv has a view in "
            f"{', '.join(views)}; ask for other views (e.g. views=('PA', 'AP', 'Lateral'))."
        )
    _check_unique(rows, data_dir)

    absent = [(row["where"], row["image_id"]) for row in rows if not Path(row["path"]).is_file()]
    notes += missing_images_notes(
        absent, len(rows), f"train.csv/valid.csv of {data_dir}", f"{data_dir}/", skip_missing
    )
    missing = [image_id for _, image_id in absent]
    missing_ids = set(missing)
    images = conform_images(
        pd.DataFrame(
            [row for row in rows if row["image_id"] not in missing_ids],
            columns=[*IMAGE_COLUMNS, *CHEXPERT_LABELS],
        ),
        CHEXPERT_LABELS,
    )
    notes.insert(
        0,
        f"CheXpert from {data_dir}: {len(images)} images of "
        f"{images['patient_id'].nunique()} patients.",
    )
    return SourceTable(
        source="chexpert", labels=CHEXPERT_LABELS, images=images, notes=notes, missing=missing
    )


def _wanted_views(views: tuple[str, ...]) -> set[str]:
    if isinstance(views, str):
        views = (views,)  # a lone "PA" would otherwise be read as ("P", "A")
    wanted: set[str] = set()
    for view in views:
        name = view.strip().upper()
        if name == "LATERAL":
            wanted |= {"LL", "RL"}
        elif name in KNOWN_VIEWS:
            wanted.add(name)
        else:
            raise DatasetError(
                f"views: {view!r} is not a view; "
                f"expected some of {', '.join(KNOWN_VIEWS)} or Lateral."
            )
    return wanted


def _find_data_dir(root: Path) -> Path:
    """The folder holding train.csv/valid.csv: `root` itself or its one child that does."""

    def has_csv(folder: Path) -> bool:
        return any((folder / name).is_file() for name in CSV_SPLITS)

    if has_csv(root):
        return root
    if not root.is_dir():
        raise DatasetError(
            f"{root} is not a folder; point at CheXpert-v1.0-small or the folder containing it."
        )
    candidates = sorted(child for child in root.iterdir() if child.is_dir() and has_csv(child))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise DatasetError(
            f"{root} holds several CheXpert folders "
            f"({', '.join(c.name for c in candidates)}); point at one of them."
        )
    raise DatasetError(
        f"no train.csv or valid.csv in {root} or its subfolders; "
        "point at the CheXpert-v1.0-small folder "
        "(the one holding train.csv, valid.csv, train/ and valid/)."
    )


def _read_rows(table: LabelCsv, data_dir: Path, uncertain_value: float, split: str) -> list[dict]:
    """One dict per CSV row: IMAGE_COLUMNS, the labels, and `where` (file and line) for messages."""
    label_positions = [table.index[column_key(label)] for label in CHEXPERT_LABELS]
    rows = []
    for line, values in table.rows:
        where = f"{table.path} line {line}"
        relative = _relative_path(table.get(values, "path"), where)
        patient = next((part for part in relative.parts if _PATIENT.match(part)), None)
        if patient is None:
            raise DatasetError(
                f"{where}: Path {relative} names no patient folder; "
                "expected …/patient00001/study1/…."
            )
        try:
            age_years = parse_age_years(table.get(values, "age"))
        except ValueError as error:
            raise DatasetError(f"{where}: column 'Age': {error}.") from None
        sex_text = table.get(values, "sex")
        if sex_text.lower() not in _SEX:
            raise DatasetError(
                f"{where}: column 'Sex' is {sex_text!r}; expected Male, Female, Unknown or blank."
            )
        row = {
            "where": f"{table.path.name} line {line}",  # short: messages name data_dir once
            "image_id": relative.as_posix(),
            "path": str(data_dir.joinpath(*relative.parts)),
            "patient_id": patient,
            "age_years": age_years if plausible_age(age_years) else math.nan,
            "sex": _SEX[sex_text.lower()],
            "view": _view(table.get(values, "frontallateral"), table.get(values, "appa"), where),
            "official_split": split,
        }
        for label, position in zip(CHEXPERT_LABELS, label_positions, strict=True):
            row[label] = _label_value(values[position].strip(), uncertain_value, where, label)
        rows.append(row)
    return rows


def _relative_path(text: str, where: str) -> PurePosixPath:
    """A CSV Path below the dataset folder, cut at the split folder: for example
    'CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg' gives
    'train/patient1/study1/view1_frontal.jpg'.

    Cutting at the split folder rather than at a known dataset name makes a renamed dataset
    folder (or an absolute path) resolve too.
    """
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if not parts:
        raise DatasetError(
            f"{where}: column 'Path' is blank; expected e.g. "
            "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg."
        )
    for index, part in enumerate(parts):
        if part in ("train", "valid", "test"):
            parts = parts[index:]
            break
    if parts[0] == "/" or ".." in parts:
        # A label file must not make prepare read (and copy into a dataset) files elsewhere.
        raise DatasetError(
            f"{where}: Path {text!r} points outside the dataset folder; expected a path "
            "below it, e.g. CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg."
        )
    return PurePosixPath(*parts)


def _view(frontal_lateral: str, ap_pa: str, where: str) -> str | None:
    orientation, projection = frontal_lateral.lower(), ap_pa.upper()
    if orientation not in ("frontal", "lateral"):
        raise DatasetError(
            f"{where}: column 'Frontal/Lateral' is {frontal_lateral!r}; "
            "expected Frontal or Lateral."
        )
    if orientation == "lateral":
        return projection if projection in ("LL", "RL") else "LL"
    return projection or None


def _label_value(text: str, uncertain_value: float, where: str, label: str) -> float:
    if not text:
        return BLANK_VALUE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value == 1.0 or value == 0.0:
        return value
    if value == -1.0:
        return uncertain_value
    raise DatasetError(
        f"{where}: column {label!r} is {text!r}; expected 1, 0, -1 (uncertain) or blank."
    )


def _check_unique(rows: list[dict], data_dir: Path) -> None:
    """One row per image, and no patient in both train.csv and valid.csv (that would leak into
    the test)."""
    where_by_image: dict[str, str] = {}
    first_by_patient: dict[str, dict] = {}
    for row in rows:
        earlier = where_by_image.setdefault(row["image_id"], row["where"])
        if earlier != row["where"]:
            raise DatasetError(
                f"{data_dir / row['where']}: {row['image_id']} is listed again "
                f"(first on {earlier}); each image must appear once — delete one of the rows."
            )
        first = first_by_patient.setdefault(row["patient_id"], row)
        if first["official_split"] != row["official_split"]:
            raise DatasetError(
                f"patient {row['patient_id']} is in both train.csv ({first['where']}) "
                f"and valid.csv ({row['where']}) of {data_dir}; all images of a patient must be "
                "in one file, or the test set leaks into training. "
                "Remove the patient from one of them."
            )
