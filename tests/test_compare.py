"""`chestxpert compare A B`: the paired patient-bootstrap difference on constructed predictions
(no TensorFlow), then one end-to-end run on the session's final model against itself and against
a copy that cannot rank (its classifier's kernel zeroed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import html5lib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from chestxpert.results.bootstrap import patient_bootstrap_weights
from chestxpert.results.compare import (
    ComparedModel,
    CompareError,
    check_same_labels,
    open_test_split,
    paired_auc_difference,
    render_html,
    render_markdown,
    table_rows,
)

LABELS = ["Effusion", "Mass", "Hernia"]
HTML_NS = {"h": "http://www.w3.org/1999/xhtml"}


def _constructed(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """300 images of 150 patients: truth, scores that carry Effusion's and Mass's signal (Hernia's
    scores are noise), patient ids."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(150), 2)
    truth = (rng.random((300, 3)) < 0.3).astype(float)
    truth[rng.random(300) < 0.1, 1] = np.nan  # unknown Mass labels are left out
    scores = 0.4 * np.nan_to_num(truth) + 0.6 * rng.random((300, 3))
    scores[:, 2] = rng.random(300)
    return truth, scores, patients


def _cells(page: str) -> dict[str, list[str]]:
    document = html5lib.HTMLParser(strict=True).parse(page)  # raises on any parse error
    table = document.find(".//h:table[@id='compare-table']", HTML_NS)
    return {
        row.get("data-key"): ["".join(cell.itertext()) for cell in row.findall("h:td", HTML_NS)]
        for row in table.findall(".//h:tr", HTML_NS)
        if row.get("data-key")
    }


def _assert_page_says_the_json(page: str, data: dict) -> None:
    assert not re.search(r"(?i)https?://", page), "the page names an external URL"
    assert not re.search(r"(?i)\b(src|href)=['\"](?!data:|#)", page), "it fetches something"
    cells = _cells(page)
    assert cells == {key: row for key, row in table_rows(data)}
    for key, item in [*data["per_label"].items(), ("macro", data["macro"])]:
        if item["difference"] is None:
            continue
        assert cells[key][1].startswith(f"{item['auc_a']:.4f} ({item['auc_a_low']:.4f}–")
        assert cells[key][2].startswith(f"{item['auc_b']:.4f} ({item['auc_b_low']:.4f}–")
        assert cells[key][3] == (
            f"{item['difference']:+.4f} ({item['low']:.4f} to {item['high']:.4f})"
        )
        assert cells[key][4] == f"{item['p_value']:.4f}"
        assert cells[key][5].startswith("yes" if item["excludes_zero"] else "no")


def _with_sources(data: dict) -> dict:
    side = {"what": "constructed", "backbone": "none", "image_size": 0}
    return {**data, "a": side, "b": side, "dataset": {"uri": "constructed", "generation": "g"}}


def test_a_model_with_the_signal_beats_one_trained_on_shuffled_labels() -> None:
    truth, scores, patients = _constructed()
    shuffled = scores[np.random.default_rng(1).permutation(len(scores))]
    data = paired_auc_difference(truth, scores, shuffled, patients, LABELS, n_boot=400, seed=3)

    assert data["difference"] == "B - A"
    for label in ("Effusion", "Mass"):
        item = data["per_label"][label]
        assert item["auc_a"] > 0.8 and abs(item["auc_b"] - 0.5) < 0.1, item
        assert item["difference"] == pytest.approx(item["auc_b"] - item["auc_a"])
        assert item["high"] < 0 and item["excludes_zero"] and item["p_value"] < 0.01, item
    assert data["macro"]["excludes_zero"] and data["macro"]["high"] < 0
    assert {"Effusion", "Mass"} <= set(data["differing_labels"])
    # Both models are scored on the same patient resamples: Effusion's interval is the one of
    # sklearn's weighted AUC of B minus A, resample by resample, on `patient_bootstrap_weights`.
    known_truth = truth[:, 0]
    differences = [
        roc_auc_score(known_truth, shuffled[:, 0], sample_weight=weights)
        - roc_auc_score(known_truth, scores[:, 0], sample_weight=weights)
        for weights in patient_bootstrap_weights(patients, n_boot=400, seed=3)
        if len(set(known_truth[weights > 0])) == 2
    ]
    item = data["per_label"]["Effusion"]
    assert item["n_used"] == len(differences)
    assert [item["low"], item["high"]] == pytest.approx(
        np.quantile(differences, [0.025, 0.975]), abs=1e-12
    )

    data = _with_sources(data)
    _assert_page_says_the_json(render_html(data), data)
    markdown = render_markdown(data)
    assert "| Pathology | AUC A (95% CI) | AUC B (95% CI) | B − A (95% CI) |" in markdown
    assert "Differences whose interval excludes zero: Effusion, Mass" in markdown


def test_two_copies_of_one_model_differ_by_exactly_zero() -> None:
    truth, scores, patients = _constructed()
    truth[:, 2] = 0.0  # Hernia: no positives in this test split
    data = paired_auc_difference(truth, scores, scores.copy(), patients, LABELS, n_boot=300)

    for label in ("Effusion", "Mass"):
        item = data["per_label"][label]
        assert item["difference"] == 0.0 and item["low"] == 0.0 == item["high"], item
        assert item["p_value"] == 1.0 and not item["excludes_zero"]
    assert data["macro"]["difference"] == 0.0 and data["macro"]["p_value"] == 1.0
    assert data["differing_labels"] == []
    hernia = data["per_label"]["Hernia"]
    assert hernia["auc_a"] is None and hernia["difference"] is None and hernia["positives"] == 0
    assert json.loads(json.dumps(data, allow_nan=False)) == data  # plain JSON, no NaN

    data = _with_sources(data)
    assert _cells(render_html(data))["Hernia"][1] == "no positives in test"
    _assert_page_says_the_json(render_html(data), data)


def test_models_that_predict_different_labels_are_refused() -> None:
    def model(labels: list[str], what: str) -> ComparedModel:
        return ComparedModel(what, Path(what), what, {"labels": labels})

    a, b = model(LABELS, "model a"), model([*LABELS[:2], "Edema"], "model b")
    with pytest.raises(CompareError, match=r"only A has \['Hernia'\], only B has \['Edema'\]"):
        check_same_labels(a, b)
    with pytest.raises(CompareError, match="the same labels in another order"):
        check_same_labels(a, model(LABELS[::-1], "model c"))
    assert check_same_labels(a, model(LABELS, "model d")) == LABELS


def test_a_dataset_without_test_images_or_none_at_all_is_refused(tmp_path: Path) -> None:
    from chestxpert.cluster.endpoints import resolve
    from chestxpert.datasets.schema import MANIFEST, SCHEMA_VERSION

    endpoints = resolve(workspace=tmp_path / "ws", environ={})
    split = {"images": 10, "patients": 5, "shards": []}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "labels": LABELS,
        "image_size": 64,
        "generation": "g1",
        "splits": {"train": split, "val": split, "test": {**split, "images": 0}},
    }
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CompareError, match=r"has no test split \(0 test images\)"):
        open_test_split(str(tmp_path / "data"), "", endpoints, "model a")
    with pytest.raises(CompareError, match="does not record the dataset .*; pass --dataset URI"):
        open_test_split(None, "", endpoints, "model a")
    with pytest.raises(CompareError, match="dataset .*nowhere: .*no manifest.json"):
        open_test_split(str(tmp_path / "nowhere"), "", endpoints, "model a")


@pytest.mark.services
def test_compare_on_the_final_model_with_itself_and_with_a_copy_that_cannot_rank(
    finished_sweep: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import keras

    from chestxpert.cli import main
    from chestxpert.trainable.checkpoint import load_model, read_state, write_checkpoint

    root, env = finished_sweep["root"], finished_sweep["env"]
    for key in ("MLFLOW_TRACKING_URI", "CHESTXPERT_STORAGE", "CHESTXPERT_WORKSPACE"):
        monkeypatch.setenv(key, env[key])
    # What main() sets for Ray goes back as it was when the test ends.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "ray_auth_token"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    version = root / "storage" / "tiny-final" / "final" / "versions" / "1"
    metrics = json.loads((version / "report" / "metrics.json").read_text())
    dataset = metrics["dataset"]

    assert main(["compare", "no-such-sweep", "tiny-final"]) == 3
    said = capsys.readouterr().err
    assert "'no-such-sweep' is not a folder here, so it was taken as a sweep name" in said
    assert "no sweep named 'no-such-sweep'" in said

    # The sweep's final model (pulled as `pull-best --final` pulls it) against its own folder.
    argv = ["compare", "tiny-final", str(version / "model"), "--bootstrap", "200"]
    assert main([*argv, "--dataset", dataset, "--out", str(tmp_path / "same")]) == 0
    assert "labels whose difference excludes zero: none" in capsys.readouterr().out
    same = json.loads((tmp_path / "same" / "compare.json").read_text())
    assert same["a"]["what"].startswith("sweep tiny-final's final model, version 1")
    scored = [label for label, item in same["per_label"].items() if item["auc_a"] is not None]
    assert scored, "the synthetic test split has labels with both classes"
    for label in scored:
        item = same["per_label"][label]
        assert item["difference"] == 0.0 and item["low"] <= 0.0 <= item["high"], label
    assert same["differing_labels"] == [] and same["macro"]["difference"] == 0.0

    # A copy whose classifier outputs a constant: AUC 0.5 on every label and every resample.
    model = load_model(version / "model", compile=False)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([np.zeros_like(kernel), bias])
    constant = write_checkpoint(model, read_state(version / "model"), tmp_path / "constant")

    # A by its registry version; no --dataset: the one A was trained on.
    argv = ["compare", "models:/tiny-final-model/1", str(constant), "--bootstrap", "200"]
    assert main([*argv, "--out", str(tmp_path / "vs-constant")]) == 0
    out = tmp_path / "vs-constant"
    assert sorted(p.name for p in out.iterdir()) == ["compare.html", "compare.json", "compare.md"]
    data = json.loads((out / "compare.json").read_text())
    assert data["dataset"]["uri"] == dataset
    # `final` drew the same patient resamples (seed 0, 200 of them): where its test AUC
    # interval lies above 0.5, the constant copy is worse; below 0.5 (a tiny test split), better.
    ranked = metrics["evaluation"]["per_label"]
    above = [label for label in scored if ranked[label]["auc_low"] > 0.5]
    below = [label for label in scored if ranked[label]["auc_high"] < 0.5]
    assert above, "the trained model ranks some label better than chance"
    assert data["differing_labels"] == [label for label in scored if label in above + below]
    for label in scored:
        item = data["per_label"][label]
        assert item["auc_b"] == 0.5 and item["auc_a"] == pytest.approx(ranked[label]["auc"])
        assert item["auc_a_low"] == pytest.approx(ranked[label]["auc_low"])
        assert item["auc_a_high"] == pytest.approx(ranked[label]["auc_high"])
        if label in above:
            assert item["high"] < 0 and item["difference"] < 0  # B − A: the copy is worse
        if label in below:
            assert item["low"] > 0
    assert "| Pathology | AUC A (95% CI) | AUC B (95% CI) |" in (out / "compare.md").read_text()
    _assert_page_says_the_json((out / "compare.html").read_text(), data)
