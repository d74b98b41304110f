"""`pull-best --final [--version N] [--no-verify]` over the versioned final layout: the pointer
picks the champion, every file is checked against the version's SHA256SUMS, an unsealed version
or a retrain's staging is never served, and a legacy `final/model` is served until a pointer
exists.
The layout is written by hand here (as `sha256sum` would), so these tests pin the format too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

from chestxpert.cluster.endpoints import resolve
from chestxpert.results import versions
from chestxpert.results.download import ChecksumError, PullError
from chestxpert.results.pull import pull_final
from chestxpert.sweeps.layout import SPEC_FILE, SUMMARY_FILE, locate
from chestxpert.trainable.checkpoint import MODEL_FILE, STATE_FILE

SWEEP = "pneumo"
SIZE = 64


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two densenet_tiny final models with different weights, as `chestxpert final` writes them."""
    import keras

    from chestxpert.datasets.schema import NIH_LABELS
    from chestxpert.trainable.backbones import build_model
    from chestxpert.trainable.checkpoint import write_checkpoint

    folders = []
    for seed in (0, 1):
        keras.utils.set_random_seed(seed)
        model = build_model("densenet_tiny", SIZE, len(NIH_LABELS))
        state = {
            "epoch": 1,
            "labels": list(NIH_LABELS),
            "metrics": {"val_auc_macro": 0.6 + seed / 10},
            "preprocessing": {"image_size": SIZE, "channels": 1, "dtype": "uint8"},
            "thresholds": {label: 0.5 for label in NIH_LABELS},
        }
        folder = tmp_path_factory.mktemp(f"model{seed}") / "model"
        folders.append(write_checkpoint(model, state, folder))
    return folders[0], folders[1]


def sweep_folder(storage: Path) -> Path:
    """A finished sweep's record and summary, nothing final yet."""
    sweep = storage / SWEEP
    sweep.mkdir(parents=True)
    (sweep / SPEC_FILE).write_text(json.dumps({"raw": {"name": SWEEP}}))
    (sweep / SUMMARY_FILE).write_text(json.dumps({"name": SWEEP, "best_checkpoint": None}))
    return sweep


def add_version(sweep: Path, number: int, model: Path, sealed: bool = True) -> Path:
    """`final/versions/<number>/` with the model, a report and, if `sealed`, SHA256SUMS."""
    folder = sweep / "final" / "versions" / str(number)
    shutil.copytree(model, folder / "model")
    (folder / "report").mkdir()
    (folder / "report" / "metrics.json").write_text("{}")
    (folder / "version.json").write_text(json.dumps({"version": number}))
    if sealed:
        lines = [
            f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(folder)}\n"
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ]
        (folder / "SHA256SUMS").write_text("".join(lines))
    return folder


def point_at(sweep: Path, number: int, value: float = 0.7) -> None:
    pointer = {"version": number, "metric": "val_auc_macro", "mode": "max", "value": value}
    (sweep / "final" / "current.json").write_text(json.dumps(pointer))


def endpoints_for(tmp_path: Path):
    return resolve(workspace=tmp_path / "ws", storage=str(tmp_path / "storage"), environ={})


def pull(tmp_path: Path, version: int | None = None, verify: bool = True) -> tuple[Path, str]:
    return pull_final(
        SWEEP, tmp_path / "out", endpoints_for(tmp_path), version, verify, progress=False
    )


def test_the_pointer_picks_the_champion_and_version_n_fetches_any_sealed_one(
    two_models, tmp_path
) -> None:
    champion, kept = two_models
    sweep = sweep_folder(tmp_path / "storage")
    add_version(sweep, 1, champion)
    add_version(sweep, 2, kept)  # published, not promoted: the pointer stays on 1
    point_at(sweep, 1)

    folder, what = pull(tmp_path)
    assert folder == tmp_path / "out" / "model" and what.startswith("version 1, the champion")
    assert (folder / MODEL_FILE).read_bytes() == (champion / MODEL_FILE).read_bytes()
    folder, what = pull(tmp_path, version=2)
    assert what == "version 2"
    assert (folder / MODEL_FILE).read_bytes() == (kept / MODEL_FILE).read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in kept.iterdir())

    with pytest.raises(PullError, match=r"no final version 7 .*\(published versions: 1, 2\)"):
        pull(tmp_path, version=7)


def test_an_unsealed_version_is_refused_unless_no_verify(two_models, tmp_path) -> None:
    champion, partial = two_models
    sweep = sweep_folder(tmp_path / "storage")
    add_version(sweep, 1, champion)
    point_at(sweep, 1)
    add_version(sweep, 2, partial, sealed=False)  # a publish that died before SHA256SUMS

    with pytest.raises(PullError, match=r"version 2 .* has no SHA256SUMS .*`--no-verify`"):
        pull(tmp_path, version=2)
    assert not (tmp_path / "out").exists(), "nothing is fetched from an unsealed version"
    folder, _ = pull(tmp_path, version=2, verify=False)
    assert (folder / MODEL_FILE).read_bytes() == (partial / MODEL_FILE).read_bytes()
    assert versions.published_versions(locate(endpoints_for(tmp_path), SWEEP)) == [1]
    assert versions.next_version(locate(endpoints_for(tmp_path), SWEEP)) == 3, "never reused"


@pytest.mark.parametrize(
    "damage, expected",
    [
        (
            lambda model: (model / STATE_FILE).write_text('{"labels": []}'),
            r"state.json from .*/versions/1/model is corrupted: its SHA-256 is \w+ but "
            r"SHA256SUMS says \w+",
        ),
        (
            lambda model: (model / "extra.bin").write_bytes(b"x"),
            r"does not match its SHA256SUMS \(not listed: extra.bin\)",
        ),
        (
            lambda model: (model / f"{MODEL_FILE}.sha256").unlink(),
            r"does not match its SHA256SUMS \(missing model.keras.sha256\)",
        ),
    ],
    ids=["changed", "added", "removed"],
)
def test_a_version_changed_after_publishing_is_refused(
    two_models, tmp_path, damage, expected
) -> None:
    sweep = sweep_folder(tmp_path / "storage")
    damage(add_version(sweep, 1, two_models[0]) / "model")
    point_at(sweep, 1)
    with pytest.raises(ChecksumError, match=expected):
        pull(tmp_path)
    assert not (tmp_path / "out").exists()


def test_no_final_model_is_said_and_staging_is_never_served(two_models, tmp_path) -> None:
    sweep = sweep_folder(tmp_path / "storage")
    # A retrain killed after uploading a whole epoch: a loadable model, but never evaluated.
    shutil.copytree(
        two_models[0], sweep / "final" / "staging" / "20260101T000000Z-abc123" / "model"
    )
    with pytest.raises(
        PullError,
        match=r"no final model yet \(no .*/pneumo/final/current.json\); "
        r"run `chestxpert final pneumo` first",
    ):
        pull(tmp_path)
    add_version(sweep, 1, two_models[0])  # published, but MLflow failed before the pointer
    with pytest.raises(
        PullError, match=r"version\(s\) 1 are published .* `chestxpert final pneumo --finish`"
    ):
        pull(tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_legacy_final_model_is_served_until_a_pointer_exists(two_models, tmp_path) -> None:
    legacy, new = two_models
    sweep = sweep_folder(tmp_path / "storage")
    shutil.copytree(legacy, sweep / "final" / "model")  # as releases before versions left it
    folder, what = pull(tmp_path)
    assert "legacy final model (final/model/" in what
    assert (folder / MODEL_FILE).read_bytes() == (legacy / MODEL_FILE).read_bytes()
    location = locate(endpoints_for(tmp_path), SWEEP)
    assert versions.champion_metric(location, "val_auc_macro") == ("the legacy final/model", 0.6)

    add_version(sweep, 1, new)
    point_at(sweep, 1, value=0.7)
    folder, what = pull(tmp_path)
    assert what.startswith("version 1, the champion")
    assert (folder / MODEL_FILE).read_bytes() == (new / MODEL_FILE).read_bytes()
    assert (sweep / "final" / "model" / MODEL_FILE).read_bytes() == (
        legacy / MODEL_FILE
    ).read_bytes(), "the legacy model is left as it was"
    assert versions.champion_metric(location, "val_auc_macro") == ("version 1", 0.7)


@pytest.mark.services
def test_publish_seal_point_and_pull_on_the_s3_endpoint(
    two_models, tmp_path, s3_endpoint, s3_client, monkeypatch
) -> None:
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    prefix = f"versions-{uuid.uuid4().hex[:8]}"
    endpoints = resolve(workspace=tmp_path / "ws", storage=f"s3://{s3_endpoint.bucket}/{prefix}")
    location = locate(endpoints, SWEEP)
    local = tmp_path / "version"
    shutil.copytree(two_models[1], local / "model")
    (local / "version.json").write_text(json.dumps({"version": 1}))

    sums = versions.publish_version(location, 1, local)
    versions.write_pointer(location, {"version": 1, "metric": "val_auc_macro", "value": 0.7})
    location.write_json(SPEC_FILE, {"raw": {"name": SWEEP}})

    keys = {
        item["Key"][len(f"{prefix}/{SWEEP}/") :]
        for item in s3_client.list_objects_v2(Bucket=s3_endpoint.bucket, Prefix=prefix)["Contents"]
    }
    assert "final/current.json" in keys and "final/versions/1/SHA256SUMS" in keys
    assert not [key for key in keys if "partial" in key], "no temporary key is left in S3"
    body = s3_client.get_object(
        Bucket=s3_endpoint.bucket, Key=f"{prefix}/{SWEEP}/final/versions/1/SHA256SUMS"
    )["Body"].read()
    assert body.decode() == "".join(f"{digest}  {rel}\n" for rel, digest in sorted(sums.items()))
    assert set(sums) == {"model/model.keras", "model/model.keras.sha256", "model/state.json"} | {
        "version.json"
    }
    with pytest.raises(FileExistsError, match="versions are never reused"):
        versions.publish_version(location, 1, local)

    folder, what = pull_final(SWEEP, tmp_path / "out", endpoints, progress=False)
    assert what.startswith("version 1, the champion")
    assert (folder / MODEL_FILE).read_bytes() == (two_models[1] / MODEL_FILE).read_bytes()
