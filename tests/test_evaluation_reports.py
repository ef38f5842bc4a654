"""The evaluation package: reports in their recorded format, a per-case metric added in one place, the option
checks, and imports that only go down.

The golden files in tests/golden/evaluation/ record the reports' format (last deliberate change: the
error-detection AUROCs and the calibration error per case, and the true lesion size per slice); the reports
written now from the same scores must be byte-identical (the JSON: equal once parsed, but for the engine
version). To record a deliberate format change, run this file as a script:
``.venv/bin/python tests/test_evaluation_reports.py``.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffseg_engine.pipeline import evaluate as E
from diffseg_engine.maps import qubrats as QB

GOLDEN = Path(__file__).resolve().parent / "golden" / "evaluation"
TEXT_REPORTS = ("cases_csv", "slices_csv", "summary_md")


def golden_scores() -> E.FolderScores:
    """Five cases on a small anisotropic grid: every part of the reports has something to show."""
    shape, zooms = (24, 22, 10), (1.0, 1.2, 2.0)
    affine = np.diag([*zooms, 1.0])
    gt = np.zeros(shape, bool)
    gt[6:16, 5:15, 2:8] = True
    brain = np.zeros(shape, bool)
    brain[2:22, 2:20, 1:9] = True
    noise = np.random.default_rng(7).random(shape).astype(np.float32) * 0.01
    # alpha: a shifted prediction, five members, variance and the QU-BraTS map from the members
    members = np.stack([np.roll(gt, k % 3, axis=0) for k in range(5)], axis=-1).astype(np.uint8)
    mean = members.mean(axis=-1)
    alpha = E.score_case(np.roll(gt, 2, axis=0), gt, affine, zooms, case_id="alpha", variance=mean * (1 - mean) + noise,
                         brain=brain, members=members, n_levels=5, qubrats_uncertainty=QB.uncertainty_map(mean),
                         prediction="pred/alpha_mask.nii.gz", mean=mean)
    beta = E.score_case(gt, gt, affine, zooms, case_id="beta", prediction="pred/beta.nii.gz")  # perfect
    # gamma: every other test slice empty, a false positive outside the tumour, variance without a brain mask
    pred = gt.copy()
    pred[:, :, 2:8:2] = False
    pred[20:22, 18:20, 0] = True
    gamma = E.score_case(pred, gt, affine, zooms, case_id="gamma", variance=np.where(pred != gt, 0.2, 0.0) + noise,
                         n_levels=5, top_percent=10.0, prediction="pred/gamma_mask.nii.gz")
    return E.FolderScores([alpha, beta, gamma, E.CaseScores("delta", status="missing prediction"),
                           E.CaseScores("eps", status="error: bad | file", prediction="pred/eps_mask.nii.gz")],
                          unmatched_predictions=["stray"])


def _write(out: Path, scores=None) -> dict[str, Path]:
    return E.write_reports(golden_scores() if scores is None else scores, out, policy="brats",
                           meta={"note": "golden"})


def test_reports_are_those_recorded(tmp_path):
    paths = _write(tmp_path)
    for key in TEXT_REPORTS:
        assert paths[key].read_text() == (GOLDEN / E.REPORT_NAMES[key]).read_text(), key
    got = json.loads(paths["summary_json"].read_text())
    want = json.loads((GOLDEN / E.REPORT_NAMES["summary_json"]).read_text())
    got.pop("version"), want.pop("version")
    assert got == want
    assert list(got) == list(want) and list(got["volume_3d"]) == list(want["volume_3d"])  # key order too
    assert paths["ensemble_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_metric_added_in_one_place_reaches_every_report(tmp_path, monkeypatch):
    """One entry in `columns.METRICS`: a CSV column, a key of every JSON row, its means in the summary, a column of
    the Markdown per-case and per-volume tables; everything else as recorded."""
    from diffseg_engine.evaluation import columns as C
    ratio = C.Metric("volume_ratio", lambda c: c.pred_voxels / c.gt_voxels if c.gt_voxels else None,
                     group="volume_3d", column="pred / gt", mean_column="pred / gt volume")
    monkeypatch.setattr(C, "METRICS", (*C.METRICS, ratio))
    paths = _write(tmp_path)
    values = [1.0, 1.0, 304 / 600]  # alpha, beta, gamma; delta and eps have no ground truth voxels counted

    rows = list(csv.DictReader(paths["cases_csv"].open()))
    assert [r["volume_ratio"] for r in rows] == ["1", "1", "0.506667", "", ""]
    golden = list(csv.DictReader((GOLDEN / E.REPORT_NAMES["cases_csv"]).open()))
    assert [{k: v for k, v in r.items() if k != "volume_ratio"} for r in rows] == golden

    summary = json.loads(paths["summary_json"].read_text())
    assert [r["volume_ratio"] for r in summary["per_case"]] == [*values, None, None]
    v = summary["volume_3d"]
    assert v["volume_ratio_mean"] == np.mean(values) and v["volume_ratio_std"] == np.std(values, ddof=1)
    assert v["volume_ratio_n"] == 3
    want = json.loads((GOLDEN / E.REPORT_NAMES["summary_json"]).read_text())
    for part in ("slices_pooled", "slices_per_case_mean", "uncertainty", "ensemble_curve", "cases"):
        assert summary[part] == want[part]

    md = paths["summary_md"].read_text()
    # unitless scores before distances (mm) in the summary parts
    assert "| Dice | Jaccard | pred / gt volume | HD95 (mm, medpy) | HD95 (mm, MONAI directed max) |" in md
    assert f"| 0.721 ± 0.256 | {np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} | 1.33 ± 1.15 |" in md
    assert "| slice HD95 | empty / slices | variance AUROC | ECE | pred / gt |" in md
    assert "| 0.500 [1.000] | 0.00 | 3 / 6 | 1.000 | – | 0.507 |" in md and "| – / – | – | – | – |" in md


def test_option_checks_refuse_before_anything_is_read(tmp_path):
    from diffseg_engine.core.errors import UsageError
    nowhere = tmp_path / "missing"
    for kw, match in (({"top_percent": 0}, "top percent"), ({"n_levels": 1}, "2 levels"),
                      ({"ensemble_sizes": [0, 5]}, "at least 1"), ({"n": 0}, "--n must be at least 1"),
                      ({"policy": "zero"}, "policy")):
        with pytest.raises(UsageError, match=match):
            E.evaluate_folder(nowhere, tmp_path / "out", predictions=nowhere, quiet=True, **kw)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="top percent"):  # the same check where the scores are computed
        E.uncertainty_scores(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)), top_percent=101)


def test_the_evaluation_package_imports_only_downwards():
    """Scoring and reports never load the segmenting side (segment, sampler, cohort), the CLI or torch."""
    code = ("import sys, diffseg_engine.evaluation.reports, diffseg_engine.evaluation.predictions\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('diffseg_engine.', 'torch')))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "diffseg_engine.evaluation.columns" in loaded
    for above in ("diffseg_engine.pipeline.segment", "diffseg_engine.sampling.sampler", "diffseg_engine.pipeline.cohort", "diffseg_engine.cli",
                  "diffseg_engine.pipeline.evaluate", "torch"):
        assert above not in loaded, above


if __name__ == "__main__":  # record the current format as the golden one
    GOLDEN.mkdir(parents=True, exist_ok=True)
    written = _write(GOLDEN)
    for key in [k for k, p in written.items() if p.suffix in (".png", ".html")]:
        written.pop(key).unlink(missing_ok=True)
    print("\n".join(str(p) for p in written.values()), file=sys.stderr)
