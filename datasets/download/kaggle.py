"""The Kaggle "NIH sample" (5,606 images) onto this machine through the official Kaggle client,
or from a sample.zip put in place by hand, unpacked into images/ + sample_labels.csv.
"""

from __future__ import annotations

import os
import shutil
import zipfile
import zlib
from pathlib import Path

import requests

from chestxpert.datasets.download.archives import unsafe_message, unsafe_name
from chestxpert.datasets.download.credentials import (
    KaggleCredentials,
    kaggle_credentials,
    kaggle_environment,
    scrub,
)
from chestxpert.datasets.download.messages import raise_if_disk_full, say, short_reason
from chestxpert.datasets.schema import DatasetError

KAGGLE_SAMPLE = "nih-chest-xrays/sample"
KAGGLE_SAMPLE_PAGE = "https://www.kaggle.com/datasets/nih-chest-xrays/sample"
KAGGLE_SAMPLE_ZIP = "sample.zip"  # the name the Kaggle client gives the dataset's archive
SAMPLE_LABEL_FILE = "sample_labels.csv"
KAGGLE_HOST = "www.kaggle.com"


def download_nih_sample(to: Path, env_file: Path | None = None) -> Path:
    """Download the Kaggle "NIH sample" (5,606 images) into `to` as images/ + sample_labels.csv.

    Uses the official Kaggle client (`pip install kaggle`, imported only here) on dataset
    nih-chest-xrays/sample, with credentials from `kaggle_credentials(env_file)`. A folder that
    already holds the layout is left as it is; a `sample.zip` placed in `to` by hand is unpacked
    (and kept) without network or credentials. The downloaded archive is removed once unpacked.
    Returns `to`. Raises DatasetError when the client is missing, credentials are missing or
    rejected, Kaggle cannot be reached, or the archive lacks the label file or images.
    """
    to = Path(to).expanduser().absolute()
    to.mkdir(parents=True, exist_ok=True)
    if _sample_image_count(to):
        say(f"{to} already holds the NIH sample ({SAMPLE_LABEL_FILE} and images/); nothing to do.")
        return to
    by_hand = to / KAGGLE_SAMPLE_ZIP
    if by_hand.is_file():
        say(f"unpacking {by_hand}, placed there by hand.")
        return unpack_kaggle_sample(by_hand, to)
    try:
        credentials = kaggle_credentials(env_file)
    except DatasetError as error:
        raise DatasetError(
            f"{error} Or download {KAGGLE_SAMPLE_ZIP} by hand from {KAGGLE_SAMPLE_PAGE} into {to} "
            "and re-run: it will be checked and unpacked."
        ) from None
    say(f"downloading {KAGGLE_SAMPLE} from Kaggle with {credentials}.")
    # A folder of its own, so the client finds its partial download there and resumes it.
    staging = to / ".kaggle-download"
    _kaggle_download(credentials, staging, to)
    archive = staging / KAGGLE_SAMPLE_ZIP
    unpack_kaggle_sample(archive if archive.is_file() else staging, to)
    shutil.rmtree(staging, ignore_errors=True)
    return to


def _kaggle_download(credentials: KaggleCredentials, into: Path, to: Path) -> None:
    with kaggle_environment(credentials):
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi
        except ImportError:
            raise DatasetError(
                "the Kaggle client is not installed: run `pip install kaggle` in the environment "
                "that runs chestxpert, then re-run. Or download "
                f"{KAGGLE_SAMPLE_ZIP} by hand from {KAGGLE_SAMPLE_PAGE} into {to} and re-run."
            ) from None
        api = KaggleApi()
        try:
            api.authenticate()
            api.dataset_download_files(KAGGLE_SAMPLE, path=str(into), unzip=False, quiet=False)
        except SystemExit:
            # The client exits instead of raising when it finds no usable credentials.
            raise DatasetError(
                f"the Kaggle client did not accept the {credentials}; check them, or create new "
                "ones at https://www.kaggle.com/settings (API section)."
            ) from None
        except (requests.ConnectionError, requests.Timeout) as error:
            reason = scrub(short_reason(error), credentials)
            raise DatasetError(
                f"could not reach {KAGGLE_HOST}: {reason}; these machines need internet access "
                f"for `chestxpert data download`; alternatively download {KAGGLE_SAMPLE_ZIP} by "
                f"hand from {KAGGLE_SAMPLE_PAGE} into {to} and re-run, it will be checked and "
                "unpacked."
            ) from None
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status in (401, 403):
                raise DatasetError(
                    f"Kaggle rejected the {credentials} (HTTP {status}); check them, or create "
                    "new ones at https://www.kaggle.com/settings (API section)."
                ) from None
            raise DatasetError(
                f"Kaggle answered HTTP {status} for dataset {KAGGLE_SAMPLE}; check "
                f"{KAGGLE_SAMPLE_PAGE} in a browser, or download {KAGGLE_SAMPLE_ZIP} from there "
                f"by hand into {to} and re-run."
            ) from None


def unpack_kaggle_sample(archive_or_dir: Path, to: Path) -> Path:
    """Put the Kaggle NIH sample into `to` as `to/images/*.png` and `to/sample_labels.csv`.

    `archive_or_dir` is the Kaggle zip or a folder it was extracted into; the label file and
    the image folder are located wherever they sit in it (Kaggle nests them under `sample/`,
    sometimes twice), the image folder being the one with the most PNGs. A zip is extracted
    into a hidden folder in `to` first, so a failure leaves no half layout; members with
    absolute paths or `..` are refused. A folder's files are moved, not copied. Returns `to`.
    Raises DatasetError naming the archive when it is not a readable zip, has no
    sample_labels.csv or no PNG, or when `to/images` already exists.
    """
    source = Path(archive_or_dir).expanduser().absolute()
    to = Path(to).expanduser().absolute()
    to.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        _place_sample(source, to, source)
    elif source.is_file():
        staging = to / ".sample.unpacking"
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
        staging.mkdir()
        try:
            try:
                with zipfile.ZipFile(source) as archive:
                    for name in archive.namelist():
                        reason = unsafe_name(name)
                        if reason:
                            raise DatasetError(unsafe_message(source, name, reason))
                    archive.extractall(staging)
            except (zipfile.BadZipFile, EOFError, zlib.error) as error:
                raise DatasetError(
                    f"{source.name} ({source}) is not a readable zip archive ({error}); if it is "
                    f"an unfinished download, delete it and re-run, or download it again from "
                    f"{KAGGLE_SAMPLE_PAGE}."
                ) from None
            except OSError as error:
                raise_if_disk_full(error, to)
                raise
            _place_sample(staging, to, source)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        raise DatasetError(
            f"{source} does not exist; expected the Kaggle {KAGGLE_SAMPLE_ZIP} or its folder."
        )
    count = _sample_image_count(to)
    if not count:
        raise DatasetError(
            f"{to} has no {SAMPLE_LABEL_FILE} or no PNG in images/ after unpacking {source}."
        )
    say(f"{to}: {count} images in images/ and {SAMPLE_LABEL_FILE}.")
    return to


def _place_sample(found_in: Path, to: Path, named: Path) -> None:
    labels = sorted(found_in.rglob(SAMPLE_LABEL_FILE), key=lambda path: (len(path.parts), path))
    if not labels:
        raise DatasetError(
            f"{named} holds no {SAMPLE_LABEL_FILE}; expected the Kaggle NIH sample "
            f"({KAGGLE_SAMPLE_PAGE}), which has it beside a folder of PNGs."
        )
    png_counts: dict[Path, int] = {}
    for folder, _, files in os.walk(found_in):
        count = sum(name.lower().endswith(".png") for name in files)
        if count:
            png_counts[Path(folder)] = count
    if not png_counts:
        raise DatasetError(
            f"{named} holds {labels[0].name} but no .png images; expected sample/images/*.png."
        )
    image_folder = max(png_counts, key=lambda folder: (png_counts[folder], -len(folder.parts)))
    target_images = to / "images"
    if image_folder == to:
        raise DatasetError(
            f"the PNGs of the sample lie directly in {to}; move them into {target_images} "
            "and re-run."
        )
    if image_folder != target_images and target_images.exists():
        raise DatasetError(
            f"{target_images} already exists; move it away (or unpack into an empty folder) and "
            "re-run."
        )
    # Labels first, images last: images/ appearing is what marks the layout complete.
    if labels[0] != to / SAMPLE_LABEL_FILE:
        shutil.move(str(labels[0]), to / SAMPLE_LABEL_FILE)
    if image_folder != target_images:
        shutil.move(str(image_folder), target_images)


def _sample_image_count(folder: Path) -> int:
    """PNGs in folder/images when folder/sample_labels.csv exists too, else 0."""
    images = folder / "images"
    if not (folder / SAMPLE_LABEL_FILE).is_file() or not images.is_dir():
        return 0
    return sum(1 for path in images.iterdir() if path.suffix.lower() == ".png")
