"""`datasets.prepare` and the reader: splits, loss weights, shards, atomic publish, local and S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chestxpert.cluster.endpoints import resolve
from chestxpert.datasets import prepare as prepare_module
from chestxpert.datasets.prepare import PrepareOptions, assign_splits, loss_weights, prepare
from chestxpert.datasets.reader import make_tf_dataset, open_dataset, read_split
from chestxpert.datasets.schema import NIH_LABELS, SYNTHETIC_MARKER, DatasetError

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def nih_copy(tmp_path: Path) -> Path:
    root = tmp_path / "nih"
    shutil.copytree(FIXTURES / "nih_full", root)
    return root


def count_shard_writes(monkeypatch, real) -> dict:
    """From now on, count the Parquet tables `prepare` builds (one per shard for small splits)."""
    calls = {"n": 0}

    def count(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_shard_table", count)
    return calls


def upload_folder(s3_client, bucket: str, folder: Path, prefix: str) -> None:
    """Copy every file below `folder` to the same relative key below `prefix`."""
    for path in folder.rglob("*"):
        if path.is_file():
            s3_client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")


def bucket_keys(s3_client, bucket: str, prefix: str) -> list[str]:
    """The object keys under `prefix`."""
    listing = s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


def local(tmp_path: Path):
    return resolve(workspace=tmp_path / "ws", environ={})


def nih_opts(**changes) -> PrepareOptions:
    base = {"source": "nih", "image_size": 64, "split": "official", "workers": 1, "progress": False}
    return PrepareOptions(**{**base, **changes})


def test_a_synth_folder_is_marked_synthetic_in_the_manifest(nih_copy: Path, tmp_path: Path):
    real = prepare(str(nih_copy), str(tmp_path / "real"), nih_opts(), local(tmp_path))
    assert real["synthetic"] is False and real["provenance"] is None
    marker = {"synthetic": True, "generator": "chestxpert data synth", "seed": 3}
    (nih_copy / SYNTHETIC_MARKER).write_text(json.dumps(marker))
    phantoms = prepare(str(nih_copy), str(tmp_path / "synth"), nih_opts(), local(tmp_path))
    assert phantoms["synthetic"] is True and phantoms["provenance"] == marker
    assert phantoms["notes"][0].startswith("Synthetic phantoms")
    # the same files, marked, are another dataset: never reused unmarked
    assert phantoms["digest"] != real["digest"]
    assert open_dataset(str(tmp_path / "synth"), local(tmp_path)).manifest["synthetic"] is True


def test_nih_fixture_prepares_into_manifest_and_shards(nih_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    manifest = prepare(str(nih_copy), str(out), nih_opts(), local(tmp_path))
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["labels"] == list(NIH_LABELS) and manifest["image_size"] == 64
    assert manifest["patients_disjoint"] is True
    assert {split: manifest["splits"][split]["images"] for split in ("train", "val", "test")} == {
        "train": 2,
        "val": 1,
        "test": 2,
    }
    dataset = open_dataset(str(out), local(tmp_path))
    test = read_split(dataset, "test", columns=("image", "labels", "image_id"))
    # the official test list is the test split
    assert sorted(test["image_id"]) == ["00020259_002.png", "00022084_000.png"]
    assert test["image"].shape == (2, 64, 64, 1) and test["image"].dtype == np.uint8
    all_ids = []
    for split in ("train", "val", "test"):
        all_ids += list(read_split(dataset, split, columns=("image_id",))["image_id"])
    # the real RGBA image is in the dataset as gray pixels
    assert "00001369_000.png" in all_ids and len(all_ids) == 5


def test_shards_are_lz4_unless_asked_and_the_codec_does_not_change_the_images(
    nih_copy: Path, tmp_path: Path, capsys
) -> None:
    import pyarrow.parquet as pq

    codecs, read = {}, {}
    for codec in ("lz4", "zstd"):
        opts = nih_opts() if codec == "lz4" else nih_opts(compression="zstd")
        out = tmp_path / codec
        manifest = prepare(str(nih_copy), str(out), opts, local(tmp_path))
        assert manifest["shard_compression"] == codec
        shards = [out / shard for split in manifest["splits"].values() for shard in split["shards"]]
        codecs[codec] = {
            pq.ParquetFile(shard).metadata.row_group(0).column(0).compression for shard in shards
        }
        read[codec] = read_split(open_dataset(str(out), local(tmp_path)), "train")
        read[codec]["digest"] = manifest["digest"]
    assert codecs == {"lz4": {"LZ4"}, "zstd": {"ZSTD"}}
    assert read["lz4"]["digest"] == read["zstd"]["digest"]
    assert np.array_equal(read["lz4"]["image"], read["zstd"]["image"])
    assert np.array_equal(read["lz4"]["labels"], read["zstd"]["labels"], equal_nan=True)
    # the same images with the other codec: the stored generation stays, and the output says so
    capsys.readouterr()
    again = prepare(
        str(nih_copy), str(tmp_path / "lz4"), nih_opts(compression="zstd"), local(tmp_path)
    )
    assert again["shard_compression"] == "lz4"
    assert "nothing to do; its shards stay lz4 (prepare into a new --out" in capsys.readouterr().out


def test_loss_weights_come_from_the_training_split_only(nih_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    manifest = prepare(str(nih_copy), str(out), nih_opts(), local(tmp_path))
    train = read_split(open_dataset(str(out), local(tmp_path)), "train")["labels"]
    positive_freq = train.mean(axis=0)
    np.testing.assert_allclose(manifest["pos_weight"], 1.0 - positive_freq, atol=1e-6)
    np.testing.assert_allclose(manifest["neg_weight"], positive_freq, atol=1e-6)


def test_loss_weights_match_a_plain_loop_and_skip_unknown_labels() -> None:
    rng = np.random.default_rng(3)
    labels = rng.choice([0.0, 1.0, np.nan], size=(200, 5), p=[0.6, 0.3, 0.1])
    pos_w, neg_w, positives, negatives = loss_weights(labels)
    for column in range(5):
        known = [v for v in labels[:, column] if not np.isnan(v)]
        pos = sum(1 for v in known if v == 1.0)
        assert positives[column] == pos and negatives[column] == len(known) - pos
        assert pos_w[column] == pytest.approx((len(known) - pos) / len(known), abs=1e-6)
        assert neg_w[column] == pytest.approx(pos / len(known), abs=1e-6)


def _table(patients: int, images_each: int) -> pd.DataFrame:
    rows = [
        {"image_id": f"{p:08d}_{i:03d}.png", "patient_id": str(p), "official_split": None}
        for p in range(patients)
        for i in range(images_each)
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patient_split_is_disjoint_and_near_the_fractions(seed: int) -> None:
    images = _table(patients=300, images_each=3)
    split = assign_splits(
        images, nih_opts(split="patient", seed=seed, val_fraction=0.1, test_fraction=0.2)
    )
    per_patient = pd.DataFrame({"p": images["patient_id"], "s": split}).groupby("p")["s"].nunique()
    assert per_patient.max() == 1
    patient_share = (
        pd.DataFrame({"p": images["patient_id"], "s": split}).drop_duplicates()["s"].value_counts()
        / 300
    )
    assert patient_share["test"] == pytest.approx(0.2, abs=0.01)
    assert patient_share["val"] == pytest.approx(0.1, abs=0.01)
    again = assign_splits(images, nih_opts(split="patient", seed=seed))
    assert (again == split).all(), "the same seed must give the same split"


def test_official_split_carves_validation_from_train_val_by_patient() -> None:
    images = _table(patients=50, images_each=2)
    images["official_split"] = [
        "test" if int(p) < 10 else "train_val" for p in images["patient_id"]
    ]
    split = assign_splits(images, nih_opts(split="official", val_fraction=0.2))
    assert set(split[images["official_split"] == "test"]) == {"test"}
    assert set(split[images["official_split"] == "train_val"]) == {"train", "val"}
    val_patients = images.loc[split == "val", "patient_id"].unique()
    assert len(val_patients) == 8  # 20% of the 40 train_val patients


def test_rerun_gives_the_same_digest_and_a_different_dataset_needs_force(
    nih_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "prepared"
    first = prepare(str(nih_copy), str(out), nih_opts(), local(tmp_path))
    second = prepare(str(nih_copy), str(out), nih_opts(), local(tmp_path))
    assert second["digest"] == first["digest"]
    assert "nothing to do" in capsys.readouterr().out
    assert [p.name for p in (out / "generations").iterdir()] == [first["generation"]]
    with pytest.raises(DatasetError, match="--force"):
        prepare(str(nih_copy), str(out), nih_opts(image_size=32), local(tmp_path))
    capsys.readouterr()
    replaced = prepare(
        str(nih_copy), str(out), nih_opts(image_size=32, force=True), local(tmp_path)
    )
    # the refused run's shards were staged: --force publishes them without decoding again
    assert "resuming: 5 images are in shards a stopped run staged" in capsys.readouterr().out
    assert (
        replaced["digest"] != first["digest"]
        and open_dataset(str(out), local(tmp_path)).image_size == 32
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nih", "prepared"], (
        "staging folders left behind"
    )


def test_interrupted_prepare_shows_nothing_and_the_rerun_keeps_its_finished_shard(
    nih_copy: Path, tmp_path: Path, interrupt_on_second_shard, monkeypatch
) -> None:
    out = tmp_path / "prepared"
    with pytest.raises(KeyboardInterrupt):
        prepare(str(nih_copy), str(out), nih_opts(), local(tmp_path))
    assert interrupt_on_second_shard["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nih", "prepared"]
    (staging,) = (out / "generations").iterdir()  # hidden: no manifest names it
    assert staging.name.startswith(".partial-stage-") and not (out / "manifest.json").exists()
    (staged,) = (staging / "shards").glob("*/*.parquet")  # the train shard, finished first
    before = staged.stat()
    with pytest.raises(DatasetError, match="no manifest.json"):
        open_dataset(str(out), local(tmp_path))

    calls = count_shard_writes(monkeypatch, interrupt_on_second_shard["real"])
    manifest = prepare(str(nih_copy), str(out), nih_opts(), local(tmp_path))
    assert calls["n"] == 2, "only the val and test shards are written again"
    kept = out / manifest["splits"]["train"]["shards"][0]
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in (out / "generations").iterdir()) == [manifest["generation"]]
    assert (
        manifest["digest"]
        == prepare(str(nih_copy), str(tmp_path / "whole"), nih_opts(), local(tmp_path))["digest"]
    )


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: p.write_bytes(b""), "zero-byte"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
        (lambda p: p.write_text("this is not an image"), "not an image"),
    ],
    ids=["zero-byte", "truncated", "not-an-image"],
)
def test_bad_image_fails_naming_the_file_or_is_skipped_and_reported(
    nih_copy: Path, tmp_path: Path, damage, expected: str
) -> None:
    victim = nih_copy / "images_001" / "images" / "00000129_000.png"
    damage(victim)
    with pytest.raises(DatasetError) as err:
        prepare(str(nih_copy), str(tmp_path / "a"), nih_opts(), local(tmp_path))
    assert str(victim) in str(err.value) and expected in str(err.value)
    assert "--on-bad-image skip" in str(err.value)
    manifest = prepare(
        str(nih_copy), str(tmp_path / "b"), nih_opts(on_bad_image="skip"), local(tmp_path)
    )
    assert manifest["bad_images"] == 1
    report = pd.read_csv(tmp_path / "b" / manifest["bad_images_report"])
    assert (
        list(report["image_id"]) == ["00000129_000.png"] and expected in report["problem"].iloc[0]
    )


def test_missing_image_file_fails_or_is_counted_when_skipping(
    nih_copy: Path, tmp_path: Path
) -> None:
    (nih_copy / "images_002" / "images" / "00013125_000.png").unlink()
    with pytest.raises(DatasetError, match="00013125_000.png"):
        prepare(str(nih_copy), str(tmp_path / "a"), nih_opts(), local(tmp_path))
    manifest = prepare(
        str(nih_copy), str(tmp_path / "b"), nih_opts(on_bad_image="skip"), local(tmp_path)
    )
    assert manifest["missing_images"] == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 16}, "smaller than the smallest backbone input"),
        ({"split": "random"}, "--split"),
        ({"val_fraction": 0.5, "test_fraction": 0.45}, "under 10% of patients"),
        ({"on_bad_image": "ignore"}, "--on-bad-image"),
        ({"shard_rows": 0}, "--shard-rows 0 must be 1 or more"),
        ({"compression": "gzip"}, "--compression 'gzip' is not known; expected one of lz4, zstd"),
    ],
)
def test_impossible_options_fail_before_reading(
    tmp_path: Path, changes: dict, message: str
) -> None:
    with pytest.raises(DatasetError, match=message):
        prepare(
            str(tmp_path / "does-not-exist"),
            str(tmp_path / "out"),
            nih_opts(**changes),
            local(tmp_path),
        )


def test_output_not_writable_is_a_clear_error(nih_copy: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DatasetError, match="not writable"):
        prepare(str(nih_copy), str(blocker / "out"), nih_opts(), local(tmp_path))


def test_official_split_without_lists_says_what_to_do(nih_copy: Path, tmp_path: Path) -> None:
    (nih_copy / "test_list.txt").unlink()
    (nih_copy / "train_val_list.txt").unlink()
    with pytest.raises(DatasetError, match="--split patient"):
        prepare(str(nih_copy), str(tmp_path / "out"), nih_opts(), local(tmp_path))


def test_chexpert_ignored_labels_become_masked(tmp_path: Path) -> None:
    opts = PrepareOptions(
        source="chexpert",
        image_size=32,
        split="official",
        uncertain="ignore",
        workers=1,
        progress=False,
        val_fraction=0.3,
    )
    out = tmp_path / "cx"
    manifest = prepare(str(FIXTURES / "chexpert"), str(out), opts, local(tmp_path))
    assert manifest["uncertain_policy"] == "ignore" and manifest["labels"][0] == "No Finding"
    dataset = open_dataset(str(out), local(tmp_path))
    raw = np.concatenate([read_split(dataset, s)["labels"] for s in ("train", "val", "test")])
    assert np.isnan(raw).any(), "uncertain labels must stay unknown under --uncertain ignore"
    masks = [
        m.numpy() for s in ("train", "val", "test") for _, _, m in make_tf_dataset(dataset, s, 8)
    ]
    assert (np.concatenate(masks) == 0).sum() == np.isnan(raw).sum()


def test_tf_dataset_order_is_deterministic_without_shuffle(nih_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare(
        str(nih_copy),
        str(out),
        nih_opts(split="patient", val_fraction=0.2, test_fraction=0.2),
        local(tmp_path),
    )
    dataset = open_dataset(str(out), local(tmp_path))
    first = np.concatenate([x.numpy() for x, _, _ in make_tf_dataset(dataset, "train", 2)])
    second = np.concatenate([x.numpy() for x, _, _ in make_tf_dataset(dataset, "train", 2)])
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, read_split(dataset, "train")["image"])


@pytest.mark.services
@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_to_and_from_the_s3_endpoint(
    nih_copy: Path, tmp_path: Path, s3_endpoint, s3_client, monkeypatch, workers: int
) -> None:
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    endpoints = resolve(workspace=tmp_path / "ws")
    upload_folder(s3_client, s3_endpoint.bucket, nih_copy, "raw/nih")  # input from the bucket too
    out = f"s3://{s3_endpoint.bucket}/prepared/nih64-{workers}"
    # with 2 workers, the decode processes read the images from the bucket themselves
    opts = nih_opts(workers=workers)
    manifest = prepare(f"s3://{s3_endpoint.bucket}/raw/nih", out, opts, endpoints)
    dataset = open_dataset(out, endpoints)
    assert dataset.manifest["digest"] == manifest["digest"]
    assert read_split(dataset, "test")["image"].shape == (2, 64, 64, 1)
    local_manifest = prepare(str(nih_copy), str(tmp_path / "local"), nih_opts(), endpoints)
    assert local_manifest["digest"] == manifest["digest"], (
        "S3 and local input must give the same dataset"
    )
    # the images were read object by object: no copy of the input was kept anywhere
    assert not (tmp_path / "ws").exists()


@pytest.mark.services
def test_s3_missing_bucket_and_interrupted_s3_prepare(
    nih_copy: Path, tmp_path: Path, s3_endpoint, s3_client, monkeypatch, interrupt_on_second_shard
) -> None:
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    endpoints = resolve(workspace=tmp_path / "ws")
    with pytest.raises(DatasetError, match="bucket 'no-such-bucket' does not exist"):
        prepare(str(nih_copy), "s3://no-such-bucket/x", nih_opts(), endpoints)

    # from an S3 input to an S3 output: the rerun must find the staged shard in both cases
    upload_folder(s3_client, s3_endpoint.bucket, nih_copy, "raw/interrupted")
    source = f"s3://{s3_endpoint.bucket}/raw/interrupted"
    out = f"s3://{s3_endpoint.bucket}/prepared/interrupted"
    with pytest.raises(KeyboardInterrupt):
        prepare(source, out, nih_opts(), endpoints)
    assert interrupt_on_second_shard["n"] == 2
    keys = bucket_keys(s3_client, s3_endpoint.bucket, "prepared/interrupted")
    assert not any(k.endswith("manifest.json") for k in keys)
    with pytest.raises(DatasetError, match="did not\\s+finish"):
        open_dataset(out, endpoints)
    staged = [k for k in keys if "/generations/.partial-stage-" in k and k.endswith(".parquet")]
    assert len(staged) == 1, keys

    calls = count_shard_writes(monkeypatch, interrupt_on_second_shard["real"])
    manifest = prepare(source, out, nih_opts(), endpoints)
    assert calls["n"] == 2, "the shard staged before the interruption is not written again"
    keys = bucket_keys(s3_client, s3_endpoint.bucket, "prepared/interrupted")
    assert not any(".partial-" in k for k in keys), "the staged objects are removed once copied"
    whole = prepare(str(nih_copy), str(tmp_path / "whole"), nih_opts(), endpoints)
    assert open_dataset(out, endpoints).digest == manifest["digest"] == whole["digest"]


@pytest.mark.services
def test_s3_force_interrupted_leaves_the_old_dataset_whole(
    nih_copy: Path, tmp_path: Path, s3_endpoint, monkeypatch, interrupt_on_second_shard
) -> None:
    """`--force` onto S3 writes the new generation before anything else changes: a crash while
    writing it leaves the old dataset current and whole, and the rerun publishes the new one."""
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    endpoints = resolve(workspace=tmp_path / "ws")
    out = f"s3://{s3_endpoint.bucket}/prepared/replaced"
    monkeypatch.setattr(prepare_module, "_shard_table", interrupt_on_second_shard["real"])
    old = prepare(str(nih_copy), out, nih_opts(), endpoints)
    monkeypatch.setattr(prepare_module, "_shard_table", interrupt_on_second_shard["interrupt"])
    with pytest.raises(KeyboardInterrupt):
        prepare(str(nih_copy), out, nih_opts(image_size=32, force=True), endpoints)
    current = open_dataset(out, endpoints)
    assert current.digest == old["digest"]
    assert [read_split(current, s)["image"].shape[0] for s in ("train", "val", "test")] == [2, 1, 2]

    monkeypatch.setattr(prepare_module, "_shard_table", interrupt_on_second_shard["real"])
    new = prepare(str(nih_copy), out, nih_opts(image_size=32, force=True), endpoints)
    assert open_dataset(out, endpoints).image_size == 32
    kept = open_dataset(out, endpoints, generation=old["generation"])
    assert kept.digest == old["digest"] and read_split(kept, "test")["image"].shape[0] == 2
    assert new["generation"] != old["generation"]
