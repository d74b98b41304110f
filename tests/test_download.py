"""datasets.download on archives built here in NIH's and Kaggle's real layouts, served from a
loopback HTTP server that honours Range and can drop a connection; no test touches the internet.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import socket
import sys
import tarfile
import threading
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from PIL import Image

from chestxpert.datasets.download import (
    NIH_BOX_FOLDER,
    NIH_FILES,
    KaggleCredentials,
    NihFile,
    archives,
    download_nih_full,
    download_nih_sample,
    fetch,
    http,
    kaggle_credentials,
    unpack_kaggle_sample,
    unpack_nih_archive,
    verify_archive,
)
from chestxpert.datasets.download import nih_release as nih_release_module
from chestxpert.datasets.download.credentials import KAGGLE_CREDENTIAL_VARIABLES
from chestxpert.datasets.download.kaggle import KAGGLE_SAMPLE_PAGE
from chestxpert.datasets.nih import BBOX_FILE, LABEL_FILES, OFFICIAL_LISTS, read_nih
from chestxpert.datasets.schema import DatasetError

FAKE_KEY = "fake-kaggle-key-5f1c9e0b7a3d"
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
SAMPLE_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImageWidth,OriginalImageHeight,OriginalImagePixelSpacing_x,OriginalImagePixelSpacing_y"
)


# --------------------------------------------------------------------------- builders


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


def closed_port() -> int:
    """A loopback port that was free a moment ago and that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --------------------------------------------------------------------------- loopback server


@dataclass
class Served:
    body: bytes
    honour_range: bool = True
    drop_first_after: int | None = None  # the first response stops after this many bytes
    content_type: str = "application/gzip"
    dropped: bool = False


@dataclass
class LocalServer:
    port: int = 0
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def ranges(self, path: str) -> list[str | None]:
        return [range_ for seen, range_ in self.requests if seen == path]


def _handler(state: LocalServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append((self.path, self.headers.get("Range")))
            served = state.files.get(self.path)
            if served is None:
                self.send_error(404)
                return
            body, start = served.body, 0
            asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if asked and served.honour_range:
                start = int(asked.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", served.content_type)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            payload = body[start:]
            if served.drop_first_after is not None and not served.dropped:
                served.dropped = True
                payload = payload[: served.drop_first_after]  # then HTTP/1.0 closes the socket
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def server() -> Iterator[LocalServer]:
    state = LocalServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No real Kaggle credentials, home or .env reach a test; small chunks so drops land mid-file."""
    for name in list(os.environ):
        if name.startswith("KAGGLE_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(http, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(archives, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(http, "RETRY_PAUSE_S", 0.0)
    return home


# --------------------------------------------------------------------------- NIH archives


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


# --------------------------------------------------------------------------- fetch


def test_fetch_resumes_a_dropped_download_with_a_range_request(
    tmp_path: Path, server: LocalServer
) -> None:
    body = nih_tar(tmp_path / "source.tar.gz", image_names(1, 8))
    server.files["/images_001.gz"] = Served(body, drop_first_after=len(body) // 2)
    dest = tmp_path / "nih" / "images_001.tar.gz"
    dest.parent.mkdir()

    with pytest.raises(DatasetError, match=r"broke off .*re-run to resume") as caught:
        fetch(server.url("/images_001.gz"), dest, progress=False)
    part = dest.with_name("images_001.tar.gz.part")
    kept = part.stat().st_size
    assert 0 < kept < len(body)
    assert str(part) in str(caught.value)
    assert not dest.exists()

    assert fetch(server.url("/images_001.gz"), dest, progress=False) == dest

    assert dest.read_bytes() == body
    assert not part.exists()
    assert server.ranges("/images_001.gz") == [None, f"bytes={kept}-"]


@pytest.mark.parametrize(
    ("honour_range", "part_content"),
    [(True, "a correct prefix"), (False, "stale bytes")],
    ids=["server-resumes", "server-ignores-range"],
)
def test_fetch_continues_or_restarts_a_part_file(
    tmp_path: Path, server: LocalServer, honour_range: bool, part_content: str
) -> None:
    body = nih_tar(tmp_path / "source.tar.gz", image_names(1, 4))
    server.files["/a.gz"] = Served(body, honour_range=honour_range)
    dest = tmp_path / "images_002.tar.gz"
    prefix = body[:5000] if part_content == "a correct prefix" else b"stale" * 2000
    dest.with_name("images_002.tar.gz.part").write_bytes(prefix)

    fetch(server.url("/a.gz"), dest, progress=False)

    assert dest.read_bytes() == body
    assert server.ranges("/a.gz") == [f"bytes={len(prefix)}-"]


def test_fetch_finishes_a_complete_part_file_on_416(tmp_path: Path, server: LocalServer) -> None:
    body = nih_tar(tmp_path / "source.tar.gz", image_names(1, 2))
    server.files["/a.gz"] = Served(body)
    dest = tmp_path / "images_003.tar.gz"
    dest.with_name("images_003.tar.gz.part").write_bytes(body)

    fetch(server.url("/a.gz"), dest, progress=False)

    assert dest.read_bytes() == body
    assert server.ranges("/a.gz") == [f"bytes={len(body)}-"]


def test_fetch_does_not_download_a_completed_file_again(
    tmp_path: Path, server: LocalServer
) -> None:
    body = nih_tar(tmp_path / "source.tar.gz", image_names(1, 2))
    server.files["/a.gz"] = Served(body)
    dest = tmp_path / "images_004.tar.gz"

    fetch(server.url("/a.gz"), dest, progress=False)
    fetch(server.url("/a.gz"), dest, progress=False)

    assert len(server.requests) == 1
    assert dest.read_bytes() == body


@pytest.mark.parametrize(
    ("path", "content_type", "expected"),
    [("/missing.gz", "application/gzip", "HTTP 404"), ("/page.gz", "text/html", "web page")],
)
def test_fetch_reports_an_http_error_or_a_web_page(
    tmp_path: Path, server: LocalServer, path: str, content_type: str, expected: str
) -> None:
    server.files["/page.gz"] = Served(
        b"<html>Shared link removed</html>", content_type=content_type
    )
    dest = tmp_path / "images_005.tar.gz"
    with pytest.raises(DatasetError) as caught:
        fetch(server.url(path), dest, progress=False)
    message = str(caught.value)
    assert expected in message
    assert "images_005.tar.gz" in message and str(tmp_path) in message
    assert not dest.exists() and not dest.with_name("images_005.tar.gz.part").exists()


def test_fetch_offline_names_the_host_and_what_to_do(tmp_path: Path) -> None:
    dest = tmp_path / "images_006.tar.gz"
    with pytest.raises(DatasetError) as caught:
        fetch(f"http://127.0.0.1:{closed_port()}/a.gz", dest, progress=False)
    message = str(caught.value)
    assert message.startswith("could not reach 127.0.0.1: ")
    assert "refused" in message.lower()
    assert "internet access for `chestxpert data download`" in message
    assert "by hand from http://127.0.0.1:" in message and f"into {tmp_path} and re-run" in message
    assert not dest.exists()


# --------------------------------------------------------------------------- download_nih_full


@pytest.fixture
def nih_release(tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch):
    """Two NIH-style archives on the loopback server in place of NIH's twelve."""
    contents = {"images_001.tar.gz": image_names(1, 3), "images_002.tar.gz": image_names(200, 4)}
    entries = []
    for name, names in contents.items():
        body = nih_tar(tmp_path / f"source-{name}", names)
        server.files[f"/{name}"] = Served(body)
        entries.append(NihFile(name, server.url(f"/{name}"), md5_of(body)))
    entries += [NihFile(LABEL_FILES[0], None), NihFile(OFFICIAL_LISTS["test"], None)]
    monkeypatch.setattr(nih_release_module, "NIH_FILES", tuple(entries))
    return contents


def _expected_layout(contents: dict[str, list[str]]) -> set[str]:
    layout = {LABEL_FILES[0]}
    for archive, names in contents.items():
        folder = archive.removesuffix(".tar.gz")
        layout |= {folder, f"{folder}/images"} | {f"{folder}/images/{n}" for n in names}
    return layout


@pytest.mark.parametrize("keep_archives", [False, True])
def test_download_nih_full_downloads_resumes_and_unpacks(
    tmp_path: Path, server: LocalServer, nih_release: dict[str, list[str]], keep_archives: bool
) -> None:
    second = server.files["/images_002.tar.gz"]
    second.drop_first_after = len(second.body) // 3
    to = tmp_path / "nih"
    to.mkdir()
    all_names = [name for names in nih_release.values() for name in names]
    (to / LABEL_FILES[0]).write_text("\n".join([NIH_HEADER, *label_rows(all_names)]) + "\n")

    assert download_nih_full(to, keep_archives=keep_archives, progress=False) == to

    archives = set(nih_release) if keep_archives else set()
    assert tree(to) == _expected_layout(nih_release) | archives
    if keep_archives:
        assert (to / "images_002.tar.gz").read_bytes() == second.body
    assert server.ranges("/images_001.tar.gz") == [None]
    resumed = server.ranges("/images_002.tar.gz")
    assert len(resumed) == 2 and resumed[0] is None and resumed[1].startswith("bytes=")
    assert sorted(read_nih(to).images["image_id"]) == sorted(all_names)

    download_nih_full(to, keep_archives=keep_archives, progress=False)
    assert len(server.requests) == 3  # nothing is fetched again


def test_download_nih_full_uses_archives_placed_by_hand_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    to = tmp_path / "nih"
    to.mkdir()
    first, second = image_names(1, 2), image_names(50, 3)
    nih_tar(to / "images_001.tar.gz", first)
    nih_tar(to / "images_02.tar.gz", second)  # the name NIH's own script gives it
    (to / LABEL_FILES[0]).write_text("\n".join([NIH_HEADER, *label_rows(first + second)]) + "\n")
    offline = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(
        nih_release_module,
        "NIH_FILES",
        (
            NihFile("images_001.tar.gz", f"{offline}/1.gz"),
            NihFile("images_002.tar.gz", f"{offline}/2.gz"),
        ),
    )

    download_nih_full(to, progress=False)

    assert tree(to) == _expected_layout({"images_001.tar.gz": first, "images_002.tar.gz": second})


def test_download_nih_full_offline_lists_the_archives_to_fetch_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    to = tmp_path / "nih"
    to.mkdir()
    nih_tar(to / "images_001.tar.gz", image_names(1, 2))
    offline = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(
        nih_release_module,
        "NIH_FILES",
        tuple(NihFile(f"images_{n:03d}.tar.gz", f"{offline}/{n}.gz") for n in (1, 2, 3)),
    )

    with pytest.raises(DatasetError) as caught:
        download_nih_full(to, progress=False)

    message = str(caught.value)
    assert message.startswith("could not reach 127.0.0.1: ")
    assert "internet access for `chestxpert data download`" in message
    assert (
        f"(images_002.tar.gz, images_003.tar.gz) by hand from {NIH_BOX_FOLDER} into {to}" in message
    )
    assert "they will be checked and unpacked" in message
    assert (to / "images_001" / "images").is_dir()  # what could be done offline was done


@pytest.mark.parametrize("origin", ["downloaded", "placed by hand"])
def test_download_nih_full_reports_a_truncated_archive_by_name(
    tmp_path: Path, server: LocalServer, nih_release: dict[str, list[str]], origin: str
) -> None:
    to = tmp_path / "nih"
    to.mkdir()
    served = server.files["/images_002.tar.gz"]
    truncated = served.body[: len(served.body) - 100]
    if origin == "downloaded":
        served.body = truncated  # the server itself sends a cut file, with a matching length
    else:
        (to / "images_002.tar.gz").write_bytes(truncated)

    with pytest.raises(DatasetError) as caught:
        download_nih_full(to, progress=False)

    message = str(caught.value)
    assert "images_002.tar.gz" in message and "not a complete tar.gz" in message
    if origin == "downloaded":
        assert "was removed; re-run to download it again" in message
        assert not (to / "images_002.tar.gz").exists()
    else:
        assert "left in place" in message and "images_002.tar.gz.part" in message
        assert (to / "images_002.tar.gz").read_bytes() == truncated
    assert (to / "images_001" / "images").is_dir()
    assert not (to / "images_002").exists() and not (to / ".images_002.unpacking").exists()


def test_download_nih_full_without_label_file_says_where_to_get_it(
    tmp_path: Path, nih_release: dict[str, list[str]]
) -> None:
    to = tmp_path / "nih"
    with pytest.raises(DatasetError) as caught:
        download_nih_full(to, progress=False)
    message = str(caught.value)
    assert f"{LABEL_FILES[0]}" in message and NIH_BOX_FOLDER in message
    assert "no image is downloaded again" in message
    assert {"images_001", "images_002"} <= {path.name for path in to.iterdir()}


def test_nih_file_table_is_consistent_with_the_nih_reader() -> None:
    archives = [entry for entry in NIH_FILES if entry.name.endswith(".tar.gz")]
    assert [entry.name for entry in archives] == [f"images_{n:03d}.tar.gz" for n in range(1, 13)]
    for entry in archives:
        assert re.fullmatch(r"https://nihcc\.box\.com/shared/static/[0-9a-z]{32}\.gz", entry.url)
        assert re.fullmatch(r"[0-9a-f]{32}", entry.md5)
    assert len({entry.url for entry in archives}) == 12 and len({e.md5 for e in archives}) == 12
    by_hand = {entry.name for entry in NIH_FILES if entry.url is None}
    assert by_hand == {LABEL_FILES[0], BBOX_FILE, *OFFICIAL_LISTS.values()}


# --------------------------------------------------------------------------- Kaggle sample


@pytest.mark.parametrize(
    ("images_at", "labels_at"),
    [
        ("sample/images", "sample_labels.csv"),
        ("sample/sample/images", "sample/sample_labels.csv"),
        ("images", "sample_labels.csv"),
    ],
    ids=["kaggle", "nested-twice", "flat"],
)
@pytest.mark.parametrize("given", ["zip", "folder"])
def test_unpack_kaggle_sample_gives_the_sample_layout(
    tmp_path: Path, images_at: str, labels_at: str, given: str
) -> None:
    names = image_names(13, 5)
    archive = tmp_path / "sample.zip"
    kaggle_zip(archive, names, images_at, labels_at)
    source: Path = archive
    if given == "folder":
        source = tmp_path / "extracted"
        zipfile.ZipFile(archive).extractall(source)
    to = tmp_path / "sample"

    assert unpack_kaggle_sample(source, to) == to

    assert tree(to) == {"images", "sample_labels.csv"} | {f"images/{n}" for n in names}
    assert (to / "images" / names[0]).read_bytes() == png_bytes(13)
    assert sorted(read_nih(to).images["image_id"]) == names


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ({"sample/images/00000001_000.png": b"png"}, "holds no sample_labels.csv"),
        ({"sample_labels.csv": b"x", "sample/readme.txt": b"x"}, "no .png images"),
        ({"../sample_labels.csv": b"x"}, "'..'"),
        ({"/abs/sample_labels.csv": b"x"}, "absolute path"),
    ],
    ids=["no-labels", "no-images", "dotdot", "absolute"],
)
def test_unpack_kaggle_sample_names_what_is_wrong(
    tmp_path: Path, members: dict[str, bytes], expected: str
) -> None:
    archive = tmp_path / "sample.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    to = tmp_path / "data" / "sample"
    with pytest.raises(DatasetError) as caught:
        unpack_kaggle_sample(archive, to)
    assert "sample.zip" in str(caught.value) and expected in str(caught.value)
    assert tree(to) == set()
    assert not (tmp_path / "data" / "sample_labels.csv").exists()


def test_unpack_kaggle_sample_names_a_broken_zip(tmp_path: Path) -> None:
    archive = tmp_path / "sample.zip"
    kaggle_zip(archive, image_names(1, 2), "sample/images", "sample_labels.csv")
    archive.write_bytes(archive.read_bytes()[:-30])
    with pytest.raises(DatasetError, match=r"sample\.zip .*not a readable zip"):
        unpack_kaggle_sample(archive, tmp_path / "sample")


def install_fake_kaggle(
    monkeypatch: pytest.MonkeyPatch,
    zip_path: Path | None = None,
    error: BaseException | None = None,
) -> list[object]:
    """Stand in for the `kaggle` package: records what it saw and writes `zip_path` as sample.zip."""
    calls: list[object] = []

    class KaggleApi:
        def authenticate(self) -> None:
            calls.append({name: os.environ.get(name) for name in KAGGLE_CREDENTIAL_VARIABLES})

        def dataset_download_files(self, dataset: str, path: str, unzip: bool, quiet: bool) -> None:
            calls.append(dataset)
            if error is not None:
                raise error
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "sample.zip").write_bytes(zip_path.read_bytes())

    extended = types.ModuleType("kaggle.api.kaggle_api_extended")
    extended.KaggleApi = KaggleApi
    monkeypatch.setitem(sys.modules, "kaggle", types.ModuleType("kaggle"))
    monkeypatch.setitem(sys.modules, "kaggle.api", types.ModuleType("kaggle.api"))
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", extended)
    return calls


def test_download_nih_sample_through_the_kaggle_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = image_names(13, 4)
    source = tmp_path / "kaggle-sample.zip"
    kaggle_zip(source, names, "sample/images", "sample_labels.csv")
    calls = install_fake_kaggle(monkeypatch, source)
    env_file = tmp_path / "kaggle.env"
    env_file.write_text(f"KAGGLE_USERNAME=alice\nKAGGLE_KEY={FAKE_KEY}\n")
    monkeypatch.setenv("KAGGLE_API_TOKEN", "another-token")  # must not reach the client
    to = tmp_path / "sample"

    assert download_nih_sample(to, env_file) == to

    assert calls == [
        {"KAGGLE_USERNAME": "alice", "KAGGLE_KEY": FAKE_KEY, "KAGGLE_API_TOKEN": None},
        "nih-chest-xrays/sample",
    ]
    # The env file's values were lent to the client only; the environment is as it was.
    assert "KAGGLE_KEY" not in os.environ and os.environ["KAGGLE_API_TOKEN"] == "another-token"
    assert tree(to) == {"images", "sample_labels.csv"} | {f"images/{n}" for n in names}

    download_nih_sample(to, env_file)
    assert len(calls) == 2  # the complete layout is not downloaded again


def test_download_nih_sample_uses_a_zip_placed_by_hand_without_kaggle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "kaggle", None)
    to = tmp_path / "sample"
    to.mkdir()
    names = image_names(20, 3)
    kaggle_zip(to / "sample.zip", names, "sample/images", "sample_labels.csv")

    download_nih_sample(to)

    assert tree(to) == {"images", "sample_labels.csv", "sample.zip"} | {
        f"images/{n}" for n in names
    }


def test_download_nih_sample_without_the_kaggle_package_says_pip_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "kaggle", None)  # makes `import kaggle…` fail
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", FAKE_KEY)
    with pytest.raises(DatasetError) as caught:
        download_nih_sample(tmp_path / "sample")
    assert "`pip install kaggle`" in str(caught.value)
    assert FAKE_KEY not in str(caught.value)
    assert os.environ["KAGGLE_KEY"] == FAKE_KEY  # the environment is restored as it was


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(
        f"{status} for url https://www.kaggle.com/api/v1?key={FAKE_KEY}", response=response
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            requests.ConnectionError(
                f"key={FAKE_KEY} [Errno -3] Temporary failure in name resolution"
            ),
            "could not reach www.kaggle.com: [Errno -3] Temporary failure in name resolution",
        ),
        (
            requests.ConnectTimeout(f"timed out with key {FAKE_KEY}"),
            "could not reach www.kaggle.com: timed out",
        ),
        (
            requests.ConnectionError(f"proxy refused login {FAKE_KEY}"),
            "could not reach www.kaggle.com: proxy refused login ***",
        ),
        (_http_error(401), "Kaggle rejected the Kaggle credentials of user alice"),
        (_http_error(404), "HTTP 404"),
        (SystemExit(1), "did not accept"),
    ],
    ids=["dns", "timeout", "proxy", "401", "404", "client-exits"],
)
def test_kaggle_client_failures_are_explained_without_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    expected: str,
) -> None:
    install_fake_kaggle(monkeypatch, error=error)
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", FAKE_KEY)
    to = tmp_path / "sample"
    with pytest.raises(DatasetError) as caught:
        download_nih_sample(to)
    message = str(caught.value)
    assert expected in message
    captured = capsys.readouterr()
    assert FAKE_KEY not in message + repr(caught.value.args) + captured.out + captured.err
    if "reach" in expected:
        assert (
            "internet access" in message and "sample.zip by hand" in message and str(to) in message
        )


# --------------------------------------------------------------------------- credentials


def _write_json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize(
    "place",
    [
        "environment",
        "api-token-variable",
        "env-file-given",
        "dotenv-in-cwd",
        "home-kaggle-json",
        "config-dir-kaggle-json",
        "xdg-kaggle-json",
        "access-token-file",
    ],
)
def test_kaggle_credentials_says_which_source_it_used(
    tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch, place: str
) -> None:
    home, env_file = isolated, None
    legacy = {"KAGGLE_USERNAME": "alice", "KAGGLE_KEY": FAKE_KEY}
    token = {"KAGGLE_API_TOKEN": FAKE_KEY}
    if place == "environment":
        monkeypatch.setenv("KAGGLE_USERNAME", "alice")
        monkeypatch.setenv("KAGGLE_KEY", FAKE_KEY)
        source, expected = "environment variables KAGGLE_USERNAME/KAGGLE_KEY", legacy
    elif place == "api-token-variable":
        monkeypatch.setenv("KAGGLE_API_TOKEN", FAKE_KEY)
        source, expected = "environment variable KAGGLE_API_TOKEN", token
    elif place == "env-file-given":
        env_file = tmp_path / "secrets" / "kaggle.env"
        env_file.parent.mkdir()
        env_file.write_text(f"KAGGLE_USERNAME=alice\nKAGGLE_KEY={FAKE_KEY}\n")
        source, expected = str(env_file), legacy
    elif place == "dotenv-in-cwd":
        Path(".env").write_text(f"KAGGLE_API_TOKEN={FAKE_KEY}\n")
        source, expected = str(Path.cwd() / ".env"), token
    elif place == "home-kaggle-json":
        _write_json(home / ".kaggle" / "kaggle.json", {"username": "alice", "key": FAKE_KEY})
        source, expected = str(home / ".kaggle" / "kaggle.json"), legacy
    elif place == "config-dir-kaggle-json":
        monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "conf"))
        _write_json(tmp_path / "conf" / "kaggle.json", {"username": "alice", "key": FAKE_KEY})
        source, expected = str(tmp_path / "conf" / "kaggle.json"), legacy
    elif place == "xdg-kaggle-json":
        _write_json(
            home / ".config" / "kaggle" / "kaggle.json", {"username": "alice", "key": FAKE_KEY}
        )
        source, expected = str(home / ".config" / "kaggle" / "kaggle.json"), legacy
    else:
        (home / ".kaggle").mkdir()
        (home / ".kaggle" / "access_token").write_text(FAKE_KEY + "\n")
        source, expected = str(home / ".kaggle" / "access_token"), token

    found = kaggle_credentials(env_file)

    assert found.source == source
    assert found.environment == expected
    assert found.username == ("alice" if "KAGGLE_KEY" in expected else None)
    assert FAKE_KEY not in repr(found) + str(found)


def test_kaggle_credentials_precedence(
    tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_json(isolated / ".kaggle" / "kaggle.json", {"username": "json-user", "key": "k1"})
    Path(".env").write_text("KAGGLE_USERNAME=dotenv-user\nKAGGLE_KEY=k2\n")
    assert kaggle_credentials().username == "dotenv-user"
    monkeypatch.setenv("KAGGLE_USERNAME", "env-user")
    monkeypatch.setenv("KAGGLE_KEY", "k3")
    assert kaggle_credentials().username == "env-user"
    given = tmp_path / "given.env"
    given.write_text("KAGGLE_USERNAME=given-user\nKAGGLE_KEY=k4\n")
    assert kaggle_credentials(given).username == "given-user"


@pytest.mark.parametrize(
    "text",
    [
        "KAGGLE_USERNAME=alice\nKAGGLE_KEY=abc123\n",
        "export KAGGLE_USERNAME=alice\nexport KAGGLE_KEY='abc123'\n",
        '# Kaggle\n\nKAGGLE_USERNAME = "alice"\nKAGGLE_KEY=abc123  # from kaggle.com\nOTHER=1\nnot a line\n',
        "\ufeffKAGGLE_USERNAME=alice\r\nKAGGLE_KEY=abc123\r\n",
    ],
    ids=["plain", "export-and-quotes", "comments-and-spaces", "bom-and-crlf"],
)
def test_dotenv_lines_are_parsed(text: str) -> None:
    Path(".env").write_text(text, encoding="utf-8")
    found = kaggle_credentials()
    assert found.environment == {"KAGGLE_USERNAME": "alice", "KAGGLE_KEY": "abc123"}


@pytest.mark.parametrize(
    ("setup", "missing"),
    [
        ({}, "neither KAGGLE_USERNAME/KAGGLE_KEY nor KAGGLE_API_TOKEN is set"),
        ({"KAGGLE_USERNAME": "alice"}, "KAGGLE_USERNAME is set but KAGGLE_KEY is missing"),
        ({"KAGGLE_KEY": FAKE_KEY}, "KAGGLE_KEY is set but KAGGLE_USERNAME is missing"),
    ],
    ids=["nothing", "username-only", "key-only"],
)
def test_missing_credentials_say_what_is_missing_and_the_three_ways(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, setup: dict[str, str], missing: str
) -> None:
    for name, value in setup.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DatasetError) as caught:
        kaggle_credentials()
    message = str(caught.value)
    assert f"environment variables KAGGLE_USERNAME/KAGGLE_KEY: {missing}" in message
    assert f"{Path.cwd() / '.env'}: not found" in message
    assert f"{isolated / '.kaggle' / 'kaggle.json'}: not found" in message
    assert "(1) set the environment variables KAGGLE_USERNAME and KAGGLE_KEY" in message
    assert "(2) save the kaggle.json" in message and "~/.kaggle/kaggle.json" in message
    assert "(3) write KAGGLE_USERNAME=… and KAGGLE_KEY=… lines into a .env file" in message
    assert FAKE_KEY not in message


def test_missing_credentials_in_download_also_offer_the_manual_route(tmp_path: Path) -> None:
    to = tmp_path / "sample"
    with pytest.raises(DatasetError) as caught:
        download_nih_sample(to)
    message = str(caught.value)
    assert "no Kaggle credentials found" in message
    assert f"download sample.zip by hand from {KAGGLE_SAMPLE_PAGE} into {to}" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [("{not json", "is not valid JSON"), ('{"username": "alice"}', "KAGGLE_KEY is missing")],
    ids=["broken-json", "no-key"],
)
def test_bad_kaggle_json_is_named(isolated: Path, content: str, expected: str) -> None:
    config = isolated / ".kaggle" / "kaggle.json"
    config.parent.mkdir()
    config.write_text(content)
    with pytest.raises(DatasetError) as caught:
        kaggle_credentials()
    assert str(config) in str(caught.value) and expected in str(caught.value)


def test_a_given_env_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"the env file .*nowhere\.env does not exist"):
        kaggle_credentials(tmp_path / "nowhere.env")


def test_credentials_repr_hides_the_key() -> None:
    found = KaggleCredentials(
        "somewhere", "alice", {"KAGGLE_USERNAME": "alice", "KAGGLE_KEY": FAKE_KEY}
    )
    assert FAKE_KEY not in repr(found) and FAKE_KEY not in str(found)
    assert "alice" in str(found) and "somewhere" in str(found)
