"""Resumable downloads (datasets.download.http) and the full NIH release (nih_release) against
a loopback HTTP server that honours Range and can drop a connection; no test touches the
internet.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chestxpert.datasets.download import (
    NIH_BOX_FOLDER,
    NIH_FILES,
    NihFile,
    download_nih_full,
    fetch,
)
from chestxpert.datasets.download import nih_release as nih_release_module
from chestxpert.datasets.nih import BBOX_FILE, LABEL_FILES, OFFICIAL_LISTS, read_nih
from chestxpert.datasets.schema import DatasetError
from tests.download_helpers import (
    NIH_HEADER,
    image_names,
    isolate,
    label_rows,
    md5_of,
    nih_tar,
    tree,
)


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
    """Every test here runs without the real home, Kaggle credentials or .env (see isolate)."""
    return isolate(monkeypatch, tmp_path)


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
