"""Metrics (Dice, Jaccard, HD95 against medpy on real masks, empty-mask policies) and the evaluation protocol:
per-slice scores (paper Table 1), ensemble-size curves, uncertainty vs error, folder scoring and reports."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffseg_engine.pipeline import evaluate as E
from diffseg_engine.evaluation import metrics as M
from diffseg_engine.backends import StepBackend
from diffseg_engine.core.errors import DatasetError, OutputError, UsageError
from diffseg_engine.io.nifti_io import LoadedImage, load_image, save_like

medpy_binary = pytest.importorskip("medpy.metric.binary")

ALGOS = "unlabelled/{case}/algorithm-segmentations/{alg}.nii.gz"
LABELLED = "BraTS18_CBICA_AOO"


def _algo(shared: Path, case: str, alg: str) -> tuple[np.ndarray, tuple[float, ...]]:
    im = load_image(shared / ALGOS.format(case=case, alg=alg))
    return im.data.astype(np.uint8), tuple(float(z) for z in im.image.header.get_zooms()[:3])


def _box(*masks: np.ndarray, margin: int = 5) -> tuple[slice, ...]:
    u = np.logical_or.reduce(masks)
    box = []
    for ax in range(u.ndim):
        idx = np.flatnonzero(u.any(axis=tuple(i for i in range(u.ndim) if i != ax)))
        assert idx[0] >= margin and idx[-1] + margin < u.shape[ax]  # the mask never touches the crop edge
        box.append(slice(idx[0] - margin, idx[-1] + margin + 1))
    return tuple(box)


@pytest.fixture(scope="module")
def label(shared_data) -> LoadedImage:
    return load_image(shared_data / "train" / LABELLED / f"{LABELLED}_seg.nii.gz")


# ---- HD95 against medpy on real masks -------------------------------------------------------------------

def test_hd95_matches_medpy_on_real_3d_masks(shared_data):
    """isen-20 (nnU-Net) scored against hnfnetv1-20 as ground truth, header spacing; and two harder pairs
    (tumour core; another patient with anisotropic spacing). medpy runs on a crop with an empty margin of 5
    voxels around both masks -- its value is the full-array one there (checked when this test was written)
    and 7 s per call faster; our implementation runs on the full arrays."""
    isen, zooms = _algo(shared_data, "TCGA-DU-7294", "isen-20")
    hnf, _ = _algo(shared_data, "TCGA-DU-7294", "hnfnetv1-20")
    scan, _ = _algo(shared_data, "TCGA-FG-6692", "scan-20")
    isen2, _ = _algo(shared_data, "TCGA-FG-6692", "isen-20")
    cases = [(isen > 0, hnf > 0, zooms),
             (np.isin(isen, (1, 4)), np.isin(hnf, (1, 4)), zooms),
             (isen2 > 0, scan > 0, (0.9, 1.1, 1.3))]
    values = []
    for pred, gt, sp in cases:
        box = _box(pred, gt)
        ref = medpy_binary.hd95(pred[box], gt[box], voxelspacing=sp)
        ours = M.hd95(pred, gt, sp)
        assert ours == pytest.approx(ref, abs=1e-6)
        assert M.hd95_directed_max(pred, gt, sp) >= ours - 1e-9
        assert M.hd95_both(pred, gt, sp) == pytest.approx((ours, M.hd95_directed_max(pred, gt, sp)))
        assert M.dice(pred, gt) == pytest.approx(medpy_binary.dc(pred, gt), abs=1e-12)
        assert M.jaccard(pred, gt) == pytest.approx(medpy_binary.jc(pred, gt), abs=1e-12)
        values.append(ours)
    assert values[0] == pytest.approx(1.0) and values[2] > 10  # a trivial and a non-trivial distance
    assert M.hd95_directed_max(*cases[2][:2], cases[2][2]) > values[2]  # the two definitions differ here


def test_hd95_matches_medpy_on_real_2d_slices_with_spacing(shared_data):
    isen, _ = _algo(shared_data, "TCGA-FG-6692", "isen-20")
    scan, _ = _algo(shared_data, "TCGA-FG-6692", "scan-20")
    p3, g3 = isen > 0, scan > 0
    both = np.flatnonzero(p3.any((0, 1)) & g3.any((0, 1)))
    spacing = (0.9375, 1.25)
    checked = 0
    for z in both[:: max(1, len(both) // 6)]:
        p, g = p3[:, :, z], g3[:, :, z]
        ref = medpy_binary.hd95(p, g, voxelspacing=spacing)  # full 240x240 slice
        ours = M.hd95(p, g, spacing)
        assert ours == pytest.approx(ref, abs=1e-6)
        assert M.hd95_directed_max(p, g, spacing) >= ours - 1e-9
        assert M.hd95(p, g) == pytest.approx(medpy_binary.hd95(p, g), abs=1e-6)  # pixels (spacing 1)
        checked += 1
    assert checked >= 5


def test_hd95_on_a_shape_at_the_array_edge_matches_medpy():
    """Mask voxels on the array border are surface voxels (scipy's erosion border is 0): the crop must keep that."""
    a = np.zeros((12, 10), bool)
    a[0:5, 0:6] = True
    b = np.zeros((12, 10), bool)
    b[2:9, 1:10] = True
    for sp in (None, (1.0, 2.0)):
        assert M.hd95(a, b, sp) == pytest.approx(medpy_binary.hd95(a, b, voxelspacing=sp), abs=1e-9)


# ---- Dice / Jaccard and the empty-mask policies ---------------------------------------------------------

def test_dice_and_jaccard_hand_computed():
    p = np.zeros((4, 4), bool)
    g = np.zeros((4, 4), bool)
    p[0, 0:3] = True  # 3 voxels
    g[0, 1:4] = True  # 3 voxels, 2 shared
    assert M.dice(p, g) == pytest.approx(2 * 2 / 6)
    assert M.jaccard(p, g) == pytest.approx(2 / 4)
    g2 = g.copy()
    g2[3, 3] = True  # 4 voxels
    assert M.dice(p, g2) == pytest.approx(4 / 7)
    assert M.jaccard(p, g2) == pytest.approx(2 / 5)
    assert M.dice(p, p) == 1.0 and M.jaccard(p, p) == 1.0
    assert M.dice(p, ~p) == 0.0
    # a 2D HD95 by hand: two 1-pixel lines 3 pixels apart, spacing 0.5 mm across them
    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[2, 2:6] = True
    b[5, 2:6] = True
    assert M.hd95(a, b, (0.5, 1.0)) == pytest.approx(1.5)
    assert M.hd95(a, b, (0.5, 1.0)) == pytest.approx(medpy_binary.hd95(a, b, voxelspacing=(0.5, 1.0)))
    with pytest.raises(ValueError, match="shape"):
        M.dice(p, np.zeros((3, 3), bool))


def test_empty_mask_policies():
    e = np.zeros((5, 5, 5), bool)
    x = e.copy()
    x[1:3, 1:3, 1:3] = True
    # BraTS convention (default)
    assert (M.dice(e, e), M.jaccard(e, e), M.hd95(e, e)) == (1.0, 1.0, 0.0)
    assert (M.dice(e, x), M.jaccard(e, x), M.hd95(e, x, (1, 1, 1))) == (0.0, 0.0, 373.13)
    assert (M.dice(x, e), M.jaccard(x, e), M.hd95(x, e)) == (0.0, 0.0, 373.13)
    assert M.hd95_directed_max(x, e) == 373.13 and M.BRATS_EMPTY_HD95 == 373.13
    # nan policy: undefined values are NaN (one-empty Dice/Jaccard are well defined: 0)
    for pol in (M.NAN, "nan", "NaN"):
        assert math.isnan(M.dice(e, e, pol)) and math.isnan(M.jaccard(e, e, pol))
        assert math.isnan(M.hd95(e, e, policy=pol)) and math.isnan(M.hd95(e, x, policy=pol))
        assert M.dice(e, x, pol) == 0.0 and M.jaccard(x, e, pol) == 0.0
    assert M.nanmean([1.0, math.nan, 3.0]) == 2.0 and math.isnan(M.nanmean([math.nan]))
    assert "373.13" in M.BRATS.describe() and "excluded" in M.NAN.describe()
    with pytest.raises(ValueError, match="policy"):
        M.get_policy("ignore")


def test_metrics_and_evaluate_never_import_torch():
    code = ("import sys, diffseg_engine.evaluation.metrics, diffseg_engine.pipeline.evaluate\n"
            "print('TORCH' if any(m == 'torch' or m.startswith('torch.') for m in sys.modules) else 'CLEAN')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "CLEAN"


# ---- per-slice protocol on a real label volume ----------------------------------------------------------

def test_slice_protocol_on_real_label(label):
    gt = label.data > 0
    zooms = label.image.header.get_zooms()[:3]
    axis = 2  # BraTS volumes are stored axial-last
    test = np.flatnonzero(gt.any(axis=(0, 1)))
    assert 0 < len(test) < gt.shape[2]

    perfect = E.score_case(gt, gt, label.affine, zooms)
    s = perfect.slices
    assert s.axis == axis and np.array_equal(s.index, test)  # only slices with non-empty ground truth
    assert np.all(s.dice == 1) and np.all(s.jaccard == 1) and np.all(s.hd95 == 0)
    r = perfect.row()
    assert (r["dice"], r["jaccard"], r["hd95_mm"], r["n_empty_pred"], r["n_test_slices"]) == (1, 1, 0, 0, len(test))
    assert r["slice_dice_mean"] == r["slice_dice_mean_nonempty"] == 1 and r["slice_hd95_mean_nonempty"] == 0

    empty = E.score_case(np.zeros_like(gt), gt, label.affine, zooms)
    r = empty.row()
    assert r["n_empty_pred"] == r["n_test_slices"] == len(test)
    assert r["slice_dice_mean"] == 0 and r["slice_jaccard_mean"] == 0 and r["dice"] == 0
    assert math.isnan(r["slice_dice_mean_nonempty"]) and math.isnan(r["slice_jaccard_mean_nonempty"])
    assert math.isnan(r["slice_hd95_mean_nonempty"])  # HD95 only over non-empty predictions: none
    assert r["slice_hd95_mean"] == pytest.approx(373.13) and r["hd95_mm"] == 373.13
    r = E.score_case(np.zeros_like(gt), gt, label.affine, zooms, policy="nan").row()
    assert math.isnan(r["slice_hd95_mean"]) and math.isnan(r["hd95_mm"]) and r["slice_dice_mean"] == 0

    # a prediction equal to GT on every second test slice, empty on the others: brackets exclude the empties
    half = gt.copy()
    half[:, :, test[1::2]] = False
    r = E.score_case(half, gt, label.affine, zooms).row()
    assert r["n_empty_pred"] == len(test[1::2])
    assert r["slice_dice_mean"] == pytest.approx(len(test[::2]) / len(test))
    assert r["slice_dice_mean_nonempty"] == 1 and r["slice_jaccard_mean_nonempty"] == 1
    assert r["slice_hd95_mean_nonempty"] == 0


def test_case_without_tumour_and_a_2d_slice():
    e = np.zeros((20, 20, 10), bool)
    fp = e.copy()
    fp[3:5, 3:5, 3:5] = True
    r = E.score_case(e, e, np.eye(4), (1, 1, 1)).row()
    assert (r["dice"], r["jaccard"], r["hd95_mm"], r["n_test_slices"]) == (1.0, 1.0, 0.0, 0)
    assert math.isnan(r["slice_dice_mean"])  # no test slice
    r = E.score_case(e, e, np.eye(4), (1, 1, 1), policy="nan").row()
    assert math.isnan(r["dice"]) and math.isnan(r["hd95_mm"])
    r = E.score_case(fp, e, np.eye(4), (1, 1, 1)).row()  # false positives only: seen in 3D, not per slice
    assert (r["dice"], r["hd95_mm"], r["n_test_slices"]) == (0.0, 373.13, 0)
    g = np.zeros((40, 40), bool)
    g[10:20, 10:25] = True
    p = np.roll(g, 2, axis=0)
    sc = E.score_case(p, g, np.diag([0.5, 0.7, 1.0, 1.0]), (0.5, 0.7))  # a 2D slice: HD95 in-plane, mm
    assert sc.hd95_mm == pytest.approx(1.0) and sc.slices.n == 1 and sc.slices.hd95[0] == pytest.approx(1.0)
    assert sc.dice == pytest.approx(0.8) == sc.slices.dice[0]


def test_per_slice_hd95_uses_in_plane_spacing(label):
    gt = label.data > 0
    shifted = np.roll(gt, 2, axis=0)
    sc = E.score_case(shifted, gt, label.affine, (2.0, 1.0, 5.0))
    s = sc.slices
    z = int(s.index[len(s.index) // 2])
    assert s.hd95[len(s.index) // 2] == pytest.approx(M.hd95(shifted[:, :, z], gt[:, :, z], (2.0, 1.0)))
    assert sc.hd95_mm == pytest.approx(M.hd95(shifted, gt, (2.0, 1.0, 5.0)))


# ---- ensemble-size curve --------------------------------------------------------------------------------

def _cube_gt(shape=(20, 20, 12)):
    gt = np.zeros(shape, bool)
    gt[5:13, 6:14, 3:9] = True
    return gt


def test_ensemble_curve_known_answer():
    gt = _cube_gt()
    N = 10
    members = np.zeros(gt.shape + (N,), np.uint8)
    rng = np.random.default_rng(0)
    free = np.flatnonzero(~gt.ravel())
    noise = rng.choice(free, size=N * 20, replace=False).reshape(N, 20)  # disjoint false positives per member
    for m in range(N):
        member = gt.copy().ravel()
        member[noise[m]] = True
        members[..., m] = member.reshape(gt.shape)
    curve = E.ensemble_curve(members, gt, np.eye(4), (1, 1, 1))
    assert curve.sizes == [1, 5, 10] == E.default_ensemble_sizes(10)
    single = 2 * gt.sum() / (2 * gt.sum() + 20)
    assert curve.single_run_dice == pytest.approx(single)
    assert curve.dice[1:] == [1.0, 1.0]  # each false positive is in one member only: voted out
    assert curve.hd95_mm[1:] == [0.0, 0.0] and curve.slice_dice_mean[1:] == [1.0, 1.0]
    # first member empty, the rest perfect: k=1 -> Dice 0 (all test slices empty), k=2 -> tie -> background
    members2 = np.repeat(gt[..., None], 4, axis=-1).astype(np.uint8)
    members2[..., 0] = 0
    c2 = E.ensemble_curve(members2, gt, np.eye(4), (1, 1, 1), sizes=[1, 2, 3, 4])
    assert c2.dice == [0.0, 0.0, 1.0, 1.0]
    assert c2.n_empty_pred == [6, 6, 0, 0]  # 6 test slices (z = 3..8)
    sc = E.score_case(members2.mean(-1) > 0.5, gt, np.eye(4), (1, 1, 1), members=members2, ensemble_sizes=[1, 3, 99])
    assert sc.curve.sizes == [1, 3] and sc.row()["single_run_dice"] == 0.0 and sc.row()["n_members"] == 4


# ---- uncertainty vs error -------------------------------------------------------------------------------

def test_filtered_dice_and_enrichment_with_uncertainty_on_the_errors():
    gt = _cube_gt((30, 30, 12))
    pred = np.roll(gt, 1, axis=0)
    err = pred != gt
    brain = np.ones(gt.shape, bool)
    variance = np.where(err, 0.25, 0.0).astype(np.float32)
    u = E.uncertainty_scores(pred, gt, variance, brain, top_percent=5.0, variance_threshold=0.05, n_levels=100)
    base = M.dice(pred, gt)
    assert base < 1
    assert len(u.taus) == 100 and u.taus[0] == 0 and u.taus[-1] == 1
    assert np.all(u.filtered_dice[:-1] == 1.0)  # every error has u = 1 > tau: filtered out
    assert u.filtered_dice[-1] == pytest.approx(base)  # tau = 1 keeps everything
    assert 0 <= u.filtered_dice_auc <= 1
    assert u.filtered_dice_auc == pytest.approx(1 - (1 - base) * 0.5 / 99)
    assert u.ftp_auc == 0 and u.ftn_auc == 0  # no true positive / negative is uncertain
    assert "qu_brats_score" not in u.row()  # the dense variance curve is not the challenge's score
    assert err.sum() <= 0.05 * err.size  # so the top-5 % set is exactly the variance > 0 voxels
    assert u.error_fraction_in_top == 1.0 and u.top_fraction == pytest.approx(err.sum() / err.size)
    assert u.enrichment == pytest.approx(err.size / err.sum())
    assert u.high_variance_error_dice == 1.0 and u.n_error == err.sum()
    # uninformative uncertainty: constant variance everywhere -> enrichment 1
    flat = E.uncertainty_scores(pred, gt, np.full(gt.shape, 0.1, np.float32), brain)
    assert flat.enrichment == pytest.approx(1.0) and flat.top_fraction == 1.0
    # a brain mask restricts errors and true negatives
    small = np.zeros(gt.shape, bool)
    small[:, :, 5] = True
    ub = E.uncertainty_scores(pred, gt, variance, small)
    assert ub.n_brain == small.sum() and ub.n_error == (err & small).sum()


# ---- folders, reports, evaluate_folder ------------------------------------------------------------------

def _gt_root(tmp_path: Path, shared: Path, ids) -> Path:
    root = tmp_path / "gt"
    root.mkdir()
    for cid in ids:
        (root / cid).symlink_to(shared / "train" / cid, target_is_directory=True)
    return root


def _save_4d(reference: LoadedImage, arr: np.ndarray, path: Path) -> None:
    hdr = reference.image.header.copy()
    hdr.set_data_shape(arr.shape)
    img = type(reference.image)(arr, reference.image.affine, hdr)
    save_like(LoadedImage(data=arr, image=img, path=reference.path), arr, path, np.uint8)


def test_score_folder_end_to_end(tmp_path, shared_data):
    ids = ["BraTS18_CBICA_AOO", "BraTS18_CBICA_ARW", "BraTS18_CBICA_ASA"]
    root = _gt_root(tmp_path, shared_data, ids)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    lab_a = load_image(root / ids[0] / f"{ids[0]}_seg.nii.gz")
    lab_b = load_image(root / ids[1] / f"{ids[1]}_seg.nii.gz")
    gt_a, gt_b = lab_a.data > 0, lab_b.data > 0
    save_like(lab_a, gt_a.astype(np.uint8), pred_dir / f"{ids[0]}_mask.nii.gz", np.uint8)  # perfect
    shifted = np.roll(gt_b, 3, axis=0)
    save_like(lab_b, shifted.astype(np.uint8), pred_dir / f"{ids[1]}_mask.nii.gz", np.uint8)
    var_b = np.where(shifted != gt_b, 0.2, 0.0).astype(np.float32)
    save_like(lab_b, var_b, pred_dir / f"{ids[1]}_variance.nii.gz", np.float32)
    members = np.stack([shifted, gt_b, gt_b], axis=-1).astype(np.uint8)  # member 0 shifted, then perfect
    _save_4d(lab_b, members, pred_dir / f"{ids[1]}_samples.nii.gz")
    save_like(lab_b, shifted.astype(np.uint8), pred_dir / "stray_case_mask.nii.gz", np.uint8)
    # ids[2] has no prediction

    scores = E.score_folder(pred_dir, root, n_levels=11)
    assert [s.case_id for s in scores] == ids
    a, b, c = scores
    assert a.ok and (a.dice, a.hd95_mm, a.jaccard) == (1.0, 0.0, 1.0) and a.curve is None and a.uncertainty is None
    assert b.ok and b.dice == pytest.approx(M.dice(shifted, gt_b)) and b.hd95_mm == pytest.approx(M.hd95(shifted, gt_b, (1, 1, 1)))
    assert 0 < b.hd95_mm <= 3.0 + 1e-9  # a 3-voxel shift moves no surface voxel farther than 3 mm
    assert b.curve.sizes == [1, 3] and b.curve.single_run_dice == pytest.approx(b.dice) and b.curve.dice[1] == 1.0
    assert b.uncertainty is not None and b.uncertainty.brain_source == "images"
    assert b.uncertainty.error_fraction_in_top > 0 and b.uncertainty.high_variance_error_dice > 0.5
    assert c.status == "missing prediction" and math.isnan(c.dice)
    assert scores.unmatched_predictions == ["stray_case"]

    paths = E.write_reports(scores, tmp_path / "report", policy="brats", meta={"note": "test"})
    assert set(E.ALWAYS_WRITTEN) <= set(paths) <= set(E.REPORT_NAMES)
    assert all(p.name == E.REPORT_NAMES[k] for k, p in paths.items())
    assert {"ensemble_png", "evaluation_dice_per_case", "evaluation_error_detection"} <= set(paths)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert not list((tmp_path / "report").glob(".*tmp"))  # atomic writes leave no temp files
    rows = list(csv.DictReader(paths["cases_csv"].open()))
    assert [r["case_id"] for r in rows] == ids and tuple(rows[0]) == E.CSV_COLUMNS
    assert float(rows[0]["dice"]) == 1.0 and float(rows[0]["hd95_mm"]) == 0.0
    assert int(rows[0]["n_test_slices"]) == a.slices.n and rows[0]["n_empty_pred"] == "0"
    assert float(rows[1]["dice"]) == pytest.approx(b.dice, rel=1e-5) and rows[1]["var_filtered_dice_auc"] != ""
    assert rows[2]["status"] == "missing prediction" and rows[2]["dice"] == ""
    slices = list(csv.DictReader(paths["slices_csv"].open()))
    assert len(slices) == a.slices.n + b.slices.n

    summary = json.loads(paths["summary_json"].read_text())
    assert summary["policy"]["name"] == "brats" and summary["policy"]["one_empty_hd95"] == 373.13
    assert "pooled bidirectional surface distances" in summary["hd95_definition"]
    assert summary["cases"]["missing_prediction"] == [ids[2]] and summary["cases"]["scored"] == 2
    assert summary["cases"]["unmatched_predictions"] == ["stray_case"]
    assert summary["volume_3d"]["dice_mean"] == pytest.approx((1.0 + b.dice) / 2)
    pooled = summary["slices_pooled"]
    assert pooled["n_test_slices"] == a.slices.n + b.slices.n
    assert pooled["slice_dice_mean"] == pytest.approx(np.mean(np.concatenate([a.slices.dice, b.slices.dice])))
    assert summary["ensemble_curve"]["sizes"] == [1, 3] and summary["uncertainty"]["n_cases"] == 1
    md = paths["summary_md"].read_text()
    assert "pooled bidirectional surface distances" in md and "373.13" in md
    assert ids[2] in md and "missing prediction" in md and "| Dice | HD95 | Jaccard | empty |" in md
    assert paths["ensemble_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the CLI entry point scores the same folder; reports are not overwritten without overwrite=True
    res = E.evaluate_folder(root, tmp_path / "report2", predictions=pred_dir, policy="nan", n_levels=5, quiet=True)
    assert res.summary["policy"]["name"] == "nan" and res.summary["cases"]["scored"] == 2
    with pytest.raises(OutputError, match="overwrite"):
        E.evaluate_folder(root, tmp_path / "report2", predictions=pred_dir, quiet=True)
    with pytest.raises(UsageError):
        E.evaluate_folder(root, tmp_path / "r3", quiet=True)  # neither predictions nor a model
    with pytest.raises(UsageError, match="policy"):
        E.evaluate_folder(root, tmp_path / "r3", predictions=pred_dir, policy="zero", quiet=True)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no prediction"):
        E.score_folder(empty, root)


def test_plain_label_maps_as_predictions(tmp_path, shared_data):
    """A folder of plain `<case>.nii.gz` label maps (like algorithm-segmentations): isen-20 scored against
    hnfnetv1-20 as ground truth."""
    src = shared_data / "unlabelled" / "TCGA-DU-7294"
    case = tmp_path / "gt" / "TCGA-DU-7294"
    case.mkdir(parents=True)
    (case / "TCGA-DU-7294_flair.nii.gz").symlink_to(src / "TCGA-DU-7294_flair.nii.gz")
    (case / "TCGA-DU-7294_seg.nii.gz").symlink_to(src / "algorithm-segmentations" / "hnfnetv1-20.nii.gz")
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "TCGA-DU-7294.nii.gz").symlink_to(src / "algorithm-segmentations" / "isen-20.nii.gz")
    (sc,) = E.score_folder(preds, tmp_path / "gt")
    isen, _ = _algo(shared_data, "TCGA-DU-7294", "isen-20")
    hnf, _ = _algo(shared_data, "TCGA-DU-7294", "hnfnetv1-20")
    assert sc.ok and sc.dice == pytest.approx(medpy_binary.dc(isen > 0, hnf > 0))
    assert sc.hd95_mm == pytest.approx(1.0) and sc.slices.n == np.count_nonzero((hnf > 0).any((0, 1)))
    assert 0.9 < sc.row()["slice_dice_mean"] <= 1


class _FakeBackend(StepBackend):
    """A step that ignores x_t: bright FLAIR -> tumour, plus the step's noise (so members differ); its chunks
    run through the contract's host loop."""

    name = "fake"
    device = "cpu"

    def __init__(self, card):
        self.card = card

    def allocate(self, max_batch):
        pass

    def infer(self, image, x_t, timestep, coef, noise):
        return ((image[:, :1] > 0.8).astype(np.float32) + 0.3 * noise).astype(np.float32)

    def describe(self):
        return {"backend": self.name, "device": self.device}


def test_evaluate_folder_segments_then_scores(tmp_path, shared_data, monkeypatch):
    from diffseg_engine.artifacts.card import Architecture, ModelCard, Preprocessing
    from diffseg_engine.sampling.sampler import plan_sampling
    arch = Architecture(in_channels=2, model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_ds=())
    card = ModelCard(name="fake", preset="tiny", modalities=("flair",), architecture=arch,
                     preprocessing=Preprocessing(crop_size=224, downsample=8))
    backend = _FakeBackend(card)
    root = _gt_root(tmp_path, shared_data, [LABELLED])
    out = tmp_path / "eval"
    plan = plan_sampling(card, "ddim", 2)
    res = E.evaluate_folder(root, out, backend=backend, plan=plan, n=3, seed=1, batch_size=64,
                            quiet=True, n_levels=11)
    pred = out / "predictions"
    for suffix in ("mask", "variance", "samples"):
        assert (pred / f"{LABELLED}_{suffix}.nii.gz").is_file()
    (sc,) = res.scores
    assert sc.ok and sc.curve is not None and sc.curve.sizes == [1, 3] and sc.uncertainty is not None
    assert 0 <= sc.dice <= 1 and res.summary["meta"]["mode"] == "segment then score"
    assert res.summary["meta"]["sampling"]["n"] == 3 and res.reports["ensemble_png"].is_file()
    mask = load_image(pred / f"{LABELLED}_mask.nii.gz").data > 0
    assert sc.pred_voxels == int(mask.sum())
    # an interrupted run (reports not yet written) resumes: finished cases are not sampled again
    for p in res.reports.values():
        p.unlink()
    calls = []
    inner = backend.infer
    backend.infer = lambda *a: calls.append(1) or inner(*a)
    monkeypatch.setattr(E, "score_folder", lambda *a, **k: E.FolderScores(res.scores))  # scoring tested above
    res2 = E.evaluate_folder(root, out, backend=backend, plan=plan, n=3, seed=1, batch_size=64, quiet=True)
    assert not calls and res2.summary["volume_3d"]["dice_mean"] == pytest.approx(sc.dice)
    # other sampling settings do not silently reuse the old predictions
    for p in res2.reports.values():
        p.unlink()
    with pytest.raises(OutputError, match="already holds results"):
        E.evaluate_folder(root, out, backend=backend, plan=plan, n=2, seed=1, quiet=True)
    backend.card = card.replace(weights_sha256="0" * 64)  # another model: its results are not the old ones
    with pytest.raises(OutputError, match="already holds results"):
        E.evaluate_folder(root, out, backend=backend, plan=plan, n=3, seed=1, quiet=True)
    assert not calls
