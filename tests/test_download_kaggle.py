"""The Kaggle NIH sample (datasets.download.kaggle): unpacking Kaggle's zip in its real layouts,
and downloading through a stand-in for the Kaggle client that never sees the network.
"""

from __future__ import annotations

import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
import requests

from chestxpert.datasets.download import download_nih_sample, unpack_kaggle_sample
from chestxpert.datasets.download.credentials import KAGGLE_CREDENTIAL_VARIABLES
from chestxpert.datasets.nih import read_nih
from chestxpert.datasets.schema import DatasetError
from tests.download_helpers import FAKE_KEY, image_names, isolate, kaggle_zip, png_bytes, tree


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test here runs without the real home, Kaggle credentials or .env (see isolate)."""
    return isolate(monkeypatch, tmp_path)


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
    """Stand in for the `kaggle` package: record what it saw, write `zip_path` as sample.zip."""
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
