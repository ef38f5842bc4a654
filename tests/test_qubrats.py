"""QU-BraTS: the files a challenge submission needs, and the challenge's score exactly as its organisers'
scorer (github.com/RagMeh11/QU-BraTS, BraTS_Seg_Uncertainty.py) computes it."""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from diffseg_engine.maps import qubrats as QB
from diffseg_engine.cli import app

EPS = np.finfo(np.float32).eps


def _organisers_make(gt, pred, unc, brain, thresholds):
    """The organisers' `make`, `dice_metric`, `ftp_ratio_metric`, `ftn_ratio_metric`, restated loop by loop
    with their float32 masks, to hold the vectorised `qubrats.score` to."""
    gt, pred, brain = gt.astype("float32"), pred.astype("float32"), brain.astype("float32")
    dice, ftp, ftn = [], [], []
    for th in thresholds:
        keep = np.ones_like(unc, dtype="float32")
        keep[unc > th] = 0.0
        g, p = gt * keep, pred * keep
        inter, union = np.sum(p * g), np.sum(p) + np.sum(g)
        dice.append(1.0 if inter == 0.0 and union == 0.0 else 2.0 * inter / union)
        tp = pred * gt * brain
        ftp.append((tp.sum() - (tp * keep).sum()) / (tp.sum() + EPS))
        tn = (1 - pred) * (1 - gt) * brain
        ftn.append((tn.sum() - (tn * keep).sum()) / (tn.sum() + EPS))
    return np.array(dice), np.array(ftp), np.array(ftn)


def _sklearn_auc(x, y):  # sklearn.metrics.auc on a monotone x: |trapezoid|
    return abs(float(np.trapezoid(y, x)))


@pytest.mark.parametrize("num_points", [4, 40])
def test_score_is_the_organisers_computation(num_points):
    rng = np.random.default_rng(3)
    shape = (40, 36, 12)
    gt = np.zeros(shape, bool)
    gt[10:25, 8:22, 3:9] = True
    pred = np.roll(gt, 2, axis=0) & (rng.random(shape) > 0.1)
    brain = np.zeros(shape, bool)
    brain[2:38, 2:34, :] = True
    unc = np.rint(rng.random(shape) * 100 * ((pred != gt) * 0.7 + 0.3)).astype(np.uint8)  # errors more uncertain
    # the organisers' thresholds, as evaluated under numpy 1.x when the challenge ran (float64 sum: 100 included;
    # numpy >= 2 computes 100.0 + float32 eps in float32 = 100.0, and np.arange then drops the last threshold)
    th = np.arange(0.0, 100.0 + float(EPS), 100.0 / num_points).tolist()[::-1]
    assert th[0] == 100.0 and len(th) == num_points + 1
    d, p, n = _organisers_make(gt, pred, unc.astype(np.float64), brain, th)
    s = QB.score(pred, gt, unc, brain, num_points=num_points)
    assert np.allclose(s.thresholds, sorted(th))
    assert np.allclose(s.dice, d[::-1], atol=1e-7) and np.allclose(s.ftp, p[::-1]) and np.allclose(s.ftn, n[::-1])
    assert s.dice_auc == pytest.approx(_sklearn_auc(th, d) / 100.0)
    assert s.ftp_auc == pytest.approx(_sklearn_auc(th, p) / 100.0)
    assert s.ftn_auc == pytest.approx(_sklearn_auc(th, n) / 100.0)
    assert s.score == pytest.approx((s.dice_auc + 1 - s.ftp_auc + 1 - s.ftn_auc) / 3)
    assert 0.0 <= s.ftp_auc <= 1.0 and s.dice[-1] == pytest.approx(2 * (gt & pred).sum() / (gt.sum() + pred.sum()))


def test_the_challenge_thresholds_and_an_ideal_uncertainty():
    assert tuple(QB.thresholds()) == QB.THRESHOLDS == (0.0, 25.0, 50.0, 75.0, 100.0)
    gt = np.zeros((20, 20, 4), bool)
    gt[5:12, 5:12] = True
    pred = np.roll(gt, 1, axis=1)
    unc = np.where(pred != gt, 100, 0)  # uncertain exactly where wrong
    s = QB.score(pred, gt, unc)
    base = 2 * (gt & pred).sum() / (gt.sum() + pred.sum())
    assert list(s.dice[:-1]) == [1.0] * 4 and s.dice[-1] == pytest.approx(base)
    assert s.ftp_auc == 0 and s.ftn_auc == 0
    assert s.dice_auc == pytest.approx((75 + 25 * (1 + base) / 2) / 100)


def test_maps_and_names():
    assert list(QB.uncertainty_map(np.array([0.0, 1.0, 0.5, 0.11]))) == [0, 0, 100, 50]
    assert QB.uncertainty_map(np.zeros(3)).dtype == np.uint8
    assert list(QB.label_map(np.array([0, 1, 0]))) == [0, QB.WHOLE_TUMOUR_LABEL, 0]
    p = QB.submission_paths("o", "BraTS20_Validation_001")
    assert (p["label"].name, p["unc_whole"].name) == ("BraTS20_Validation_001.nii.gz",
                                                      "BraTS20_Validation_001_unc_whole.nii.gz")


@pytest.mark.slow
def test_segment_format_qubrats_then_evaluate_scores_the_submission(shared_data, tiny_model, tmp_path):
    runner = CliRunner()
    cid = "BraTS18_CBICA_ASK"
    case = shared_data / "train" / cid
    out = tmp_path / "sub"
    res = runner.invoke(app, ["segment", str(case), "--model", str(tiny_model[1]), "-o", str(out), "-q",
                              "--steps", "2", "--n", "3", "--format", "qubrats"])
    assert res.exit_code == 0, res.output
    ref = nib.load(str(case / f"{cid}_flair.nii.gz"))
    mean = np.asarray(nib.load(str(out / f"{cid}_mean.nii.gz")).dataobj, np.float32)
    mask = np.asarray(nib.load(str(out / f"{cid}_mask.nii.gz")).dataobj)
    label = nib.load(str(out / f"{cid}.nii.gz"))
    unc = nib.load(str(out / f"{cid}_unc_whole.nii.gz"))
    ent = np.asarray(nib.load(str(out / f"{cid}_entropy.nii.gz")).dataobj, np.float32)
    for img in (label, unc):
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine) and img.get_data_dtype() == np.uint8
    lab = np.asarray(label.dataobj)
    assert set(np.unique(lab)) <= {0, 2} and np.array_equal(lab != 0, mask != 0)
    u = np.asarray(unc.dataobj)
    assert u.min() >= 0 and u.max() <= 100 and np.array_equal(u, QB.uncertainty_map(mean))
    assert np.allclose(ent, QB.binary_entropy(mean), atol=1e-6) and ent.max() <= 1.0
    prov = json.loads((out / f"{cid}_provenance.json").read_text())
    assert prov["format"] == "qubrats" and "not modelled" in prov["definitions"]["label"]

    # the submission alone (label map + unc_whole) is scored with the challenge's score
    sub_only = tmp_path / "only"
    sub_only.mkdir()
    for name in (f"{cid}.nii.gz", f"{cid}_unc_whole.nii.gz"):
        os.link(out / name, sub_only / name)
    data = tmp_path / "data"
    data.mkdir()
    (data / cid).symlink_to(case)
    res = runner.invoke(app, ["evaluate", "--data", str(data), "--predictions", str(sub_only), "-o",
                              str(tmp_path / "rep"), "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "rep" / "evaluation_summary.json").read_text())
    flair = np.asarray(ref.dataobj)
    gt = np.asarray(nib.load(str(case / f"{cid}_seg.nii.gz")).dataobj) > 0
    brain = np.zeros(gt.shape, bool)
    for f in case.glob(f"{cid}_*.nii.gz"):
        if not f.name.endswith("_seg.nii.gz"):
            brain |= np.asarray(nib.load(str(f)).dataobj) != 0
    want = QB.score(lab != 0, gt, u, brain)
    assert flair.shape == gt.shape
    assert summary["uncertainty"]["qu_brats_score"] == pytest.approx(want.score)
