"""The clinical report from constructed predictions: what it shows, that it says the numbers of
metrics.json, that a browser's parser reads it and that it fetches nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from chestxpert.results.calibrate import fit_platt
from chestxpert.results.evaluate import evaluate, to_json_ready
from chestxpert.results.report import (
    CHEXNET_HEADER,
    INTENDED_USE,
    SYNTHETIC_BANNER,
    ReportFigure,
    write_html,
    write_markdown,
)
from chestxpert.results.subgroups import subgroup_aucs, subgroup_masks
from tests.report_helpers import (
    XHTML,
    assert_numbers_match,
    assert_self_contained,
    parse,
    table_cells,
)

LABELS = ["Atelectasis", "Effusion", "Hernia", "Mass"]


def report_metrics(synthetic: bool) -> dict:
    """metrics.json as `final` writes it, from constructed truth and scores: Hernia has no
    positives in test, Mass no negatives."""
    rng = np.random.default_rng(0)
    n = 240
    y_true = (rng.random((n, len(LABELS))) < 0.3).astype(float)
    y_true[:, 2], y_true[:, 3] = 0.0, 1.0
    y_prob = np.clip(0.4 * y_true + 0.6 * rng.random(y_true.shape), 0, 1)
    patients = rng.integers(0, 80, n)
    calibrator = fit_platt(y_true[:120], y_prob[:120], LABELS)
    evaluation = evaluate(
        y_true[120:],
        y_prob[120:],
        patients[120:],
        LABELS,
        dict.fromkeys(LABELS, 0.5),
        n_boot=50,
        y_prob_calibrated=calibrator.apply(y_prob[120:]),
        other_points={"spec=0.9": dict.fromkeys(LABELS, 0.8)},
    )
    sex = np.where(np.arange(120) % 2 == 0, "F", "M")
    subgroups = subgroup_aucs(
        y_true[120:],
        y_prob[120:],
        patients[120:],
        LABELS,
        {"sex": subgroup_masks(sex, [None] * 120, [np.nan] * 120)["sex"]},
        n_boot=20,
    )
    return {
        "sweep": "constructed",
        "source": "nih",
        "synthetic": synthetic,
        "dataset": "file:///data/prepared",
        "config": {"backbone": "densenet_tiny"},
        "epochs": 2,
        "train_splits": "train",
        "image_size": 64,
        "threshold_method": "youden",
        "thresholds_defaulted": [],
        "bootstrap_resamples": 50,
        "evaluation": evaluation,
        "gradcam_note": None,
        "localization": {},
        "subgroups": to_json_ready(subgroups),
    }


@pytest.fixture(scope="module", params=[False, True], ids=["real", "synthetic"])
def written(request, tmp_path_factory) -> tuple[dict, str, str, list[ReportFigure]]:
    """The two reports, built once each: read-only for every test."""
    tmp_path = tmp_path_factory.mktemp("report")
    metrics = report_metrics(synthetic=request.param)
    (tmp_path / "figures").mkdir()
    (tmp_path / "gradcam").mkdir()
    figures = [
        ReportFigure("ROC curves", "Sensitivity against 1 - specificity.", "figures/roc.png"),
        ReportFigure("Mass: true positive 1", "p=0.91 at threshold 0.50", "gradcam/Mass_tp_1.png"),
    ]
    for figure in figures:
        Image.new("L", (8, 8)).save(tmp_path / figure.path)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics, allow_nan=False))
    write_markdown(metrics, figures, tmp_path / "report.md")
    write_html(metrics, figures, tmp_path, tmp_path / "report.html")
    return (
        metrics,
        (tmp_path / "report.md").read_text(),
        (tmp_path / "report.html").read_text(),
        figures,
    )


def test_the_html_parses_and_fetches_nothing(written):
    assert_self_contained(written[2])


def test_the_tables_say_the_numbers_of_metrics_json(written):
    metrics, _, page, _ = written
    assert_numbers_match(json.loads(json.dumps(metrics)), page)


def test_no_positives_and_no_negatives_read_differently(written):
    _, md, page, _ = written
    by_label = {row[0]: row for row in table_cells(parse(page), "headline")[1:]}
    assert by_label["Hernia"][4] == "no positives in test"
    assert by_label["Mass"][4] == "no negatives in test"
    assert "| Hernia | 0 |" in md


def test_every_report_states_its_intended_use_and_synthetic_data_says_so(written):
    metrics, md, page, _ = written
    assert INTENDED_USE in md and INTENDED_USE in page
    header = table_cells(parse(page), "headline")[0]
    if metrics["synthetic"]:
        assert SYNTHETIC_BANNER.split(":")[0] in md and "class='banner synthetic'" in page
        assert CHEXNET_HEADER not in header and "CheXNet" not in md
    else:
        assert "Synthetic phantoms" not in md and "synthetic" not in header
        assert CHEXNET_HEADER in header and "own test split" in md


def test_every_figure_has_a_heading_and_a_caption(written):
    _, md, page, figures = written
    shown = list(parse(page).iter(f"{XHTML}figure"))
    assert len(shown) == len(figures)
    for element, figure in zip(shown, figures, strict=True):
        heading = (
            element.find(f"{XHTML}h3")
            if element.find(f"{XHTML}h3") is not None
            else element.find(f"{XHTML}h4")
        )
        assert heading.text == figure.heading
        assert element.find(f"{XHTML}figcaption").text == figure.caption
        assert f"### {figure.heading}" in md and f"*{figure.caption}*" in md


def test_the_other_operating_point_and_the_subgroups_have_their_tables(written):
    metrics, md, page, _ = written
    document = parse(page)
    point = table_cells(document, "point spec=0.9")
    assert point[0][:3] == ["Pathology", "Threshold", "Sensitivity (95% CI)"]
    assert {row[1] for row in point[1:]} == {"0.800"}
    assert "## Operating point spec=0.9" in md
    rows = table_cells(document, "subgroups")[1:]
    shown = {(row[0], row[2]) for row in rows}
    expected = {(r["label"], r["group"]) for r in metrics["subgroups"]["rows"]}
    assert shown == expected and ("Hernia", "female") not in shown  # no positives: no row
    assert any(s["label"] == "Hernia" for s in metrics["subgroups"]["skipped"])
    skipped = table_cells(document, "skipped subgroups")
    assert skipped[0] == ["Pathology", "Attribute", "Group", "Positives", "Negatives"]
    assert len(skipped) - 1 == len(metrics["subgroups"]["skipped"])
    assert ["Hernia", "sex", "female"] in [row[:3] for row in skipped]  # no positives
    assert "### Skipped subgroups (too few cases)" in md and "| Hernia | sex | female |" in md
    flagged = [row for row in rows if row[-1].startswith("◆")]
    for label, gap in metrics["subgroups"]["largest_gap"].items():
        marked = [row for row in flagged if row[0] == label]
        assert len(marked) == 2 and marked[0][-1] == f"◆ {gap['gap']:.3f}"
