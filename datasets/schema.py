"""The one table every dataset source ends in, and the label sets of each source.

An adapter (NIH, CheXpert, synthetic phantoms in NIH layout) returns a
`SourceTable`; everything after `datasets.prepare` only sees this shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chestxpert.cluster.errors import UserError

# pandas only where a source table is built: the reader and every CLI command import this
# module for its constants, and pandas costs them half a second or more.
if TYPE_CHECKING:
    import pandas as pd

# The prepared dataset (written by `prepare`, read by `reader`): a folder or object-store
# prefix with MANIFEST, written last, and Parquet shards per split. SCHEMA_VERSION changes
# whenever a reader could misread an older layout.
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")

# Versions: each `prepare` writes its shards under GENERATIONS/<generation>/<split>/, keeps a
# copy of its manifest as MANIFESTS/<generation>.json, and only then replaces MANIFEST, so a
# reader holding an older manifest keeps finding its shards. A generation is named by the
# first GENERATION_CHARS hex digits of the dataset's content digest. Shard paths in a manifest
# are relative to the dataset's root, which is why datasets written before generations existed
# (shards directly under <split>/, no "generation" key) read the same way: no schema change.
GENERATIONS = "generations"
MANIFESTS = "manifests"
GENERATION_CHARS = 16

# A raw folder written by `chestxpert data synth` holds this file (what drew it, with which
# settings); a source adapter that finds it marks its table synthetic, and `prepare` carries the
# mark into the manifest ("synthetic": true, "provenance": the file's content), so every report
# built on the dataset can say its images are phantoms.
SYNTHETIC_MARKER = "SYNTHETIC.json"


def generation_of(manifest: dict) -> str:
    """The generation a manifest describes: its "generation" key, or for a dataset written
    before generations existed, the same prefix of its digest ("" if it has neither)."""
    return str(manifest.get("generation") or str(manifest.get("digest") or "")[:GENERATION_CHARS])


# NIH ChestX-ray14 order, as in the label file ("Pleural_Thickening" keeps its underscore).
NIH_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

# CheXpert's 14 observations, in the order of its CSV columns.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# Columns of SourceTable.images besides one float column per label (1.0, 0.0, or
# NaN = unknown/ignored, which the loss masks out).
IMAGE_COLUMNS: tuple[str, ...] = (
    "image_id",  # file name, unique within the source (e.g. 00000001_000.png)
    "path",  # absolute local path of the image file
    "patient_id",  # str; all images of one patient go to one split
    "age_years",  # float, NaN when unknown
    "sex",  # "M", "F", or None
    "view",  # "PA", "AP", "LL", ... or None
    "official_split",  # "train_val", "test", or None when the source has no official list
)

BOX_COLUMNS: tuple[str, ...] = (
    "image_id",
    "label",
    "x",
    "y",
    "w",
    "h",
)  # pixels of the original image


def _empty_boxes() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(columns=list(BOX_COLUMNS))


@dataclass
class SourceTable:
    """A dataset source read into the common shape.

    `images` has IMAGE_COLUMNS plus one column per name in `labels` (in that
    order); `boxes` has BOX_COLUMNS (empty when the source has none); `source`
    is "nih" or "chexpert"; `notes` are human-readable remarks for the manifest;
    `missing` lists image ids the label file names but no file exists for (only
    when the caller asked to skip them; otherwise they are a DatasetError). `provenance` is the
    content of the folder's SYNTHETIC_MARKER when synthetic phantoms drew it, else None.
    """

    source: str
    labels: tuple[str, ...]
    images: pd.DataFrame
    boxes: pd.DataFrame = field(default_factory=_empty_boxes)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    provenance: dict | None = None

    @property
    def synthetic(self) -> bool:
        """Whether the images are synthetic phantoms (the source folder carried the marker)."""
        return self.provenance is not None


class DatasetError(UserError, ValueError):
    """Bad input a user can fix: the message names the file, row or key and what was expected."""
