"""`chestxpert data prepare`: a source table into patient-split Parquet shards plus manifest.json.

Images are decoded in worker processes, made 8-bit gray and square-resized once, so training
reads raw pixels; they stream through in image order, a bounded number at a time, into shards
staged as they fill, while the content digest is computed. A stopped run's staged shards are
kept and a rerun continues from them. Each run's shards become a new generation beside the old
ones (`datasets.output`); the manifest is written last and names every shard: a reader that
finds it finds a complete dataset.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from chestxpert.cluster.endpoints import Endpoints, resolve, storage_filesystem
from chestxpert.datasets.images import MIN_IMAGE_SIZE, load_gray_square
from chestxpert.datasets.output import DatasetWriter, check_target
from chestxpert.datasets.schema import (
    GENERATION_CHARS,
    GENERATIONS,
    SCHEMA_VERSION,
    SPLITS,
    SYNTHETIC_MARKER,
    DatasetError,
    SourceTable,
)
from chestxpert.datasets.validate import check_image

BAD_IMAGES_REPORT = "bad_images.csv"
SOURCES = ("nih", "chexpert")
# Parquet codecs for the shards. lz4 is the default: reading a 224-px row group costs about
# 55 µs of CPU per image with zstd, 40 of them decompressing the image column (lz4: about 2),
# and zstd saves only 2-10% of the bytes of real films (README, benchmarks).
COMPRESSIONS = ("lz4", "zstd")


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
    compression: str = "lz4"  # COMPRESSIONS; the digest names the images, not their encoding
    progress: bool = True
    on_cluster: bool = False  # one Ray task per shard (`datasets.prepare_cluster`)


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
    if opts.compression not in COMPRESSIONS:
        raise DatasetError(
            f"--compression {opts.compression!r} is not known; expected one of "
            f"{', '.join(COMPRESSIONS)}"
        )
    if opts.shard_rows < 1:
        raise DatasetError(f"--shard-rows {opts.shard_rows} must be 1 or more (2000 is usual)")
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


# --- decoding ---------------------------------------------------------------------------------

# Images one worker task decodes, and tasks allowed in flight (queued, running or decoded but
# not yet written) per worker: together they bound the decoded images held in memory, whatever
# the number of images.
DECODE_CHUNK = 16
TASKS_AHEAD_PER_WORKER = 4

# The problem recorded for an image object that listed but could not be fetched.
UNREADABLE_OBJECT = "cannot be read from S3"

# The input store of the decode workers, when images are read object by object from S3.
_input_fs: pafs.FileSystem | None = None


def _open_input_fs(endpoints: Endpoints | None, uri: str | None) -> None:
    global _input_fs
    _input_fs = storage_filesystem(endpoints, uri)[0] if endpoints and uri else None


def _start_worker(parent: int, endpoints: Endpoints | None, uri: str | None) -> None:
    _open_input_fs(endpoints, uri)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A pool worker whose prepare was killed (SIGKILL runs no cleanup) would wait for work
    # forever, holding its memory: it goes once it finds itself orphaned.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _decode_one(
    task: tuple[str, str, int],
) -> tuple[str, bytes | None, tuple[float, float, float], str | None]:
    image_id, path, size = task
    if path.startswith("s3://"):
        return _decode_object(task)
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


def _decode_object(task: tuple[str, str, int]) -> tuple:
    """Fetch one image object into a local file of its own, decode it as a local one, delete it:
    the checks and the decoding are those of local files, and no input is mirrored whole."""
    image_id, uri, size = task
    assert _input_fs is not None, "the decode workers were started without the input store"
    suffix = os.path.splitext(uri)[1]
    with tempfile.NamedTemporaryFile(prefix="chestxpert-image-", suffix=suffix) as local:
        try:
            with _input_fs.open_input_stream(uri.removeprefix("s3://")) as stream:
                shutil.copyfileobj(stream, local, 1 << 20)
        except OSError as err:
            return image_id, None, (0.0, 0.0, 0.0), f"{UNREADABLE_OBJECT} ({err})"
        local.flush()
        return _decode_one((image_id, local.name, size))


def decode_stream(
    tasks: Iterable[tuple[str, str, int]],
    workers: int,
    endpoints: Endpoints | None = None,
    input_uri: str | None = None,
) -> Iterator[tuple]:
    """Decode and resize images (id, path or s3:// URI, size) in worker processes, yielding
    (id, pixels, placement, problem) in task order.

    At most `workers * TASKS_AHEAD_PER_WORKER` tasks of DECODE_CHUNK images are in flight, so
    memory does not grow with the number of images. `endpoints` and `input_uri` give the
    workers the store to read `s3://` images from.
    """
    if workers <= 1:
        _open_input_fs(endpoints, input_uri)
        yield from map(_decode_one, tasks)
        return
    tasks = iter(tasks)
    chunks = iter(lambda: list(itertools.islice(tasks, DECODE_CHUNK)), [])
    # The AWS SDK under pyarrow's S3 filesystem is not safe across fork once used, and listing
    # the input used it: workers that read from S3 start fresh.
    context = multiprocessing.get_context("spawn") if input_uri else None
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_start_worker,
        initargs=(os.getpid(), endpoints, input_uri),
    ) as pool:
        in_flight: deque = deque()
        for chunk in chunks:
            in_flight.append(pool.submit(_decode_chunk, chunk))
            if len(in_flight) >= workers * TASKS_AHEAD_PER_WORKER:
                yield from in_flight.popleft().result()
        while in_flight:
            yield from in_flight.popleft().result()


def _decode_chunk(tasks: list[tuple[str, str, int]]) -> list[tuple]:
    return [_decode_one(task) for task in tasks]


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

# Rows per Parquet row group: also how many decoded images a split holds before writing them.
ROW_GROUP_ROWS = 256


def _placed_boxes(boxes: list[tuple], placement: tuple[float, float, float]) -> list[dict]:
    """One image's source boxes (label, x, y, w, h in original pixels) on the prepared square."""
    scale, off_x, off_y = placement
    return [
        {
            "label": label,
            "x": x * scale + off_x,
            "y": y * scale + off_y,
            "w": w * scale,
            "h": h * scale,
        }
        for label, x, y, w, h in boxes
    ]


def shard_name(split: str, index: int) -> str:
    """A shard's path within its generation."""
    return f"{split}/part-{index:05d}.parquet"


class SplitShards:
    """One split's shards as its images arrive in order: rows go to the open shard a row group
    at a time, and a shard that reaches `shard_rows` is staged with its journal entry at once.

    The entry lists each row's image id and pixel hash (what the digest needs, so a resumed run
    does not decode the images again) and the images of this split found bad since the previous
    shard (so the resumed run's report still lists them).
    """

    def __init__(
        self,
        split: str,
        output: DatasetWriter,
        images: pd.DataFrame,
        opts: PrepareOptions,
        labels: tuple[str, ...],
        staged: int,
    ) -> None:
        self.split = split
        self.output = output
        self.images = images
        self.opts = opts
        self.labels = labels
        self.count = staged  # shards of this split staged so far
        self._writer: pq.ParquetWriter | None = None
        self._scratch: Path | None = None
        self._pending: list[tuple[int, bytes, list[dict]]] = []
        self._rows: list[list[str]] = []
        self._bad: list[list[str]] = []
        self.entries: list[dict[str, Any]] = []  # the journal entries of the shards staged here

    def add_decoded(
        self, row: int, decoded: tuple, location: str, source_boxes: list[tuple]
    ) -> bytes | tuple[str, str, str]:
        """Take one image as `decode_stream` gave it (row `row` of the image table, read from
        `location`, with its boxes in source pixels): add it and return its pixel hash, or note
        it as bad and return its (image id, location, problem) record."""
        image_id, pixels, placement, problem = decoded
        if problem:
            record = (image_id, location, problem)
            self.note_bad(record)
            return record
        pixel_hash = hashlib.sha256(pixels).digest()
        self.add(row, pixels, _placed_boxes(source_boxes, placement), pixel_hash)
        return pixel_hash

    def add(self, row: int, pixels: bytes, boxes: list[dict], pixel_hash: bytes) -> None:
        """Append one decoded image (row `row` of the image table) to the open shard."""
        self._pending.append((row, pixels, boxes))
        self._rows.append([self.images["image_id"].iat[row], pixel_hash.hex()])
        if len(self._pending) == ROW_GROUP_ROWS:
            self._write_pending()
        if len(self._rows) == self.opts.shard_rows:
            self._stage()

    def note_bad(self, record: tuple[str, str, str]) -> None:
        """Remember an image of this split that could not be used, for the shard's entry."""
        self._bad.append(list(record))

    def finish(self) -> None:
        """Stage the last, partly filled shard."""
        if self._rows:
            self._stage()

    def close(self) -> None:
        """Drop an open shard (after a failure): it was never staged."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_pending(self) -> None:
        rows = self.images.iloc[[row for row, _, _ in self._pending]].assign(
            image=[pixels for _, pixels, _ in self._pending],
            boxes=[boxes for _, _, boxes in self._pending],
        )
        table = _shard_table(rows, self.labels, self.opts.image_size)
        self._pending = []
        if self._writer is None:
            self._scratch = self.output.scratch_file(self._relative())
            self._writer = pq.ParquetWriter(
                str(self._scratch), table.schema, compression=self.opts.compression
            )
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)

    def _relative(self) -> str:
        return shard_name(self.split, self.count)

    def _stage(self) -> None:
        if self._pending:
            self._write_pending()
        assert self._writer is not None and self._scratch is not None
        self._writer.close()
        self._writer = None
        entry = {
            "shard": self._relative(),
            "journal": f"{self.split}-{self.count:05d}",
            "rows": self._rows,
            "bad": self._bad,
        }
        self.entries.append(self.output.stage_file(self._scratch, entry))
        self.count += 1
        self._rows, self._bad = [], []


@dataclass
class Staged:
    """What streaming the images produced: the digest, the rows used, the images left out, and
    each split's staged shards (their paths in the generation, in order)."""

    digest: str
    used_rows: list[int]
    bad: list[tuple[str, str, str]]
    shards: dict[str, list[str]]


def _stage_shards(
    output: DatasetWriter,
    images: pd.DataFrame,
    table: SourceTable,
    opts: PrepareOptions,
    source: InputFolder,
    endpoints: Endpoints,
) -> Staged:
    """Decode every image not in an already staged shard and stage shards as they fill,
    computing the content digest on the way, in image order (`digest_start`)."""
    labels = table.labels
    row_of = {image_id: row for row, image_id in enumerate(images["image_id"])}
    kept_hash: dict[str, str] = {}
    kept_bad: dict[str, tuple[str, str, str]] = {}
    covered_to: dict[str, int] = {}  # per split: the last image row its staged shards cover
    splits = {}
    for split in SPLITS:
        entries = output.staged_entries(split)
        for entry in entries:
            kept_hash.update((image_id, pixel_hash) for image_id, pixel_hash in entry["rows"])
            kept_bad.update((record[0], tuple(record)) for record in entry["bad"])
        if entries:
            covered_to[split] = row_of[entries[-1]["rows"][-1][0]]
        splits[split] = SplitShards(split, output, images, opts, labels, staged=len(entries))
    image_ids, image_splits = images["image_id"].tolist(), images["split"].tolist()
    covered = [row <= covered_to.get(split, -1) for row, split in enumerate(image_splits)]
    todo = [row for row in range(len(images)) if not covered[row]]
    if len(todo) < len(images):
        print(
            f"resuming: {len(images) - len(todo)} images are in shards a stopped run staged; "
            f"decoding the other {len(todo)}"
        )
    paths = images["path"].tolist()
    tasks = ((image_ids[row], source.locate(paths[row]), opts.image_size) for row in todo)
    boxes_by_image = source_boxes(table)
    from tqdm import tqdm

    bar = tqdm(
        total=len(todo),
        desc="decode+resize",
        unit="img",
        disable=not opts.progress,
        mininterval=1.0,
    )
    results = decode_stream(tasks, opts.workers or os.cpu_count() or 1, endpoints, source.uri)
    digest = digest_start(labels, opts, table.synthetic)
    label_matrix = images[list(labels)].to_numpy(dtype=np.float32)
    used_rows, bad = [], []
    try:
        for row, image_id in enumerate(image_ids):
            split = image_splits[row]
            if covered[row]:
                if image_id in kept_bad:
                    bad.append(kept_bad[image_id])
                    continue
                if image_id not in kept_hash:
                    raise AssertionError(f"staged shards skip {image_id}: the staging key is wrong")
                pixel_hash = bytes.fromhex(kept_hash[image_id])
            else:
                decoded = next(results)
                bar.update()
                assert decoded[0] == image_id, (decoded[0], image_id)
                taken = splits[split].add_decoded(
                    row, decoded, source.locate(paths[row]), boxes_by_image.get(image_id, [])
                )
                if isinstance(taken, tuple):
                    bad.append(taken)
                    continue
                pixel_hash = taken
            digest_image(digest, image_id, split, label_matrix[row], pixel_hash)
            used_rows.append(row)
        for shards in splits.values():
            shards.finish()
    finally:
        results.close()  # stops the workers if we stop early
        bar.close()
        for shards in splits.values():
            shards.close()
    shards = {s: [shard_name(s, index) for index in range(splits[s].count)] for s in SPLITS}
    return Staged(digest.hexdigest(), used_rows, bad, shards)


def source_boxes(table: SourceTable) -> dict[str, list[tuple]]:
    """Each image's boxes as (label, x, y, w, h) in source pixels, by image id."""
    boxes: dict[str, list[tuple]] = {}
    for box in table.boxes.itertuples(index=False):
        boxes.setdefault(box.image_id, []).append((box.label, box.x, box.y, box.w, box.h))
    return boxes


# --- input -------------------------------------------------------------------------------------


@dataclass
class InputFolder:
    """The input as the source adapters see it: a local folder. For an `s3://` input `root` is a
    temporary folder holding the label and list files and an empty stand-in for each image,
    which `locate` maps back to its object, read by the decode workers one by one."""

    root: Path
    uri: str | None = None  # the s3:// prefix, None for a local folder
    objects: dict[str, tuple[int, int]] = field(default_factory=dict)  # relative: size, mtime

    def locate(self, path: str) -> str:
        """Where the decode workers read the image the adapter found at `path`."""
        if self.uri is None:
            return path
        return f"{self.uri}/{Path(path).relative_to(self.root).as_posix()}"

    def identity(self, path: str) -> tuple[int, int]:
        """(size in bytes, modification time in ns) of an image file or object: a rerun resumes
        staged shards only while every image is unchanged."""
        if self.uri is None:
            stat = os.stat(path)
            return stat.st_size, stat.st_mtime_ns
        return self.objects[Path(path).relative_to(self.root).as_posix()]


# Files of an input prefix fetched for the adapters (labels, lists, boxes, the synthetic marker);
# any other object is an image, read by the decode workers when they reach it.
METADATA_SUFFIXES = (".csv", ".txt", ".json")


@contextmanager
def open_input(input_uri: str, endpoints: Endpoints) -> Iterator[InputFolder]:
    """The input folder of `input_uri` (local folder or `s3://` prefix) for the source adapter.

    For S3, only the small label and list files are downloaded, into a temporary folder removed
    afterwards; images stay in the bucket (see InputFolder).
    """
    parsed = urlparse(input_uri)
    if parsed.scheme != "s3":
        path = Path(input_uri if not parsed.scheme else parsed.path).expanduser()
        if not path.is_dir():
            raise DatasetError(
                f"input {input_uri} is not a folder; point --input at the dataset's root folder"
            )
        yield InputFolder(path)
        return
    fs, root = storage_filesystem(endpoints, input_uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise DatasetError(f"input {input_uri} does not exist (or the bucket is missing)")
    listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    with tempfile.TemporaryDirectory(prefix="chestxpert-input-") as temporary:
        folder = InputFolder(Path(temporary), f"s3://{root}")
        for info in listing:
            if info.type != pafs.FileType.File or not info.base_name:
                continue  # S3 "folder" marker objects
            relative = info.path[len(root) + 1 :]
            local = folder.root / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            if relative.lower().endswith(METADATA_SUFFIXES):
                _download(fs, info.path, local)
            else:
                local.touch()
                folder.objects[relative] = (info.size, info.mtime_ns or 0)
        yield folder


def _download(fs: pafs.FileSystem, path: str, local: Path) -> None:
    with fs.open_input_stream(path) as stream, local.open("wb") as handle:
        shutil.copyfileobj(stream, handle, 1 << 20)


def prepare(
    input_uri: str, out_uri: str, opts: PrepareOptions, endpoints: Endpoints | None = None
) -> dict[str, Any]:
    """Validate, split by patient, decode and shard a dataset; return the manifest it published.

    `input_uri` is a local folder or `s3://` prefix holding the source's layout;
    `out_uri` a local folder or `s3://` prefix that is absent, empty or a ChestXpert dataset
    (see `check_target`). Images are decoded in worker processes and each shard is staged as
    soon as it fills, so memory does not grow with the number of images; a run that stops
    (killed, interrupted, or refused at the end) leaves its finished shards staged, and the same
    command run again keeps them and continues. Re-running on the same input gives the same
    digest and leaves an identical dataset untouched; replacing a different one needs `force`,
    and adds a new generation beside the old one, which stays readable until `chestxpert data gc`.
    With `opts.on_cluster` the decoding runs as one Ray task per shard on the cluster `endpoints`
    names (`datasets.prepare_cluster`; input and output must then be `s3://`), with the same
    digest.
    """
    started = time.monotonic()
    check_options(opts)
    endpoints = endpoints or resolve()
    if opts.on_cluster:
        from chestxpert.datasets.prepare_cluster import check_cluster_locations

        check_cluster_locations(input_uri, out_uri)
    output = DatasetWriter(check_target(input_uri, out_uri, endpoints), endpoints)
    try:
        with open_input(input_uri, endpoints) as source:
            manifest = _prepare_into(output, source, opts, endpoints, started)
    except BaseException:
        kept = output.abandon()
        if kept:
            print(
                f"{kept} finished shard(s) stay staged in {output.staging}; the same command "
                "continues from them",
                file=sys.stderr,
            )
        raise
    return manifest


def _prepare_into(
    output: DatasetWriter,
    source: InputFolder,
    opts: PrepareOptions,
    endpoints: Endpoints,
    started: float,
) -> dict:
    table = read_source(opts, source.root)
    images = table.images.copy().sort_values("image_id", kind="stable").reset_index(drop=True)
    images["split"] = assign_splits(images, opts)
    output.stage(_staging_key(images, table, opts, source))
    if opts.on_cluster:
        from chestxpert.datasets.prepare_cluster import stage_on_cluster

        staged = stage_on_cluster(output, images, table, opts, source, endpoints)
    else:
        staged = _stage_shards(output, images, table, opts, source, endpoints)
    bad = staged.bad
    if bad and opts.on_bad_image == "fail":
        listing = "\n".join(f"  {path}: {problem}" for _, path, problem in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DatasetError(
            f"{len(bad)} bad image(s):\n{listing}{more}\n"
            "fix or remove them, or pass --on-bad-image skip to leave them out (they are then "
            f"listed in the dataset's {BAD_IMAGES_REPORT}, which the manifest names)"
        )
    images = images.iloc[staged.used_rows].reset_index(drop=True)
    if images.empty:
        raise DatasetError("no image could be read; nothing to prepare")

    digest = staged.digest
    generation = digest[:GENERATION_CHARS]
    existing = output.current_manifest()
    if existing is not None:
        if existing.get("digest") == digest:
            stored_codec = existing.get("shard_compression", "zstd")  # zstd before the option
            codec = (
                f"; its shards stay {stored_codec} (prepare into a new --out to change that)"
                if stored_codec != opts.compression
                else ""
            )
            print(
                f"{output.uri} already holds this dataset (digest {digest[:12]}); nothing to "
                f"do{codec}"
            )
            output.drop_staging()
            return existing
        if not opts.force:
            raise DatasetError(
                f"{output.uri} already holds a different dataset "
                f"(digest {existing.get('digest', '?')[:12]}, "
                f"this one {digest[:12]}); pass --force to replace it (readers of the old one "
                "keep it until `chestxpert data gc`; the new shards stay staged, so the rerun "
                "does not decode again) or choose another --out"
            )
    stored = output.stored_manifest(generation)
    if stored is not None and stored.get("digest") == digest:
        output.make_current(stored)
        output.drop_staging()
        print(f"{output.uri}: generation {generation} was still stored; it is current again")
        return stored

    prefix = f"{GENERATIONS}/{generation}"
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
        "shard_compression": opts.compression,
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
        # Size and SHA-256 of each shard, by its path in "shards": what a node's shard cache
        # checks its copies against. Not part of the digest, which is the images' alone.
        "shard_checks": {},
    }
    for split in SPLITS:
        part = images[images["split"] == split]
        label_matrix = part[list(labels)].to_numpy(dtype=np.float64)
        pos_w, neg_w, positives, negatives = loss_weights(label_matrix)
        shards = staged.shards[split]
        manifest["splits"][split] = {
            "images": len(part),
            "patients": int(part["patient_id"].nunique()),
            "positives": dict(zip(labels, positives, strict=True)),
            "negatives": dict(zip(labels, negatives, strict=True)),
            "shards": [f"{prefix}/{shard}" for shard in shards],
        }
        for shard in shards:
            manifest["shard_checks"][f"{prefix}/{shard}"] = output.shard_checks[shard]
        if split == "train":
            manifest["pos_weight"] = pos_w
            manifest["neg_weight"] = neg_w
    if bad:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["image_id", "path", "problem"])
        writer.writerows(bad)
        output.stage_bytes(BAD_IMAGES_REPORT, buffer.getvalue().encode())
    manifest["prepare_seconds"] = round(time.monotonic() - started, 2)
    output.publish(generation, manifest)
    return manifest


def _staging_key(
    images: pd.DataFrame, table: SourceTable, opts: PrepareOptions, source: InputFolder
) -> str:
    """Name the staging area after everything the shards' bytes depend on: the options, the
    source table (every row and box), and each image file's size and modification time, so a
    rerun with the same arguments on unchanged input finds the shards, and nothing else does."""
    key = hashlib.sha256()
    params = {
        **_digest_params(table.labels, opts, table.synthetic),
        "source": table.source,
        "provenance": table.provenance,
        "shard_rows": opts.shard_rows,
        "row_group_rows": ROW_GROUP_ROWS,
        "compression": opts.compression,
    }
    if opts.on_cluster:
        # Each task fills its shard from a fixed run of images, bad ones left out, where a local
        # run fills every shard: staged shards of one kind are never taken for the other.
        params["shards"] = "one per task"
    key.update(json.dumps(params, sort_keys=True).encode())
    rows = images.drop(columns=["path"]).assign(
        location=[source.locate(path) for path in images["path"]],
        identity=[source.identity(path) for path in images["path"]],
    )
    key.update(rows.to_csv(index=False).encode())
    key.update(table.boxes.to_csv(index=False).encode())
    return key.hexdigest()[:GENERATION_CHARS]


def _digest_params(labels: tuple[str, ...], opts: PrepareOptions, synthetic: bool) -> dict:
    params: dict[str, Any] = {
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
    return params


def digest_start(labels: tuple[str, ...], opts: PrepareOptions, synthetic: bool) -> Any:
    """Begin the content digest: SHA-256 over the parameters and then, per image used in image
    order, its id, split, labels and pixels (`digest_image`).

    Synthetic phantoms digest differently from the same files without their marker, so a
    dataset prepared before the mark existed is replaced (with --force), not reused unmarked.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(_digest_params(labels, opts, synthetic), sort_keys=True).encode())
    return digest


def digest_image(
    digest: Any, image_id: str, split: str, labels: np.ndarray, pixel_hash: bytes
) -> None:
    """Add one image to the content digest: `labels` as float32, `pixel_hash` the SHA-256 of its
    raw pixels."""
    digest.update(f"{image_id}\0{split}\0".encode())
    digest.update(labels.tobytes())
    digest.update(pixel_hash)
