"""Kaggle credentials (datasets.download.credentials): every place they are looked for, in which
order, what a message says when they are missing or broken, and that the key is never shown.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chestxpert.datasets.download import KaggleCredentials, download_nih_sample, kaggle_credentials
from chestxpert.datasets.download.kaggle import KAGGLE_SAMPLE_PAGE
from chestxpert.datasets.schema import DatasetError
from tests.download_helpers import FAKE_KEY, isolate


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test here runs without the real home, Kaggle credentials or .env (see isolate)."""
    return isolate(monkeypatch, tmp_path)


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
        '# Kaggle\n\nKAGGLE_USERNAME = "alice"\nKAGGLE_KEY=abc123  # from kaggle.com\n'
        "OTHER=1\nnot a line\n",
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
