"""Backbone registry and the classifier built on it: gray uint8 image in, one sigmoid per label out.

Adding a backbone is one `Backbone` entry in `BACKBONES` (and one test row, which is automatic).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

# Keras (and so TensorFlow) is imported by the functions that build, not by the registry:
# a spec check or `sweep run --dry-run` reads the registry's facts in well under a second.
if TYPE_CHECKING:
    import keras

DEFAULT_BACKBONE = "densenet121"

# How 0..255 pixels (repeated to RGB) are scaled before the base; see `_scale`.
SCALINGS = ("torch", "tf", "raw")
_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Backbone:
    """One registered feature extractor and the facts build_model needs about it."""

    name: str
    min_size: int  # smallest square input side it accepts, in pixels
    last_conv_layer: str  # last convolutional activation in the built model (Grad-CAM target)
    scaling: str  # one of SCALINGS
    weights_file: str | None  # Keras ImageNet notop weights file, None if there is none
    # (input_tensor, weights: None or a local file) -> base without top, built on input_tensor
    builder: Callable[..., keras.Model]
    weights_url: str | None = None  # where Keras publishes weights_file

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"Backbone {self.name!r}: scaling must be one of {SCALINGS}")


def _load_base_weights(base: keras.Model, input_tensor: keras.KerasTensor, path: str) -> None:
    """Load a weights file into the layers between `input_tensor` and `base.output` only.

    The base is built on our tensor, so `base` also holds our cast, augmentation and
    scaling layers; the Keras notop .h5 files match layers by order, which only works
    on a model with exactly the application's layers. This view shares those layers.
    """
    import keras

    application_only = keras.Model(input_tensor, base.output)
    application_only.load_weights(path)


def _keras_application(
    application: Callable[..., keras.Model] | str,
    input_tensor: keras.KerasTensor,
    weights: str | None = None,
) -> keras.Model:
    """Build a Keras application (a function, or its name in `keras.applications`) without its
    top on `input_tensor`; `weights` is None or a file."""
    import keras

    if isinstance(application, str):
        application = getattr(keras.applications, application)
    base = application(include_top=False, weights=None, input_tensor=input_tensor)
    if weights is not None:
        _load_base_weights(base, input_tensor, weights)
    return base


def _mobilenet_v3(
    application: Callable[..., keras.Model] | str,
    input_tensor: keras.KerasTensor,
    weights: str | None = None,
) -> keras.Model:
    """MobileNetV3 whose last activation gets a fixed name (Keras leaves it auto-numbered)."""
    base = _keras_application(application, input_tensor, weights)
    last = base.layers[-1]
    assert last.output is base.output, "MobileNetV3 base no longer ends in its activation"
    last.name = "conv_1_activation"
    return base


def _efficientnet_b0(input_tensor: keras.KerasTensor, weights: str | None = None) -> keras.Model:
    """EfficientNetB0; loaded weights get the input scaling Keras gives its ImageNet model.

    Keras adds a Rescaling(1/sqrt(std)) after the stem Normalization only when it is
    asked for weights="imagenet", not when given the same file by path. Folding that
    factor into the Normalization variance gives the same output with the same layers,
    so a local copy of efficientnetb0_notop.h5 behaves like the download. Every loaded
    file is treated so: weights saved from a base built here would be folded twice.
    """
    import keras

    base = _keras_application(keras.applications.EfficientNetB0, input_tensor, weights)
    if weights is not None:
        normalization = next(
            layer for layer in base.layers if isinstance(layer, keras.layers.Normalization)
        )
        normalization.adapt_variance.assign(
            normalization.adapt_variance * keras.ops.convert_to_tensor(_IMAGENET_STD_RGB)
        )
        normalization.finalize_state()
    return base


def _densenet_tiny(**kwargs) -> keras.Model:
    """DenseNet121's design with 1, 2, 4, 2 conv blocks (not 6, 12, 24, 16): ~7x faster on CPU."""
    # keras.applications only exports DenseNet121/169/201; they are thin calls of this
    # function, which takes the number of conv blocks per dense block.
    from keras.src.applications.densenet import DenseNet as _keras_densenet

    return _keras_densenet([1, 2, 4, 2], name="densenet_tiny", **kwargs)


def _convnet_small(input_tensor: keras.KerasTensor, weights: str | None = None) -> keras.Model:
    """Four conv-BN-ReLU stages (16, 32, 64, 128 filters; the last three stride 2), ending at
    1/8 of the input side: an 8x8 map at 64 px, where DenseNet's is 2x2.

    For smoke runs and tests of the pipeline around the model, not for results: its graph
    builds in a fraction of densenet_tiny's time (see `make bench` startup_per_backbone).
    """
    import keras

    x = input_tensor
    for stage, filters in enumerate((16, 32, 64, 128), start=1):
        x = keras.layers.Conv2D(
            filters,
            3,
            strides=1 if stage == 1 else 2,
            padding="same",
            use_bias=False,
            name=f"conv{stage}",
        )(x)
        x = keras.layers.BatchNormalization(name=f"conv{stage}_bn")(x)
        x = keras.layers.Activation("relu", name="relu" if stage == 4 else f"conv{stage}_relu")(x)
    # As keras.applications do: the base starts at the model's own Input, so its layers stay flat.
    base = keras.Model(keras.utils.get_source_inputs(input_tensor), x, name="convnet_small")
    if weights is not None:
        _load_base_weights(base, input_tensor, weights)
    return base


def _keras_notop(folder: str, file: str) -> dict[str, str]:
    """The weights_file/weights_url pair of a Keras notop file published under `folder`."""
    return {"weights_file": file, "weights_url": f"{_KERAS_WEIGHTS}{folder}{file}"}


BACKBONES: dict[str, Backbone] = {
    entry.name: entry
    for entry in [
        Backbone(
            "densenet121",
            min_size=32,
            last_conv_layer="relu",
            scaling="torch",
            builder=partial(_keras_application, "DenseNet121"),
            **_keras_notop("densenet/", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ),
        Backbone(
            "densenet169",
            min_size=32,
            last_conv_layer="relu",
            scaling="torch",
            builder=partial(_keras_application, "DenseNet169"),
            **_keras_notop("densenet/", "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ),
        Backbone(
            "densenet201",
            min_size=32,
            last_conv_layer="relu",
            scaling="torch",
            builder=partial(_keras_application, "DenseNet201"),
            **_keras_notop("densenet/", "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ),
        # MobileNetV3 and EfficientNet carry their own Rescaling/Normalization layers and
        # expect 0..255 input (Keras 3 docs), hence "raw".
        Backbone(
            "mobilenetv3small",
            min_size=32,
            last_conv_layer="conv_1_activation",
            scaling="raw",
            builder=partial(_mobilenet_v3, "MobileNetV3Small"),
            **_keras_notop(
                "mobilenet_v3/", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
            ),
        ),
        Backbone(
            "mobilenetv3large",
            min_size=32,
            last_conv_layer="conv_1_activation",
            scaling="raw",
            builder=partial(_mobilenet_v3, "MobileNetV3Large"),
            **_keras_notop(
                "mobilenet_v3/", "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"
            ),
        ),
        Backbone(
            "efficientnetb0",
            min_size=32,
            last_conv_layer="top_activation",
            scaling="raw",
            builder=_efficientnet_b0,
            weights_file="efficientnetb0_notop.h5",
            weights_url="https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        ),
        Backbone(
            "resnet50v2",
            min_size=32,
            last_conv_layer="post_relu",
            scaling="tf",
            builder=partial(_keras_application, "ResNet50V2"),
            **_keras_notop("resnet/", "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ),
        Backbone(
            "inceptionresnetv2",
            min_size=75,
            last_conv_layer="conv_7b_ac",
            scaling="tf",
            builder=partial(_keras_application, "InceptionResNetV2"),
            **_keras_notop(
                "inception_resnet_v2/",
                "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
            ),
        ),
        # For fast CPU runs and tests; there are no published weights for these.
        Backbone(
            "densenet_tiny",
            min_size=32,
            last_conv_layer="relu",
            scaling="torch",
            builder=partial(_keras_application, _densenet_tiny),
            weights_file=None,
        ),
        Backbone(
            "convnet_small",
            min_size=32,
            last_conv_layer="relu",
            scaling="torch",
            builder=_convnet_small,
            weights_file=None,
        ),
    ]
}


def get_backbone(name: str) -> Backbone:
    """Return the registered backbone called `name` (e.g. "densenet121"), or raise a ValueError
    that lists the known names and suggests the closest one, so a typo in a config is one
    message away from fixed."""
    if name in BACKBONES:
        return BACKBONES[name]
    close = difflib.get_close_matches(str(name).lower(), BACKBONES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown backbone {name!r}.{hint} Known backbones: {', '.join(BACKBONES)}.")


def _scale(rgb: keras.KerasTensor, scaling: str) -> keras.KerasTensor:
    """Scale 0..255 RGB the way the backbone was trained, with serializable built-in layers."""
    import keras

    if scaling == "torch":
        unit = keras.layers.Rescaling(1.0 / 255.0, name="scale_to_unit")(rgb)
        return keras.layers.Normalization(
            mean=list(_IMAGENET_MEAN_RGB),
            variance=[std**2 for std in _IMAGENET_STD_RGB],
            name="imagenet_normalization",
        )(unit)
    if scaling == "tf":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_symmetric")(rgb)
    return rgb  # "raw": the base has its own preprocessing layers


def _weights_source(backbone: Backbone) -> str:
    if backbone.weights_file is None:
        return (
            f"{backbone.name} has no published ImageNet weights: pass a weights file saved "
            f"from a {backbone.name} base"
        )
    return (
        f"{backbone.name} uses {backbone.weights_file}: download it from {backbone.weights_url} "
        f"on a machine with internet access, copy it to this machine and pass "
        f"`weights: /path/to/{backbone.weights_file}`"
    )


def _resolve_weights(backbone: Backbone, weights: str | None) -> str | None:
    """Turn the `weights` option into None or an existing local file, or say what to do."""
    if not weights:  # None, or "" as the trial config spells "from scratch"
        return None
    if weights == "imagenet":
        import keras

        if backbone.weights_file is None:
            raise ValueError(
                f"Backbone {backbone.name!r} has no ImageNet weights: leave `weights` empty "
                f"to train from scratch, or pass a weights file saved from a {backbone.name} base."
            )
        try:
            return keras.utils.get_file(
                backbone.weights_file, origin=backbone.weights_url, cache_subdir="models"
            )
        except Exception as error:  # get_file re-raises URLError/HTTPError as bare Exception
            raise ValueError(
                f"This machine could not download the ImageNet weights ({error}). "
                f"{_weights_source(backbone)} instead of `weights: imagenet`."
            ) from error
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(
            f"Weights file {str(path)!r} does not exist. {_weights_source(backbone)}; "
            f"or leave `weights` empty to train from scratch."
        )
    return str(path)


def build_model(
    backbone: str,
    image_size: int,
    num_labels: int,
    dropout: float = 0.2,
    weights: str | None = None,
    augmentation: keras.layers.Layer | None = None,
) -> keras.Model:
    """Build the multi-label classifier: a (batch, image_size, image_size, 1) uint8 gray image
    (0..255) goes through a float32 cast, the optional `augmentation` layer (active in training
    only), a repeat to RGB, the backbone's scaling, the backbone `backbone` without its top
    (layers flat, so `model.get_layer(get_backbone(backbone).last_conv_layer)` works), global
    average pooling, `dropout` (a rate in [0, 1)) and `num_labels` float32 sigmoid outputs in
    [0, 1] named "predictions". `weights` is None or "" (from scratch), "imagenet" (Keras
    download, cached in ~/.keras/models) or a path to a weights file for the base (a Keras
    notop .h5 file, matched by layer order as Keras does, or .weights.h5/.keras, matched by
    layer name); a file that does not fit is an error, not a partial load. Every layer is a
    Keras built-in, so the model loads with `keras.models.load_model(..., safe_mode=True)`."""
    import keras

    entry = get_backbone(backbone)
    if image_size < entry.min_size:
        raise ValueError(
            f"Backbone {entry.name!r} needs images of at least {entry.min_size}x{entry.min_size} "
            f"pixels, got image_size={image_size}: set image_size to {entry.min_size} or more, "
            f"or choose another backbone."
        )
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    weights_path = _resolve_weights(entry, weights)

    inputs = keras.Input((image_size, image_size, 1), dtype="uint8", name="image")
    # Rescaling casts to its dtype; pinned to float32 so augmentation sees 0..255 floats
    # even under a mixed-precision policy.
    gray = keras.layers.Rescaling(1.0, dtype="float32", name="to_float32")(inputs)
    if augmentation is not None:
        gray = augmentation(gray)
    rgb = keras.layers.Concatenate(name="gray_to_rgb")([gray, gray, gray])
    base_input = _scale(rgb, entry.scaling)
    try:
        base = entry.builder(base_input, weights_path)
    except (ValueError, OSError) as error:
        if weights_path is None:
            raise
        expected = entry.weights_file or f"weights saved from a {entry.name} base"
        raise ValueError(
            f"Could not load weights {weights_path!r} into backbone {entry.name!r} "
            f"({error}); expected {expected}."
        ) from error

    features = keras.layers.GlobalAveragePooling2D(name="feature_pool")(base.output)
    features = keras.layers.Dropout(dropout, name="feature_dropout")(features)
    outputs = keras.layers.Dense(
        num_labels, activation="sigmoid", dtype="float32", name="predictions"
    )(features)
    return keras.Model(inputs, outputs, name=f"{entry.name}_classifier")
