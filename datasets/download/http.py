"""Resumable HTTP downloads: a `.part` file continued with Range requests, retried when the
connection drops, and every failure explained with what to do next.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from chestxpert.datasets.download.messages import raise_if_disk_full, say, short_reason
from chestxpert.datasets.download.nih_files import NIH_BOX_FOLDER
from chestxpert.datasets.schema import DatasetError

CHUNK_BYTES = 1 << 20
TIMEOUT_S = (15.0, 120.0)  # connect, then between two reads: Box can pause long mid-archive
FETCH_ATTEMPTS = 3  # a dropped connection is resumed this often before giving up
RETRY_PAUSE_S = 5.0


class Unreachable(DatasetError):
    """The host could not be reached at all (DNS, refused, timeout): this machine is offline."""

    def __init__(self, message: str, host: str, reason: str) -> None:
        super().__init__(message)
        self.host, self.reason = host, reason


class _Interrupted(DatasetError):
    """The connection dropped mid-download; the `.part` file is kept and a new try resumes it."""


def fetch_resuming(url: str, dest: Path, session: requests.Session, progress: bool) -> Path:
    """`fetch`, resumed after a dropped connection up to FETCH_ATTEMPTS times (Box drops long
    downloads); raises what `fetch` raises once the attempts are used up."""
    attempt = 1
    while True:
        try:
            return fetch(url, dest, session, progress)
        except _Interrupted as error:
            if attempt >= FETCH_ATTEMPTS:
                raise
            say(f"{error} Resuming (try {attempt + 1} of {FETCH_ATTEMPTS}).", progress)
            time.sleep(RETRY_PAUSE_S * attempt)
            attempt += 1


def fetch(
    url: str, dest: Path, session: requests.Session | None = None, progress: bool = True
) -> Path:
    """Download `url` to `dest`, resuming an earlier partial download; a complete `dest` is kept.

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
            reason = short_reason(error)
            raise Unreachable(
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
    say(
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
            f"({short_reason(error)}); {part} was kept, re-run to resume from there."
        ) from None
    except OSError as error:
        raise_if_disk_full(error, part.parent)
        raise
