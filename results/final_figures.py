"""The final report's figures: reliability diagrams, ROC and PR panels with the operating points,
and the Grad-CAM gallery of test images with its localisation scores against annotated boxes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chestxpert.results.report import ReportFigure

if TYPE_CHECKING:
    from chestxpert.results.evaluate import ThresholdChoice

# DenseNet121's last map is 7×7 at the 224 px it was designed for; at 128 px it is 4×4 and
# points at little (the README gives the demo's pointing-game figures for both maps).
# Smaller last maps step back to the deepest ≥ 7×7 one.
MIN_GRADCAM_MAP = 7


def _gradcam_layer(model, preferred: str, chosen: str | None) -> tuple[str, str | None]:
    """The layer to explain and, when we had to step back from the last conv layer, why."""
    if chosen:
        model.get_layer(chosen)  # a typo fails here, with Keras naming the layer
        return chosen, None
    side = model.get_layer(preferred).output.shape[1]
    if side is None or side >= MIN_GRADCAM_MAP:
        return preferred, None
    for layer in reversed(model.layers[: model.layers.index(model.get_layer(preferred))]):
        shape = layer.output.shape
        if len(shape) == 4 and shape[1] and shape[1] >= MIN_GRADCAM_MAP and "relu" in layer.name:
            note = (
                f"Grad-CAM uses layer {layer.name} ({shape[1]}×{shape[2]}): the last convolutional "
                f"layer {preferred} is only {side}×{side} at this image size (7×7 at 224 px); "
                f"`--gradcam-layer` chooses another."
            )
            return layer.name, note
    return (
        preferred,
        f"Grad-CAM layer {preferred} is {side}×{side}: heatmaps cannot localise at this size.",
    )


def summary_figures(
    evaluation: dict[str, Any], choice: ThresholdChoice, out: Path
) -> list[ReportFigure]:
    """The reliability diagrams (raw, calibrated), ROC and PR panels into `out/figures`, with the
    operating points marked and each label's AUC and CI under its ROC panel title."""
    from chestxpert.results.figures import curves_figure, reliability_figure

    (out / "figures").mkdir(exist_ok=True)
    reliability_figure(evaluation["calibration"], out / "figures" / "reliability.png")
    reliability_figure(
        evaluation["calibration_calibrated"], out / "figures" / "reliability_calibrated.png"
    )
    main_point = "youden" if choice.method == "youden" else f"sens={choice.target_sensitivity}"
    marked = {
        main_point: {
            name: item["operating_point"] for name, item in evaluation["per_label"].items()
        },
        **evaluation.get("operating_points", {}),
    }
    subtitles = {
        name: f"AUC {item['auc']:.2f} ({item['auc_low']:.2f}–{item['auc_high']:.2f})"
        for name, item in evaluation["per_label"].items()
        if item["auc"] is not None and item["auc_low"] is not None
    }
    for kind in ("roc", "pr"):
        curves_figure(
            evaluation["curves"],
            out / "figures" / f"{kind}.png",
            kind=kind,
            points=marked,
            subtitles=subtitles,
        )
    return [
        ReportFigure(
            "Reliability: raw probabilities",
            "Observed fraction positive against mean predicted probability per bin on the test "
            "split, pooled then per label; the diagonal is perfect calibration.",
            "figures/reliability.png",
        ),
        ReportFigure(
            "Reliability: after Platt scaling",
            "The same diagrams after the per-label calibration fitted on validation, the "
            "probabilities `predict` reports.",
            "figures/reliability_calibrated.png",
        ),
        ReportFigure(
            "ROC curves",
            "Sensitivity against 1 - specificity on the test split, one panel per label, with "
            f"AUC (95% CI); markers: the operating points ({', '.join(marked)}) chosen on "
            "validation, where they fall on test.",
            "figures/roc.png",
        ),
        ReportFigure(
            "Precision-recall curves",
            "Precision (PPV) against recall (sensitivity) on the test split, one panel per "
            "label; low-prevalence labels sit low.",
            "figures/pr.png",
        ),
    ]


def gradcam_gallery(
    model,
    preferred_layer: str,
    chosen_layer: str | None,
    test: dict[str, Any],
    test_prob: np.ndarray,
    labels: list[str],
    choice: ThresholdChoice,
    size: int,
    examples_per_label: int,
    out: Path,
) -> tuple[list[ReportFigure], str, str | None, dict[str, Any]]:
    """Grad-CAM of the test split: a gallery of `examples_per_label` images of each kind per label
    (`gradcam.select_examples`) into `out/gradcam`, and pointing scores where images have boxes.

    `preferred_layer` is the backbone's last convolutional layer, `chosen_layer` the user's
    `--gradcam-layer` (or None), `size` the model's input side in pixels. Returns the gallery's
    figures, the layer explained, a note on that choice (or None), and the localisation scores
    (empty without boxes).
    """
    from chestxpert.results.gradcam import (
        MIN_OVERLAY_SIDE,
        GradCam,
        heatmaps_for_boxes,
        localization_scores,
        overlay,
        select_examples,
    )

    figures: list[ReportFigure] = []
    layer, note = _gradcam_layer(model, preferred_layer, chosen_layer)
    gradcam = GradCam(model, layer)
    thresholds = [choice.thresholds[label] for label in labels]
    examples = select_examples(
        np.nan_to_num(test["labels"], nan=0.0),
        test_prob,
        thresholds,
        labels,
        k=examples_per_label,
    )
    (out / "gradcam").mkdir(exist_ok=True)
    for column, label in enumerate(labels):
        for kind, indices in examples.get(label, {}).items():
            if not indices:
                continue
            maps = gradcam.heatmaps(test["image"][indices], [column] * len(indices))
            for rank, (index, heat) in enumerate(zip(indices, maps, strict=True), start=1):
                box = next(
                    (
                        (b["x"], b["y"], b["w"], b["h"])
                        for b in (test["boxes"][index] or [])
                        if b["label"] == label
                    ),
                    None,
                )
                title = f"{label} {kind.replace('_', ' ')[:-1]} p={test_prob[index, column]:.2f}"
                # The prepared dataset keeps only the model-size image, so the gallery enlarges
                # it (and the map) smoothly rather than show a thumbnail.
                picture = overlay(
                    test["image"][index][..., 0], heat, box, title, min_side=MIN_OVERLAY_SIDE
                )
                rel = f"gradcam/{label}_{kind}_{rank}.png"
                picture.save(out / rel)
                what = kind.replace("_", " ")[:-1]
                figures.append(
                    ReportFigure(
                        f"{label.replace('_', ' ')}: {what} {rank}",
                        f"p={test_prob[index, column]:.2f} at threshold "
                        f"{choice.thresholds[label]:.2f}; heatmap over the test image, "
                        f"upsampled (bicubic image, bilinear map) from the model's {size} px "
                        f"input to {max(size, MIN_OVERLAY_SIDE)} px, as the dataset keeps no "
                        "original" + ("; box: the annotated finding" if box else ""),
                        rel,
                    )
                )
    localization = {}
    with_boxes = [i for i, boxes in enumerate(test["boxes"]) if boxes is not None and len(boxes)]
    if with_boxes:
        try:
            pairs = heatmaps_for_boxes(
                gradcam,
                test["image"][with_boxes],
                [test["boxes"][i] for i in with_boxes],
                {label: i for i, label in enumerate(labels)},
            )
            localization = localization_scores(pairs)
        except ValueError as err:
            note = (note + " " if note else "") + f"No localisation scores: {err}"
    return figures, layer, note, localization
