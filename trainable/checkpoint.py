"""Trial checkpoints: a folder with the Keras model (weights + optimiser state) and a JSON state.

The state carries what is needed to resume (epoch, schedule state, history) and
to rebuild the exact preprocessing at inference (labels, image size, encoding).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"
# A final model also carries its calibrator (plain JSON, written and read by results.calibrate).
CALIBRATOR_FILE = "calibrator.json"
# Keras zips hold config.json, metadata.json and model.weights.h5 (plus assets/);
# anything else, a pickle above all, was not written by us.
ALLOWED_ARCHIVE_MEMBERS = ("config.json", "metadata.json", "model.weights.h5")


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete or holds something we did not write."""


def write_checkpoint(model, state: dict[str, Any], directory: Path | None = None) -> Path:
    """Save `model` and `state` into a new folder (a temp dir unless given) and return it."""
    directory = Path(directory or tempfile.mkdtemp(prefix="cx-ckpt-"))
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    # A checksum beside the model lets pull-best prove a download is whole.
    (directory / f"{MODEL_FILE}.sha256").write_text(file_sha256(directory / MODEL_FILE) + "\n")
    partial = directory / f".{STATE_FILE}.partial"
    partial.write_text(json.dumps(state, indent=2, sort_keys=True, default=float))
    os.replace(partial, directory / STATE_FILE)
    return directory


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state(directory: Path) -> dict[str, Any]:
    """The JSON state of a checkpoint folder."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise CheckpointError(f"{directory} has no {STATE_FILE}; it is not a ChestXpert checkpoint")
    return json.loads(path.read_text())


def check_checkpoint_files(directory: Path) -> None:
    """Refuse a checkpoint that holds files we never write (pickles, code) before Keras opens it."""
    directory = Path(directory)
    for path in directory.rglob("*"):
        if (
            path.is_file()
            and path.name not in (MODEL_FILE, STATE_FILE, CALIBRATOR_FILE)
            and not path.name.endswith(".sha256")
        ):
            raise CheckpointError(
                f"{directory} holds an unexpected file {path.relative_to(directory)}; "
                "ChestXpert checkpoints contain only model.keras, state.json and a final "
                "model's calibrator.json "
                "— refusing to load it"
            )
    model_path = directory / MODEL_FILE
    if not model_path.exists():
        raise CheckpointError(f"{directory} has no {MODEL_FILE}; it is not a ChestXpert checkpoint")
    with zipfile.ZipFile(model_path) as archive:
        for name in archive.namelist():
            if name not in ALLOWED_ARCHIVE_MEMBERS and not name.startswith("assets/"):
                raise CheckpointError(
                    f"{model_path} contains {name!r}, which Keras model files never hold; "
                    "refusing to load it"
                )


def load_model(directory: Path, compile: bool = True):
    """Load a checkpoint's model with Keras safe mode (no Lambda layers, no arbitrary code)."""
    import keras

    import chestxpert.trainable.losses  # noqa: F401  (registers the loss so a compiled model loads)

    check_checkpoint_files(directory)
    try:
        return keras.models.load_model(
            Path(directory) / MODEL_FILE, compile=compile, safe_mode=True
        )
    except ValueError as err:
        if "safe_mode" in str(err) or "Lambda" in str(err):
            raise CheckpointError(
                f"{directory}: the model holds a Lambda layer or custom code; "
                f"refusing to load it ({err})"
            ) from None
        raise


def copy_checkpoint(source: Path, destination: Path) -> Path:
    """Copy a checkpoint folder so the destination appears whole or not at all."""
    destination = Path(destination)
    partial = destination.parent / f".{destination.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(partial, destination)
    return destination
