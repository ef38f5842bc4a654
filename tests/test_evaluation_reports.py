"""The evaluation reports keep their recorded format, and a per-case metric is added in one place.

The golden files in tests/golden/evaluation/ were written by the reports as they stood before
`evaluate.py` was split into `diffseg_engine.evaluation` (commit a3e3532); the reports written now from the same
scores must be byte-identical (the JSON: equal once parsed, but for the engine version). To record a deliberate
format change, run this file as a script: ``.venv/bin/python tests/test_evaluation_reports.py``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from diffseg_engine import evaluate as E
from diffseg_engine import qubrats as QB

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
                         prediction="pred/alpha_mask.nii.gz")
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


if __name__ == "__main__":  # record the current format as the golden one
    GOLDEN.mkdir(parents=True, exist_ok=True)
    written = _write(GOLDEN)
    written.pop("ensemble_png").unlink()
    print("\n".join(str(p) for p in written.values()), file=sys.stderr)
