"""NIH's image archives checked and unpacked: one streaming pass verifies a tar.gz (gzip trailer,
MD5, safe member names), another unpacks it into images_NNN/images/ only when complete.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from tqdm import tqdm

from chestxpert.datasets.download.messages import raise_if_disk_full
from chestxpert.datasets.schema import DatasetError

CHUNK_BYTES = 1 << 20
_ARCHIVE_NAME = re.compile(r"^images_0*(\d{1,3})\.tar\.gz$")


def verify_archive(path: Path, md5: str | None = None, progress: bool = False) -> int:
    """Check `path` is a complete, safe tar.gz with MD5 `md5` (if given); return its file count.

    Reads the whole archive once: every member is listed, the gzip trailer's CRC and length are
    checked (which catches a truncated or damaged file), the MD5 is computed on the way, and
    members that would land outside the target (absolute paths, `..`, links, devices) are
    refused. `progress` shows a tqdm bar in bytes. Raises DatasetError naming the archive
    and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; expected a .tar.gz archive there.")
    files = 0
    with _tar_stream(path, "checking", progress) as (tar, reader):
        for member in tar:
            _refuse_unsafe(member, path)
            files += member.isfile()
    if files == 0:
        raise DatasetError(
            f"{path.name} ({path}) is a tar.gz without any file; expected images/*.png."
        )
    if md5 and reader.md5.hexdigest() != md5.lower():
        raise DatasetError(
            f"{path.name} ({path}) has MD5 {reader.md5.hexdigest()}, but NIH lists {md5} for it "
            "(FAQ_CHESTXRAY.pdf): it is damaged or a different file."
        )
    return files


def unpack_nih_archive(archive: Path, to: Path, progress: bool = False) -> Path:
    """Unpack one NIH archive (`images/*.png` inside) into `to/images_NNN/`; return that folder.

    NNN comes from the archive's name (images_001.tar.gz or images_01.tar.gz → images_001). The
    archive is extracted into a hidden sibling `.images_NNN.unpacking` and renamed into place
    only when complete, so `images_NNN/` exists only whole. Members with absolute paths, `..`,
    links or devices are refused (and tarfile's "data" filter applies on Python ≥ 3.11.4).
    Raises DatasetError naming the archive when its name or content is not as NIH ships it,
    or when `images_NNN/` already exists.
    """
    archive = Path(archive).expanduser().absolute()
    to = Path(to).expanduser().absolute()
    match = _ARCHIVE_NAME.match(archive.name)
    if not match:
        raise DatasetError(
            f"{archive.name}: expected an NIH archive name like images_001.tar.gz "
            "(or images_01.tar.gz)."
        )
    folder = to / f"images_{int(match.group(1)):03d}"
    if folder.exists():
        raise DatasetError(f"{folder} already exists; remove it to unpack {archive.name} again.")
    staging = to / f".{folder.name}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    staging.mkdir(parents=True)
    try:
        with _tar_stream(archive, "unpacking", progress) as (tar, _):
            for member in tar:
                _refuse_unsafe(member, archive)
                _extract(tar, member, staging)
        images = staging / "images"
        if not images.is_dir() or not any(
            path.suffix.lower() == ".png" for path in images.iterdir()
        ):
            found = sorted(path.name for path in staging.iterdir())[:10]
            raise DatasetError(
                f"{archive.name} holds no images/*.png "
                f"(top level: {', '.join(found) or 'nothing'}); "
                "expected an NIH ChestX-ray14 image archive."
            )
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, into: Path) -> None:
    try:
        if hasattr(tarfile, "data_filter"):  # Python ≥ 3.11.4
            tar.extract(member, into, filter="data")
        else:
            tar.extract(member, into)
    except OSError as error:
        raise_if_disk_full(error, into)
        raise


class _HashingReader:
    """A read-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], object]) -> None:
        self._raw, self._on_read = raw, on_read
        self.md5 = hashlib.md5(usedforsecurity=False)

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.md5.update(data)
        self._on_read(len(data))
        return data


_FILTER_ERRORS: tuple[type[Exception], ...] = (
    (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()
)


@contextmanager
def _tar_stream(
    path: Path, action: str, progress: bool
) -> Iterator[tuple[tarfile.TarFile, _HashingReader]]:
    """Open a tar.gz for one sequential pass; on leaving, read to the end so gzip checks its
    trailer."""
    bar = tqdm(
        total=path.stat().st_size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"{action} {path.name}",
        disable=not progress,
    )
    with path.open("rb") as raw, bar:
        reader = _HashingReader(raw, bar.update)
        try:
            with gzip.GzipFile(fileobj=reader, mode="rb") as unzipped:
                with tarfile.open(fileobj=unzipped, mode="r|") as tar:
                    yield tar, reader
                while unzipped.read(CHUNK_BYTES):
                    pass
        except _FILTER_ERRORS as error:  # tarfile's own "data" filter refused a member
            raise DatasetError(unsafe_message(path, error.tarinfo.name, str(error))) from None
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise DatasetError(
                f"{path.name} ({path}) is not a complete tar.gz archive: "
                f"{error or type(error).__name__}."
            ) from None
        while reader.read(CHUNK_BYTES):  # bytes after the gzip stream still count for the MD5
            pass


def unsafe_name(name: str) -> str | None:
    """Why an archive member's path would land outside the target folder; None when it is safe."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "is an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "climbs out with '..'"
    return None


def _refuse_unsafe(member: tarfile.TarInfo, archive: Path) -> None:
    reason = unsafe_name(member.name)
    if reason is None and (member.issym() or member.islnk()):
        reason = "is a link"  # NIH's archives hold none; a link could point anywhere
    if reason is None and not (member.isfile() or member.isdir()):
        reason = "is a device or other special file"
    if reason:
        raise DatasetError(unsafe_message(archive, member.name, reason))


def unsafe_message(archive: Path, member: str | None, reason: str) -> str:
    """The refusal of an unsafe member `member` of `archive`, with what the user should do."""
    return (
        f"{archive.name} ({archive}): member {member!r} {reason}; refusing to unpack it. This is "
        "not an archive as NIH or Kaggle ship it: delete it and download it again."
    )
