"""Image preprocessing shared by `prepare` and inference: any PNG/JPEG to an 8-bit gray square.

Training and `predict` call the same function, so a model sees the same pixels
at inference as it saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# The largest image we decode: far above any radiograph (a 43×43 cm detector at 100 µm is
# 18 MP) and far below what would exhaust memory. Pillow's own guard stops at 89 MP with a
# warning and raises only at twice that; a file declaring more than this is refused unread.
MAX_IMAGE_PIXELS = 50_000_000

# The smallest input any registered backbone accepts (DenseNet121 and MobileNetV3 need 32×32).
MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class Placement:
    """How an original image maps to the prepared square: `prepared = original * scale + offset`."""

    scale: float
    offset_x: float
    offset_y: float


def to_gray_uint8(image: Image.Image) -> np.ndarray:
    """Return an image as a 2-D uint8 array, whatever its mode.

    RGBA/RGB/LA/P are converted with PIL's luminance formula (NIH's RGBA files
    are gray copies with an opaque alpha); 16-bit and 32-bit modes are scaled
    from their own minimum-maximum range, because X-ray PNGs use 10-, 12- or
    16-bit ranges and a fixed divisor would leave some nearly black.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape, dtype=np.uint8)
        return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


def square_resize(gray: np.ndarray, size: int) -> tuple[np.ndarray, Placement]:
    """Pad a gray image to a square (centred, black border) and resize it to `size`×`size`.

    Padding rather than stretching keeps the heart-to-thorax proportions that
    findings like cardiomegaly are judged by. The resize is anti-aliased
    (Lanczos, after a box reduction for large factors).
    """
    height, width = gray.shape
    side = max(height, width)
    offset_y, offset_x = (side - height) // 2, (side - width) // 2
    if height != width:
        square = np.zeros((side, side), dtype=np.uint8)
        square[offset_y : offset_y + height, offset_x : offset_x + width] = gray
    else:
        square = gray
    image = Image.fromarray(square, mode="L")
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    scale = size / side
    return np.asarray(image, dtype=np.uint8), Placement(scale, offset_x * scale, offset_y * scale)


def resize_uint8(images, size: int):
    """Resize a batch of uint8 images (N×S×S×C, array or tensor) to `size`×`size`, anti-aliased.

    The one on-the-fly resize, for a trial or an evaluation at a smaller size than the
    dataset was prepared at: eager on arrays (call `.numpy()` on the result) and inside a
    tf.data map alike. Returns a uint8 tensor, rounded, never truncated.
    """
    import tensorflow as tf

    resized = tf.image.resize(images, (size, size), antialias=True)
    return tf.cast(tf.round(resized), tf.uint8)


def load_gray_square(path: str | Path, size: int) -> tuple[np.ndarray, Placement]:
    """Read an image file (PNG or JPEG, 8/16-bit, gray/RGB/RGBA) as a `size`×`size` uint8 array."""
    return square_resize(load_gray(path), size)


def load_gray(path: str | Path) -> np.ndarray:
    """Read an image file (PNG or JPEG, 8/16-bit, gray/RGB/RGBA) as a uint8 gray array at its own
    size: what `load_gray_square` pads and resizes, and what a Grad-CAM overlay is drawn on."""
    with Image.open(path) as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"it declares {image.width}×{image.height} pixels, over the "
                f"{MAX_IMAGE_PIXELS:,}-pixel limit for one radiograph (not decoded)"
            )
        image.load()
        return to_gray_uint8(image)
