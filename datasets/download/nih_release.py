"""The full NIH ChestX-ray14 release onto this machine: each image archive fetched (or found
where a user put it), checked, unpacked and removed, and the link-less label files asked for.
"""

from __future__ import annotations

import re
from pathlib import Path

import requests

from chestxpert.datasets.download.archives import unpack_nih_archive, verify_archive
from chestxpert.datasets.download.http import Unreachable, fetch_resuming
from chestxpert.datasets.download.kaggle import SAMPLE_LABEL_FILE
from chestxpert.datasets.download.messages import say
from chestxpert.datasets.download.nih_files import (
    NIH_BOX_FOLDER,
    NIH_FILES,
    NIH_LABEL_FILE,
    NihFile,
)
from chestxpert.datasets.nih import BBOX_FILE, LABEL_FILES, OFFICIAL_LISTS
from chestxpert.datasets.schema import DatasetError


def download_nih_full(to: Path, keep_archives: bool = False, progress: bool = True) -> Path:
    """Download NIH ChestX-ray14 (12 archives, about 42 GB) from NIH and unpack it into `to`.

    Each `images_NNN.tar.gz` is fetched from its NIH_FILES link (resumable, see `fetch`),
    checked against NIH's MD5 and as a complete tar.gz (`verify_archive`), and unpacked into
    `to/images_NNN/images/` (`unpack_nih_archive`); it is then removed unless `keep_archives`.
    An archive already unpacked is skipped; one placed in `to` by hand (images_001.tar.gz or
    NIH's script's images_01.tar.gz) is checked and unpacked without network. NIH publishes no
    direct link for the label file and lists: place them in `to` by hand. `progress` shows tqdm
    bars in bytes. Returns `to`. Raises DatasetError when NIH cannot be reached, an archive is
    bad (named, and said whether it was removed or left), or no label file is in `to`.
    """
    to = Path(to).expanduser().absolute()
    to.mkdir(parents=True, exist_ok=True)
    archives = [entry for entry in NIH_FILES if entry.name.endswith(".tar.gz")]
    by_hand = _missing_label_files(to)
    if by_hand:
        say(
            f"NIH publishes no direct link for {', '.join(by_hand)}: download them from "
            f"{NIH_BOX_FOLDER} into {to} (the images download meanwhile).",
            progress,
        )
    with requests.Session() as session:
        for position, entry in enumerate(archives):
            try:
                _download_nih_archive(entry, to, session, keep_archives, progress)
            except Unreachable as error:
                remaining = [
                    later.name
                    for later in archives[position:]
                    if not (to / later.name.removesuffix(".tar.gz")).is_dir()
                ]
                labels = _missing_label_files(to)
                also = f" and the label files ({', '.join(labels)})" if labels else ""
                raise DatasetError(
                    f"could not reach {error.host}: {error.reason}; these machines need internet "
                    "access for `chestxpert data download`; alternatively download the archives "
                    f"({', '.join(remaining)}){also} by hand from {NIH_BOX_FOLDER} into {to} and "
                    "re-run, they will be checked and unpacked."
                ) from None
    if _missing_label_files(to)[:1] == [NIH_LABEL_FILE]:
        raise DatasetError(
            f"the images are unpacked in {to}, but its label file is missing: NIH publishes no "
            f"direct link for it. Download {NIH_LABEL_FILE} (and {BBOX_FILE}, "
            f"{OFFICIAL_LISTS['train_val']}, {OFFICIAL_LISTS['test']} for boxes and the official "
            f"split) from {NIH_BOX_FOLDER} into {to} and re-run; no image is downloaded again."
        )
    return to


def _missing_label_files(to: Path) -> list[str]:
    """The link-less NIH files not in `to`; the label file counts as present in any of its forms."""
    missing = [
        entry.name for entry in NIH_FILES if entry.url is None and not (to / entry.name).is_file()
    ]
    if any((to / name).is_file() for name in LABEL_FILES if name != SAMPLE_LABEL_FILE):
        missing = [name for name in missing if name != NIH_LABEL_FILE]
    return missing


def _download_nih_archive(
    entry: NihFile, to: Path, session: requests.Session, keep_archives: bool, progress: bool
) -> None:
    folder = to / entry.name.removesuffix(".tar.gz")
    if folder.is_dir():
        say(f"{folder.name}/ is already unpacked; skipped.", progress)
        return
    # NIH's own script saves images_01.tar.gz; its web folder says images_001.tar.gz.
    names = (entry.name, re.sub(r"_0(\d\d)\.", r"_\1.", entry.name))
    archive = next((to / name for name in names if (to / name).is_file()), None)
    fetched_now = archive is None
    if archive is None:
        if entry.url is None:
            raise DatasetError(
                f"no link for {entry.name}; download it from {NIH_BOX_FOLDER} into {to}."
            )
        archive = fetch_resuming(entry.url, to / entry.name, session, progress)
    try:
        verify_archive(archive, entry.md5, progress)
    except DatasetError as error:
        if fetched_now:
            archive.unlink()
            raise DatasetError(
                f"{error} The download was removed; re-run to download it again."
            ) from None
        raise DatasetError(
            f"{error} It was left in place: if it is an unfinished download, rename it to "
            f"{entry.name}.part and re-run to resume it; otherwise delete it and re-run to "
            "download it again."
        ) from None
    unpack_nih_archive(archive, to, progress)
    if not keep_archives:
        archive.unlink()
