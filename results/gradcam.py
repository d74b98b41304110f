"""Grad-CAM heatmaps of a trained classifier, their overlay on the radiograph, and how well
they point at the radiologists' boxes (pointing game, IoU) compared with a centred baseline.

Coordinates: a heatmap is (S, S) over the image the model saw; a box is (x, y, w, h) in
pixels of that image (x to the right, y down), as the prepared dataset stores it. A pixel
(row, col) is inside a box when its centre (col + 0.5, row + 0.5) is. `heatmap_on_source` maps
a heatmap back onto the original file's pixels, and `overlay` can enlarge a small image to
MIN_OVERLAY_SIDE pixels on its long side, so a reader sees more than the model's input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont

from chestxpert.datasets.images import Placement

# A box as a tuple, or as the {"label", "x", "y", "w", "h"} dict the prepared shards hold.
Box = tuple[float, float, float, float] | Mapping[str, float]

OVERLAY_ALPHA = 0.4  # weight of the coloured heatmap over the gray radiograph
BOX_COLOUR = (255, 0, 255)  # magenta: in neither the jet colormap nor a gray image
CENTRE_SIGMA_FRACTION = 0.25  # the centred baseline's Gaussian sigma, as a fraction of S
# An overlay smaller than this on its long side is enlarged to it: at the model's input size
# (64-224 px) a reader cannot tell what the heatmap lies on.
MIN_OVERLAY_SIDE = 512


class GradCam:
    """Grad-CAM (Selvaraju et al. 2017) of one model at one convolutional layer.

    `layer_name` is the layer whose (batch, h, w, channels) output is explained; for a
    `trainable.backbones.build_model` classifier it is `get_backbone(name).last_conv_layer`.
    The model and the gradient computation are built and traced once (the first call of
    `heatmaps` pays a few seconds of tracing; later calls are graph speed).

    The score explained is the pre-sigmoid logit when the model ends in a Dense layer with a
    sigmoid activation (as build_model's "predictions" does), else the model's output
    (`score` says which). Why the logit: d(sigmoid(z))/dA = sigmoid'(z) * dz/dA, so the
    probability's gradient is the logit's times one positive number per image, which the
    per-image normalisation removes; but for a confident prediction sigmoid(z) rounds to
    exactly 1.0 in float32, sigmoid'(z) underflows to 0 and the map would be all zero. The
    logit has no such flat region, so a confident finding still gets its map.
    """

    def __init__(self, model: keras.Model, layer_name: str) -> None:
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ValueError(
                f"Grad-CAM needs a model with one input and one output; {model.name!r} has "
                f"{len(model.inputs)} inputs and {len(model.outputs)} outputs."
            )
        layer_names = [layer.name for layer in model.layers]
        if layer_name not in layer_names:
            raise ValueError(
                f"Model {model.name!r} has no layer {layer_name!r}; for a build_model "
                f"classifier pass get_backbone(backbone).last_conv_layer (the last layers "
                f"are {layer_names[-5:]})."
            )
        conv_output = model.get_layer(layer_name).output
        if len(conv_output.shape) != 4:
            raise ValueError(
                f"Layer {layer_name!r} outputs shape {tuple(conv_output.shape)}; Grad-CAM needs "
                f"a (batch, height, width, channels) convolutional map."
            )
        self.model = model
        self.layer_name = layer_name
        self.num_classes = int(model.outputs[0].shape[-1])
        model_input = model.inputs[0]
        self.image_shape = tuple(int(d) for d in model_input.shape[1:])  # (S, S, channels)
        self.image_dtype = np.dtype(model_input.dtype)

        self._head = _sigmoid_dense_head(model)
        self.score = "logit" if self._head is not None else "probability"
        score_source = self._head.input if self._head is not None else model.outputs[0]
        # model.inputs[0], not the list: calling a one-input model built on a list warns.
        self._grad_model = keras.Model(model_input, [conv_output, score_source])
        # A signature with any batch size: traced once, the short last batch included.
        self._traced = tf.function(
            self._batch_heatmaps,
            input_signature=[
                tf.TensorSpec((None, *self.image_shape), model_input.dtype),
                tf.TensorSpec((None,), tf.int32),
            ],
        )

    def _batch_heatmaps(self, images: tf.Tensor, class_indices: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            # training=False: augmentation and dropout off, batch norm on its moving statistics,
            # so each image's map depends on that image alone.
            conv_maps, scores = self._grad_model(images, training=False)
            if self._head is not None:
                kernel = tf.convert_to_tensor(self._head.kernel)
                scores = tf.matmul(tf.cast(scores, kernel.dtype), kernel)
                if self._head.use_bias:
                    scores = scores + tf.convert_to_tensor(self._head.bias)
            # Images are independent, so the gradient of the sum is each image's own gradient.
            total_score = tf.reduce_sum(tf.gather(scores, class_indices, axis=1, batch_dims=1))
        gradients = tf.cast(tape.gradient(total_score, conv_maps), tf.float32)
        conv_maps = tf.cast(conv_maps, tf.float32)
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)  # (N, 1, 1, C)
        cams = tf.nn.relu(tf.reduce_sum(channel_weights * conv_maps, axis=-1, keepdims=True))
        cams = tf.image.resize(cams, self.image_shape[:2], method="bilinear")[..., 0]
        peaks = tf.reduce_max(cams, axis=(1, 2), keepdims=True)
        # The epsilon only guards an all-zero map (an untrained model, a class no channel
        # supports), which stays all zero; it is far below any real peak, so the others
        # still reach exactly 1.
        return tf.clip_by_value(cams / (peaks + 1e-30), 0.0, 1.0)

    def heatmaps(
        self,
        images: np.ndarray,
        class_indices: int | Sequence[int] | np.ndarray,
        batch_size: int = 16,
    ) -> np.ndarray:
        """Grad-CAM heatmaps of `images` ((N, S, S, 1) or (N, S, S), the model's input dtype,
        uint8 0..255 for build_model) for `class_indices` (one output index per image, or one
        for all), `batch_size` images at a time. Returns (N, S, S) float32 in [0, 1]: each
        map divided by its own maximum (so it peaks at exactly 1), or all zero where no
        location raises the class score."""
        images = self._check_images(images)
        count = len(images)
        classes = np.asarray(class_indices, dtype=np.int64)
        if classes.ndim == 0:
            classes = np.full(count, classes)
        if classes.shape != (count,):
            raise ValueError(
                f"class_indices has shape {classes.shape} for {count} images; give one class "
                f"index per image, or a single index for all of them."
            )
        bad = classes[(classes < 0) | (classes >= self.num_classes)]
        if bad.size:
            raise ValueError(
                f"class index {int(bad[0])} is out of range: the model has {self.num_classes} "
                f"outputs (indices 0..{self.num_classes - 1})."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        maps = [
            self._traced(
                tf.constant(images[start : start + batch_size]),
                tf.constant(classes[start : start + batch_size], dtype=tf.int32),
            ).numpy()
            for start in range(0, count, batch_size)
        ]
        if not maps:
            return np.zeros((0, *self.image_shape[:2]), dtype=np.float32)
        return np.concatenate(maps).astype(np.float32, copy=False)

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == len(self.image_shape) and self.image_shape[-1] == 1:
            images = images[..., np.newaxis]
        if images.shape[1:] != self.image_shape:
            raise ValueError(
                f"images have shape {images.shape}; "
                f"the model takes (N, {', '.join(map(str, self.image_shape))})."
            )
        if images.dtype != self.image_dtype:
            if not np.can_cast(images.dtype, self.image_dtype, casting="safe"):
                raise ValueError(
                    f"images are {images.dtype}; the model takes {self.image_dtype} "
                    f"(0..255 gray pixels for a build_model classifier)."
                )
            images = images.astype(self.image_dtype)
        return images


def _sigmoid_dense_head(model: keras.Model) -> keras.layers.Dense | None:
    """The Dense layer with a sigmoid activation that produces the model's output, if any."""
    head = model.layers[-1]
    if (
        isinstance(head, keras.layers.Dense)
        and head.output is model.outputs[0]
        and keras.activations.serialize(head.activation) == "sigmoid"
    ):
        return head
    return None


def overlay(
    image_gray: np.ndarray,
    heatmap: np.ndarray,
    box: Box | None = None,
    title: str = "",
    alpha: float = OVERLAY_ALPHA,
    min_side: int = 0,
) -> Image.Image:
    """The radiograph `image_gray` ((H, W) uint8, 0..255) in gray with `heatmap` ((H, W) in
    [0, 1]) blended over it in the jet colormap (weight `alpha`), `box` (x, y, w, h in pixels)
    outlined in magenta if given, and `title` in small white text on a dark band at the top
    left. Returns an (H, W) RGB image, so pixel coordinates match the image's; or, when the
    long side is under `min_side` (MIN_OVERLAY_SIDE for a reader), one enlarged to it: the
    image bicubic, the heatmap bilinear (smooth, no blocks), the box scaled with them."""
    from matplotlib import colormaps  # not pyplot: no GUI backend needed

    gray = np.asarray(image_gray)
    if gray.ndim == 3 and gray.shape[-1] == 1:
        gray = gray[..., 0]
    heat = np.asarray(heatmap, dtype=np.float32)
    if gray.ndim != 2 or gray.shape != heat.shape:
        raise ValueError(
            "overlay needs an (H, W) image and a heatmap of the same shape; "
            f"got {gray.shape} and {heat.shape}."
        )
    factor = min_side / max(gray.shape)
    if factor > 1:
        size = (round(gray.shape[1] * factor), round(gray.shape[0] * factor))
        gray = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BICUBIC))
        heat = np.asarray(Image.fromarray(heat, mode="F").resize(size, Image.Resampling.BILINEAR))
        box = tuple(v * factor for v in _xywh(box)) if box is not None else None
    colour = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3]
    gray_rgb = np.repeat(gray.astype(np.float32)[..., np.newaxis] / 255.0, 3, axis=-1)
    blended = (1.0 - alpha) * gray_rgb + alpha * colour
    picture = Image.fromarray(np.round(blended * 255.0).astype(np.uint8))

    draw = ImageDraw.Draw(picture)
    size = max(gray.shape)
    if box is not None:
        x, y, w, h = _xywh(box)
        # PIL's rectangle includes both corners: the last pixel inside is x + w - 1.
        draw.rectangle(
            [round(x), round(y), round(x + w) - 1, round(y + h) - 1],
            outline=BOX_COLOUR,
            width=max(1, size // 128),
        )
    if title:
        font = ImageFont.load_default(size=max(8, size // 16))
        left, top, right, bottom = draw.textbbox((2, 1), title, font=font)
        draw.rectangle([0, 0, right + 2, bottom + 1], fill=(0, 0, 0))
        draw.text((2, 1), title, fill=(255, 255, 255), font=font)
    return picture


def heatmap_on_source(
    heatmap: np.ndarray, source_shape: tuple[int, int], placement: Placement
) -> np.ndarray:
    """An (S, S) heatmap over the model's input, as an (H, W) map over the original image of
    `source_shape` that `datasets.images.square_resize` made that input from (`placement`).

    The input is the original padded to a centred square and resized; the original's part of
    it, (offset, offset + side × scale), is resampled bilinearly to H × W, so the map lies on
    the original's pixels, smooth, with the padding left out."""
    height, width = source_shape
    left, top = placement.offset_x, placement.offset_y
    region = (left, top, left + width * placement.scale, top + height * placement.scale)
    heat = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
    resized = heat.resize((width, height), Image.Resampling.BILINEAR, box=region)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


class BoxScore(NamedTuple):
    """How one heatmap does against one box."""

    pointing_hit: bool  # the heatmap's peak is inside the box
    iou: float  # IoU of the heatmap >= threshold region with the box


def _xywh(box: Box) -> tuple[float, float, float, float]:
    if isinstance(box, Mapping):
        return float(box["x"]), float(box["y"]), float(box["w"]), float(box["h"])
    x, y, w, h = box
    return float(x), float(y), float(w), float(h)


def box_mask(shape: tuple[int, int], box: Box) -> np.ndarray:
    """Boolean (rows, cols) mask of the pixels whose centres lie inside `box`."""
    x, y, w, h = _xywh(box)
    cols = np.arange(shape[1]) + 0.5
    rows = np.arange(shape[0]) + 0.5
    return ((rows >= y) & (rows < y + h))[:, np.newaxis] & ((cols >= x) & (cols < x + w))


def heatmap_peak(heatmap: np.ndarray) -> tuple[int, int] | None:
    """The (row, col) the heatmap points at, or None for an all-zero map (it points nowhere).

    Bilinear upsampling turns the coarse map's peak cell into a plateau of equal maxima
    (at the border, half a cell wide); taking the first one, as np.argmax does, would pull
    every border peak to the plateau's top-left pixel. This takes the maximal pixel nearest
    the maxima's centroid, i.e. the middle of a single plateau.
    """
    heat = np.asarray(heatmap, dtype=np.float32)
    top = float(heat.max()) if heat.size else 0.0
    if top <= 0.0:
        return None
    rows, cols = np.nonzero(heat >= top * (1.0 - 1e-6))
    nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    return int(rows[nearest]), int(cols[nearest])


def pointing_game(heatmap: np.ndarray, box: Box) -> bool:
    """True when the heatmap's peak (see `heatmap_peak`) is a pixel inside `box`; an all-zero
    heatmap points nowhere and misses."""
    peak = heatmap_peak(heatmap)
    return peak is not None and bool(box_mask(np.shape(heatmap), box)[peak])


def heatmap_iou(heatmap: np.ndarray, box: Box, threshold: float = 0.5) -> float:
    """Intersection over union of the pixels where `heatmap` >= `threshold` (in (0, 1]) and
    the pixels inside `box`; 0.0 when both are empty."""
    hot = np.asarray(heatmap) >= threshold
    inside = box_mask(hot.shape, box)
    union = np.count_nonzero(hot | inside)
    return float(np.count_nonzero(hot & inside) / union) if union else 0.0


def centre_gaussian(size: int, sigma_fraction: float = CENTRE_SIGMA_FRACTION) -> np.ndarray:
    """A (size, size) "heatmap" that knows nothing about the image: a Gaussian centred on the
    image with sigma = sigma_fraction * size, peaking at 1. Findings sit mostly mid-chest, so
    this is the score a heatmap has to beat to show it looked at the finding."""
    centres = np.arange(size) + 0.5 - size / 2.0
    sigma = sigma_fraction * size
    profile = np.exp(-(centres**2) / (2.0 * sigma**2))
    profile /= profile.max()  # pixel centres miss the exact middle: rescale so the peak is 1
    return np.outer(profile, profile).astype(np.float32)


def centre_baseline(
    size: int,
    box: Box,
    threshold: float = 0.5,
    sigma_fraction: float = CENTRE_SIGMA_FRACTION,
) -> BoxScore:
    """Pointing game and IoU of the centred Gaussian (`centre_gaussian`) against `box` in an
    image of `size` x `size` pixels."""
    baseline = centre_gaussian(size, sigma_fraction)
    return BoxScore(pointing_game(baseline, box), heatmap_iou(baseline, box, threshold))


def heatmaps_for_boxes(
    gradcam: GradCam,
    images: np.ndarray,
    boxes_per_image: Sequence[Sequence[Mapping] | None],
    class_index_of: Mapping[str, int],
    batch_size: int = 16,
) -> dict[str, list[tuple[np.ndarray, tuple[float, float, float, float]]]]:
    """The (heatmap, box) pairs `localization_scores` takes, grouped by box label: each box
    of image i ({"label", "x", "y", "w", "h"}, as the prepared shards store them) is paired
    with image i's heatmap for the box's own label. One heatmap is computed per distinct
    (image, label), shared by that image's boxes of the label. Boxes whose label the model
    does not predict (not in `class_index_of`) are left out; if that leaves none, it is an
    error naming both label sets."""
    if len(boxes_per_image) != len(images):
        raise ValueError(
            f"boxes_per_image has {len(boxes_per_image)} entries for {len(images)} images; "
            f"give one list of boxes (possibly empty) per image."
        )
    wanted: dict[tuple[int, str], list[tuple[float, float, float, float]]] = {}
    unknown: set[str] = set()
    for image_index, boxes in enumerate(boxes_per_image):
        for box in boxes or ():
            if box["label"] not in class_index_of:
                unknown.add(box["label"])
                continue
            wanted.setdefault((image_index, box["label"]), []).append(_xywh(box))
    if unknown and not wanted:
        raise ValueError(
            f"No box has a label the model predicts: box labels {sorted(unknown)}, model "
            f"labels {sorted(class_index_of)}. Map the box labels to the model's names."
        )
    keys = list(wanted)
    maps = gradcam.heatmaps(
        np.asarray(images)[[image_index for image_index, _ in keys]],
        [class_index_of[label] for _, label in keys],
        batch_size=batch_size,
    )
    pairs: dict[str, list[tuple[np.ndarray, tuple[float, float, float, float]]]] = {}
    for key, heatmap in zip(keys, maps, strict=True):
        pairs.setdefault(key[1], []).extend((heatmap, box) for box in wanted[key])
    return pairs


def localization_scores(
    pairs_by_label: Mapping[str, Sequence[tuple[np.ndarray, Box]]],
    threshold: float = 0.5,
    sigma_fraction: float = CENTRE_SIGMA_FRACTION,
) -> dict[str, dict[str, float]]:
    """Per label: `n` (boxes scored), `pointing_hit_rate` (fraction of boxes containing
    their heatmap's peak), `mean_iou` (mean IoU of heatmap >= `threshold` with the box), and
    the same two for the centred Gaussian baseline (`baseline_pointing_hit_rate`,
    `baseline_mean_iou`). Each pair is a box and the heatmap computed for that box's label
    on its image, as `heatmaps_for_boxes` makes them. Labels with no pairs are left out."""
    scores: dict[str, dict[str, float]] = {}
    baselines: dict[int, np.ndarray] = {}
    for label, pairs in pairs_by_label.items():
        if not pairs:
            continue
        hits, ious, baseline_hits, baseline_ious = [], [], [], []
        for heatmap, box in pairs:
            size = int(np.shape(heatmap)[0])
            if size not in baselines:
                baselines[size] = centre_gaussian(size, sigma_fraction)
            hits.append(pointing_game(heatmap, box))
            ious.append(heatmap_iou(heatmap, box, threshold))
            baseline_hits.append(pointing_game(baselines[size], box))
            baseline_ious.append(heatmap_iou(baselines[size], box, threshold))
        scores[label] = {
            "n": len(pairs),
            "pointing_hit_rate": float(np.mean(hits)),
            "mean_iou": float(np.mean(ious)),
            "baseline_pointing_hit_rate": float(np.mean(baseline_hits)),
            "baseline_mean_iou": float(np.mean(baseline_ious)),
        }
    return scores


def select_examples(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    thresholds: Sequence[float] | Mapping[str, float] | np.ndarray,
    labels: Sequence[str],
    k: int = 3,
) -> dict[str, dict[str, list[int]]]:
    """Row indices worth a Grad-CAM figure, per label: "true_positives", the k positives
    (y_true == 1) with the highest probability at or above the label's threshold, and
    "false_positives", the k negatives (y_true == 0) with the highest probability at or above
    it (the worst false alarms), most confident first, ties by lower index. `y_true` and
    `y_prob` are (N, L) in `labels` order; unknown labels (NaN) are neither. `thresholds` is
    one per label, in order or by name."""
    truth = np.asarray(y_true, dtype=np.float64)
    probability = np.asarray(y_prob, dtype=np.float64)
    if truth.shape != probability.shape or truth.ndim != 2 or truth.shape[1] != len(labels):
        raise ValueError(
            f"y_true {truth.shape} and y_prob {probability.shape} must both be "
            f"(N, {len(labels)}), one column per label."
        )
    if isinstance(thresholds, Mapping):
        missing = [label for label in labels if label not in thresholds]
        if missing:
            raise ValueError(f"thresholds has no value for {missing}.")
        thresholds = [thresholds[label] for label in labels]
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (len(labels),):
        raise ValueError(f"thresholds has {thresholds.size} values for {len(labels)} labels.")

    def most_confident(rows: np.ndarray, column: int) -> list[int]:
        # Stable sort on -probability: equal probabilities keep index order.
        order = np.argsort(-probability[rows, column], kind="stable")
        return [int(i) for i in rows[order][:k]]

    examples: dict[str, dict[str, list[int]]] = {}
    for column, label in enumerate(labels):
        flagged = probability[:, column] >= thresholds[column]
        examples[label] = {
            "true_positives": most_confident(
                np.flatnonzero(flagged & (truth[:, column] == 1)), column
            ),
            "false_positives": most_confident(
                np.flatnonzero(flagged & (truth[:, column] == 0)), column
            ),
        }
    return examples
