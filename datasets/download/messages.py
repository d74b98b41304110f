"""Messages shared by the downloaders: a network failure in the OS's own words, a full disk as
an instruction, and progress notes printed above any tqdm bar.
"""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path

import requests
from tqdm import tqdm

from chestxpert.datasets.schema import DatasetError

_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] [^'\")\]]+")


def short_reason(error: BaseException) -> str:
    """The OS's words for a network failure, without the URL and object reprs that requests
    wraps them in."""
    if isinstance(error, requests.Timeout):
        return "timed out"
    text = str(error)
    match = _ERRNO_TEXT.search(text)
    if match:
        return match.group(0).strip()
    return re.sub(r"<[^>]*>: ", "", text)[:200] or type(error).__name__


def raise_if_disk_full(error: OSError, folder: Path) -> None:
    """Turn a full disk under `folder` into a DatasetError saying what to free; else return."""
    if error.errno == errno.ENOSPC:
        raise DatasetError(
            f"no space left on the disk of {folder}: free some (the full NIH release needs about "
            "45 GB unpacked, plus 4 GB for the archive in hand) and re-run; finished parts are "
            "kept."
        ) from None


def say(text: str, show: bool = True) -> None:
    """Print a progress note to stderr, above any tqdm bar, when `show`."""
    if show:
        tqdm.write(text, file=sys.stderr)
