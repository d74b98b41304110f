"""Kaggle credentials: found in the places the Kaggle client looks (and a .env file), said where
they came from, lent to the client through the environment only, and never shown.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from chestxpert.datasets.schema import DatasetError

# The variables the Kaggle client reads its credentials from; only these are ever set or cleared.
KAGGLE_CREDENTIAL_VARIABLES: tuple[str, ...] = (
    "KAGGLE_USERNAME",
    "KAGGLE_KEY",
    "KAGGLE_API_TOKEN",
)


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
def kaggle_environment(credentials: KaggleCredentials) -> Iterator[None]:
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


def scrub(text: str, credentials: KaggleCredentials) -> str:
    """Third-party error text goes through here, so a key it might echo is never shown."""
    for secret in (
        credentials.environment.get("KAGGLE_KEY"),
        credentials.environment.get("KAGGLE_API_TOKEN"),
    ):
        if secret:
            text = text.replace(secret, "***")
    return text
