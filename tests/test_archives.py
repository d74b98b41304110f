"""Checking and unpacking NIH's image archives (datasets.download.archives) on tar.gz files built
here in NIH's real layout, including damaged ones and members that would escape the target.
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import pytest

from chestxpert.datasets.download import unpack_nih_archive, verify_archive
from chestxpert.datasets.nih import LABEL_FILES, read_nih
from chestxpert.datasets.schema import DatasetError
from tests.download_helpers import (
    NIH_HEADER,
    image_names,
    isolate,
    label_rows,
    md5_of,
    nih_tar,
    png_bytes,
    tree,
)


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test here runs without the real home, Kaggle credentials or .env (see isolate)."""
    return isolate(monkeypatch, tmp_path)


@pytest.mark.parametrize("archive_name", ["images_001.tar.gz", "images_01.tar.gz"])
def test_unpack_nih_archive_gives_the_nih_layout(tmp_path: Path, archive_name: str) -> None:
    names = image_names(1, 4)
    archive = tmp_path / archive_name
    nih_tar(archive, names)
    to = tmp_path / "nih"
    to.mkdir()

    folder = unpack_nih_archive(archive, to)

    assert folder == to / "images_001"
    assert tree(to) == {"images_001", "images_001/images"} | {
        f"images_001/images/{n}" for n in names
    }
    for name in names:
        assert (folder / "images" / name).read_bytes() == png_bytes(int(name[:8]))


def test_unpacked_archives_read_as_nih(tmp_path: Path) -> None:
    to = tmp_path / "nih"
    to.mkdir()
    first, second = image_names(1, 3), image_names(100, 2)
    nih_tar(tmp_path / "images_001.tar.gz", first)
    nih_tar(tmp_path / "images_002.tar.gz", second)
    unpack_nih_archive(tmp_path / "images_001.tar.gz", to)
    unpack_nih_archive(tmp_path / "images_002.tar.gz", to)
    (to / LABEL_FILES[0]).write_text("\n".join([NIH_HEADER, *label_rows(first + second)]) + "\n")

    table = read_nih(to)

    assert sorted(table.images["image_id"]) == sorted(first + second)
    assert not table.missing


def test_unpack_nih_archive_refuses_an_existing_folder(tmp_path: Path) -> None:
    nih_tar(tmp_path / "images_003.tar.gz", image_names(1, 2))
    (tmp_path / "images_003").mkdir()
    with pytest.raises(DatasetError, match=r"images_003 already exists"):
        unpack_nih_archive(tmp_path / "images_003.tar.gz", tmp_path)


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (_member("../escaped.png"), "'..'"),
        (_member("images/../../escaped.png"), "'..'"),
        (_member("/tmp/escaped.png"), "absolute path"),
        (_member("images/link.png", tarfile.SYMTYPE, "/etc/passwd"), "link"),
        (_member("images/hard.png", tarfile.LNKTYPE, "../../escaped.png"), "link"),
        (_member("images/dev", tarfile.CHRTYPE), "device"),
    ],
    ids=["dotdot", "dotdot-inside", "absolute", "symlink", "hardlink", "device"],
)
def test_unsafe_tar_member_is_refused(tmp_path: Path, member: tarfile.TarInfo, reason: str) -> None:
    archive = tmp_path / "images_004.tar.gz"
    nih_tar(archive, image_names(1, 2), extra=[member])
    to = tmp_path / "data" / "nih"
    to.mkdir(parents=True)

    for check in (lambda: verify_archive(archive), lambda: unpack_nih_archive(archive, to)):
        with pytest.raises(DatasetError) as caught:
            check()
        assert "images_004.tar.gz" in str(caught.value)
        assert repr(member.name) in str(caught.value)
        assert reason in str(caught.value)
    assert tree(to) == set()  # neither images_004/ nor the staging folder is left
    assert not (tmp_path / "data" / "escaped.png").exists()
    assert not (tmp_path / "escaped.png").exists()


def test_verify_archive_counts_files_and_checks_md5(tmp_path: Path) -> None:
    archive = tmp_path / "images_005.tar.gz"
    data = nih_tar(archive, image_names(1, 3))
    assert verify_archive(archive) == 3
    assert verify_archive(archive, md5_of(data)) == 3
    with pytest.raises(DatasetError, match=r"images_005\.tar\.gz .*has MD5 .* but NIH lists 0{32}"):
        verify_archive(archive, "0" * 32)


@pytest.mark.parametrize(
    "damage",
    [
        "cut in half",
        "cut at the last byte",
        "one byte flipped",
        "web page",
        "empty",
        "gzip of text",
    ],
)
def test_verify_archive_names_a_bad_archive(tmp_path: Path, damage: str) -> None:
    archive = tmp_path / "images_006.tar.gz"
    data = nih_tar(archive, image_names(1, 3))
    broken = {
        "cut in half": data[: len(data) // 2],
        "cut at the last byte": data[:-1],
        "one byte flipped": data[:-12] + bytes([data[-12] ^ 0xFF]) + data[-11:],
        "web page": b"<!DOCTYPE html><html><body>Shared link disabled</body></html>",
        "empty": b"",
        "gzip of text": gzip.compress(b"not a tar archive\n" * 50),
    }[damage]
    archive.write_bytes(broken)
    with pytest.raises(DatasetError, match=r"images_006\.tar\.gz .*not a complete tar\.gz"):
        verify_archive(archive)
