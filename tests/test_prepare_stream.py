"""Streaming `data prepare`: the digest stays what it was, and a killed prepare resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from chestxpert.cluster.endpoints import resolve
from chestxpert.datasets import prepare as prepare_module
from chestxpert.datasets import synth
from chestxpert.datasets.gc import collect_garbage
from chestxpert.datasets.output import STAGING_MARK, DatasetWriter
from chestxpert.datasets.prepare import PrepareOptions, prepare
from chestxpert.datasets.reader import open_dataset, read_split
from chestxpert.datasets.schema import GENERATIONS, SPLITS, DatasetError
from tests.conftest import CHESTXPERT_CLI

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


def test_a_killed_prepare_resumes_keeping_the_shards_it_finished(tmp_path: Path) -> None:
    """`chestxpert data prepare` SIGKILLed once it has staged shards, then run again: the rerun
    keeps those shards (same inode and mtime once published), decodes only the rest, and
    publishes the dataset an uninterrupted prepare gives."""
    raw = tmp_path / "raw"
    synth.generate(raw, images=800, size=256, seed=1, progress=False)
    out = tmp_path / "prepared"
    command = [
        CHESTXPERT_CLI, "data", "prepare", "--source", "nih", "--input", str(raw),
        "--out", str(out), "--image-size", "64", "--shard-rows", "10", "--workers", "2",
        "--workspace", str(tmp_path / "ws"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (tmp_path / "killed.log").open("w") as log:  # a file: a pipe would wait for orphans
        killed = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    journal: list[Path] = []
    while killed.poll() is None and len(journal) < 3:
        journal = list(out.glob(f"{GENERATIONS}/{STAGING_MARK}*/journal/*.json"))
        time.sleep(0.02)
    workers = psutil.Process(killed.pid).children()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert len(workers) == 2
    _, orphans = psutil.wait_procs(workers, timeout=30)
    assert not orphans, "the decode workers of a killed prepare exit"
    assert not (out / "manifest.json").exists()
    (staging,) = out.glob(f"{GENERATIONS}/{STAGING_MARK}*")
    # A shard counts as finished once its journal entry is written, after the file.
    finished = [json.loads(entry.read_text())["shard"] for entry in staging.glob("journal/*.json")]
    staged = {relative: (staging / "shards" / relative).stat() for relative in finished}
    assert len(staged) >= 3

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming:" in rerun.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    generation = out / GENERATIONS / manifest["generation"]
    for relative, before in staged.items():
        after = (generation / relative).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), relative
    assert sorted(p.name for p in (out / GENERATIONS).iterdir()) == [manifest["generation"]]

    whole = prepare(
        str(raw), str(tmp_path / "whole"), PrepareOptions(source="nih", image_size=64, workers=2,
        progress=False, shard_rows=10), local(tmp_path)
    )  # fmt: skip
    assert manifest["digest"] == whole["digest"]
    assert manifest["splits"] == whole["splits"]


def test_two_runs_with_the_same_arguments_do_not_share_a_staging_area(tmp_path: Path) -> None:
    out = str(tmp_path / "prepared")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_STAGING, out, str(tmp_path / "ws")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "staged\n"
        second = DatasetWriter(out, local(tmp_path))
        with pytest.raises(DatasetError, match="another `data prepare` with the same input"):
            second.stage("0123456789abcdef")
        assert second.abandon() == 0
        assert (tmp_path / "prepared" / GENERATIONS / f"{STAGING_MARK}0123456789abcdef").is_dir()
        second.stage("fedcba9876543210")  # other arguments: another area
        second.drop_staging()
    finally:
        holder.kill()
        holder.wait()
    DatasetWriter(out, local(tmp_path)).stage("0123456789abcdef")  # a killed run holds nothing


# A run that holds the staging area of key 0123456789abcdef until it is killed.
HOLD_STAGING = """
import sys, time
from chestxpert.cluster.endpoints import resolve
from chestxpert.datasets.output import DatasetWriter
writer = DatasetWriter(sys.argv[1], resolve(workspace=sys.argv[2], environ={}))
writer.stage("0123456789abcdef")
print("staged", flush=True)
time.sleep(600)
"""


def test_gc_keeps_a_recent_staging_area_and_removes_an_idle_one(
    phantoms: Path, tmp_path: Path, interrupt_on_second_shard, monkeypatch
) -> None:
    out = tmp_path / "prepared"
    monkeypatch.setattr(prepare_module, "_shard_table", interrupt_on_second_shard["real"])
    current = prepare(str(phantoms), str(out), phantom_opts(), local(tmp_path))
    monkeypatch.setattr(prepare_module, "_shard_table", interrupt_on_second_shard["interrupt"])
    with pytest.raises(KeyboardInterrupt):
        prepare(str(phantoms), str(out), phantom_opts(image_size=48, force=True), local(tmp_path))
    (staging,) = out.glob(f"{GENERATIONS}/{STAGING_MARK}*")
    relative = staging.relative_to(out).as_posix()

    rows = {row.name: row for row in collect_garbage(str(out), local(tmp_path), keep={})}
    assert rows[relative].action == "keep" and "a prepare may still run" in rows[relative].reason
    rows = {
        row.name: row
        for row in collect_garbage(str(out), local(tmp_path), keep={}, grace_seconds=0)
    }
    assert rows[relative].action == "remove" and not staging.exists()
    assert rows[current["generation"]].action == "keep"
    assert open_dataset(str(out), local(tmp_path)).digest == current["digest"]
