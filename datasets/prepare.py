"""`chestxpert data prepare`: a source table into patient-split Parquet shards plus manifest.json.

Images are decoded in parallel, made 8-bit gray and square-resized once, so
training reads raw pixels. Each run's shards form a new generation beside the old ones
(`datasets.output`); the manifest is written last and names every shard: a reader that finds
it finds a complete dataset.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from chestxpert.cluster.endpoints import Endpoints, resolve, storage_filesystem
from chestxpert.datasets.images import MIN_IMAGE_SIZE, load_gray_square
from chestxpert.datasets.output import DatasetWriter, check_target
from chestxpert.datasets.schema import (
    GENERATION_CHARS,
    SCHEMA_VERSION,
    SPLITS,
    SYNTHETIC_MARKER,
    DatasetError,
    SourceTable,
)
from chestxpert.datasets.validate import check_image

BAD_IMAGES_REPORT = "bad_images.csv"
SOURCES = ("nih", "chexpert")


@dataclass(frozen=True)
class PrepareOptions:
    """Everything `prepare` needs besides the input and output; fractions are of patients."""

    source: str
    image_size: int
    split: str = "patient"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    views: tuple[str, ...] = ("PA", "AP")
    uncertain: str = "ones"
    on_bad_image: str = "fail"
    force: bool = False
    workers: int | None = None
    shard_rows: int = 2000
    progress: bool = True


def check_options(opts: PrepareOptions) -> None:
    """Refuse impossible options before any file is read, with the flag to change."""
    if opts.source not in SOURCES:
        raise DatasetError(
            f"--source {opts.source!r} is not known; expected one of {', '.join(SOURCES)}"
        )
    if opts.image_size < MIN_IMAGE_SIZE:
        raise DatasetError(
            f"--image-size {opts.image_size} is smaller than the smallest backbone input "
            f"({MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE}); use --image-size {MIN_IMAGE_SIZE} or more "
            "(224 is the usual size for DenseNet121)"
        )
    if opts.split not in ("patient", "official"):
        raise DatasetError(f"--split {opts.split!r} is not known; expected 'patient' or 'official'")
    if opts.on_bad_image not in ("skip", "fail"):
        raise DatasetError(
            f"--on-bad-image {opts.on_bad_image!r} is not known; expected 'skip' or 'fail'"
        )
    for flag, value in (
        ("--val-fraction", opts.val_fraction),
        ("--test-fraction", opts.test_fraction),
    ):
        if not 0.0 < value < 1.0:
            raise DatasetError(f"{flag} {value} must be between 0 and 1 (exclusive)")
    if opts.val_fraction + opts.test_fraction >= 0.9:
        raise DatasetError(
            f"--val-fraction {opts.val_fraction} + --test-fraction {opts.test_fraction} leaves "
            "under 10% of patients for training; lower them"
        )


def read_source(opts: PrepareOptions, input_dir: Path) -> SourceTable:
    """Read a local source folder with its adapter.

    Images the source lists but does not hold are skipped or fatal, as `opts.on_bad_image` says.
    A folder holding SYNTHETIC_MARKER (written by `data synth`) gives a synthetic table.
    """
    skip = opts.on_bad_image == "skip"
    if opts.source == "nih":
        from chestxpert.datasets.nih import read_nih

        table = read_nih(input_dir, skip_missing=skip)
    else:
        from chestxpert.datasets.chexpert import read_chexpert

        table = read_chexpert(
            input_dir, views=opts.views, uncertain=opts.uncertain, skip_missing=skip
        )
    marker = input_dir / SYNTHETIC_MARKER
    if marker.is_file():
        try:
            table.provenance = json.loads(marker.read_text())
        except ValueError as err:
            raise DatasetError(
                f"{marker} is not JSON ({err}); it marks a folder drawn by `chestxpert data "
                "synth`: restore it, or run `data synth` again"
            ) from None
        table.notes.insert(0, "Synthetic phantoms drawn by `chestxpert data synth`.")
    return table


# --- splitting -------------------------------------------------------------------------------


def assign_splits(images: pd.DataFrame, opts: PrepareOptions) -> pd.Series:
    """Return each image's split ("train"/"val"/"test"), assigning whole patients.

    `official`: the source's test list is the test split and validation is carved by
    patient from its train_val list. `patient`: patients are shuffled with the seed
    and cut by fraction. Either way no patient is in two splits.
    """
    rng = np.random.default_rng(opts.seed)
    patients = images["patient_id"].astype(str)
    if opts.split == "official":
        official = images["official_split"]
        if official.isna().all():
            raise DatasetError(
                "--split official needs the source's official lists (NIH: train_val_list.txt and "
                "test_list.txt; CheXpert: valid.csv) next to the label file; none were found. "
                "Add them, or use --split patient"
            )
        unlisted = int(official.isna().sum())
        if unlisted:
            raise DatasetError(
                f"--split official: {unlisted} images are in neither official list (first: "
                f"{images.loc[official.isna(), 'image_id'].iloc[0]}); use --split patient"
            )
        split = pd.Series(np.where(official == "test", "test", "train"), index=images.index)
        train_patients = np.array(sorted(patients[split == "train"].unique()))
        rng.shuffle(train_patients)
        n_val = max(1, round(len(train_patients) * opts.val_fraction))
        split[patients.isin(set(train_patients[:n_val]))] = "val"
    else:
        unique = np.array(sorted(patients.unique()))
        if len(unique) < 3:
            raise DatasetError(
                f"only {len(unique)} patient(s) in the input; a patient-level train/val/test split "
                "needs at least 3"
            )
        rng.shuffle(unique)
        n_test = max(1, round(len(unique) * opts.test_fraction))
        n_val = max(1, round(len(unique) * opts.val_fraction))
        by_patient = {p: "test" for p in unique[:n_test]}
        by_patient.update({p: "val" for p in unique[n_test : n_test + n_val]})
        split = patients.map(lambda p: by_patient.get(p, "train"))
    check_patient_disjoint(patients, split)
    return split


def check_patient_disjoint(patients: pd.Series, split: pd.Series) -> None:
    """Fail loudly (a bug, not a user error) if any patient appears in two splits."""
    per_patient = (
        pd.DataFrame({"patient": patients, "split": split}).groupby("patient")["split"].nunique()
    )
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise AssertionError(f"patients in more than one split: {list(leaked.index[:5])}")


def loss_weights(labels: np.ndarray) -> tuple[list[float], list[float], list[int], list[int]]:
    """Per-label (pos_weight, neg_weight, positives, negatives) from a training label matrix.

    pos_weight is the negative frequency and neg_weight the positive frequency,
    counted over known (non-NaN) labels only.
    """
    known = ~np.isnan(labels)
    positives = np.where(known, labels == 1.0, False).sum(axis=0)
    negatives = np.where(known, labels == 0.0, False).sum(axis=0)
    total = np.maximum(positives + negatives, 1)
    return (
        (negatives / total).round(6).tolist(),
        (positives / total).round(6).tolist(),
        positives.astype(int).tolist(),
        negatives.astype(int).tolist(),
    )


# --- decoding --------------------------------------------------------------------------------


def _decode_one(
    task: tuple[str, str, int],
) -> tuple[str, bytes | None, tuple[float, float, float], str | None]:
    image_id, path, size = task
    problem = check_image(Path(path))
    if problem:
        return image_id, None, (0.0, 0.0, 0.0), problem
    try:
        pixels, placement = load_gray_square(path, size)
    except Exception as err:  # a file that verifies but does not decode
        return image_id, None, (0.0, 0.0, 0.0), f"could not be decoded ({err})"
    return (
        image_id,
        pixels.tobytes(),
        (placement.scale, placement.offset_x, placement.offset_y),
        None,
    )


def decode_all(images: pd.DataFrame, size: int, workers: int, progress: bool) -> Iterator[tuple]:
    """Decode and resize every image in parallel, yielding results in input order."""
    from tqdm import tqdm

    tasks = list(zip(images["image_id"], images["path"], [size] * len(images), strict=True))
    bar = tqdm(
        total=len(tasks), desc="decode+resize", unit="img", disable=not progress, mininterval=1.0
    )
    chunk = max(1, min(64, len(tasks) // (workers * 8) or 1))
    if workers <= 1:
        for task in tasks:
            yield _decode_one(task)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_decode_one, tasks, chunksize=chunk):
                yield result
                bar.update()
    bar.close()


# --- output ----------------------------------------------------------------------------------


def _shard_table(rows: pd.DataFrame, labels: tuple[str, ...], size: int) -> pa.Table:
    label_matrix = rows[list(labels)].to_numpy(dtype=np.float32)
    return pa.table(
        {
            "image": pa.array(rows["image"].tolist(), type=pa.binary(size * size)),
            "labels": pa.FixedSizeListArray.from_arrays(
                pa.array(label_matrix.ravel(), pa.float32()), len(labels)
            ),
            "image_id": pa.array(rows["image_id"].astype(str).tolist(), pa.string()),
            "patient_id": pa.array(rows["patient_id"].astype(str).tolist(), pa.string()),
            "view": pa.array(
                [v if isinstance(v, str) else None for v in rows["view"]], pa.string()
            ),
            "age_years": pa.array(rows["age_years"].astype(float).tolist(), pa.float32()),
            "sex": pa.array([v if isinstance(v, str) else None for v in rows["sex"]], pa.string()),
            "boxes": pa.array(rows["boxes"].tolist(), type=_BOX_TYPE),
        }
    )


_BOX_TYPE = pa.list_(
    pa.struct(
        [
            ("label", pa.string()),
            ("x", pa.float32()),
            ("y", pa.float32()),
            ("w", pa.float32()),
            ("h", pa.float32()),
        ]
    )
)


def _boxes_by_image(
    table: SourceTable, placements: dict[str, tuple[float, float, float]]
) -> dict[str, list]:
    boxes: dict[str, list] = {}
    for row in table.boxes.itertuples(index=False):
        if row.image_id not in placements:
            continue
        scale, off_x, off_y = placements[row.image_id]
        boxes.setdefault(row.image_id, []).append(
            {
                "label": row.label,
                "x": row.x * scale + off_x,
                "y": row.y * scale + off_y,
                "w": row.w * scale,
                "h": row.h * scale,
            }
        )
    return boxes


def _local_input(input_uri: str, endpoints: Endpoints) -> Path:
    parsed = urlparse(input_uri)
    if parsed.scheme != "s3":
        path = Path(input_uri if not parsed.scheme else parsed.path).expanduser()
        if not path.is_dir():
            raise DatasetError(
                f"input {input_uri} is not a folder; point --input at the dataset's root folder"
            )
        return path
    # Decoding needs random access to thousands of files: mirror the prefix locally once.
    fs, root = storage_filesystem(endpoints, input_uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise DatasetError(f"input {input_uri} does not exist (or the bucket is missing)")
    cache = (
        endpoints.workspace
        / "cache"
        / ("input-" + hashlib.sha1(input_uri.encode()).hexdigest()[:12])
    )
    if not (cache / ".complete").exists():
        partial = Path(
            tempfile.mkdtemp(prefix=".input-", dir=cache.parent if cache.parent.exists() else None)
        )
        pafs.copy_files(
            root, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        (partial / ".complete").touch()
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.move(str(partial), cache)
    return cache


def prepare(
    input_uri: str, out_uri: str, opts: PrepareOptions, endpoints: Endpoints | None = None
) -> dict[str, Any]:
    """Validate, split by patient, decode and shard a dataset; return the manifest it published.

    `input_uri` is a local folder or `s3://` prefix holding the source's layout;
    `out_uri` a local folder or `s3://` prefix that is absent, empty or a ChestXpert dataset
    (see `check_target`). Re-running on the same input gives the same digest and leaves an
    identical dataset untouched; replacing a different one needs `force`, and adds a new
    generation beside the old one, which stays readable until `chestxpert data gc`.
    """
    started = time.monotonic()
    check_options(opts)
    endpoints = endpoints or resolve()
    output = DatasetWriter(check_target(input_uri, out_uri, endpoints), endpoints)
    try:
        manifest = _prepare_into(output, input_uri, opts, endpoints, started)
    except BaseException:
        output.abandon()
        raise
    return manifest


def _prepare_into(
    output: DatasetWriter,
    input_uri: str,
    opts: PrepareOptions,
    endpoints: Endpoints,
    started: float,
) -> dict:
    table = read_source(opts, _local_input(input_uri, endpoints))
    images = table.images.copy().sort_values("image_id", kind="stable").reset_index(drop=True)
    images["split"] = assign_splits(images, opts)

    workers = opts.workers or os.cpu_count() or 1
    pixels: dict[str, bytes] = {}
    placements: dict[str, tuple[float, float, float]] = {}
    bad: list[tuple[str, str, str]] = []
    for image_id, payload, placement, problem in decode_all(
        images, opts.image_size, workers, opts.progress
    ):
        if problem:
            bad.append(
                (image_id, images.loc[images["image_id"] == image_id, "path"].iloc[0], problem)
            )
            continue
        pixels[image_id] = payload
        placements[image_id] = placement
    if bad and opts.on_bad_image == "fail":
        listing = "\n".join(f"  {path}: {problem}" for _, path, problem in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DatasetError(
            f"{len(bad)} bad image(s):\n{listing}{more}\n"
            "fix or remove them, or pass --on-bad-image skip to leave them out (they are then "
            f"listed in the dataset's {BAD_IMAGES_REPORT}, which the manifest names)"
        )
    images = images[images["image_id"].isin(pixels.keys())].reset_index(drop=True)
    if images.empty:
        raise DatasetError("no image could be read; nothing to prepare")
    images["image"] = images["image_id"].map(pixels)
    boxes = _boxes_by_image(table, placements)
    images["boxes"] = images["image_id"].map(lambda i: boxes.get(i, []))

    digest = _content_digest(images, table.labels, opts, table.synthetic)
    generation = digest[:GENERATION_CHARS]
    existing = output.current_manifest()
    if existing is not None:
        if existing.get("digest") == digest:
            print(f"{output.uri} already holds this dataset (digest {digest[:12]}); nothing to do")
            return existing
        if not opts.force:
            raise DatasetError(
                f"{output.uri} already holds a different dataset "
                f"(digest {existing.get('digest', '?')[:12]}, "
                f"this one {digest[:12]}); pass --force to replace it (readers of the old one "
                "keep it until `chestxpert data gc`) or choose another --out"
            )
    stored = output.stored_manifest(generation)
    if stored is not None and stored.get("digest") == digest:
        output.make_current(stored)
        print(f"{output.uri}: generation {generation} was still stored; it is current again")
        return stored
    prefix = output.begin(generation)

    labels = table.labels
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "source": table.source,
        "synthetic": table.synthetic,
        "provenance": table.provenance,
        "labels": list(labels),
        "image_size": opts.image_size,
        "channels": 1,
        "image_encoding": "raw_uint8",
        "split_method": opts.split,
        "split_seed": opts.seed,
        "fractions": {"val": opts.val_fraction, "test": opts.test_fraction},
        "views": list(opts.views) if table.source == "chexpert" else None,
        "uncertain_policy": opts.uncertain if table.source == "chexpert" else None,
        "splits": {},
        "patients_disjoint": True,
        "bad_images": len(bad),
        "bad_images_report": f"{prefix}/{BAD_IMAGES_REPORT}" if bad else None,
        "missing_images": len(table.missing),
        "notes": table.notes,
        "digest": digest,
        "generation": generation,
    }
    for split in SPLITS:
        part = images[images["split"] == split]
        label_matrix = part[list(labels)].to_numpy(dtype=np.float64)
        pos_w, neg_w, positives, negatives = loss_weights(label_matrix)
        shards = []
        for index, start in enumerate(range(0, len(part), opts.shard_rows)):
            relative = f"{split}/part-{index:05d}.parquet"
            output.write_table(
                relative,
                _shard_table(part.iloc[start : start + opts.shard_rows], labels, opts.image_size),
            )
            shards.append(f"{prefix}/{relative}")
        manifest["splits"][split] = {
            "images": len(part),
            "patients": int(part["patient_id"].nunique()),
            "positives": dict(zip(labels, positives, strict=True)),
            "negatives": dict(zip(labels, negatives, strict=True)),
            "shards": shards,
        }
        if split == "train":
            manifest["pos_weight"] = pos_w
            manifest["neg_weight"] = neg_w
    if bad:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["image_id", "path", "problem"])
        writer.writerows(bad)
        output.write_bytes(BAD_IMAGES_REPORT, buffer.getvalue().encode())
    manifest["prepare_seconds"] = round(time.monotonic() - started, 2)
    output.publish(manifest)
    return manifest


def _content_digest(
    images: pd.DataFrame, labels: tuple[str, ...], opts: PrepareOptions, synthetic: bool
) -> str:
    """SHA-256 over the parameters and, per image in order, its id, split, labels and pixels.

    Synthetic phantoms digest differently from the same files without their marker, so a
    dataset prepared before the mark existed is replaced (with --force), not reused unmarked.
    """
    digest = hashlib.sha256()
    params = {
        "size": opts.image_size,
        "split": opts.split,
        "seed": opts.seed,
        "labels": list(labels),
        "fractions": [opts.val_fraction, opts.test_fraction],
        "uncertain": opts.uncertain,
        "views": list(opts.views),
        "schema": SCHEMA_VERSION,
    }
    if synthetic:
        params["synthetic"] = True
    digest.update(json.dumps(params, sort_keys=True).encode())
    label_matrix = images[list(labels)].to_numpy(dtype=np.float32)
    for row, image_id in enumerate(images["image_id"]):
        digest.update(f"{image_id}\0{images['split'].iat[row]}\0".encode())
        digest.update(label_matrix[row].tobytes())
        digest.update(hashlib.sha256(images["image"].iat[row]).digest())
    return digest.hexdigest()
