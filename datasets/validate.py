"""Checks shared by the dataset adapters: reading a label CSV with line numbers, spotting typos,
and a cheap per-image check (does this file hold a whole, decodable image?).

Every problem a user can fix is a `DatasetError` naming the file, the line and what was expected.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from chestxpert.datasets.schema import IMAGE_COLUMNS, DatasetError

# Ages outside this range are data-entry errors (the Kaggle sample has a "411Y"); they become NaN.
PLAUSIBLE_AGE_YEARS = (0.0, 120.0)

# DICOM age strings: a number and a unit (Y years, M months, W weeks, D days); a bare number is
# years.
_AGE_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)\s*([YMWD]?)$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}

# A header cell like "OriginalImage[Width,Height]" names several values; NIH writes it unquoted.
_BRACKETED = re.compile(r"^(.*)\[(.*)\]\s*$", re.DOTALL)


@dataclass
class LabelCsv:
    """A label CSV read as text: display column names, a lookup by normalized key, and rows.

    `rows` holds `(line_number, values)` with 1-based line numbers as an editor shows them,
    so that every later error can point at the exact line.
    """

    path: Path
    columns: list[str]
    rows: list[tuple[int, list[str]]]
    index: dict[str, int] = field(default_factory=dict)

    def get(self, values: list[str], key: str) -> str:
        """The stripped value of column `key` (normalized name) in one row; "" if it is absent."""
        position = self.index.get(key)
        return values[position].strip() if position is not None else ""


def conform_images(images: pd.DataFrame, labels: tuple[str, ...]) -> pd.DataFrame:
    """Give an adapter's image table the schema's column order and types, whatever pandas inferred.

    Ids and paths become strings; age float64; labels float32 (1.0/0.0/NaN). sex, view and
    official_split stay object columns holding None when unknown, as the schema documents
    (pandas' string dtype would turn None into NaN).
    """
    images = images.reindex(columns=[*IMAGE_COLUMNS, *labels]).reset_index(drop=True)
    for column in ("image_id", "path", "patient_id"):
        images[column] = images[column].astype(str)
    for column in ("sex", "view", "official_split"):
        values = images[column].astype(object)
        images[column] = values.where(values.notna(), None)
    return images.astype({"age_years": "float64"} | {label: "float32" for label in labels})


def column_key(name: str) -> str:
    """Normalize a header name so spelling variants match: "Patient ID" and "patient_id" both
    give "patientid"."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def read_label_csv(path: Path, required: Mapping[str, str]) -> LabelCsv:
    """Read a label CSV (plain or `.gz`) and check its header names every required column.

    `required` maps normalized keys (see `column_key`) to the names shown in messages. Header
    cells that name several values (`OriginalImage[Width,Height]`, `Bbox [x,y,w,h]`) are
    expanded to one column per value, and trailing empty cells (a trailing comma on every
    line) are dropped, so each row must then hold exactly one value per column. Raises
    `DatasetError` for an empty file, a header with no rows, a missing column, or a row
    with the wrong number of values.
    """
    lines = _read_rows(path)
    header_line, header = next(lines, (0, []))
    header = _drop_trailing_empty(header)
    if not header:
        raise DatasetError(
            f"{path} is empty: expected a header line naming {', '.join(required.values())} "
            "and one row per image. Re-download or re-extract the file."
        )
    columns = _expand_header(header)
    index: dict[str, int] = {}
    for position, name in enumerate(columns):
        key = column_key(name)
        if key in index:
            raise DatasetError(
                f"{path} line {header_line}: column {name!r} appears twice in the header; "
                "remove one of them."
            )
        index[key] = position
    absent = [shown for key, shown in required.items() if key not in index]
    if absent:
        raise DatasetError(
            f"{path} line {header_line}: missing column(s) {', '.join(map(repr, absent))}; "
            f"found {', '.join(map(repr, columns))}. "
            f"Expected at least {', '.join(required.values())} "
            "— is this the right file, with its original header?"
        )
    rows: list[tuple[int, list[str]]] = []
    for line, values in lines:
        values = values[: len(columns)] + _drop_trailing_empty(values[len(columns) :])
        if not any(value.strip() for value in values):
            continue  # a blank line, typically at the end of a hand-edited file
        if len(values) != len(columns):
            raise DatasetError(
                f"{path} line {line}: {len(values)} values, expected {len(columns)} "
                f"(one per column: {', '.join(columns)}). "
                "Look for an unquoted comma or a cut-off line."
            )
        rows.append((line, values))
    if not rows:
        raise DatasetError(f"{path} has a header but no rows: expected one row per image.")
    return LabelCsv(path=path, columns=columns, rows=rows, index=index)


def _read_rows(path: Path) -> Iterable[tuple[int, list[str]]]:
    """Yield `(line_number, values)` for every CSV record; decode errors become DatasetError."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            # line_num counts physical lines read so far, i.e. the last line of this record.
            for values in reader:
                yield reader.line_num, values
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(
            f"{path} could not be read as a CSV text file ({error}); re-download or re-extract it."
        ) from error


def _drop_trailing_empty(values: list[str]) -> list[str]:
    end = len(values)
    while end and not values[end - 1].strip():
        end -= 1
    return values[:end]


def _expand_header(cells: list[str]) -> list[str]:
    """Re-join header cells split inside brackets, then give each bracketed value its own column."""
    joined: list[str] = []
    for cell in cells:
        if joined and "[" in joined[-1] and "]" not in joined[-1]:
            joined[-1] += "," + cell
        else:
            joined.append(cell.strip())
    columns: list[str] = []
    for cell in joined:
        match = _BRACKETED.match(cell)
        if match and "," in match.group(2):
            prefix = match.group(1)
            columns.extend(f"{prefix}[{part.strip()}]" for part in match.group(2).split(","))
        else:
            columns.append(cell)
    return columns


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A " (did you mean 'X'?)" hint for a misspelt name, or "" when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_age_years(text: str) -> float:
    """Parse an age as written in label files ("57", "060Y", "013M", "001D", "") into years.

    A bare number is years; the DICOM suffixes Y, M, W and D mean years, months, weeks and
    days. Blank gives NaN. Raises `ValueError` (the caller adds file and line) for anything
    else.
    """
    text = text.strip()
    if not text:
        return math.nan
    match = _AGE_PATTERN.match(text)
    if not match:
        raise ValueError(
            f"age {text!r} is not a number of years or a DICOM age like 060Y, 013M, 001D"
        )
    return float(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()]


def plausible_age(age_years: float) -> bool:
    """True when an age lies in PLAUSIBLE_AGE_YEARS (NaN counts as plausible: it is unknown)."""
    low, high = PLAUSIBLE_AGE_YEARS
    return math.isnan(age_years) or low <= age_years <= high


def check_image(path: Path) -> str | None:
    """Say what is wrong with one image file, or return None when it looks whole.

    Cheap by design (no full decode): the file must be non-empty, PIL must recognise it,
    its chunk structure must verify (PNG: every chunk's CRC up to IEND, which catches
    truncated files) and a JPEG must end with its end-of-image marker. Works for grayscale,
    16-bit (I;16), RGB and RGBA PNGs and for JPEGs. The returned text does not repeat the
    path; the caller puts it in front.
    """
    try:
        size_bytes = path.stat().st_size
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if size_bytes == 0:
        return "is an empty (zero-byte) file; re-download or re-extract it"
    try:
        with Image.open(path) as image:
            image_format, (width, height) = image.format, image.size
            image.verify()
    except UnidentifiedImageError:
        with path.open("rb") as handle:
            start = handle.read(16)
        return f"is not an image PIL can read (starts with {start!r}); expected a PNG or JPEG file"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL reports a cut-off PNG as OSError("Truncated File Read") and a bad CRC as SyntaxError.
        return f"is damaged or truncated ({error}); re-download or re-extract it"
    if width < 1 or height < 1:
        return f"has no pixels ({width}x{height})"
    if image_format == "JPEG" and not _jpeg_ends_with_eoi(path):
        return "is a truncated JPEG (no end-of-image marker); re-download or re-extract it"
    return None


def _jpeg_ends_with_eoi(path: Path) -> bool:
    # Some writers pad after the marker, so look at the tail rather than the last two bytes only.
    with path.open("rb") as handle:
        handle.seek(0, 2)
        handle.seek(max(0, handle.tell() - 1024))
        return b"\xff\xd9" in handle.read()


def missing_images_notes(
    missing: list[tuple[str, str]], listed: int, listed_in: str, searched: str, skip_missing: bool
) -> list[str]:
    """Account for listed images that have no file: a note when skipping, else a DatasetError.

    `missing` holds `(where, image_id)` pairs, `where` being e.g. "line 12"; `listed` counts
    the rows checked, `listed_in` names the label file(s) and `searched` where the files were
    looked for. When every listed image is missing it is always an error, because the table
    would be empty and the likely cause is a wrong root folder.
    """
    if not missing:
        return []
    examples = ", ".join(f"{image_id} ({where})" for where, image_id in missing[:5])
    examples += ", …" if len(missing) > 5 else ""
    if len(missing) == listed:
        raise DatasetError(
            f"none of the {listed} images listed in {listed_in} was found under {searched} "
            f"(first: {examples}). "
            "Point at the folder that holds both the label file and the images."
        )
    if not skip_missing:
        raise DatasetError(
            f"{len(missing)} of {listed} images listed in {listed_in} have no file under "
            f"{searched} (first: {examples}). "
            "Download or extract the missing images, or ask to skip them "
            "(skip_missing=True) to leave those rows out."
        )
    return [
        f"skipped {len(missing)} of {listed} images listed in {listed_in} that have no file under "
        f"{searched} (first: {examples}); the full list is in the table's `missing`."
    ]
