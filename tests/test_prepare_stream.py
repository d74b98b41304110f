"""Streaming `data prepare`: the digest stays what it was, and a killed prepare resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from chestxpert.cluster.endpoints import resolve
from chestxpert.datasets import synth
from chestxpert.datasets.prepare import PrepareOptions, prepare
from chestxpert.datasets.reader import open_dataset, read_split
from chestxpert.datasets.schema import SPLITS

# The digest of `phantoms` below at --image-size 32, split by patient with seed 0, computed by
# the prepare that held every image in memory (main at eac0d7a). A streaming prepare must
# give the same value: datasets already prepared keep being recognised as the same.
PINNED_DIGEST = "87cd0a229e820803c7443c07e1711812709b388c5ee8af6951c623fe7b77b8ca"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms") / "nih"
    synth.generate(out, images=60, size=64, seed=0, workers=1, progress=False)
    return out


def local(tmp_path: Path):
    return resolve(workspace=tmp_path / "ws", environ={})


def phantom_opts(**changes) -> PrepareOptions:
    base = {"source": "nih", "image_size": 32, "workers": 1, "progress": False, "shard_rows": 7}
    return PrepareOptions(**{**base, **changes})


@pytest.mark.parametrize("workers", [1, 2])
def test_digest_is_the_one_prepare_gave_before_streaming(
    phantoms: Path, tmp_path: Path, workers: int
) -> None:
    out = tmp_path / "prepared"
    manifest = prepare(str(phantoms), str(out), phantom_opts(workers=workers), local(tmp_path))
    assert manifest["digest"] == PINNED_DIGEST
    dataset = open_dataset(str(out), local(tmp_path))
    counts = [len(read_split(dataset, s, columns=("image_id",))["image_id"]) for s in SPLITS]
    assert counts == [42, 3, 15]
    assert [len(manifest["splits"][s]["shards"]) for s in SPLITS] == [6, 1, 3]
