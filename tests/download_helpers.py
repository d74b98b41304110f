"""Builders shared by the download tests: small archives in NIH's and Kaggle's real layouts,
and `isolate`, which keeps the real home, Kaggle credentials and .env away from a test.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from chestxpert.datasets.download import archives
from chestxpert.datasets.download import http as resumable_http

FAKE_KEY = "fake-kaggle-key-5f1c9e0b7a3d"
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
SAMPLE_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImageWidth,OriginalImageHeight,"
    "OriginalImagePixelSpacing_x,OriginalImagePixelSpacing_y"
)


def png_bytes(seed: int, side: int = 64) -> bytes:
    """A small grayscale PNG of noise: incompressible enough that archives span several chunks."""
    pixels = hashlib.shake_256(str(seed).encode()).digest(side * side)
    buffer = io.BytesIO()
    Image.frombytes("L", (side, side), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_names(first_patient: int, count: int) -> list[str]:
    return [f"{first_patient + index:08d}_000.png" for index in range(count)]


def nih_tar(path: Path, names: list[str], extra: list[tarfile.TarInfo] = ()) -> bytes:
    """A tar.gz as NIH ships it: a folder `images/` of PNGs; `extra` members are added after."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folder = tarfile.TarInfo("images")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name in names:
            data = png_bytes(int(name[:8]))
            info = tarfile.TarInfo(f"images/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def label_rows(names: list[str]) -> list[str]:
    return [f"{name},No Finding,0,{int(name[:8])},40,F,PA,64,64,0.143,0.143" for name in names]


def kaggle_zip(path: Path, names: list[str], images_at: str, labels_at: str) -> None:
    """A zip like Kaggle's nih-chest-xrays/sample, with the images and label file at given paths."""
    with zipfile.ZipFile(path, "w") as archive:
        for name in names:
            archive.writestr(f"{images_at}/{name}", png_bytes(int(name[:8])))
        archive.writestr(labels_at, "\n".join([SAMPLE_HEADER, *label_rows(names)]) + "\n")


def tree(folder: Path) -> set[str]:
    """Every file and folder under `folder`, as relative POSIX paths."""
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")}


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No real Kaggle credentials, home or .env reach a test; small chunks so drops land
    mid-file; no pause between retries. Returns the stand-in home folder."""
    for name in list(os.environ):
        if name.startswith("KAGGLE_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(resumable_http, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(archives, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(resumable_http, "RETRY_PAUSE_S", 0.0)
    return home
