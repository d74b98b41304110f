"""Backbone registry and build_model: every backbone builds, exposes its Grad-CAM layer and
loads safely; weights come from local files, and offline or missing weights fail clearly."""

from __future__ import annotations

import dataclasses
import urllib.error
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from chestxpert.trainable.backbones import BACKBONES, DEFAULT_BACKBONE, build_model, get_backbone

NUM_LABELS = 3


def gray_batch(image_size: int, count: int = 2, seed: int = 0) -> np.ndarray:
    """Random uint8 gray images shaped like the dataset reader's batches."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, image_size, image_size, 1), dtype=np.uint8)


def save_keras_notop_h5(base: keras.Model, path: Path) -> Path:
    """Write `base` in the legacy .h5 layout of Keras's published *_notop.h5 ImageNet files."""
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, base)
    return path


def randomize_weights(model: keras.Model, seed: int = 1) -> None:
    """Fill every variable with random values (not a usable model), so a no-op load fails."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))


def weights_by_layer(model: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def assert_weights_loaded(source: keras.Model, model: keras.Model) -> None:
    expected = weights_by_layer(source)
    assert expected, "source has no weights to compare"
    for name, values in expected.items():
        for saved, loaded in zip(values, model.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(saved, loaded, err_msg=name)


def test_registry_is_consistent():
    assert DEFAULT_BACKBONE == "densenet121"
    assert {
        "densenet121",
        "densenet169",
        "densenet201",
        "mobilenetv3small",
        "mobilenetv3large",
        "efficientnetb0",
        "resnet50v2",
        "inceptionresnetv2",
        "densenet_tiny",
    } <= set(BACKBONES)
    for name, entry in BACKBONES.items():
        assert entry.name == name
        assert get_backbone(name) is entry
        assert (entry.weights_file is None) == (entry.weights_url is None)
        if entry.weights_file:
            assert entry.weights_url.startswith("https://storage.googleapis.com/")
            assert entry.weights_url.endswith("/" + entry.weights_file)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_builds_at_min_size_with_reachable_grad_cam_layer(name):
    entry = BACKBONES[name]
    size = entry.min_size
    model = build_model(name, size, NUM_LABELS)

    assert model.input.dtype == "uint8" and tuple(model.input.shape) == (None, size, size, 1)
    predictions = model(gray_batch(size), training=False)
    assert predictions.dtype == "float32" and tuple(predictions.shape) == (2, NUM_LABELS)
    assert np.all((np.asarray(predictions) >= 0) & (np.asarray(predictions) <= 1))

    # Grad-CAM target: reachable by name, a spatial map, and what the pooling reads.
    last_conv = model.get_layer(entry.last_conv_layer)
    assert len(last_conv.output.shape) == 4
    spatial = [layer for layer in model.layers if len(layer.output.shape) == 4]
    assert spatial[-1] is last_conv
    assert model.get_layer("feature_pool").input is last_conv.output

    # safe_mode loading needs built-in layers only, and no nested model hides the base.
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert all(type(layer).__module__.startswith("keras.") for layer in model.layers)
    if entry.scaling == "raw":  # the base scales 0..255 itself
        own = [layer for layer in model.layers if isinstance(layer, keras.layers.Rescaling)]
        assert [layer.name for layer in own if layer.name != "to_float32"]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_rejects_images_below_min_size(name):
    entry = BACKBONES[name]
    with pytest.raises(ValueError, match=rf"'{name}' needs images of at least {entry.min_size}x"):
        build_model(name, entry.min_size - 1, NUM_LABELS)


@pytest.mark.parametrize("name", ["densenet121", "densenet_tiny"])
def test_save_and_safe_load_give_identical_predictions(name, tmp_path):
    augmentation = keras.Sequential(
        [
            keras.layers.RandomRotation(0.02, seed=1),
            keras.layers.RandomTranslation(0.05, 0.05, seed=2),
        ],
        name="augmentation",
    )
    model = build_model(name, 32, NUM_LABELS, augmentation=augmentation)
    images = gray_batch(32, count=4)
    expected = np.asarray(model(images, training=False))

    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)

    np.testing.assert_array_equal(np.asarray(loaded(images, training=False)), expected)
    assert loaded.get_layer(BACKBONES[name].last_conv_layer) is not None


def test_augmentation_runs_on_gray_floats_in_training_only():
    flip = keras.layers.RandomFlip("horizontal", seed=3, name="flip")
    model = build_model("densenet_tiny", 32, NUM_LABELS, augmentation=flip)
    augmented = keras.Model(model.input, model.get_layer("flip").output)
    images = gray_batch(32, count=16)

    assert augmented.output.dtype == "float32" and augmented.output.shape[-1] == 1
    np.testing.assert_array_equal(np.asarray(augmented(images, training=False)), images)
    trained = np.asarray(augmented(images, training=True))
    flipped = [np.array_equal(out, img[:, ::-1]) for out, img in zip(trained, images, strict=True)]
    kept = [np.array_equal(out, img) for out, img in zip(trained, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped)


@pytest.mark.parametrize(
    ("scaling", "expected"),
    [
        (
            "torch",
            lambda px: (
                (px / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
            ),
        ),
        ("tf", lambda px: np.repeat(px / 127.5 - 1.0, 3, axis=-1)),
        ("raw", lambda px: np.repeat(px, 3, axis=-1)),
    ],
)
def test_scaling_turns_gray_pixels_into_backbone_input(scaling, expected, monkeypatch):
    entry = dataclasses.replace(BACKBONES["densenet_tiny"], scaling=scaling)
    monkeypatch.setitem(BACKBONES, "densenet_tiny", entry)
    model = build_model("densenet_tiny", 32, NUM_LABELS)
    # conv1_conv reads the base input after 3 pixels of zero padding.
    base_input = keras.Model(model.input, model.get_layer("conv1_conv").input)
    images = gray_batch(32, count=2)

    seen = np.asarray(base_input(images))[:, 3:-3, 3:-3, :]
    np.testing.assert_allclose(seen, expected(images.astype("float64")), rtol=1e-5, atol=1e-5)


def test_mixed_precision_keeps_float32_input_and_output():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("densenet_tiny", 32, NUM_LABELS)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("conv1_conv").compute_dtype == "float16"
    assert model.get_layer("to_float32").output.dtype == "float32"
    assert model(gray_batch(32), training=False).dtype == "float32"


@pytest.mark.parametrize("suffix", [".h5", ".weights.h5", ".keras"])
def test_weights_from_local_file(suffix, tmp_path):
    source = BACKBONES["densenet_tiny"].builder(keras.Input((64, 64, 3)), None)
    randomize_weights(source)
    path = tmp_path / f"densenet_tiny{suffix}"
    if suffix == ".h5":  # the layout of Keras's published notop files
        save_keras_notop_h5(source, path)
    elif suffix == ".weights.h5":
        source.save_weights(path)
    else:
        source.save(path)

    model = build_model("densenet_tiny", 64, NUM_LABELS, weights=str(path))

    assert_weights_loaded(source, model)


def test_weights_of_another_backbone_are_refused(tmp_path):
    source = BACKBONES["densenet_tiny"].builder(keras.Input((32, 32, 3)), None)
    path = save_keras_notop_h5(source, tmp_path / "densenet_tiny.h5")
    with pytest.raises(
        ValueError,
        match=r"Could not load weights .*'mobilenetv3small'.*"
        r"weights_mobilenet_v3_small_224_1\.0_float_no_top_v2\.h5",
    ):
        build_model("mobilenetv3small", 32, NUM_LABELS, weights=str(path))


def test_missing_weights_file_says_which_file_and_where_to_get_it(tmp_path):
    entry = BACKBONES["densenet121"]
    missing = tmp_path / "nowhere" / entry.weights_file
    with pytest.raises(ValueError) as error:
        build_model("densenet121", 32, NUM_LABELS, weights=str(missing))
    message = str(error.value)
    assert str(missing) in message and "does not exist" in message
    assert entry.weights_file in message and entry.weights_url in message
    assert f"weights: /path/to/{entry.weights_file}" in message


def test_missing_weights_file_for_a_backbone_without_published_weights(tmp_path):
    with pytest.raises(ValueError, match="no published ImageNet weights: pass a weights file"):
        build_model("densenet_tiny", 32, NUM_LABELS, weights=str(tmp_path / "tiny.h5"))


def test_empty_weights_means_from_scratch(monkeypatch):
    monkeypatch.setattr(keras.utils, "get_file", None)  # any download attempt would fail
    model = build_model("densenet_tiny", 32, NUM_LABELS, weights="")
    assert model.output.shape[-1] == NUM_LABELS


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_labels": 0}, "num_labels must be at least 1"),
        ({"dropout": 1.0}, r"dropout .*\[0, 1\)"),
    ],
)
def test_rejects_bad_head_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        build_model(**{"backbone": "densenet_tiny", "image_size": 32, "num_labels": 3, **arguments})


@pytest.mark.parametrize(
    "failure",
    [
        urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
        Exception("URL fetch failure on https://storage.googleapis.com/...: None -- offline"),
    ],
)
def test_imagenet_offline_asks_for_a_local_file(failure, monkeypatch):
    entry = BACKBONES["densenet121"]
    requested = []

    def offline_get_file(fname, origin, **kwargs):
        requested.append((fname, origin))
        raise failure

    monkeypatch.setattr(keras.utils, "get_file", offline_get_file)
    with pytest.raises(ValueError, match="could not download") as error:
        build_model("densenet121", 32, NUM_LABELS, weights="imagenet")
    assert requested == [(entry.weights_file, entry.weights_url)]
    assert f"weights: /path/to/{entry.weights_file}" in str(error.value)


def test_imagenet_loads_the_file_keras_provides(tmp_path, monkeypatch):
    # Stands in for the download: a DenseNet121 notop file in Keras's published layout.
    source = keras.applications.DenseNet121(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    randomize_weights(source)
    path = save_keras_notop_h5(source, tmp_path / BACKBONES["densenet121"].weights_file)
    monkeypatch.setattr(keras.utils, "get_file", lambda fname, origin, **kwargs: str(path))

    model = build_model("densenet121", 32, NUM_LABELS, weights="imagenet")

    assert_weights_loaded(source, model)


def test_imagenet_for_a_backbone_without_published_weights():
    with pytest.raises(ValueError, match="'densenet_tiny' has no ImageNet weights"):
        build_model("densenet_tiny", 32, NUM_LABELS, weights="imagenet")


def test_efficientnet_weights_file_matches_keras_imagenet_model(tmp_path, monkeypatch):
    # Keras inserts an extra Rescaling only for weights="imagenet"; a local copy of the
    # same file must scale the input the same way.
    source = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    normalization = next(
        layer for layer in source.layers if isinstance(layer, keras.layers.Normalization)
    )
    normalization.set_weights(
        [np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]), np.array(0)]
    )
    path = save_keras_notop_h5(source, tmp_path / "efficientnetb0_notop.h5")
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", lambda *args, **kwargs: str(path))
    keras_imagenet = keras.applications.EfficientNetB0(
        include_top=False, weights="imagenet", input_shape=(32, 32, 3)
    )

    model = build_model("efficientnetb0", 32, NUM_LABELS, weights=str(path))

    # The first convolution sees exactly what Keras's ImageNet model feeds it.
    ours = keras.Model(model.input, model.get_layer("stem_conv").output)
    theirs = keras.Model(keras_imagenet.input, keras_imagenet.get_layer("stem_conv").output)
    images = gray_batch(32, count=2)
    expected = np.asarray(theirs(np.repeat(images, 3, axis=-1).astype("float32")))
    assert np.all(np.isfinite(expected)) and np.abs(expected).max() > 0.1
    np.testing.assert_allclose(np.asarray(ours(images)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("densenet12", "densenet121"),
        ("DenseNet169", "densenet169"),
        ("mobilenet_v3_small", "mobilenetv3small"),
    ],
)
def test_unknown_backbone_suggests_the_closest_name(typo, suggestion):
    with pytest.raises(
        ValueError, match=rf"Unknown backbone '{typo}'\. Did you mean '{suggestion}'\?"
    ) as error:
        get_backbone(typo)
    assert all(name in str(error.value) for name in BACKBONES)
    with pytest.raises(ValueError, match="Unknown backbone"):
        build_model(typo, 64, NUM_LABELS)
