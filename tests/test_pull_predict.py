"""pull-best and predict: a checkpoint laid out as a finished sweep (local folder and S3 endpoint)
comes back whole and checksum-verified, and predicts on real NIH fixture images (gray, RGBA,
16-bit, JPEG) with the training preprocessing, the right thresholds and Grad-CAM overlays;
`models:/NAME@champion` resolves through a real MLflow server."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxpert.cluster.endpoints import resolve
from chestxpert.datasets.images import load_gray_square
from chestxpert.datasets.schema import NIH_LABELS
from chestxpert.results.calibrate import Calibrator
from chestxpert.results.download import ChecksumError, PullError
from chestxpert.results.gradcam import MIN_OVERLAY_SIDE
from chestxpert.results.predict import (
    CALIBRATED,
    DEFAULT_THRESHOLD_SOURCE,
    FINAL_THRESHOLD_SOURCE,
    NO_CALIBRATOR,
    UNCALIBRATED,
    PredictError,
    format_predictions,
    predict,
)
from chestxpert.results.pull import load_lines, pull_best, resolve_model
from chestxpert.sweeps.layout import SPEC_FILE, SUMMARY_FILE
from chestxpert.trainable.checkpoint import MODEL_FILE, STATE_FILE, file_sha256

REPO = Path(__file__).resolve().parent.parent
NIH_IMAGES = REPO / "tests" / "fixtures" / "nih_full" / "images_001" / "images"
SIZE = 64
SWEEP = "pneumo"
TRIAL = "train_ab12c_00001"
CHECKPOINT = "checkpoint_000002"
# Even labels always positive, odd never: a final model's thresholds are visibly the ones used.
FINAL_THRESHOLDS = {label: 0.0 if i % 2 == 0 else 1.0 for i, label in enumerate(NIH_LABELS)}


@pytest.fixture(scope="module")
def trial_checkpoint(tmp_path_factory) -> Path:
    """A densenet_tiny trial checkpoint as training writes it (model, state, checksum)."""
    import keras

    from chestxpert.trainable.backbones import build_model
    from chestxpert.trainable.checkpoint import write_checkpoint

    keras.utils.set_random_seed(0)
    model = build_model("densenet_tiny", SIZE, len(NIH_LABELS))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    state = {
        "epoch": 2,
        "labels": list(NIH_LABELS),
        "metrics": {"val_auc_macro": 0.61},
        "preprocessing": {"image_size": SIZE, "channels": 1, "dtype": "uint8"},
        "config": {"backbone": "densenet_tiny", "image_size": SIZE},
    }
    folder = write_checkpoint(model, state, tmp_path_factory.mktemp("trial") / CHECKPOINT)
    assert (folder / f"{MODEL_FILE}.sha256").read_text().strip() == file_sha256(folder / MODEL_FILE)
    return folder


@pytest.fixture(scope="module")
def final_model(trial_checkpoint: Path, tmp_path_factory) -> Path:
    """The same weights as a final model: state.json with validation thresholds."""
    folder = tmp_path_factory.mktemp("final") / "model"
    shutil.copytree(trial_checkpoint, folder)
    state = json.loads((folder / STATE_FILE).read_text())
    state["thresholds"] = FINAL_THRESHOLDS
    (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory) -> list[Path]:
    """Real NIH images: 8-bit gray and RGBA PNGs, a 16-bit PNG and an RGB JPEG made from them."""
    gray_png, rgba_png = NIH_IMAGES / "00000129_000.png", NIH_IMAGES / "00001369_000.png"
    assert Image.open(rgba_png).mode == "RGBA"
    folder = tmp_path_factory.mktemp("images")
    pixels = np.asarray(Image.open(gray_png), dtype=np.uint16)
    sixteen = folder / "sixteen_bit.png"
    Image.fromarray(pixels * 64 + 100).save(sixteen)  # 14-bit range inside 16 bits
    assert Image.open(sixteen).mode == "I;16"
    jpeg = folder / "colour.jpg"
    Image.open(gray_png).convert("RGB").save(jpeg, quality=95)
    return [gray_png, rgba_png, sixteen, jpeg]


def lay_out_sweep(
    storage: Path, checkpoint: Path, final: Path | None, best: str | None = None
) -> Path:
    """`<storage>/pneumo/` as a finished sweep: spec, summary, the best checkpoint, final model."""
    sweep = storage / SWEEP
    best_folder = sweep / TRIAL / CHECKPOINT
    shutil.copytree(checkpoint, best_folder)
    (sweep / SPEC_FILE).write_text(json.dumps({"spec": {}, "raw": {"name": SWEEP}}))
    summary = {
        "name": SWEEP,
        "metric": "val_auc_macro",
        "mode": "max",
        "trials": 2,
        "errors": 0,
        "best_trial_id": TRIAL,
        "best_checkpoint": best or str(best_folder),
    }
    (sweep / SUMMARY_FILE).write_text(json.dumps(summary))
    if final is not None:
        shutil.copytree(final, sweep / "final" / "model")
    return sweep


def local_endpoints(tmp_path: Path):
    return resolve(workspace=tmp_path / "ws", storage=str(tmp_path / "storage"), environ={})


def assert_same_files(pulled: Path, source: Path) -> None:
    names = sorted(p.name for p in source.iterdir())
    assert sorted(p.name for p in pulled.iterdir()) == names
    assert names == [MODEL_FILE, f"{MODEL_FILE}.sha256", STATE_FILE]
    for name in names:
        assert (pulled / name).read_bytes() == (source / name).read_bytes(), name


def test_pull_best_from_a_local_storage_and_load_it(
    trial_checkpoint, final_model, tmp_path
) -> None:
    lay_out_sweep(tmp_path / "storage", trial_checkpoint, final_model)
    endpoints = local_endpoints(tmp_path)

    pulled = pull_best(SWEEP, tmp_path / "out", endpoints=endpoints, progress=False)
    assert pulled == tmp_path / "out" / CHECKPOINT
    assert_same_files(pulled, trial_checkpoint)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [CHECKPOINT], "no partial folder left"

    final = pull_best(SWEEP, tmp_path / "out", final=True, endpoints=endpoints, progress=False)
    assert final == tmp_path / "out" / "model"
    assert json.loads((final / STATE_FILE).read_text())["thresholds"] == FINAL_THRESHOLDS
    # Pulling again replaces the folder whole.
    (final / "stale.txt").write_text("from an older pull")
    assert (
        pull_best(SWEEP, tmp_path / "out", final=True, endpoints=endpoints, progress=False) == final
    )
    assert_same_files(final, final_model)

    lines = load_lines(pulled)
    assert lines.splitlines() == [
        "from chestxpert.trainable.checkpoint import load_model",
        f'model = load_model("{pulled}", compile=False)',
    ]
    namespace: dict = {}
    exec(lines, namespace)
    assert tuple(namespace["model"].outputs[0].shape) == (None, len(NIH_LABELS))


def test_pull_best_follows_a_storage_that_was_moved(trial_checkpoint, tmp_path) -> None:
    # The summary was written on another machine whose storage lived at /mnt/storage.
    lay_out_sweep(
        tmp_path / "storage",
        trial_checkpoint,
        None,
        best=f"/mnt/storage/{SWEEP}/{TRIAL}/{CHECKPOINT}",
    )
    pulled = pull_best(SWEEP, tmp_path / "out", endpoints=local_endpoints(tmp_path), progress=False)
    assert_same_files(pulled, trial_checkpoint)


@pytest.mark.parametrize("to_exists", [False, True])
def test_corrupted_model_is_refused_and_nothing_is_left(
    trial_checkpoint, tmp_path, to_exists
) -> None:
    sweep = lay_out_sweep(tmp_path / "storage", trial_checkpoint, None)
    stored = sweep / TRIAL / CHECKPOINT / MODEL_FILE
    with stored.open("ab") as handle:
        handle.write(b"flipped on the way")
    expected, actual = file_sha256(trial_checkpoint / MODEL_FILE), file_sha256(stored)
    to = tmp_path / "out"
    if to_exists:
        to.mkdir()
    with pytest.raises(ChecksumError) as caught:
        pull_best(SWEEP, to, endpoints=local_endpoints(tmp_path), progress=False)
    message = str(caught.value)
    assert expected in message and actual in message and str(stored.parent) in message
    assert (list(to.iterdir()) == []) if to_exists else not to.exists()


def test_checkpoint_without_checksum_file_is_refused_unless_no_verify(
    trial_checkpoint, tmp_path
) -> None:
    sweep = lay_out_sweep(tmp_path / "storage", trial_checkpoint, None)
    (sweep / TRIAL / CHECKPOINT / f"{MODEL_FILE}.sha256").unlink()
    endpoints = local_endpoints(tmp_path)
    with pytest.raises(ChecksumError, match=r"has no model.keras.sha256, .*--no-verify"):
        pull_best(SWEEP, tmp_path / "out", endpoints=endpoints, progress=False)
    assert not (tmp_path / "out").exists(), "a refused pull leaves nothing"
    pulled = pull_best(SWEEP, tmp_path / "out", endpoints=endpoints, progress=False, verify=False)
    assert sorted(p.name for p in pulled.iterdir()) == [MODEL_FILE, STATE_FILE]


def _unknown_sweep(sweep: Path) -> str:
    return "nope"


def _unfinished(sweep: Path) -> str:
    (sweep / SUMMARY_FILE).unlink()
    return SWEEP


def _missing_state(sweep: Path) -> str:
    (sweep / TRIAL / CHECKPOINT / STATE_FILE).unlink()
    return SWEEP


def _deleted_checkpoint(sweep: Path) -> str:
    shutil.rmtree(sweep / TRIAL)
    return SWEEP


@pytest.mark.parametrize(
    "breakage, final, expected",
    [
        (
            _unknown_sweep,
            False,
            r"no sweep named 'nope': looked for file://.*/storage/nope \(sweeps there: pneumo\)",
        ),
        (
            _unfinished,
            False,
            r"sweep 'pneumo' has not finished: .* no chestxpert_summary.json.*sweep resume pneumo",
        ),
        (
            _missing_state,
            False,
            r"not a complete checkpoint: missing state.json "
            r"\(found model.keras, model.keras.sha256\)",
        ),
        (
            _deleted_checkpoint,
            False,
            r"best checkpoint of sweep 'pneumo', .*checkpoint_000002 .* is missing",
        ),
        (
            lambda sweep: SWEEP,
            True,
            r"no final model yet \(no .*/pneumo/final/current.json\); "
            r"run `chestxpert final pneumo` first",
        ),
    ],
    ids=["unknown-sweep", "unfinished", "missing-file", "deleted-checkpoint", "no-final"],
)
def test_pull_best_errors_say_what_to_do(
    trial_checkpoint, tmp_path, breakage, final, expected
) -> None:
    name = breakage(lay_out_sweep(tmp_path / "storage", trial_checkpoint, None))
    with pytest.raises(PullError, match=expected):
        pull_best(
            name, tmp_path / "out", final=final, endpoints=local_endpoints(tmp_path), progress=False
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.services
def test_pull_best_and_resolve_model_from_the_s3_endpoint(
    trial_checkpoint, final_model, tmp_path, s3_endpoint, s3_client, monkeypatch
) -> None:
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    prefix = f"pull-{uuid.uuid4().hex[:8]}"
    endpoints = resolve(workspace=tmp_path / "ws", storage=f"s3://{s3_endpoint.bucket}/{prefix}")
    best_key = f"{prefix}/{SWEEP}/{TRIAL}/{CHECKPOINT}"
    sweep = lay_out_sweep(
        tmp_path / "layout",
        trial_checkpoint,
        final_model,
        best=f"s3://{s3_endpoint.bucket}/{best_key}",
    )
    for path in sweep.rglob("*"):
        if path.is_file():
            key = f"{prefix}/{SWEEP}/{path.relative_to(sweep).as_posix()}"
            s3_client.upload_file(str(path), s3_endpoint.bucket, key)
    # A "folder" marker as the S3 console writes it: not a file to download.
    s3_client.put_object(Bucket=s3_endpoint.bucket, Key=f"{best_key}/", Body=b"")

    pulled = pull_best(SWEEP, tmp_path / "out", endpoints=endpoints, progress=False)
    assert_same_files(pulled, trial_checkpoint)
    final = pull_best(SWEEP, tmp_path / "out", final=True, endpoints=endpoints, progress=False)
    assert_same_files(final, final_model)

    uri = f"s3://{s3_endpoint.bucket}/{prefix}/{SWEEP}/final/model"
    cached = resolve_model(uri, endpoints, progress=False)
    assert cached == tmp_path / "ws" / "cache" / "models" / hashlib.sha1(uri.encode()).hexdigest()
    assert_same_files(cached, final_model)
    # The cached copy still matches the remote checksum: reused, not fetched again.
    modified = (cached / MODEL_FILE).stat().st_mtime_ns
    assert resolve_model(uri, endpoints, progress=False) == cached
    assert (cached / MODEL_FILE).stat().st_mtime_ns == modified

    # A key no ChestXpert wrote, climbing out of the checkpoint folder: refused, nothing written.
    escape = "../../../../../../escaped-by-a-key.txt"
    s3_client.put_object(Bucket=s3_endpoint.bucket, Key=f"{best_key}/{escape}", Body=b"x")
    with pytest.raises(PullError, match=r"would land outside the download folder"):
        pull_best(SWEEP, tmp_path / "again", endpoints=endpoints, progress=False)
    assert not (tmp_path / "again").exists()
    assert not list(tmp_path.parent.glob("**/escaped-by-a-key.txt"))


def test_resolve_model_local_folder_and_file_uri(final_model, tmp_path) -> None:
    endpoints = local_endpoints(tmp_path)
    assert resolve_model(str(final_model), endpoints) == final_model
    cached = resolve_model(final_model.as_uri(), endpoints, progress=False)
    assert cached.parent == tmp_path / "ws" / "cache" / "models"
    assert_same_files(cached, final_model)
    with pytest.raises(PullError, match="is a file; give the checkpoint folder"):
        resolve_model(str(final_model / MODEL_FILE), endpoints)
    with pytest.raises(PullError, match=r"not a folder here; expected .*models:/NAME@ALIAS"):
        resolve_model(str(tmp_path / "nothing"), endpoints)


def reference_probabilities(checkpoint: Path, images: list[Path]) -> np.ndarray:
    """What the saved model predicts on the training preprocessing, computed without predict()."""
    import keras

    model = keras.models.load_model(checkpoint / MODEL_FILE, compile=False, safe_mode=True)
    pixels = np.stack([load_gray_square(path, SIZE)[0] for path in images])[..., np.newaxis]
    return np.asarray(model(pixels, training=False))


def test_predict_with_a_trial_checkpoint(trial_checkpoint, sample_images) -> None:
    results = predict(trial_checkpoint, sample_images)
    assert [r["image"] for r in results] == [str(p) for p in sample_images]
    expected = reference_probabilities(trial_checkpoint, sample_images)
    for result, reference in zip(results, expected, strict=True):
        assert [f["label"] for f in result["findings"]] == list(NIH_LABELS)
        assert result["threshold_source"] == DEFAULT_THRESHOLD_SOURCE
        probabilities = np.array([f["probability"] for f in result["findings"]])
        np.testing.assert_allclose(probabilities, reference, atol=1e-5)
        assert ((0 <= probabilities) & (probabilities <= 1)).all()
        for finding in result["findings"]:
            assert finding["threshold"] == 0.5
            assert finding["positive"] == (finding["probability"] >= finding["threshold"])
        assert "gradcam" not in result


def test_predict_with_a_final_model_uses_its_thresholds(final_model, sample_images) -> None:
    results = predict(final_model, sample_images[:2])
    for result in results:
        assert result["threshold_source"] == FINAL_THRESHOLD_SOURCE
        assert {f["label"]: f["threshold"] for f in result["findings"]} == FINAL_THRESHOLDS
        calls = [f["positive"] for f in result["findings"]]
        assert calls == [i % 2 == 0 for i in range(len(NIH_LABELS))]
    table = format_predictions(results)
    assert table.count("Label") == 2 and table.count("Probability  Threshold  Call") == 2
    assert table.count("POSITIVE") == 2 * 7 and table.count("negative") == 2 * 7
    first = results[0]["findings"][0]
    assert f"{first['label']}" in table and f"{first['probability']:.3f}" in table


def test_predict_reports_calibrated_probabilities_unless_told_not(
    final_model, sample_images, tmp_path
) -> None:
    folder = tmp_path / "calibrated"
    shutil.copytree(final_model, folder)
    labels = list(NIH_LABELS)
    calibrator = Calibrator(
        labels, dict.fromkeys(labels, 0.5), dict.fromkeys(labels, -1.0), identity=[labels[0]]
    )
    calibrator.write(folder)
    images = sample_images[:2]
    raw = reference_probabilities(final_model, images)
    calibrated = predict(folder, images)
    uncalibrated = predict(folder, images, calibrated=False)
    for with_cal, without, reference in zip(calibrated, uncalibrated, raw, strict=True):
        assert with_cal["probabilities"] == CALIBRATED and without["probabilities"] == UNCALIBRATED
        got = np.array([f["probability"] for f in with_cal["findings"]])
        np.testing.assert_allclose(got, calibrator.apply(reference[None])[0], atol=1e-5)
        assert got[0] == pytest.approx(reference[0], abs=1e-5)  # identity label left alone
        np.testing.assert_allclose(
            [f["probability"] for f in without["findings"]], reference, atol=1e-5
        )
        assert [f["positive"] for f in with_cal["findings"]] == [
            f["positive"] for f in without["findings"]
        ]
        assert [f["threshold"] for f in without["findings"]] == list(FINAL_THRESHOLDS.values())
    assert "probabilities: calibrated" in format_predictions(calibrated)
    assert predict(final_model, images[:1])[0]["probabilities"] == NO_CALIBRATOR


def test_predict_writes_gradcam_overlays_over_each_file_at_its_own_size(
    trial_checkpoint, sample_images, tmp_path
) -> None:
    # Beside the 128 px fixtures, a 1024² film and a 1024×768 one (padded to a square for the
    # model): each overlay is drawn over the file as read, at its own size, not at the model's
    # 64 px input; files under 512 px are enlarged to 512.
    films = {}
    for name, (height, width) in (("square", (1024, 1024)), ("wide", (768, 1024))):
        rows, cols = np.mgrid[0:height, 0:width]
        films[tmp_path / f"{name}.png"] = (20 + 200 * ((rows // 8 + cols // 8) % 2)).astype(
            np.uint8
        )
        Image.fromarray(films[tmp_path / f"{name}.png"]).save(tmp_path / f"{name}.png")
    images = [*sample_images[:3], *films]
    results = predict(trial_checkpoint, images, gradcam_dir=tmp_path / "cams", top_k=2)
    for image, result in zip(images, results, strict=True):
        ranked = sorted(result["findings"], key=lambda f: -f["probability"])[:2]
        expected = [str(tmp_path / "cams" / f"{image.stem}_{f['label']}.png") for f in ranked]
        assert result["gradcam"] == expected
        film = films.get(image)
        for path in expected:
            with Image.open(path) as picture:
                assert picture.format == "PNG" and picture.mode == "RGB"
                if film is None:
                    assert picture.size == (MIN_OVERLAY_SIDE, MIN_OVERLAY_SIDE)
                else:
                    assert picture.size == (film.shape[1], film.shape[0])
                rgb = np.asarray(picture, dtype=np.int16)
            assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 0, "the heatmap is blended in colour"
            if film is not None:
                # below the title band the overlay follows the film's 8 px checkers, which
                # a 64 px picture of the padded square scaled up could not
                gray = rgb[200:].mean(axis=-1).ravel()
                assert np.corrcoef(gray, film[200:].ravel())[0, 1] > 0.9, path
    assert len(list((tmp_path / "cams").iterdir())) == len(images) * 2
    assert "Grad-CAM: " + expected[0] in format_predictions(results)


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "no_such_image.png"


def _not_an_image(tmp_path: Path) -> Path:
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    return path


def _dicom_without_pydicom(tmp_path: Path) -> Path:
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM")
    return path


@pytest.mark.parametrize(
    "make_image, expected",
    [
        (_missing, r"image .*no_such_image.png does not exist"),
        (_not_an_image, r"cannot read image .*notes.png: .*Expected PNG or JPEG"),
        (
            _dicom_without_pydicom,
            r"scan.dcm is a DICOM file; reading DICOM needs pydicom: "
            r"pip install 'chestxpert\[dicom\]'",
        ),
    ],
    ids=["missing", "unreadable", "dicom-without-pydicom"],
)
def test_bad_images_are_named(
    trial_checkpoint, sample_images, tmp_path, monkeypatch, make_image, expected
) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if pydicom were not installed
    with pytest.raises(PredictError, match=expected):
        predict(trial_checkpoint, [sample_images[0], make_image(tmp_path)])


@pytest.mark.services
def test_registered_champion_resolves_and_predicts(
    final_model, sample_images, tmp_path, mlflow_server
) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.create_experiment(f"pull-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment, run_name="final")
    run_id = run.info.run_id
    client.log_artifacts(run_id, str(final_model), "checkpoint")
    client.set_terminated(run_id)
    name = f"chestxpert-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"runs:/{run_id}/checkpoint", run_id=run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    endpoints = resolve(
        workspace=tmp_path / "ws", mlflow_tracking_uri=mlflow_server.url, environ={}
    )

    folder = resolve_model(f"models:/{name}@champion", endpoints)
    assert folder.parent == tmp_path / "ws" / "cache" / "models"
    assert_same_files(folder, final_model)
    assert resolve_model(f"models:/{name}@champion", endpoints) == folder
    results = predict(folder, sample_images[:1])
    assert results[0]["threshold_source"] == FINAL_THRESHOLD_SOURCE

    with pytest.raises(
        PullError,
        match=rf"model '{name}' in the MLflow registry at {mlflow_server.url} "
        rf"has no alias 'staging' \(aliases: @champion → version 1\)",
    ):
        resolve_model(f"models:/{name}@staging", endpoints)
    with pytest.raises(
        PullError,
        match=rf"registry at {mlflow_server.url} has no model 'nobody' "
        rf"\(registered models: .*{name}",
    ):
        resolve_model("models:/nobody@champion", endpoints)
    # A version by number, as `compare` and `final` name one that is not the champion.
    assert_same_files(resolve_model(f"models:/{name}/{version.version}", endpoints), final_model)
    with pytest.raises(PullError, match=rf"model '{name}' .* has no version 7 \(aliases: @champ"):
        resolve_model(f"models:/{name}/7", endpoints)
    with pytest.raises(PullError, match="expected models:/NAME@ALIAS or models:/NAME/VERSION"):
        resolve_model(f"models:/{name}/one", endpoints)


def test_pull_best_and_predict_json_through_the_cli(
    trial_checkpoint, final_model, sample_images, tmp_path, cli_env, capsys
) -> None:
    """The README's JSON schemas of `pull-best --json` and `predict --json`."""
    from chestxpert.cli import main

    lay_out_sweep(tmp_path / "storage", trial_checkpoint, final_model)
    where = ["--storage", str(tmp_path / "storage"), "--workspace", str(tmp_path / "ws")]
    assert main(["pull-best", SWEEP, "--to", str(tmp_path / "out"), "--json", *where]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert set(pulled) == {"sweep", "kind", "path", "final_model", "verified", "load"}
    assert pulled["kind"] == "best" and pulled["path"] == str(tmp_path / "out" / CHECKPOINT)
    assert pulled["final_model"] is None and pulled["verified"] is True

    argv = ["predict", str(final_model), str(sample_images[0]), "--json", *where]
    assert main(argv) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert set(result) == {"image", "findings", "threshold_source", "probabilities"}
    assert set(result["findings"][0]) == {"label", "probability", "threshold", "positive"}
