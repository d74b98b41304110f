"""Fetch the NIH ChestX-ray14 data onto this machine: the Kaggle "NIH sample" through the Kaggle
client, or the full release from NIH's own archive links, resumable, checked, and unpacked into
the layout `datasets.nih.read_nih` reads.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from chestxpert.datasets.nih import BBOX_FILE, LABEL_FILES, OFFICIAL_LISTS
from chestxpert.datasets.schema import DatasetError


@dataclass(frozen=True)
class NihFile:
    """One file of the NIH release: its name in the data folder, where NIH serves it, its MD5.

    `url` is None where NIH publishes no direct link (the file must be fetched by hand from
    NIH_BOX_FOLDER); `md5` is None where NIH publishes no checksum.
    """

    name: str
    url: str | None
    md5: str | None = None


NIH_BOX_FOLDER = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
NIH_LABEL_FILE = LABEL_FILES[0]  # Data_Entry_2017_v2020.csv, the revision read first
# The 12 image archives: links as in NIH's own batch_download_zips.py (in NIH_BOX_FOLDER), which
# saves them as images_01.tar.gz … images_12.tar.gz; the web folder names them images_001.tar.gz …,
# the name used here. MD5s as NIH's FAQ_CHESTXRAY.pdf (same folder, question Q07) lists them.
# The label file, box file and split lists have no direct link in NIH's script or FAQ, and a Box
# file page is not a download URL: rather than guess one, they stay None and must be fetched by
# hand (download_nih_full says so and which ones are missing).
NIH_FILES: tuple[NihFile, ...] = (
    NihFile(
        "images_001.tar.gz",
        "https://nihcc.box.com/shared/static/vfk49d74nhbxq3nqjg0900w5nvkorp5c.gz",
        "fe8ed0a6961412fddcbb3603c11b3698",
    ),
    NihFile(
        "images_002.tar.gz",
        "https://nihcc.box.com/shared/static/i28rlmbvmfjbl8p2n3ril0pptcmcu9d1.gz",
        "ab07a2d7cbe6f65ddd97b4ed7bde10bf",
    ),
    NihFile(
        "images_003.tar.gz",
        "https://nihcc.box.com/shared/static/f1t00wrtdk94satdfb9olcolqx20z2jp.gz",
        "2301d03bde4c246388bad3876965d574",
    ),
    NihFile(
        "images_004.tar.gz",
        "https://nihcc.box.com/shared/static/0aowwzs5lhjrceb3qp67ahp0rd1l1etg.gz",
        "9f1b7f5aae01b13f4bc8e2c44a4b8ef6",
    ),
    NihFile(
        "images_005.tar.gz",
        "https://nihcc.box.com/shared/static/v5e3goj22zr6h8tzualxfsqlqaygfbsn.gz",
        "1861f3cd0ef7734df8104f2b0309023b",
    ),
    NihFile(
        "images_006.tar.gz",
        "https://nihcc.box.com/shared/static/asi7ikud9jwnkrnkj99jnpfkjdes7l6l.gz",
        "456b53a8b351afd92a35bc41444c58c8",
    ),
    NihFile(
        "images_007.tar.gz",
        "https://nihcc.box.com/shared/static/jn1b4mw4n6lnh74ovmcjb8y48h8xj07n.gz",
        "1075121ea20a137b87f290d6a4a5965e",
    ),
    NihFile(
        "images_008.tar.gz",
        "https://nihcc.box.com/shared/static/tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j.gz",
        "b61f34cec3aa69f295fbb593cbd9d443",
    ),
    NihFile(
        "images_009.tar.gz",
        "https://nihcc.box.com/shared/static/upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj.gz",
        "442a3caa61ae9b64e61c561294d1e183",
    ),
    NihFile(
        "images_010.tar.gz",
        "https://nihcc.box.com/shared/static/l6nilvfa9cg3s28tqv1qc1olm3gnz54p.gz",
        "09ec81c4c31e32858ad8cf965c494b74",
    ),
    NihFile(
        "images_011.tar.gz",
        "https://nihcc.box.com/shared/static/hhq8fkdgvcari67vfhs7ppg2w6ni4jze.gz",
        "499aefc67207a5a97692424cf5dbeed5",
    ),
    NihFile(
        "images_012.tar.gz",
        "https://nihcc.box.com/shared/static/ioqwiy20ihqwyr8pf4c24eazhh281pbu.gz",
        "dc9fda1757c2de0032b63347a7d2895c",
    ),
    NihFile(NIH_LABEL_FILE, None),
    NihFile(BBOX_FILE, None),
    NihFile(OFFICIAL_LISTS["train_val"], None),
    NihFile(OFFICIAL_LISTS["test"], None),
)

KAGGLE_SAMPLE = "nih-chest-xrays/sample"
KAGGLE_SAMPLE_PAGE = "https://www.kaggle.com/datasets/nih-chest-xrays/sample"
KAGGLE_SAMPLE_ZIP = "sample.zip"  # the name the Kaggle client gives the dataset's archive
SAMPLE_LABEL_FILE = "sample_labels.csv"
KAGGLE_HOST = "www.kaggle.com"
# The variables the Kaggle client reads its credentials from; only these are ever set or cleared.
KAGGLE_CREDENTIAL_VARIABLES: tuple[str, ...] = ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN")

CHUNK_BYTES = 1 << 20
TIMEOUT_S = (15.0, 120.0)  # connect, then between two reads: Box can pause long mid-archive
FETCH_ATTEMPTS = 3  # a dropped connection is resumed this often before giving up
RETRY_PAUSE_S = 5.0
_ARCHIVE_NAME = re.compile(r"^images_0*(\d{1,3})\.tar\.gz$")
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] [^'\")\]]+")


class _Unreachable(DatasetError):
    """The host could not be reached at all (DNS, refused, timeout): this machine is offline."""

    def __init__(self, message: str, host: str, reason: str) -> None:
        super().__init__(message)
        self.host, self.reason = host, reason


class _Interrupted(DatasetError):
    """The connection dropped mid-download; the `.part` file is kept and a new try resumes it."""


# --------------------------------------------------------------------------- Kaggle credentials


@dataclass(frozen=True)
class KaggleCredentials:
    """Kaggle credentials and where they were found; `str()` and `repr()` never show the key.

    `source` says where they came from (a file path or the environment variables' names);
    `username` is None for an API token, which carries no user name; `environment` holds the
    KAGGLE_* variables handed to the Kaggle client, key included, so never print it.
    """

    source: str
    username: str | None
    environment: dict[str, str] = field(repr=False, compare=False)

    def __str__(self) -> str:
        who = f"user {self.username}" if self.username else "an API token"
        return f"Kaggle credentials of {who} from {self.source}"


def kaggle_credentials(env_file: Path | None = None) -> KaggleCredentials:
    """Find Kaggle credentials, and say where, without ever putting the key in a message.

    Looked for in this order: the `env_file` if one is given (it must exist); the environment
    variables KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN); a `.env` file in the current
    folder; `kaggle.json` in KAGGLE_CONFIG_DIR, else ~/.kaggle/ or ~/.config/kaggle/; and the
    API token file ~/.kaggle/access_token. A `.env` file is read as KEY=VALUE lines (`export`,
    quotes and `#` comments allowed). Raises DatasetError naming what each place lacked and the
    three ways to provide credentials.
    """
    looked: list[str] = []
    places: list[tuple[str, Callable[[], dict[str, str] | None]]] = []
    if env_file is not None:
        env_file = Path(env_file).expanduser()
        if not env_file.is_file():
            raise DatasetError(
                f"the env file {env_file} does not exist; give the path of a file with "
                "KAGGLE_USERNAME=… and KAGGLE_KEY=… lines, or leave the option out."
            )
        places.append((str(env_file.absolute()), lambda: _read_env_file(env_file)))
    places.append(("environment variables", lambda: dict(os.environ)))
    default_env = Path.cwd() / ".env"
    if env_file is None or default_env.absolute() != env_file.absolute():
        places.append((str(default_env), lambda: _read_env_file(default_env)))
    for config in _kaggle_json_candidates():
        places.append((str(config), lambda config=config: _read_kaggle_json(config)))
    token_file = Path.home() / ".kaggle" / "access_token"
    places.append((str(token_file), lambda: _read_token_file(token_file)))

    for source, read in places:
        values = read()
        if values is None:
            looked.append(f"{source}: not found")
            continue
        username, key = values.get("KAGGLE_USERNAME", ""), values.get("KAGGLE_KEY", "")
        token = values.get("KAGGLE_API_TOKEN", "")
        if source == "environment variables":
            source = "environment variables KAGGLE_USERNAME/KAGGLE_KEY"
            if token and not (username and key):
                source = "environment variable KAGGLE_API_TOKEN"
        if username and key:
            return KaggleCredentials(
                source, username, {"KAGGLE_USERNAME": username, "KAGGLE_KEY": key}
            )
        if token:
            return KaggleCredentials(source, None, {"KAGGLE_API_TOKEN": token})
        looked.append(f"{source}: {_what_is_missing(username, key)}")
    raise DatasetError(
        "no Kaggle credentials found (" + "; ".join(looked) + "). Provide them in one of three "
        "ways: (1) set the environment variables KAGGLE_USERNAME and KAGGLE_KEY (or "
        "KAGGLE_API_TOKEN); (2) save the kaggle.json that https://www.kaggle.com/settings gives "
        "you (API section) as ~/.kaggle/kaggle.json, or in the folder KAGGLE_CONFIG_DIR names, "
        "and chmod 600 it; (3) write KAGGLE_USERNAME=… and KAGGLE_KEY=… lines into a .env file "
        "in the current folder, or pass that file's path."
    )


def _what_is_missing(username: str, key: str) -> str:
    if username:
        return "KAGGLE_USERNAME is set but KAGGLE_KEY is missing"
    if key:
        return "KAGGLE_KEY is set but KAGGLE_USERNAME is missing"
    return "neither KAGGLE_USERNAME/KAGGLE_KEY nor KAGGLE_API_TOKEN is set"


def _read_env_file(path: Path) -> dict[str, str] | None:
    """KEY=VALUE lines of a .env file; None when there is no such file."""
    if not path.is_file():
        return None
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, equals, value = line.partition("=")
        name = name.strip()
        if not equals or not name or name.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        else:
            # As in shell and python-dotenv: an unquoted " #" starts a comment.
            value = value.split(" #", 1)[0].rstrip()
        values[name] = value
    return values


def _kaggle_json_candidates() -> list[Path]:
    """Where the Kaggle client looks for kaggle.json, in its order."""
    configured = os.environ.get("KAGGLE_CONFIG_DIR")
    if configured:
        return [Path(configured).expanduser() / "kaggle.json"]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [Path.home() / ".kaggle" / "kaggle.json", xdg / "kaggle" / "kaggle.json"]


def _read_kaggle_json(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        content = None
    if not isinstance(content, dict):
        # Not the parser's message: it may quote the file, key included.
        raise DatasetError(
            f'{path} is not valid JSON; expected {{"username": "…", "key": "…"}} as Kaggle '
            "gives it. Download a new one from https://www.kaggle.com/settings (API section)."
        )
    return {
        "KAGGLE_USERNAME": str(content.get("username") or ""),
        "KAGGLE_KEY": str(content.get("key") or ""),
    }


def _read_token_file(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    return {"KAGGLE_API_TOKEN": path.read_text(encoding="utf-8").strip()}


@contextmanager
def _kaggle_environment(credentials: KaggleCredentials) -> Iterator[None]:
    """Expose exactly the chosen credentials to the Kaggle client, and restore the environment."""
    saved = {name: os.environ.get(name) for name in KAGGLE_CREDENTIAL_VARIABLES}
    try:
        for name in KAGGLE_CREDENTIAL_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(credentials.environment)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _scrub(text: str, credentials: KaggleCredentials) -> str:
    """Third-party error text goes through here, so a key it might echo is never shown."""
    for secret in (
        credentials.environment.get("KAGGLE_KEY"),
        credentials.environment.get("KAGGLE_API_TOKEN"),
    ):
        if secret:
            text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------- Kaggle NIH sample


def download_nih_sample(to: Path, env_file: Path | None = None) -> Path:
    """Download the Kaggle "NIH sample" (5,606 images) and unpack it into `to` as images/ + sample_labels.csv.

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
        _say(f"{to} already holds the NIH sample ({SAMPLE_LABEL_FILE} and images/); nothing to do.")
        return to
    by_hand = to / KAGGLE_SAMPLE_ZIP
    if by_hand.is_file():
        _say(f"unpacking {by_hand}, placed there by hand.")
        return unpack_kaggle_sample(by_hand, to)
    try:
        credentials = kaggle_credentials(env_file)
    except DatasetError as error:
        raise DatasetError(
            f"{error} Or download {KAGGLE_SAMPLE_ZIP} by hand from {KAGGLE_SAMPLE_PAGE} into {to} "
            "and re-run: it will be checked and unpacked."
        ) from None
    _say(f"downloading {KAGGLE_SAMPLE} from Kaggle with {credentials}.")
    # A folder of its own, so the client finds its partial download there and resumes it.
    staging = to / ".kaggle-download"
    _kaggle_download(credentials, staging, to)
    archive = staging / KAGGLE_SAMPLE_ZIP
    unpack_kaggle_sample(archive if archive.is_file() else staging, to)
    shutil.rmtree(staging, ignore_errors=True)
    return to


def _kaggle_download(credentials: KaggleCredentials, into: Path, to: Path) -> None:
    with _kaggle_environment(credentials):
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
            reason = _scrub(_short_reason(error), credentials)
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
                        reason = _unsafe_name(name)
                        if reason:
                            raise DatasetError(_unsafe_message(source, name, reason))
                    archive.extractall(staging)
            except (zipfile.BadZipFile, EOFError, zlib.error) as error:
                raise DatasetError(
                    f"{source.name} ({source}) is not a readable zip archive ({error}); if it is "
                    f"an unfinished download, delete it and re-run, or download it again from "
                    f"{KAGGLE_SAMPLE_PAGE}."
                ) from None
            except OSError as error:
                _raise_if_disk_full(error, to)
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
    _say(f"{to}: {count} images in images/ and {SAMPLE_LABEL_FILE}.")
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
            f"the PNGs of the sample lie directly in {to}; move them into {target_images} and re-run."
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


# --------------------------------------------------------------------------- NIH full release


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
        _say(
            f"NIH publishes no direct link for {', '.join(by_hand)}: download them from "
            f"{NIH_BOX_FOLDER} into {to} (the images download meanwhile).",
            progress,
        )
    with requests.Session() as session:
        for position, entry in enumerate(archives):
            try:
                _download_nih_archive(entry, to, session, keep_archives, progress)
            except _Unreachable as error:
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
        _say(f"{folder.name}/ is already unpacked; skipped.", progress)
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
        archive = _fetch_resuming(entry.url, to / entry.name, session, progress)
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


def _fetch_resuming(url: str, dest: Path, session: requests.Session, progress: bool) -> Path:
    """`fetch`, resumed after a dropped connection up to FETCH_ATTEMPTS times: Box drops long downloads."""
    attempt = 1
    while True:
        try:
            return fetch(url, dest, session, progress)
        except _Interrupted as error:
            if attempt >= FETCH_ATTEMPTS:
                raise
            _say(f"{error} Resuming (try {attempt + 1} of {FETCH_ATTEMPTS}).", progress)
            time.sleep(RETRY_PAUSE_S * attempt)
            attempt += 1


def fetch(
    url: str, dest: Path, session: requests.Session | None = None, progress: bool = True
) -> Path:
    """Download `url` to `dest`, resuming an earlier partial download; a complete `dest` is kept as is.

    Bytes go to `dest` + ".part"; when that file exists, an HTTP Range request continues from its
    size (a server that ignores Range gets the file from the start), and the file is renamed to
    `dest` once complete. `session` is a requests.Session to reuse connections; `progress`
    shows a tqdm bar in bytes. Returns `dest`. Raises DatasetError when the host cannot be
    reached (naming it and saying what to do), answers an HTTP error or a web page, or the
    connection drops (the `.part` file is kept: re-run to resume).
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    host = urlsplit(url).hostname or url
    owned = session is None
    session = session or requests.Session()
    try:
        try:
            response = session.get(
                url,
                headers={"Range": f"bytes={offset}-"} if offset else {},
                stream=True,
                timeout=TIMEOUT_S,
            )
        except (requests.ConnectionError, requests.Timeout) as error:
            reason = _short_reason(error)
            raise _Unreachable(
                f"could not reach {host}: {reason}; these machines need internet access for "
                f"`chestxpert data download`; alternatively download {dest.name} by hand from "
                f"{url} into {dest.parent} and re-run, it will be checked and used.",
                host,
                reason,
            ) from None
        with response:
            if response.status_code == 416 and offset:
                return _settle_unsatisfiable_range(response, url, dest, part, session, progress)
            _check_response(response, url, dest)
            total, mode = _resume_plan(response, offset, url, part)
            if mode == "wb":
                offset = 0
            _stream_to(response, part, mode, total, offset, progress, url)
    finally:
        if owned:
            session.close()
    size = part.stat().st_size
    if total is not None and size != total:
        part.unlink()
        raise DatasetError(
            f"{host} sent {size} bytes of {dest.name} but announced {total}; the partial file was "
            "removed, re-run to download it again."
        )
    part.replace(dest)
    return dest


def _settle_unsatisfiable_range(
    response: requests.Response,
    url: str,
    dest: Path,
    part: Path,
    session: requests.Session,
    progress: bool,
) -> Path:
    """416 to a Range request: the `.part` file is either complete already or not this file."""
    total = _total_of(response.headers.get("Content-Range", ""))
    if total is not None and total == part.stat().st_size:
        part.replace(dest)
        return dest
    part.unlink()
    _say(
        f"{dest.name}.part did not match the file on the server; downloading it from the start.",
        progress,
    )
    return fetch(url, dest, session, progress)


def _check_response(response: requests.Response, url: str, dest: Path) -> None:
    if response.status_code not in (200, 206):
        raise DatasetError(
            f"{urlsplit(url).hostname} answered HTTP {response.status_code} {response.reason} for "
            f"{url} ({dest.name}); NIH may have moved the file. Download it by hand from "
            f"{NIH_BOX_FOLDER} into {dest.parent} and re-run, it will be checked and used."
        )
    if response.headers.get("Content-Type", "").startswith("text/html"):
        # Box answers an expired or disabled shared link with a web page, not an error status.
        raise DatasetError(
            f"{urlsplit(url).hostname} answered {url} ({dest.name}) with a web page instead of "
            f"the file; NIH may have moved it. Download it by hand from {NIH_BOX_FOLDER} into "
            f"{dest.parent} and re-run, it will be checked and used."
        )


def _resume_plan(
    response: requests.Response, offset: int, url: str, part: Path
) -> tuple[int | None, str]:
    """(total size, file mode): append for a 206 that starts where we stopped, else start over."""
    if response.status_code == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            return (int(match.group(2)) if match.group(2) != "*" else None), "ab"
        part.unlink()
        raise _Interrupted(
            f"{urlsplit(url).hostname} resumed {url} at the wrong byte "
            f"({response.headers.get('Content-Range')!r}, expected {offset}); {part.name} was "
            "removed, re-run to download it from the start."
        )
    length = response.headers.get("Content-Length")
    return (int(length) if length and length.isdigit() else None), "wb"


def _total_of(content_range: str) -> int | None:
    match = re.search(r"/(\d+)$", content_range)
    return int(match.group(1)) if match else None


def _stream_to(
    response: requests.Response,
    part: Path,
    mode: str,
    total: int | None,
    offset: int,
    progress: bool,
    url: str,
) -> None:
    bar = tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=part.name.removesuffix(".part"),
        disable=not progress,
    )
    try:
        with part.open(mode) as out, bar:
            for chunk in response.iter_content(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    except (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
    ) as error:
        raise _Interrupted(
            f"the download of {part.name.removesuffix('.part')} from {urlsplit(url).hostname} "
            f"broke off after {part.stat().st_size} of {total or '?'} bytes "
            f"({_short_reason(error)}); {part} was kept, re-run to resume from there."
        ) from None
    except OSError as error:
        _raise_if_disk_full(error, part.parent)
        raise


# --------------------------------------------------------------------------- archives


def verify_archive(path: Path, md5: str | None = None, progress: bool = False) -> int:
    """Check that `path` is a complete, safe tar.gz (and has MD5 `md5`, when given); return its file count.

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
    """Unpack one NIH archive (`images/*.png` inside) into `to/images_NNN/images/`; return that folder.

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
            f"{archive.name}: expected an NIH archive name like images_001.tar.gz (or images_01.tar.gz)."
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
                f"{archive.name} holds no images/*.png (top level: {', '.join(found) or 'nothing'}); "
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
        _raise_if_disk_full(error, into)
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
    """Open a tar.gz for one sequential pass; on leaving, read to the end so gzip checks its trailer."""
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
            raise DatasetError(_unsafe_message(path, error.tarinfo.name, str(error))) from None
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise DatasetError(
                f"{path.name} ({path}) is not a complete tar.gz archive: {error or type(error).__name__}."
            ) from None
        while reader.read(CHUNK_BYTES):  # bytes after the gzip stream still count for the MD5
            pass


def _unsafe_name(name: str) -> str | None:
    """Why an archive member's path would land outside the target folder, or None when it is safe."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "is an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "climbs out with '..'"
    return None


def _refuse_unsafe(member: tarfile.TarInfo, archive: Path) -> None:
    reason = _unsafe_name(member.name)
    if reason is None and (member.issym() or member.islnk()):
        reason = "is a link"  # NIH's archives hold none; a link could point anywhere
    if reason is None and not (member.isfile() or member.isdir()):
        reason = "is a device or other special file"
    if reason:
        raise DatasetError(_unsafe_message(archive, member.name, reason))


def _unsafe_message(archive: Path, member: str | None, reason: str) -> str:
    return (
        f"{archive.name} ({archive}): member {member!r} {reason}; refusing to unpack it. This is "
        "not an archive as NIH or Kaggle ship it: delete it and download it again."
    )


# --------------------------------------------------------------------------- messages


def _short_reason(error: BaseException) -> str:
    """The OS's words for a network failure, without the URL and object reprs requests wraps them in."""
    if isinstance(error, requests.Timeout):
        return "timed out"
    text = str(error)
    match = _ERRNO_TEXT.search(text)
    if match:
        return match.group(0).strip()
    return re.sub(r"<[^>]*>: ", "", text)[:200] or type(error).__name__


def _raise_if_disk_full(error: OSError, folder: Path) -> None:
    if error.errno == errno.ENOSPC:
        raise DatasetError(
            f"no space left on the disk of {folder}: free some (the full NIH release needs about "
            "45 GB unpacked, plus 4 GB for the archive in hand) and re-run; finished parts are kept."
        ) from None


def _say(text: str, show: bool = True) -> None:
    if show:
        tqdm.write(text, file=sys.stderr)
