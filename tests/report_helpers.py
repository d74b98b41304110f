"""Reading a report as a browser would (html5lib), for tests/test_report.py and test_final.py."""

from __future__ import annotations

import re

import html5lib

XHTML = "{http://www.w3.org/1999/xhtml}"


def parse(page: str):
    """The page's element tree; html5lib in strict mode raises on any parse error."""
    return html5lib.HTMLParser(strict=True).parse(page)


def table_cells(document, css: str) -> list[list[str]]:
    """The text of every cell, row by row (header first), of the table with class `css`."""
    table = next(t for t in document.iter(f"{XHTML}table") if t.get("class") == css)
    return [
        ["".join(cell.itertext()) for cell in row if cell.tag in (f"{XHTML}td", f"{XHTML}th")]
        for row in table.iter(f"{XHTML}tr")
    ]


def assert_self_contained(page: str) -> None:
    """It parses, and nothing in it is fetched: every src/href is inline data, no URL anywhere."""
    for element in parse(page).iter():
        for attribute in ("src", "href", "srcset", "action"):
            value = element.get(attribute)
            assert value is None or value.startswith("data:"), (element.tag, value)
    assert not re.search(r"https?://|url\(", page)


def assert_numbers_match(metrics: dict, page: str) -> None:
    """The headline table, summary line and pooled calibration say metrics.json's numbers."""
    document = parse(page)
    rows = table_cells(document, "headline")
    header, body = rows[0], rows[1:]
    ev = metrics["evaluation"]
    by_shown_name = {label.replace("_", " "): label for label in ev["per_label"]}
    assert sorted(by_shown_name) == sorted(row[0] for row in body)
    for row in body:
        cell = dict(zip(header, row, strict=True))
        label = by_shown_name[cell["Pathology"]]
        item, op = ev["per_label"][label], ev["per_label"][label]["operating_point"]
        assert cell["Positives"] == str(ev["counts"]["positives"][label])
        assert cell["Negatives"] == str(ev["counts"]["negatives"][label])
        assert cell["Prevalence"] == f"{ev['counts']['prevalence'][label]:.3f}"
        if item["auc"] is not None:
            assert cell["AUC (95% CI)"] == (
                f"{item['auc']:.3f} ({item['auc_low']:.3f}–{item['auc_high']:.3f})"
            )
        for key, title in [
            ("sensitivity", "Sensitivity"),
            ("specificity", "Specificity"),
            ("ppv", "PPV"),
            ("npv", "NPV"),
        ]:
            shown = cell[f"{title} (95% CI)"]
            assert shown.startswith("–" if op[key] is None else f"{op[key]:.3f}"), (label, key)
            if op[key] is not None and op[f"{key}_low"] is not None:
                assert shown.endswith(f"({op[f'{key}_low']:.3f}–{op[f'{key}_high']:.3f})")
        assert cell["F1"] == ("–" if op["f1"] is None else f"{op['f1']:.3f}")
        assert cell["Threshold"] == f"{op['threshold']:.3f}"
    summary = "".join(document.find(f".//{XHTML}p[@class='summary']").itertext())
    for key, name in (("auc_macro", "Macro AUC"), ("auc_micro", "micro AUC")):
        if ev[key] is not None and ev[f"{key}_low"] is not None:
            assert f"{name} {ev[key]:.3f} ({ev[f'{key}_low']:.3f}–{ev[f'{key}_high']:.3f})" in (
                summary
            )
    calibration = table_cells(document, "calibration")
    pooled = dict(zip(calibration[0], calibration[1], strict=True))
    assert pooled["ECE"] == f"{ev['calibration']['pooled']['ece']:.3f}"
    assert pooled["Brier"] == f"{ev['calibration']['pooled']['brier']:.3f}"
    if "calibration_calibrated" in ev:
        after = ev["calibration_calibrated"]["pooled"]
        assert pooled["ECE calibrated"] == f"{after['ece']:.3f}"
        assert pooled["Brier calibrated"] == f"{after['brier']:.3f}"
