"""Fixture paths and helpers shared by the source adapter tests: the small real-format copies of
NIH and CheXpert in tests/fixtures, and ways to copy and break them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NIH_FULL = FIXTURES / "nih_full"
NIH_SAMPLE = FIXTURES / "nih_sample"
CHEXPERT = FIXTURES / "chexpert"


def copy_fixture(source: Path, tmp_path: Path) -> Path:
    """A writable copy of a fixture tree, so a test can break it."""
    return Path(shutil.copytree(source, tmp_path / source.name))


def edit_lines(path: Path, edit) -> None:
    """Rewrite a text file through `edit(list_of_lines) -> list_of_lines`."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def labels_of(table, image_id: str) -> dict[str, float]:
    row = table.images.set_index("image_id").loc[image_id]
    return {label: float(row[label]) for label in table.labels}
