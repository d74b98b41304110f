"""Dataset versions: `data prepare` never deletes what it did not write, a replacement adds a
generation beside the old one, readers keep theirs, and `data gc` removes only what nothing names.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from chestxpert.cluster.endpoints import resolve
from chestxpert.datasets.gc import collect_garbage
from chestxpert.datasets.prepare import PrepareOptions, prepare
from chestxpert.datasets.reader import open_dataset, read_split
from chestxpert.datasets.schema import DatasetError
from tests.conftest import CHESTXPERT_CLI

FIXTURES = Path(__file__).parent / "fixtures"
SPLITS = ("train", "val", "test")


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with a content hash: equal trees, nothing touched."""
    return {
        str(path.relative_to(root)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        )
        for path in sorted(root.rglob("*"))
    }


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "CHESTXPERT_WORKSPACE": str(cwd / "ws"), **(env or {})}
    return subprocess.run(
        [CHESTXPERT_CLI, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=300
    )


def prepare_args(input_dir: str, out: str, *extra: str, size: int = 32) -> list[str]:
    return [
        "data",
        "prepare",
        "--source",
        "nih",
        "--input",
        input_dir,
        "--out",
        out,
        "--image-size",
        str(size),
        "--split",
        "official",
        "--workers",
        "1",
        *extra,
    ]


def opts(**changes) -> PrepareOptions:
    base = {"source": "nih", "image_size": 32, "split": "official", "workers": 1, "progress": False}
    return PrepareOptions(**{**base, **changes})


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """A user's folder: the raw download under data/, and other folders beside it."""
    shutil.copytree(FIXTURES / "nih_full", tmp_path / "data" / "nih")
    (tmp_path / "data" / "README.txt").write_text("where the NIH download lives\n")
    (tmp_path / "downloads" / "scans").mkdir(parents=True)
    (tmp_path / "downloads" / "README.txt").write_text("keep me\n")
    (tmp_path / "downloads" / "scans" / "a.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "other-tool").mkdir()
    (tmp_path / "other-tool" / "manifest.json").write_text('{"files": ["blob.bin"]}')
    (tmp_path / "other-tool" / "blob.bin").write_bytes(b"\0" * 64)
    return tmp_path


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize(
    ("out", "expected"),
    [
        ("data", ["--input data/nih is inside --out", "/data"]),
        ("downloads", ["/downloads is not empty", "README.txt, scans", "choose a new --out"]),
        ("data/nih/prepared", ["/data/nih/prepared is inside --input data/nih"]),
        ("other-tool", ["manifest.json that ChestXpert did not write", "blob.bin"]),
    ],
    ids=["input-parent", "other-files", "inside-input", "foreign-manifest"],
)
def test_prepare_refuses_an_out_it_could_damage_and_deletes_nothing(
    layout: Path, out: str, expected: list[str], force: bool
) -> None:
    """Drill 1: a real `data prepare` at a folder holding other files or the input's parent."""
    before = tree(layout)
    result = cli(*prepare_args("data/nih", out, *(["--force"] if force else [])), cwd=layout)
    assert result.returncode == 3, result.stdout + result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: --") and "\n" not in message, message
    for text in expected:
        assert text in message, message
    assert tree(layout) == before, "a refused prepare changed files"


def test_force_adds_a_generation_and_a_reader_keeps_the_one_it_opened(tmp_path: Path) -> None:
    endpoints = resolve(workspace=tmp_path / "ws", environ={})
    out = tmp_path / "prepared"
    old = prepare(str(FIXTURES / "nih_full"), str(out), opts(), endpoints)
    reader = open_dataset(str(out), endpoints)  # a trial holding the manifest it started with
    before = {split: read_split(reader, split)["image"] for split in SPLITS}

    new = prepare(
        str(FIXTURES / "nih_full"), str(out), opts(val_fraction=0.4, force=True), endpoints
    )
    assert new["generation"] == new["digest"][:16] != old["generation"]
    for manifest in (old, new):
        generation = manifest["generation"]
        assert json.loads((out / "manifests" / f"{generation}.json").read_text()) == manifest
        shards = [s for split in SPLITS for s in manifest["splits"][split]["shards"]]
        assert all(s.startswith(f"generations/{generation}/") for s in shards), shards
    assert json.loads((out / "manifest.json").read_text()) == new
    for split in SPLITS:  # the old reader's shards are all still there, unchanged
        assert (read_split(reader, split)["image"] == before[split]).all()
    assert open_dataset(str(out), endpoints).digest == new["digest"]
    pinned = open_dataset(str(out), endpoints, generation=old["generation"])
    assert pinned.digest == old["digest"] and pinned.count("val") == 1
    assert sorted(p.name for p in out.iterdir()) == ["generations", "manifest.json", "manifests"]
    assert not [p for p in (out / "generations").iterdir() if p.name.startswith(".")]

    # Back to the old options: its generation is still stored, so nothing is rewritten.
    files = tree(out / "generations")
    again = prepare(str(FIXTURES / "nih_full"), str(out), opts(force=True), endpoints)
    assert again == old and open_dataset(str(out), endpoints).digest == old["digest"]
    assert tree(out / "generations") == files


def test_gc_removes_only_generations_nothing_names(tmp_path: Path) -> None:
    """Five generations: current, one a sweep read, one the legacy final model was trained on,
    one a published final version was, one unused. Dry run deletes nothing; gc removes the
    unused one; --ignore-references the rest."""
    endpoints = resolve(workspace=tmp_path / "ws", environ={})
    out = tmp_path / "prepared"
    made = [
        prepare(str(FIXTURES / "nih_full"), str(out), opts(val_fraction=v, force=True), endpoints)
        for v in (0.1, 0.2, 0.25, 0.3, 0.4)
    ]
    swept, finished, versioned, unused, current = (m["generation"] for m in made)
    storage = tmp_path / "storage"
    (storage / "lr-sweep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(out)  # the sweep named the dataset through a symlink
    record = {"raw": {"dataset": str(tmp_path / "link")}, "dataset_generations": [swept]}
    (storage / "lr-sweep" / "chestxpert_spec.json").write_text(json.dumps(record))
    (storage / "other" / "final" / "model").mkdir(parents=True)
    other = {"raw": {"dataset": "s3://elsewhere/data"}, "dataset_generations": [unused]}
    (storage / "other" / "chestxpert_spec.json").write_text(json.dumps(other))
    state = {"config": {"dataset": out.as_uri()}, "dataset_digest": made[1]["digest"]}
    (storage / "other" / "final" / "model" / "state.json").write_text(json.dumps(state))
    version_model = storage / "other" / "final" / "versions" / "2" / "model"
    version_model.mkdir(parents=True)
    state = {"config": {"dataset": out.as_uri()}, "dataset_digest": made[2]["digest"]}
    (version_model / "state.json").write_text(json.dumps(state))

    before = tree(out)
    dry = cli("data", "gc", str(out), "--dry-run", "--storage", str(storage), cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert tree(out) == before
    assert f"keep    {current}  current" in dry.stdout
    assert f"keep    {swept}  sweep lr-sweep" in dry.stdout
    assert f"keep    {finished}  final model of other" in dry.stdout
    assert f"keep    {versioned}  final model version 2 of other" in dry.stdout
    assert f"would remove {unused}" in dry.stdout, dry.stdout

    done = cli("data", "gc", str(out), "--storage", str(storage), cwd=tmp_path)
    assert done.returncode == 0 and f"removed {unused}" in done.stdout, done.stdout
    assert sorted(p.name for p in (out / "generations").iterdir()) == sorted(
        [swept, finished, versioned, current]
    )
    assert not (out / "manifests" / f"{unused}.json").exists()
    with pytest.raises(DatasetError, match=f"no longer holds generation {unused}"):
        open_dataset(str(out), endpoints, generation=unused)
    assert open_dataset(str(out), endpoints, generation=swept).digest == made[0]["digest"]

    forced = cli("data", "gc", str(out), "--ignore-references", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert [p.name for p in (out / "generations").iterdir()] == [current]
    assert [p.name for p in (out / "manifests").iterdir()] == [f"{current}.json"]
    assert read_split(open_dataset(str(out), endpoints), "test")["image"].shape[0] == 2


def test_gc_refuses_a_folder_that_is_not_a_dataset(layout: Path) -> None:
    before = tree(layout)
    result = cli("data", "gc", str(layout / "downloads"), cwd=layout)
    assert result.returncode == 3 and "not a prepared dataset" in result.stderr, result.stderr
    assert tree(layout) == before


def test_a_dataset_from_before_generations_stays_readable_and_replaceable(tmp_path: Path) -> None:
    """Old layout: shards directly under <split>/, a manifest without "generation"."""
    endpoints = resolve(workspace=tmp_path / "ws", environ={})
    out = tmp_path / "prepared"
    old = prepare(str(FIXTURES / "nih_full"), str(out), opts(), endpoints)
    generation = old.pop("generation")
    for split in SPLITS:
        shutil.move(out / "generations" / generation / split, out / split)
        old["splits"][split]["shards"] = [
            s.removeprefix(f"generations/{generation}/") for s in old["splits"][split]["shards"]
        ]
    shutil.rmtree(out / "generations")
    shutil.rmtree(out / "manifests")
    (out / "manifest.json").write_text(json.dumps(old))

    legacy = open_dataset(str(out), endpoints)
    assert legacy.generation == generation and read_split(legacy, "train")["image"].shape[0] == 2
    assert open_dataset(str(out), endpoints, generation=generation).digest == old["digest"]
    again = prepare(str(FIXTURES / "nih_full"), str(out), opts(), endpoints)
    assert again == old, "re-preparing the same input over an old dataset must be a no-op"

    new = prepare(
        str(FIXTURES / "nih_full"), str(out), opts(val_fraction=0.4, force=True), endpoints
    )
    pinned = open_dataset(str(out), endpoints, generation=generation)
    assert pinned.manifest == old and read_split(pinned, "test")["image"].shape[0] == 2
    rows = collect_garbage(str(out), endpoints, keep={})
    assert {row.name: row.action for row in rows} == {
        generation: "remove",
        new["generation"]: "keep",
    }
    assert sorted(p.name for p in out.iterdir()) == ["generations", "manifest.json", "manifests"]


@pytest.mark.services
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_prepare_refuses_a_bucket_root_and_a_prefix_holding_other_objects(
    layout: Path, s3_endpoint, s3_client, force: bool
) -> None:
    """On the code before generations, `--out s3://bucket` emptied the whole bucket: this test
    uses a bucket of its own, holding what a shared bucket holds."""
    bucket = "cx-shared"
    if bucket not in [b["Name"] for b in s3_client.list_buckets()["Buckets"]]:
        s3_client.create_bucket(Bucket=bucket)
    for key in ("mlflow/1/abc/artifacts/model.pkl", "sweeps/lr/chestxpert_spec.json", "raw/a.png"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=key.encode())

    def objects() -> dict[str, str]:
        listed = s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return {o["Key"]: o["ETag"] for o in listed}

    before = objects()
    cases = [
        ("data/nih", f"s3://{bucket}", "is a bucket root"),
        ("data/nih", f"s3://{bucket}/", "is a bucket root"),
        ("data/nih", f"s3://{bucket}/sweeps", f"s3://{bucket}/sweeps is not empty"),
        (f"s3://{bucket}/raw/nih", f"s3://{bucket}/raw", "is inside --out"),
    ]
    for input_uri, out, expected in cases:
        args = prepare_args(input_uri, out, *(["--force"] if force else []))
        result = cli(*args, cwd=layout, env=s3_endpoint.env())
        assert result.returncode == 3, result.stdout + result.stderr
        assert expected in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert objects() == before, "a refused prepare changed the bucket"


def journal_kinds(tracking: Path) -> list[str]:
    """The kinds of the events a sweep's driver journalled, in order."""
    return [
        json.loads(line)["kind"]
        for path in sorted(tracking.glob("journal-*.jsonl"))
        for line in path.read_text().splitlines()
        if line.endswith("}")  # not a line still being written
    ]


def trial_records(sweep: Path) -> dict[str, tuple[list[dict], list[dict]]]:
    """Per trial folder: its reported rows (result.json) and its checkpoints' states."""
    records = {}
    for result in sorted(sweep.glob("train_*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        states = [
            json.loads(path.read_text())
            for path in sorted(result.parent.glob("checkpoint_*/state.json"))
        ]
        records[result.parent.name] = (rows, states)
    return records


@pytest.mark.services
def test_prepare_force_while_a_sweep_reads_the_dataset(
    synthetic_dataset, ray_cluster, s3_endpoint, mlflow_server, tmp_path: Path, monkeypatch
) -> None:
    """Drill 2: `data prepare --force` onto the S3 dataset a 2-trial sweep is reading. The sweep
    ends on the old generation, its second trial starting after the replacement; a new sweep
    reads the new one; resume and final refuse the change unless told to allow it; gc keeps
    the generation the old sweep names."""
    from tests.test_sweeps import sweep_env, write_spec

    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    endpoints = resolve(workspace=tmp_path / "ws")
    uri = f"s3://{s3_endpoint.bucket}/datasets/drill-{tmp_path.name}"
    storage = tmp_path / "storage"
    env = sweep_env(ray_cluster, s3_endpoint.env(), mlflow_server.url, str(storage))
    env["CHESTXPERT_WORKSPACE"] = str(tmp_path / "ws")

    def start(name: str, **changes) -> subprocess.Popen:
        spec = write_spec(
            tmp_path / f"{name}.yaml", name, uri, scheduler={"type": "none"}, **changes
        )
        with (tmp_path / f"{name}.log").open("w") as log:  # a file: two drivers, no pipe to fill
            return subprocess.Popen(
                [CHESTXPERT_CLI, "sweep", "run", str(spec)],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()[-3000:]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [CHESTXPERT_CLI, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    def prepare_seed(seed: int, *extra: str) -> None:
        args = prepare_args(str(synthetic_dataset.raw), uri, "--seed", str(seed), *extra, size=64)
        result = run(*args)
        assert result.returncode == 0, result.stderr[-3000:]

    prepare_seed(0)
    old = open_dataset(uri, endpoints).manifest["digest"]  # digests: what a trial records
    drivers = [start("drill-old", search__max_concurrent=1, search__num_samples=2)]
    try:
        deadline = time.monotonic() + 600
        # the driver journals each epoch as it gets it (Tune syncs result.json to storage later)
        journal = storage / "drill-old" / "tracking"
        while "metrics" not in journal_kinds(journal):
            assert drivers[0].poll() is None, log("drill-old")
            assert time.monotonic() < deadline, "no trial reported before the deadline"
            time.sleep(0.5)
        # The first trial trains on; its driver, paused, cannot start the second one until
        # the new generation is published. (Tune's result timestamps are whole seconds: the
        # driver's journal, which records each trial's start, gives the order exactly.)
        os.kill(drivers[0].pid, signal.SIGSTOP)
        try:
            prepare_seed(1, "--force")
            started_before = journal_kinds(journal).count("start")
        finally:
            os.kill(drivers[0].pid, signal.SIGCONT)
        drivers.append(start("drill-new", search__num_samples=1, trial__epochs=1))
        for driver in drivers:
            driver.wait(timeout=900)
    finally:
        for driver in drivers:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    assert [d.returncode for d in drivers] == [0, 0], log("drill-old") + log("drill-new")
    new = open_dataset(uri, endpoints).manifest["digest"]
    assert new != old

    records = trial_records(storage / "drill-old")
    assert len(records) == 2
    digests = {
        folder: {s["dataset_digest"] for s in states} for folder, (_, states) in records.items()
    }
    assert digests == {folder: {old} for folder in records}, f"old {old[:12]}, new {new[:12]}"
    for folder, (rows, _) in records.items():
        assert [r["epoch"] for r in rows] == [1, 2], folder
        assert {r["dataset_generation"] for r in rows} == {old[:16]}, folder
    assert started_before == 1, "the second trial must not start before the replacement"
    assert journal_kinds(journal).count("start") == 2
    [(rows, states)] = trial_records(storage / "drill-new").values()
    assert {s["dataset_digest"] for s in states} == {new}
    assert {r["dataset_generation"] for r in rows} == {new[:16]}

    for refused in (run("sweep", "resume", "drill-old"), run("final", "drill-old", "--local")):
        message = refused.stderr.strip().splitlines()[-1]  # after TensorFlow's start-up lines
        assert refused.returncode == 3 and message.startswith("error: "), refused.stderr[-3000:]
        for text in (uri, old[:12], new[:12], "--allow-dataset-change"):
            assert text in message, message
    allowed = run("sweep", "resume", "drill-old", "--allow-dataset-change")
    assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    record = json.loads((storage / "drill-old" / "chestxpert_spec.json").read_text())
    assert record["dataset_generations"] == [old[:16], new[:16]]
    assert record["dataset_digest"] == new and len(record["dataset_changes"]) == 1

    collected = run("data", "gc", uri)
    assert collected.returncode == 0, collected.stderr[-3000:]
    assert f"keep    {old[:16]}  sweep drill-old" in collected.stdout, collected.stdout
    assert f"keep    {new[:16]}  current" in collected.stdout
    assert "freed 0 B" in collected.stdout
    assert open_dataset(uri, endpoints, generation=old[:16]).manifest["digest"] == old
