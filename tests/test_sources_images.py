"""The per-image check shared by the adapters (datasets.validate.check_image): whole images of
every mode pass, and a zero-byte, truncated or mislabelled file is named with what to do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxpert.datasets.validate import check_image
from tests.source_helpers import CHEXPERT, NIH_FULL


def write_png(path: Path, mode: str) -> Path:
    if mode == "I;16":
        Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).save(path)
    else:
        Image.new(mode, (32, 32)).save(path)
    return path


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA"])
def test_check_image_accepts_png_modes(tmp_path: Path, mode: str) -> None:
    path = write_png(tmp_path / "image.png", mode)
    with Image.open(path) as image:
        assert image.mode == mode
    assert check_image(path) is None


@pytest.mark.parametrize(
    "fixture_image",
    [
        NIH_FULL / "images_001/images/00000129_000.png",
        NIH_FULL / "images_001/images/00001369_000.png",
        CHEXPERT / "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
    ],
    ids=["grayscale-png", "rgba-png", "jpeg"],
)
def test_check_image_accepts_fixture_images(fixture_image: Path) -> None:
    assert check_image(fixture_image) is None


def zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def not_an_image(path: Path) -> None:
    path.write_text("<html>404 Not Found</html>")


@pytest.mark.parametrize(
    ("source", "damage", "expected"),
    [
        (NIH_FULL / "images_001/images/00000129_000.png", zero_byte, "zero-byte"),
        (NIH_FULL / "images_001/images/00000129_000.png", truncated, "truncated"),
        (NIH_FULL / "images_001/images/00001369_000.png", truncated, "truncated"),
        (NIH_FULL / "images_001/images/00000129_000.png", not_an_image, "not an image"),
        (
            CHEXPERT / "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
            truncated,
            "truncated JPEG",
        ),
    ],
    ids=["zero-byte", "truncated-png", "truncated-rgba-png", "text-named-png", "truncated-jpeg"],
)
def test_check_image_names_the_problem(tmp_path: Path, source: Path, damage, expected: str) -> None:
    path = tmp_path / source.name
    shutil.copy(source, path)
    damage(path)

    problem = check_image(path)

    assert problem is not None and expected in problem
    assert "expected" in problem or "re-download" in problem, "the message says what to do"
