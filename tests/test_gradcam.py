"""Grad-CAM: a hand-weighted model whose class score depends only on a bright blob must get
its heatmap peak on the blob; real backbones give finite [0, 1] maps, the same in any batch
size; pointing game, IoU, the centred baseline, example selection and overlay on known cases."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from chestxpert.datasets.images import square_resize
from chestxpert.results.gradcam import (
    BOX_COLOUR,
    MIN_OVERLAY_SIDE,
    GradCam,
    box_mask,
    centre_baseline,
    centre_gaussian,
    heatmap_iou,
    heatmap_on_source,
    heatmap_peak,
    heatmaps_for_boxes,
    localization_scores,
    overlay,
    pointing_game,
    select_examples,
)
from chestxpert.trainable.backbones import build_model, get_backbone

SIZE = 64
PATCH = 8  # the blob model sees the image as 8x8 cells of 8x8 pixels
BLOB, DARK, NOTHING = 0, 1, 2  # the blob model's classes
BLOB_SIDE = 16
# Blob boxes (x, y, w, h): one per corner, 4 px from the edges, off the 8 px cell grid.
CORNERS = {
    "top_left": (4, 4, BLOB_SIDE, BLOB_SIDE),
    "top_right": (SIZE - 4 - BLOB_SIDE, 4, BLOB_SIDE, BLOB_SIDE),
    "bottom_left": (4, SIZE - 4 - BLOB_SIDE, BLOB_SIDE, BLOB_SIDE),
    "bottom_right": (SIZE - 4 - BLOB_SIDE, SIZE - 4 - BLOB_SIDE, BLOB_SIDE, BLOB_SIDE),
}


def blob_model(logit_scale: float = 10.0, separate_sigmoid: bool = False) -> keras.Model:
    """A classifier built like build_model's (uint8 gray in, augmentation, last conv
    activation, pooling, dropout, sigmoid "predictions") with weights set by hand:

    - channel 0 of `patch_relu` is relu(mean brightness of an 8x8 cell - 0.5): bright cells;
    - channel 1 is relu(0.5 - mean brightness): dark cells, a distractor for class BLOB;
    - class BLOB's logit is `logit_scale` x the pooled channel 0, class DARK's the pooled
      channel 1, class NOTHING's a constant (no location raises it).

    The random flips and dropout would move or blank the maps if Grad-CAM ran in training
    mode. `separate_sigmoid` puts the sigmoid in its own layer after a linear Dense, so the
    logit is not reachable and Grad-CAM must use the probability.
    """
    inputs = keras.Input((SIZE, SIZE, 1), dtype="uint8", name="image")
    unit = keras.layers.Rescaling(1.0 / 255.0, name="to_unit")(inputs)
    flipped = keras.layers.RandomFlip("horizontal_and_vertical", seed=1, name="augment")(unit)
    cells = keras.layers.Conv2D(2, PATCH, strides=PATCH, name="patch_conv")(flipped)
    cells = keras.layers.Activation("relu", name="patch_relu")(cells)
    pooled = keras.layers.GlobalAveragePooling2D(name="feature_pool")(cells)
    pooled = keras.layers.Dropout(0.5, name="feature_dropout")(pooled)
    if separate_sigmoid:
        logits = keras.layers.Dense(3, name="logits")(pooled)
        outputs = keras.layers.Activation("sigmoid", name="predictions")(logits)
        head = "logits"
    else:
        outputs = keras.layers.Dense(3, activation="sigmoid", name="predictions")(pooled)
        head = "predictions"
    model = keras.Model(inputs, outputs)

    cell_mean = np.full((PATCH, PATCH, 1), 1.0 / PATCH**2, dtype=np.float32)
    model.get_layer("patch_conv").set_weights(
        [np.stack([cell_mean, -cell_mean], axis=-1), np.array([-0.5, 0.5], np.float32)]
    )
    head_kernel = np.array([[logit_scale, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    model.get_layer(head).set_weights([head_kernel, np.array([-1.0, 0.0, 0.5], np.float32)])
    return model


def blob_images(boxes: list[tuple[int, int, int, int]], seed: int = 0) -> np.ndarray:
    """(N, SIZE, SIZE, 1) uint8: a dark noisy background with one bright square per box."""
    rng = np.random.default_rng(seed)
    images = rng.integers(20, 61, (len(boxes), SIZE, SIZE, 1)).astype(np.uint8)
    for image, (x, y, w, h) in zip(images, boxes, strict=True):
        image[y : y + h, x : x + w] = 230
    return images


def grown(box: tuple[int, int, int, int], margin: int) -> tuple[int, int, int, int]:
    x, y, w, h = box
    return (x - margin, y - margin, w + 2 * margin, h + 2 * margin)


@pytest.fixture(scope="module")
def blob_gradcam() -> GradCam:
    return GradCam(blob_model(), "patch_relu")


@pytest.fixture(scope="module")
def densenet_gradcam() -> GradCam:
    model = build_model("densenet_tiny", SIZE, 14)
    return GradCam(model, get_backbone("densenet_tiny").last_conv_layer)


# --- Grad-CAM on a model whose right answer is known ---


@pytest.mark.parametrize("corner", list(CORNERS))
def test_heatmap_peak_falls_on_the_blob(blob_gradcam, corner):
    box = CORNERS[corner]
    (heatmap,) = blob_gradcam.heatmaps(blob_images([box]), BLOB)

    assert blob_gradcam.score == "logit"
    assert pointing_game(heatmap, box)
    assert heatmap.max() == 1.0
    # The heat sits on the blob (give or take one cell of the 8x8 map), not spread around.
    near_blob = box_mask(heatmap.shape, grown(box, PATCH))
    assert heatmap[near_blob].sum() > 0.95 * heatmap.sum()
    assert heatmap[~near_blob].max() < 0.05


def test_heatmap_follows_the_class_asked_for(blob_gradcam):
    box = CORNERS["top_right"]
    images = blob_images([box])
    dark_map, nothing_map = blob_gradcam.heatmaps(np.repeat(images, 2, axis=0), [DARK, NOTHING])

    # DARK's score comes from the dark cells: its map is cold on the blob, hot elsewhere.
    assert not pointing_game(dark_map, box)
    assert dark_map[box_mask(dark_map.shape, box)].mean() < 0.2
    assert dark_map.max() == 1.0
    # No location raises NOTHING's score: an all-zero map, not NaN, that points nowhere.
    assert np.all(nothing_map == 0.0)
    assert heatmap_peak(nothing_map) is None


def test_confident_prediction_still_localises_through_the_logit():
    box = CORNERS["bottom_left"]
    images = blob_images([box])
    saturated = blob_model(logit_scale=1e4)
    assert saturated.predict(images, verbose=0)[0, BLOB] == 1.0  # sigmoid rounds to exactly 1

    (heatmap,) = GradCam(saturated, "patch_relu").heatmaps(images, BLOB)
    assert pointing_game(heatmap, box)

    # Without a reachable logit the probability's gradient underflows to zero: the map is
    # empty (and finite), which is why GradCam prefers the logit.
    probability_only = GradCam(blob_model(1e4, separate_sigmoid=True), "patch_relu")
    assert probability_only.score == "probability"
    (empty,) = probability_only.heatmaps(images, BLOB)
    assert np.all(empty == 0.0)


# --- Grad-CAM on a real backbone ---


def test_untrained_densenet_maps_are_finite_and_normalised(densenet_gradcam):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, SIZE, SIZE, 1), dtype=np.uint8)
    heatmaps = densenet_gradcam.heatmaps(images, rng.integers(0, 14, 5))

    assert densenet_gradcam.score == "logit"
    assert heatmaps.shape == (5, SIZE, SIZE)
    assert heatmaps.dtype == np.float32
    assert np.all(np.isfinite(heatmaps))
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    # Each map peaks at exactly 1, or is all zero where nothing raises the score.
    assert set(heatmaps.max(axis=(1, 2)).tolist()) <= {0.0, 1.0}


def test_batching_does_not_change_the_maps(densenet_gradcam):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (5, SIZE, SIZE), dtype=np.uint8)  # channel axis optional
    classes = rng.integers(0, 14, 5)

    together = densenet_gradcam.heatmaps(images, classes, batch_size=16)
    in_pairs = densenet_gradcam.heatmaps(images, classes, batch_size=2)
    one_by_one = np.concatenate(
        [densenet_gradcam.heatmaps(images[i : i + 1], classes[i]) for i in range(len(images))]
    )
    np.testing.assert_allclose(in_pairs, together, atol=1e-5)
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)
    assert densenet_gradcam.heatmaps(images[:0], []).shape == (0, SIZE, SIZE)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: GradCam(blob_model(), "relu"), "has no layer 'relu'"),
        (lambda: GradCam(blob_model(), "feature_pool"), "convolutional map"),
        (
            lambda: GradCam(blob_model(), "patch_relu").heatmaps(blob_images([]), [], 0),
            "batch_size",
        ),
        (
            lambda: GradCam(blob_model(), "patch_relu").heatmaps(blob_images([(0, 0, 1, 1)]), 3),
            "class index 3 is out of range",
        ),
        (
            lambda: GradCam(blob_model(), "patch_relu").heatmaps(np.zeros((1, 32, 32, 1)), 0),
            "the model takes",
        ),
        (
            lambda: GradCam(blob_model(), "patch_relu").heatmaps(blob_images([]), [0, 1]),
            "one class index per image",
        ),
    ],
    ids=["unknown_layer", "not_a_map", "batch_size", "class_index", "image_shape", "classes"],
)
def test_mistakes_are_explained(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- Pointing game, IoU and the centred baseline ---


def test_pointing_game_uses_pixel_centres():
    heatmap = np.zeros((10, 10), np.float32)
    heatmap[2, 3] = 1.0  # row 2, column 3: centre (x, y) = (3.5, 2.5)
    assert pointing_game(heatmap, (3, 2, 1, 1))
    assert pointing_game(heatmap, {"label": "Mass", "x": 3.2, "y": 2.0, "w": 0.5, "h": 1.0})
    assert not pointing_game(heatmap, (0, 0, 3, 10))  # ends at x = 3, before the centre
    assert not pointing_game(np.zeros((10, 10)), (0, 0, 10, 10))  # an empty map points nowhere


def test_peak_of_a_plateau_is_its_middle_not_its_first_pixel():
    # Bilinear upsampling of a border cell gives a plateau like this one.
    heatmap = np.zeros((12, 12), np.float32)
    heatmap[:4, :4] = 1.0
    heatmap[4:6, :6] = 0.7
    assert heatmap_peak(heatmap) == (1, 1)
    assert pointing_game(heatmap, (1, 1, 2, 2))
    assert not pointing_game(heatmap, (0, 0, 1, 1))  # where np.argmax would point


def test_heatmap_iou_known_values():
    heatmap = np.full((10, 10), 0.4, np.float32)  # below the threshold: not hot
    heatmap[:4, :4] = 0.8  # 16 hot pixels
    assert heatmap_iou(heatmap, (0, 0, 4, 4)) == 1.0
    assert heatmap_iou(heatmap, (2, 2, 4, 4)) == pytest.approx(4 / 28)  # 4 shared of 16+16-4
    assert heatmap_iou(heatmap, (6, 6, 4, 4)) == 0.0
    assert heatmap_iou(heatmap, (0, 0, 10, 10), threshold=0.3) == 1.0
    assert heatmap_iou(np.zeros((10, 10)), (0, 0, 0.2, 0.2)) == 0.0  # both empty


def test_centre_baseline_hits_a_centred_box_and_misses_a_corner():
    centred = centre_baseline(SIZE, (24, 24, 16, 16))
    assert centred.pointing_hit
    # Gaussian >= 0.5 is a disc of radius sigma*sqrt(2 ln 2) that holds the whole box.
    disc_area = math.pi * (0.25 * SIZE) ** 2 * 2 * math.log(2)
    assert centred.iou == pytest.approx(16 * 16 / disc_area, abs=0.02)

    corner = centre_baseline(SIZE, (0, 0, 10, 10))
    assert not corner.pointing_hit
    assert corner.iou == 0.0
    assert centre_gaussian(SIZE).max() == 1.0


def test_localization_scores_per_label_with_baseline():
    hit = np.zeros((SIZE, SIZE), np.float32)
    hit[5, 5] = 1.0
    pairs = {
        "Mass": [(hit, (0, 0, 10, 10)), (hit, (40, 40, 10, 10))],  # one hit, one miss
        "Nodule": [(hit, (24, 24, 16, 16))],
        "Atelectasis": [],
    }
    scores = localization_scores(pairs)

    assert set(scores) == {"Mass", "Nodule"}
    assert scores["Mass"]["n"] == 2
    assert scores["Mass"]["pointing_hit_rate"] == 0.5
    assert scores["Mass"]["mean_iou"] == pytest.approx((1 / 100 + 0.0) / 2)
    assert scores["Mass"]["baseline_pointing_hit_rate"] == 0.0
    assert scores["Nodule"]["pointing_hit_rate"] == 0.0
    assert scores["Nodule"]["baseline_pointing_hit_rate"] == 1.0
    assert scores["Nodule"]["baseline_mean_iou"] == centre_baseline(SIZE, (24, 24, 16, 16)).iou


def test_boxes_get_the_heatmap_of_their_own_label(blob_gradcam):
    images = blob_images([CORNERS["top_left"], CORNERS["bottom_right"]])
    as_dict = lambda label, box: dict(zip("xywh", box, strict=True), label=label)  # noqa: E731
    boxes_per_image = [
        [as_dict("Blob", CORNERS["top_left"]), as_dict("Blob", grown(CORNERS["top_left"], 2))],
        [as_dict("Blob", CORNERS["bottom_right"]), as_dict("Dark", CORNERS["bottom_right"])],
        [as_dict("Other", (0, 0, 5, 5))],  # a label the model does not predict: left out
    ]
    images = np.concatenate([images, images[:1]])
    pairs = heatmaps_for_boxes(blob_gradcam, images, boxes_per_image, {"Blob": 0, "Dark": 1})

    assert {label: len(p) for label, p in pairs.items()} == {"Blob": 3, "Dark": 1}
    assert pairs["Blob"][0][0] is pairs["Blob"][1][0]  # one map per (image, label)
    scores = localization_scores(pairs)
    assert scores["Blob"]["pointing_hit_rate"] == 1.0  # BLOB's maps point at the blobs
    assert scores["Dark"]["pointing_hit_rate"] == 0.0  # DARK's map avoids it

    with pytest.raises(ValueError, match="No box has a label the model predicts"):
        heatmaps_for_boxes(blob_gradcam, images[2:], boxes_per_image[2:], {"Blob": 0})


# --- Picking examples and drawing them ---


def test_select_examples_picks_most_confident_true_and_false_positives():
    nan = np.nan
    y_true = np.array(
        [[1, 0], [1, 1], [0, 1], [0, 0], [1, nan], [nan, 0], [0, 1], [1, 0]], dtype=float
    )
    y_prob = np.array(
        [
            [0.9, 0.1],
            [0.6, 0.8],
            [0.7, 0.2],  # B: a positive below its threshold
            [0.95, 0.4],  # A: the worst false alarm
            [0.99, 0.9],  # B unknown: neither
            [0.8, 0.35],  # A unknown: neither
            [0.55, 0.4],  # A: a false alarm
            [0.4, 0.4],  # A: a positive below its threshold; B: ties row 3, which comes first
        ]
    )
    examples = select_examples(y_true, y_prob, {"A": 0.5, "B": 0.3}, ["A", "B"], k=2)

    assert examples["A"] == {"true_positives": [4, 0], "false_positives": [3, 2]}
    assert examples["B"] == {"true_positives": [1, 6], "false_positives": [3, 7]}
    assert select_examples(y_true, y_prob, [0.5, 0.3], ["A", "B"], k=5)["A"] == {
        "true_positives": [4, 0, 1],
        "false_positives": [3, 2, 6],
    }


def test_overlay_draws_the_heatmap_the_box_and_the_title():
    image = np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))
    heatmap = centre_gaussian(SIZE)
    plain = np.asarray(overlay(image, heatmap))
    x, y, w, h = 10, 20, 30, 15
    boxed_image = overlay(image, heatmap, box=(x, y, w, h))
    boxed = np.asarray(boxed_image)

    assert boxed_image.mode == "RGB" and boxed_image.size == (SIZE, SIZE)
    outline = box_mask((SIZE, SIZE), (x, y, w, h)) & ~box_mask(
        (SIZE, SIZE), (x + 1, y + 1, w - 2, h - 2)
    )
    assert np.all(boxed[outline] == BOX_COLOUR)
    assert np.all(np.any(plain[outline] != BOX_COLOUR, axis=-1))
    np.testing.assert_array_equal(boxed[~outline], plain[~outline])  # an outline, not a fill

    red, blue = 0, 2
    centre, corner = plain[SIZE // 2, SIZE // 2].astype(int), plain[0, 0].astype(int)
    assert centre[red] > centre[blue]  # hot is red in jet
    assert corner[blue] > corner[red]  # cold is blue

    titled = np.asarray(overlay(image, heatmap, title="Mass p=0.91"))
    assert np.any(titled[:8, :40] != plain[:8, :40])
    np.testing.assert_array_equal(titled[SIZE // 2 :], plain[SIZE // 2 :])


@pytest.mark.parametrize(("height", "width"), [(200, 300), (300, 200), (256, 256)])
def test_a_heatmap_lands_on_the_same_spot_of_the_original_image(height, width):
    # A spot of the original (a quarter across, a fifth down), found in the model's padded
    # 64 px square the way prepare finds it, is hot there; mapped back, the map is the
    # original's size and peaks on the spot, the padding left out.
    spot_x, spot_y = width // 4, height // 5
    _, placement = square_resize(np.zeros((height, width), dtype=np.uint8), SIZE)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    centre_x = spot_x * placement.scale + placement.offset_x
    centre_y = spot_y * placement.scale + placement.offset_y
    heat = np.exp(-((cols - centre_x) ** 2 + (rows - centre_y) ** 2) / 8.0).astype(np.float32)

    on_source = heatmap_on_source(heat, (height, width), placement)

    assert on_source.shape == (height, width) and on_source.dtype == np.float32
    peak_row, peak_col = heatmap_peak(on_source)
    cell = 1 / placement.scale  # one model pixel, in original pixels
    assert abs(peak_row - spot_y) <= cell and abs(peak_col - spot_x) <= cell
    assert 0.0 <= on_source.min() and on_source.max() <= 1.0


def test_an_overlay_for_a_reader_keeps_a_large_image_and_enlarges_a_small_one():
    large = np.full((1024, 768), 90, dtype=np.uint8)
    assert overlay(large, np.zeros(large.shape, np.float32), min_side=MIN_OVERLAY_SIDE).size == (
        768,
        1024,
    )
    image = np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8), (SIZE, 1))
    box = (10, 20, 30, 15)
    enlarged = overlay(image, centre_gaussian(SIZE), box=box, min_side=MIN_OVERLAY_SIDE)
    factor = MIN_OVERLAY_SIDE // SIZE
    assert enlarged.size == (MIN_OVERLAY_SIDE, MIN_OVERLAY_SIDE)
    pixels = np.asarray(enlarged)
    # the box is scaled with the image: its outline is at 8× the coordinates
    assert tuple(pixels[20 * factor, 10 * factor + 5]) == BOX_COLOUR
    assert tuple(pixels[20 * factor + 5, 10 * factor + 5]) != BOX_COLOUR
    # smooth, not blocky: inside one model pixel the enlarged map still varies
    reds = pixels[200:208, 200:208, 0].astype(int)
    assert len(np.unique(reds)) > 1


@pytest.mark.parametrize(
    ("size", "layer", "side"), [(224, "relu", 7), (128, "pool4_relu", 8), (64, "pool3_relu", 8)]
)
def test_the_report_explains_densenet121s_deepest_map_of_at_least_7x7(size, layer, side):
    from chestxpert.results.final_figures import _gradcam_layer

    model = build_model("densenet121", size, 14)
    chosen, note = _gradcam_layer(model, get_backbone("densenet121").last_conv_layer, None)
    assert chosen == layer and model.get_layer(chosen).output.shape[1:3] == (side, side)
    assert (note is None) == (layer == "relu")
    if note:
        assert f"{layer} ({side}×{side})" in note and "--gradcam-layer" in note
    assert _gradcam_layer(model, "relu", "pool3_relu") == ("pool3_relu", None)
    with pytest.raises(ValueError, match="no_such_layer"):
        _gradcam_layer(model, "relu", "no_such_layer")
