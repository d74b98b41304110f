"""`predict`'s image input: real DICOM files written with pydicom (windowing, MONOCHROME1,
palette colour, YBR, pixel caps) and PNGs that declare more pixels than any radiograph."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chestxpert.datasets.images import MAX_IMAGE_PIXELS
from chestxpert.results.predict import PredictError, read_image

SIZE = 64


def write_dicom(path: Path, pixels: np.ndarray | None, photometric: str, **elements) -> Path:
    """A real DICOM file (explicit VR little endian, uncompressed) holding `pixels`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    dataset.Modality = "DX"
    dataset.PhotometricInterpretation = photometric
    if pixels is not None:
        dataset.Rows, dataset.Columns = pixels.shape[:2]
        colour = pixels.ndim == 3
        dataset.SamplesPerPixel = 3 if colour else 1
        if colour:
            dataset.PlanarConfiguration = 0
        dataset.BitsAllocated = dataset.BitsStored = 8 * pixels.dtype.itemsize
        dataset.HighBit = dataset.BitsStored - 1
        dataset.PixelRepresentation = 0
        dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in elements.items():
        setattr(dataset, key, value)
    dataset.save_as(path, enforce_file_format=True)
    return path


def anatomy(height: int = 96, width: int = 80) -> np.ndarray:
    """A smooth 12-bit picture, taller than wide (so it is padded to a square)."""
    rows, cols = np.mgrid[0:height, 0:width]
    return (2000 + 1500 * np.sin(rows / 15.0) * np.cos(cols / 11.0)).astype(np.uint16)


def as_png(path: Path, pixels: np.ndarray) -> np.ndarray:
    """The same pixels through the PNG path, as a 16-bit file: both paths then scale the
    image's own minimum-maximum range to 0..255."""
    Image.fromarray(pixels.astype(np.uint16)).save(path)
    return read_image(path, SIZE).astype(np.int16)


INSIDE = (slice(None), slice(8, -8))  # the image part of the square, not the padding


def test_monochrome1_with_rescale_is_inverted_like_a_png(tmp_path: Path) -> None:
    stored = anatomy()
    no_suffix = write_dicom(
        tmp_path / "IM0001", stored, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1024
    )  # found by its DICM preamble, as PACS exports name files
    from_dicom = read_image(no_suffix, SIZE).astype(np.int16)
    from_png = as_png(tmp_path / "same.png", stored)
    assert from_dicom.shape == (SIZE, SIZE)
    assert np.abs(from_dicom[INSIDE] - (255 - from_png[INSIDE])).max() <= 2
    assert (from_dicom[:, :3] == 0).all(), "the padding stays black, not inverted"


def test_the_voi_window_is_applied(tmp_path: Path) -> None:
    """A narrow window saturates what lies outside it: the film as it was meant to be read."""
    stored = anatomy()
    windowed = write_dicom(
        tmp_path / "w.dcm", stored, "MONOCHROME2", WindowCenter=2000, WindowWidth=400
    )
    plain = write_dicom(tmp_path / "p.dcm", stored, "MONOCHROME2")
    with_window = read_image(windowed, SIZE)[INSIDE]
    without = read_image(plain, SIZE)[INSIDE]
    # clipped to black below 1800 and white above 2200: far more saturated pixels
    saturated = lambda image: int(((image <= 2) | (image >= 253)).sum())  # noqa: E731
    assert saturated(with_window) > 2 * saturated(without) + 50
    expected = np.clip((stored.astype(np.float32) - 1800) / 400, 0, 1) * 255
    assert abs(float(with_window.mean()) - float(expected.mean())) < 20


def test_palette_colour_is_looked_up(tmp_path: Path) -> None:
    indices = (anatomy() // 16).astype(np.uint8)  # 0..255 palette indices
    # an inverting gray palette (16-bit entries): index 0 is white
    ramp = ((255 - np.arange(256, dtype=np.uint16)) * 257).tobytes()
    palette = write_dicom(
        tmp_path / "pal.dcm",
        indices,
        "PALETTE COLOR",
        RedPaletteColorLookupTableDescriptor=[256, 0, 16],
        GreenPaletteColorLookupTableDescriptor=[256, 0, 16],
        BluePaletteColorLookupTableDescriptor=[256, 0, 16],
        RedPaletteColorLookupTableData=ramp,
        GreenPaletteColorLookupTableData=ramp,
        BluePaletteColorLookupTableData=ramp,
    )
    inverted = as_png(tmp_path / "looked-up.png", 255 - indices.astype(np.int16))
    assert np.abs(read_image(palette, SIZE).astype(np.int16) - inverted)[INSIDE].max() <= 2


def test_ybr_full_becomes_its_luminance(tmp_path: Path) -> None:
    gray = (anatomy() // 16).astype(np.uint8)
    ybr = np.stack([gray, np.full_like(gray, 128), np.full_like(gray, 128)], axis=-1)
    from_dicom = read_image(write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"), SIZE)
    from_png = as_png(tmp_path / "gray.png", gray)
    assert np.abs(from_dicom.astype(np.int16) - from_png).max() <= 2


@pytest.mark.parametrize(
    ("photometric", "elements", "expected"),
    [
        ("YBR_PARTIAL_420", {}, r"photometric interpretation YBR_PARTIAL_420; predict reads"),
        (
            "MONOCHROME2",
            {"Rows": 10_000, "Columns": 9_000},
            r"declares 1 × 10000×9000 pixels, over the 50,000,000-pixel limit",
        ),
        ("MONOCHROME2", {"Rows": 64, "Columns": 64, "NumberOfFrames": 3}, r"holds 3 frames"),
    ],
    ids=["unsupported-colour-model", "pixel-cap", "multi-frame"],
)
def test_dicoms_predict_cannot_read_are_refused_by_name(
    tmp_path: Path, photometric: str, elements: dict, expected: str
) -> None:
    path = write_dicom(tmp_path / "x.dcm", None, photometric, **elements)
    with pytest.raises(PredictError, match=expected) as raised:
        read_image(path, SIZE)
    assert str(path) in str(raised.value)


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid PNG header declaring `width`×`height` gray pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(
    ("side", "expected"),
    [
        (8_000, r"declares 8000×8000 pixels, over the 50,000,000-pixel limit"),
        (20_000, r"exceeds limit of .* pixels, could be decompression bomb"),
    ],
    ids=["over-our-cap", "pillow-decompression-bomb"],
)
def test_images_declaring_huge_sizes_are_refused_unread(
    tmp_path: Path, side: int, expected: str
) -> None:
    assert side * side > MAX_IMAGE_PIXELS
    path = png_declaring(tmp_path / "bomb.png", side, side)
    with pytest.raises(PredictError, match=expected) as raised:
        read_image(path, SIZE)
    assert str(path) in str(raised.value)
