"""The evaluation's figures and page: the calibration and error-detection numbers they draw (checked against
brute force), and a real `evaluate` run on real BraTS cases opened in headless Chromium."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffseg_engine.cli import app
from diffseg_engine.evaluation.calibration import auroc, calibration_scores, reliability, roc_points
from diffseg_engine.evaluation.page import PAGE_NAME

CASES = ("BraTS18_CBICA_ASK", "BRATS2013_pat0003")
runner = CliRunner()


def test_auroc_is_the_share_of_error_correct_pairs_ranked_right():
    rng = np.random.default_rng(0)
    score = np.round(rng.random(300), 1)  # many ties
    label = rng.random(300) < 0.3 + 0.4 * score
    pos, neg = score[label], score[~label]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auroc(score, label) == pytest.approx(brute, abs=1e-12)
    assert auroc(label.astype(float), label) == 1.0 and math.isnan(auroc(score, np.zeros(300, bool)))
    fpr, tpr = roc_points(score, label)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute, abs=1e-12)  # the curve's area is the table's AUROC


def test_reliability_bins_and_calibration_error():
    p = np.array([0.05, 0.05, 0.15, 0.95, 0.95, 0.95, 0.95])
    t = np.array([0, 0, 1, 1, 1, 1, 0], bool)
    rel = reliability(p, t)
    assert rel.count.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 4]
    assert rel.observed[0] == 0 and rel.observed[1] == 1 and rel.observed[9] == 0.75
    want = (2 * abs(0 - 0.05) + 1 * abs(1 - 0.15) + 4 * abs(0.75 - 0.95)) / 7
    assert rel.ece == pytest.approx(want)
    calibrated = reliability(np.full(1000, 0.3), np.arange(1000) % 10 < 3)
    assert calibrated.ece == pytest.approx(0.0, abs=1e-12)


def test_calibration_region_is_the_brain_of_the_tumour_slices():
    gt = np.zeros((6, 6, 4), bool)
    gt[2:4, 2:4, 1] = True
    pred = gt.copy()
    pred[0, 0, 1] = True  # an error on a tumour slice
    pred[0, 0, 3] = True  # an error on a tumour-free slice: outside the region
    brain = np.ones_like(gt)
    brain[5] = False
    var = np.where(pred != gt, 0.2, 0.01)
    cs = calibration_scores(pred, gt, 2, brain=brain, variance=var, mean=pred.astype(float))
    assert cs.n_region == 30 and cs.n_error == 1  # slice 1 only, without the x = 5 row
    assert cs.variance.auroc == 1.0 and cs.row()["ece"] == pytest.approx(1 / 30)


@pytest.fixture(scope="module")
def evaluated(shared_data, tmp_path_factory) -> Path:
    """`evaluate --data D --n 3` with the shipped default model on two real labelled cases."""
    tmp = tmp_path_factory.mktemp("evalpage")
    data = tmp / "data"
    data.mkdir()
    for cid in CASES:
        (data / cid).symlink_to(shared_data / "train" / cid, target_is_directory=True)
    out = tmp / "eval"
    res = runner.invoke(app, ["evaluate", "--data", str(data), "--n", "3", "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    return out


def test_evaluate_writes_figures_and_a_page_with_the_tables_numbers(evaluated):
    summary = json.loads((evaluated / "evaluation_summary.json").read_text())
    for stem in ("evaluation_dice_per_case", "evaluation_reliability", "evaluation_error_detection",
                 "evaluation_dice_vs_lesion_size", "evaluation_ensemble_size"):
        assert (evaluated / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
    rows = {r["case_id"]: r for r in summary["per_case"]}
    assert set(rows) == set(CASES)
    for r in rows.values():
        assert 0.5 < r["variance_auroc"] <= 1 and 0.5 < r["entropy_auroc"] <= 1 and 0 <= r["ece"] < 0.5
    html = (evaluated / PAGE_NAME).read_text()
    assert f"{summary['uncertainty']['variance_auroc']:.3f}" in html  # the page shows the tables' AUROC


def test_evaluation_page_renders_in_chromium(evaluated, chromium):
    from selenium.webdriver.common.by import By
    d = chromium
    d.get_log("browser")
    d.get((evaluated / PAGE_NAME).as_uri())
    imgs = d.find_elements(By.CSS_SELECTOR, "img.figure")
    assert len(imgs) == 5
    assert d.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    cells = [td.text for td in d.find_elements(By.CSS_SELECTOR, "#per-case td:first-child")]
    assert sorted(cells) == sorted(CASES)
    assert "error-detection AUROC of the variance" in d.find_element(By.ID, "headline").text
    assert [e for e in d.get_log("browser") if e.get("level") == "SEVERE"] == []
    shot = os.environ.get("DIFFSEG_SCREENSHOTS")
    if shot:
        d.set_window_size(1200, 2400)
        d.save_screenshot(str(Path(shot) / "evaluation-page.png"))
        d.set_window_size(1400, 1000)
