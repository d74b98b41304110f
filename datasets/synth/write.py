"""Write a synthetic dataset in the NIH ChestX-ray14 layout: plan it, draw the images in worker
processes, write the label, box and split files, and move the whole into place at the end.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from chestxpert.datasets.schema import NIH_LABELS, SYNTHETIC_MARKER, DatasetError
from chestxpert.datasets.synth.anatomy import FIELD_OF_VIEW_MM
from chestxpert.datasets.synth.canvas import BOX_LABELS, Box
from chestxpert.datasets.synth.plan import PlannedImage, image_seed, plan_dataset
from chestxpert.datasets.synth.png import png_bytes
from chestxpert.datasets.synth.radiograph import draw_radiograph

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h]"


def finding_labels(labels: tuple[str, ...]) -> str:
    """The "Finding Labels" cell: names joined by "|" in alphabetical order, as the real
    Data_Entry_2017 file writes them (99.95% of its rows), or "No Finding"."""
    return "|".join(sorted(labels)) if labels else "No Finding"


def _draw_and_write(
    plans: list[PlannedImage], root: str, size: int, seed: int, difficulty: float
) -> list[tuple[int, list[Box]]]:
    """Draw a chunk of images into `root` (runs in a worker process, or inline for workers=1)."""
    results = []
    for plan in plans:
        pixels, boxes = draw_radiograph(
            plan.anatomy,
            plan.drawn,
            size,
            image_seed(seed, plan.index),
            plan.lesion_seed,
            difficulty,
            plan.view,
        )
        if plan.rgba:  # like 519 real NIH files: grey stored as RGBA, fully opaque
            pixels = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
        Path(root, plan.folder, "images", plan.name).write_bytes(png_bytes(pixels))
        results.append((plan.index, boxes))
    return results


def _worker_setup() -> None:
    """Initializer of our worker processes: let glibc keep freed image-sized buffers.

    By default glibc returns every freed block above 128 KiB to the kernel, so each numpy
    temporary of a 256 x 256 float32 film is a fresh mmap whose pages fault in on first touch,
    which slows drawing a lot. Raising the thresholds (32 MiB is glibc's maximum) removes it.
    Only done in processes we start, never in the caller's.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: only slower


def _check_arguments(
    out_dir: Path,
    images: int,
    size: int,
    seed: int,
    fractions: dict[str, float],
    images_per_patient: float,
    workers: int | None,
) -> None:
    """Raise one DatasetError naming every out-of-range argument, or a non-empty out_dir."""
    problems = []
    if not isinstance(images, int) or images < 1:
        problems.append(f"images={images!r} (expected an integer >= 1)")
    if not isinstance(size, int) or not 32 <= size <= 4096:
        problems.append(f"size={size!r} (expected an integer from 32 to 4096 pixels)")
    if not isinstance(seed, int) or seed < 0:
        problems.append(f"seed={seed!r} (expected an integer >= 0)")
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name}={value!r} (expected 0..1)")
    if not images_per_patient >= 1.0:
        problems.append(f"images_per_patient={images_per_patient!r} (expected >= 1)")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        problems.append(f"workers={workers!r} (expected an integer >= 1, or None for all cores)")
    if problems:
        raise DatasetError("synthetic dataset: bad " + "; ".join(problems))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(
            f"{out_dir} already exists and is not an empty folder; "
            "choose a new output folder or delete this one first"
        )


def _draw_all(
    plans: list[PlannedImage],
    root: Path,
    size: int,
    seed: int,
    difficulty: float,
    workers: int,
    progress: bool,
) -> list[list[Box]]:
    """Draw and write every planned image, in this process or in `workers` spawned ones."""
    boxes: list[list[Box]] = [[] for _ in plans]
    # a small single-worker job runs here: starting a worker process costs more than it saves
    in_process = workers == 1 and len(plans) * size * size < 2**24
    chunk = 64 if in_process else max(1, min(256, len(plans) // (workers * 8)))
    chunks = [plans[start : start + chunk] for start in range(0, len(plans), chunk)]
    with tqdm(
        total=len(plans), unit="img", desc="synth", disable=not progress, file=sys.stderr
    ) as bar:
        if in_process:
            for part in chunks:
                for index, image_boxes in _draw_and_write(part, str(root), size, seed, difficulty):
                    boxes[index] = image_boxes
                bar.update(len(part))
            return boxes
        # spawn, not fork: the caller may hold threads (TensorFlow, Ray) that fork copies mid-lock
        pool = ProcessPoolExecutor(workers, get_context("spawn"), initializer=_worker_setup)
        try:
            futures = [
                pool.submit(_draw_and_write, part, str(root), size, seed, difficulty)
                for part in chunks
            ]
            for future in as_completed(futures):
                done = future.result()
                for index, image_boxes in done:
                    boxes[index] = image_boxes
                bar.update(len(done))
        finally:
            pool.shutdown(cancel_futures=True)  # on failure, do not draw the queued rest
    return boxes


def _write_tables(root: Path, plans: list[PlannedImage], boxes: list[list[Box]], size: int) -> None:
    """Data_Entry_2017.csv, BBox_List_2017.csv and the two split lists, as NIH writes them."""
    spacing = f"{FIELD_OF_VIEW_MM / size:.6g}"
    rows = [DATA_ENTRY_HEADER]
    for plan in plans:
        rows.append(
            f"{plan.name},{finding_labels(plan.written)},{plan.follow_up},{plan.patient_id},"
            f"{plan.age_years},{plan.sex},{plan.view},{size},{size},{spacing},{spacing}"
        )
    (root / "Data_Entry_2017.csv").write_bytes(("\n".join(rows) + "\n").encode())
    lines = [BBOX_HEADER]
    for plan, image_boxes in zip(plans, boxes, strict=True):
        for label, x, y, w, h in image_boxes:
            lines.append(f"{plan.name},{BOX_LABELS[label]},{x:.4f},{y:.4f},{w:.4f},{h:.4f}")
    # the real BBox_List_2017.csv has Windows line ends; Data_Entry_2017 has Unix ones
    (root / "BBox_List_2017.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    for file_name, test in (("train_val_list.txt", False), ("test_list.txt", True)):
        names = sorted(plan.name for plan in plans if plan.test == test)
        (root / file_name).write_bytes("".join(name + "\n" for name in names).encode())


def generate(
    out_dir: Path,
    images: int,
    size: int = 256,
    seed: int = 0,
    difficulty: float = 0.5,
    label_noise: float = 0.1,
    images_per_patient: float = 3.0,
    rgba_fraction: float = 0.02,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write `images` synthetic chest films of size x size pixels in the NIH ChestX-ray14 layout.

    Creates out_dir/images_0NN/images/{patient:08d}_{follow-up:03d}.png (10,000 per folder),
    Data_Entry_2017.csv, BBox_List_2017.csv (one box per drawn lesion of the eight box labels,
    including lesions whose label the label noise removed: boxes record what was drawn, the
    label file what a report would say), train_val_list.txt and test_list.txt (~20% of patients).
    `difficulty` 0..1 makes signs subtler, `label_noise` 0..1 is the chance a drawn finding is
    missing from the labels, `images_per_patient` (>= 1) is the mean number of images per
    patient, `rgba_fraction` 0..1 the share of RGBA files, `workers` the processes (None = all
    cores; workers are spawned, so a script calling this needs an `if __name__ == "__main__":`
    guard). The same seed gives byte-identical files whatever `workers` is. Everything is written
    to a hidden sibling folder and renamed at the end, so a failed run leaves nothing at out_dir.
    Raises DatasetError if out_dir exists and is not empty or an argument is out of range.
    Returns a summary: images, patients, label counts, boxes, seconds, images_per_second.
    """
    out_dir = Path(out_dir)
    fractions = {
        "difficulty": difficulty,
        "label_noise": label_noise,
        "rgba_fraction": rgba_fraction,
    }
    _check_arguments(out_dir, images, size, seed, fractions, images_per_patient, workers)
    started = time.perf_counter()
    plans = plan_dataset(images, seed, label_noise, images_per_patient, rgba_fraction)
    workers = min(workers or os.cpu_count() or 1, max(1, images // 16))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent)
    )
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a dataset should read like any folder
        for folder in sorted({plan.folder for plan in plans}):
            (staging / folder / "images").mkdir(parents=True)
        boxes = _draw_all(plans, staging, size, seed, difficulty, workers, progress)
        _write_tables(staging, plans, boxes, size)
        marker = {
            "synthetic": True,
            "generator": "chestxpert data synth",
            "what": "synthetic phantoms for testing the pipeline, not radiographs of patients",
            "images": images,
            "size": size,
            "seed": seed,
            **fractions,
            "images_per_patient": images_per_patient,
        }
        (staging / SYNTHETIC_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    written = Counter(label for plan in plans for label in plan.written)
    drawn = Counter(label for plan in plans for label in plan.drawn)
    return {
        "out_dir": str(out_dir),
        "images": images,
        "patients": plans[-1].patient_id,
        "test_patients": len({plan.patient_id for plan in plans if plan.test}),
        "test_images": sum(plan.test for plan in plans),
        "label_counts": {label: written[label] for label in NIH_LABELS},
        "drawn_label_counts": {label: drawn[label] for label in NIH_LABELS},
        "no_finding": sum(not plan.written for plan in plans),
        "boxes": sum(len(image_boxes) for image_boxes in boxes),
        "rgba_images": sum(plan.rgba for plan in plans),
        "size": size,
        "seed": seed,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 1) if seconds > 0 else float("inf"),
    }
