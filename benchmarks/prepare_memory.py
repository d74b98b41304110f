"""Peak memory of `data prepare` against the number of images: the same phantoms prepared at
two dataset sizes, each in a fresh interpreter; a streaming prepare's peak should not grow.

Before streaming (main at eac0d7a) prepare held every decoded image: measured with
`/usr/bin/time -v chestxpert data prepare --image-size 224`, 2,000 phantoms peaked at 459 MB
and 8,000 at 1,360 MB. The target for the ratio large/small is at most 1.2x.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from benchmarks.runner import run_child, scratch_dir


@dataclass(frozen=True)
class Size:
    small: int  # images of the smaller dataset; the larger has LARGER_FACTOR times as many
    original: int  # side of the generated PNGs
    image_size: int  # side of the prepared images


FULL = Size(small=2000, original=256, image_size=224)
SMOKE = Size(small=30, original=64, image_size=32)
LARGER_FACTOR = 4
TARGET_RATIO = 1.2


def prepare_child(spec: dict) -> dict:
    """Prepare `spec["raw"]` into `spec["out"]`; return the seconds taken and this process's
    peak RSS (the decode workers hold a few images each and are not counted)."""
    import resource

    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.prepare import PrepareOptions, prepare

    started = time.monotonic()
    opts = PrepareOptions(source="nih", image_size=spec["image_size"], progress=False)
    manifest = prepare(spec["raw"], spec["out"], opts, resolve(workspace=spec["ws"], environ={}))
    return {
        "seconds": time.monotonic() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "images": sum(split["images"] for split in manifest["splits"].values()),
    }


def run(smoke: bool = False) -> None:
    from chestxpert.datasets.synth import generate

    size = SMOKE if smoke else FULL
    peaks = {}
    with scratch_dir() as work:
        for images in (size.small, size.small * LARGER_FACTOR):
            raw = work / f"raw-{images}"
            generate(raw, images=images, size=size.original, seed=0, progress=False)
            spec = {"raw": str(raw), "out": str(work / f"prepared-{images}")}
            result = run_child(prepare_child, {**spec, "ws": str(work / "ws"), **vars(size)})
            peaks[images] = result["peak_rss_mb"]
            print(
                f"  {result['images']:6d} images: peak RSS {result['peak_rss_mb']:6.0f} MB, "
                f"{result['images'] / result['seconds']:.0f} images/s "
                f"({size.original}px PNG -> {size.image_size}px shards)"
            )
    small, large = peaks[size.small], peaks[size.small * LARGER_FACTOR]
    print(
        f"  ratio peak RSS {LARGER_FACTOR}x images / 1x: {large / small:.2f}x "
        f"(target <= {TARGET_RATIO}x)"
    )
