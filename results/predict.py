"""`chestxpert predict`: findings for a few radiographs from a checkpoint folder, Grad-CAM optional.

Images go through `datasets.images` exactly as in training; the model loads in Keras safe
mode; each finding is called positive at the operating threshold the final job chose. A final
model's probabilities are reported through its calibrator (fitted on validation) unless asked not.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from chestxpert.cluster.errors import UserError
from chestxpert.datasets.images import (
    MAX_IMAGE_PIXELS,
    Placement,
    load_gray,
    square_resize,
    to_gray_uint8,
)
from chestxpert.results.calibrate import read_calibrator
from chestxpert.results.evaluate import DEFAULT_THRESHOLD
from chestxpert.trainable.checkpoint import STATE_FILE, CheckpointError, read_state
from chestxpert.trainable.train import predict as predict_images

DEFAULT_THRESHOLD_SOURCE = "default 0.5 (trial checkpoint has no thresholds; run chestxpert final)"
CALIBRATED = "calibrated (per-label Platt scaling fitted on the validation split)"
UNCALIBRATED = "uncalibrated (--uncalibrated: the network's own outputs)"
NO_CALIBRATOR = "uncalibrated (this model folder has no calibrator.json)"
FINAL_THRESHOLD_SOURCE = "chosen on the validation split (final model)"
DICOM_SUFFIXES = (".dcm", ".dicom")
# Photometric interpretations predict converts to gray; anything else is refused by name.
DICOM_PHOTOMETRICS = (
    "MONOCHROME1",
    "MONOCHROME2",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "PALETTE COLOR",
)
PREDICT_BATCH = 32  # images per forward pass: bounds activation memory, not the number of images


class PredictError(UserError, ValueError):
    """An image or model folder `predict` cannot use; the message names it and says what to do."""


def predict(
    model_dir: Path,
    images: Sequence[Path],
    gradcam_dir: Path | None = None,
    top_k: int = 3,
    calibrated: bool = True,
) -> list[dict[str, Any]]:
    """Predict every label for each image with the checkpoint in `model_dir`.

    Returns one dict per image, in order: `image` (its path), `findings` (every label in the
    model's order, each `{"label", "probability" in [0, 1], "threshold", "positive":
    probability >= threshold}`) and `threshold_source` (the final model's validation thresholds,
    or 0.5 for a trial checkpoint, said so) and `probabilities` (how they were made). A final
    model's calibrator.json maps probabilities and thresholds alike (`calibrated`=False keeps
    the network's outputs); it keeps their order, so the calls are the same either way. With
    `gradcam_dir`, the Grad-CAM overlays of the image's `top_k` most probable labels are written
    there as `<image stem>_<label>.png` and listed under `gradcam`: RGB, the heatmap drawn over
    the image file as read (its own size; enlarged to MIN_OVERLAY_SIDE on the long side when
    smaller), not over the model's input. Raises PredictError naming a missing or unreadable
    image or an unusable model folder.
    """
    model_dir = Path(model_dir)
    images = [Path(path) for path in images]
    if gradcam_dir is not None and top_k < 1:
        raise PredictError(f"top_k must be at least 1 for Grad-CAM overlays, got {top_k}")
    state = _read_model_state(model_dir)
    labels: list[str] = list(state["labels"])
    size = int(state["preprocessing"]["image_size"])
    thresholds, threshold_source = operating_thresholds(state)
    try:
        calibrator = read_calibrator(model_dir) if calibrated else None
    except UserError as err:
        raise PredictError(str(err)) from None
    shown_thresholds = calibrator.apply_thresholds(thresholds) if calibrator else thresholds
    how = CALIBRATED if calibrator else (UNCALIBRATED if not calibrated else NO_CALIBRATOR)
    if not images:
        return []
    # Images first: a typo in a path fails in milliseconds, before the model loads.
    sources = [read_source(path) for path in images]
    squares = [square_resize(gray, size) for gray in sources]
    pixels = np.stack([square for square, _ in squares])[..., np.newaxis]
    model = _load_model(model_dir, size, len(labels))
    probabilities = predict_images(model, pixels, PREDICT_BATCH)
    shown = calibrator.apply(probabilities) if calibrator else probabilities

    results = []
    for path, row, shown_row in zip(images, probabilities, shown, strict=True):
        findings = [
            {
                "label": label,
                "probability": float(shown_row[column]),
                "threshold": shown_thresholds[label],
                # called on the network's output: the calibrator keeps the order, and this way
                # no rounding can make the calibrated and uncalibrated calls differ
                "positive": bool(float(row[column]) >= thresholds[label]),
            }
            for column, label in enumerate(labels)
        ]
        results.append(
            {
                "image": str(path),
                "findings": findings,
                "threshold_source": threshold_source,
                "probabilities": how,
            }
        )
    if gradcam_dir is not None:
        placements = [placement for _, placement in squares]
        overlays = _gradcam_overlays(
            model,
            state,
            pixels,
            sources,
            placements,
            probabilities,
            images,
            labels,
            top_k,
            Path(gradcam_dir),
        )
        for result, paths in zip(results, overlays, strict=True):
            result["gradcam"] = paths
    return results


def operating_thresholds(state: dict[str, Any]) -> tuple[dict[str, float], str]:
    """Per-label thresholds from a checkpoint state and a note on where they came from.

    A final model's state has `thresholds` chosen on the validation split; a trial checkpoint
    has none, and every label gets DEFAULT_THRESHOLD (0.5).
    """
    labels = list(state["labels"])
    chosen = state.get("thresholds")
    if not chosen:
        return {label: DEFAULT_THRESHOLD for label in labels}, DEFAULT_THRESHOLD_SOURCE
    missing = [label for label in labels if label not in chosen]
    thresholds = {label: float(chosen.get(label, DEFAULT_THRESHOLD)) for label in labels}
    if missing:
        return thresholds, f"{FINAL_THRESHOLD_SOURCE}; default 0.5 for {', '.join(missing)}"
    return thresholds, FINAL_THRESHOLD_SOURCE


def read_image(path: Path, size: int) -> np.ndarray:
    """An image file as the model's (size, size) uint8 gray square, preprocessed as in training:
    `read_source`, then `datasets.images.square_resize`."""
    return square_resize(read_source(path), size)[0]


def read_source(path: Path) -> np.ndarray:
    """An image file as a uint8 gray array at its own size, before any resize.

    PNG and JPEG (8/16-bit, gray/RGB/RGBA) go through `datasets.images.load_gray`, as in
    training; DICOM (by suffix or by its `DICM` preamble) needs pydicom: pixel data, the
    modality and VOI LUTs, MONOCHROME1 inverted, then the same min-max gray.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"image {path} does not exist")
    if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path):
        return _read_dicom(path)
    try:
        return load_gray(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise PredictError(
            f"cannot read image {path}: {err}. Expected PNG or JPEG (8/16-bit, gray/RGB/RGBA) "
            f"or DICOM (.dcm)"
        ) from None


def format_predictions(results: Sequence[dict[str, Any]]) -> str:
    """Per image: its path, where the thresholds came from, and a Label | Probability |
    Threshold | Call table (every label, in the model's order), then its Grad-CAM files."""
    out = io.StringIO()
    for index, result in enumerate(results):
        if index:
            out.write("\n")
        out.write(f"{result['image']}\n  thresholds: {result['threshold_source']}\n")
        if result.get("probabilities"):
            out.write(f"  probabilities: {result['probabilities']}\n")
        width = max(len("Label"), *(len(f["label"]) for f in result["findings"]))
        out.write(f"  {'Label':<{width}}  Probability  Threshold  Call\n")
        for finding in result["findings"]:
            call = "POSITIVE" if finding["positive"] else "negative"
            out.write(
                f"  {finding['label']:<{width}}  {finding['probability']:>11.3f}  "
                f"{finding['threshold']:>9.3f}  {call}\n"
            )
        for overlay_path in result.get("gradcam", []):
            out.write(f"  Grad-CAM: {overlay_path}\n")
    return out.getvalue()


def _read_model_state(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise PredictError(f"model folder {model_dir} does not exist")
    try:
        state = read_state(model_dir)
    except CheckpointError as err:
        raise PredictError(str(err)) from None
    for key in ("labels", "preprocessing"):
        if key not in state:
            raise PredictError(
                f"{model_dir / STATE_FILE} has no {key!r}; "
                "it was not written by ChestXpert training"
            )
    if "image_size" not in state["preprocessing"]:
        raise PredictError(f"{model_dir / STATE_FILE} has no preprocessing.image_size")
    return state


def _load_model(model_dir: Path, size: int, num_labels: int):
    from chestxpert.trainable.checkpoint import load_model

    try:
        model = load_model(model_dir, compile=False)
    except CheckpointError as err:
        raise PredictError(str(err)) from None
    expected_input, expected_output = (size, size, 1), num_labels
    got_input = tuple(int(d) for d in model.inputs[0].shape[1:])
    got_output = int(model.outputs[0].shape[-1])
    if got_input != expected_input or got_output != expected_output:
        raise PredictError(
            f"{model_dir}: the model takes {got_input} and predicts {got_output} labels, but "
            f"{STATE_FILE} says {expected_input} and {expected_output} labels; "
            "the folder is mixed up"
        )
    return model


def _gradcam_overlays(
    model,
    state: dict[str, Any],
    pixels: np.ndarray,
    sources: list[np.ndarray],
    placements: list[Placement],
    probabilities: np.ndarray,
    images: list[Path],
    labels: list[str],
    top_k: int,
    gradcam_dir: Path,
) -> list[list[str]]:
    """Each image's `top_k` most probable labels' heatmaps, computed on the model's input
    (`pixels`) and drawn over the image as read (`sources`, mapped through `placements`)."""
    from chestxpert.results.gradcam import MIN_OVERLAY_SIDE, GradCam, heatmap_on_source, overlay

    layer = state.get("last_conv_layer") or _backbone_layer(state)
    try:
        gradcam = GradCam(model, layer)
    except ValueError as err:
        raise PredictError(f"Grad-CAM: {err}") from None
    top = [list(np.argsort(-row, kind="stable")[:top_k]) for row in probabilities]
    pairs = [(image, int(column)) for image, columns in enumerate(top) for column in columns]
    heatmaps = gradcam.heatmaps(
        pixels[[image for image, _ in pairs]], [column for _, column in pairs]
    )
    gradcam_dir.mkdir(parents=True, exist_ok=True)
    stems = _unique_stems(images)
    written: list[list[str]] = [[] for _ in images]
    for (image, column), heatmap in zip(pairs, heatmaps, strict=True):
        label = labels[column]
        target = gradcam_dir / f"{stems[image]}_{label}.png"
        title = f"{label} {probabilities[image, column]:.2f}"
        source = sources[image]
        heat = heatmap_on_source(heatmap, source.shape, placements[image])
        overlay(source, heat, title=title, min_side=MIN_OVERLAY_SIDE).save(target)
        written[image].append(str(target))
    return written


def _backbone_layer(state: dict[str, Any]) -> str:
    from chestxpert.trainable.backbones import get_backbone

    backbone = state.get("config", {}).get("backbone")
    if not backbone:
        raise PredictError(
            f"{STATE_FILE} names no backbone (config.backbone) nor last_conv_layer; "
            f"Grad-CAM cannot tell which layer to explain"
        )
    try:
        return get_backbone(backbone).last_conv_layer
    except ValueError as err:
        raise PredictError(f"Grad-CAM: {err}") from None


def _unique_stems(images: list[Path]) -> list[str]:
    """File stems, numbered from the second on when two images share one (a/x.png, b/x.png)."""
    seen: dict[str, int] = {}
    stems = []
    for path in images:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        stems.append(path.stem if count == 0 else f"{path.stem}-{count + 1}")
    return stems


def _has_dicom_preamble(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom import pixels as dicom_pixels
    except ImportError:
        raise PredictError(
            f"{path} is a DICOM file; reading DICOM needs pydicom: pip install 'chestxpert[dicom]'"
        ) from None
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # pydicom raises many types (invalid file, truncated header…)
        raise PredictError(f"cannot read DICOM image {path}: {err}") from None
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if rows * columns * frames > MAX_IMAGE_PIXELS:
        raise PredictError(
            f"{path} declares {frames} × {rows}×{columns} pixels, over the "
            f"{MAX_IMAGE_PIXELS:,}-pixel limit for one radiograph; nothing was decoded"
        )
    if frames > 1:
        raise PredictError(f"{path} holds {frames} frames; predict takes single-frame radiographs")
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if photometric not in DICOM_PHOTOMETRICS:
        raise PredictError(
            f"{path} has photometric interpretation {photometric or '(none)'}; predict reads "
            f"{', '.join(DICOM_PHOTOMETRICS)}. Convert it to MONOCHROME2 first"
        )
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array  # YBR_FULL(_422) arrive as RGB
        if photometric == "PALETTE COLOR":
            pixels = dicom_pixels.apply_color_lut(pixels, dataset)
        elif photometric.startswith("MONOCHROME"):
            # Modality LUT (rescale slope/intercept) then the VOI LUT or window the film was
            # meant to be read with: the raw detector range is not what a reader sees.
            pixels = dicom_pixels.apply_modality_lut(pixels, dataset)
            pixels = dicom_pixels.apply_voi_lut(pixels, dataset)
        pixels = np.asarray(pixels, dtype=np.float32)
    except Exception as err:  # no pixel data, no decoder for its transfer syntax, bad LUT…
        raise PredictError(f"cannot decode the pixels of DICOM image {path}: {err}") from None
    if pixels.ndim == 3:
        # Colour DICOM: the luminance formula PIL's convert("L") uses for RGB PNGs.
        pixels = pixels[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 shows low values white; training images show them black.
        pixels = pixels.max() + pixels.min() - pixels
    return to_gray_uint8(Image.fromarray(pixels.astype(np.float32)))
