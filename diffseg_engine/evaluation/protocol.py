"""The scoring protocol: how one case's segmentation is scored against its ground truth.

Owns: per-slice scores (`slice_scores` / `SliceScores`, paper Table 1), per-volume scores (`volume_scores`),
ensemble-size curves (`ensemble_curve` / `EnsembleCurve`, `default_ensemble_sizes`, `check_sizes`), and one
case's scores (`score_case` / `CaseScores`, which also holds its `uncertainty` and QU-BraTS scores).
Imports: numpy; `calibration`, `columns`, `core`, `inputs`, `maps`, `metrics`, `uncertainty`. Never torch.
Definitions and conventions: the comment below the imports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import metrics as M
from ..maps import qubrats as QB
from ..core.errors import UsageError
from ..inputs.preprocess import slice_axis
from ..maps.qubrats import QuBratsScore
from . import columns
from .calibration import CalibrationScores, calibration_scores
from .uncertainty import UncertaintyScores, uncertainty_scores

# Protocol (Wolleb et al., MIDL 2022, section 4 and Table 1):
#
# * Ground truth: whole tumour = label > 0. Prediction: mask > 0.5 (``<case>_mask.nii.gz`` holds 0/1; a plain
#   ``<case>.nii.gz`` label map counts every label >= 1 as tumour).
# * Per slice: the axial slices (axis = `preprocess.slice_axis`) whose ground truth is non-empty are the test
#   slices. For each: Dice, Jaccard, HD95 (in-plane spacing, mm). An empty prediction on a test slice gives Dice
#   0, Jaccard 0 and an undefined HD95 (`metrics.EmptyPolicy` decides what is stored: 373.13 under ``brats``,
#   NaN under ``nan``). Reported: means over all test slices and, "in brackets", over the test slices with a
#   non-empty prediction, plus the number of empty predictions. ``slice_hd95_mean_nonempty`` (HD95 over
#   non-empty predictions only) is the paper's HD95 column. The paper keeps only slices 80..128 of 155 and
#   crops to 224x224; this module scores every axial slice of the input grid with non-empty ground truth.
#   False positives on slices without tumour are invisible to this protocol (as in the paper); the 3D
#   scores see them.
# * Per volume: 3D Dice, Jaccard, HD95 in mm (axes of length 1 are dropped first, so a 2D slice file scores
#   as 2D) and the MONAI-style HD95 (`metrics.hd95_directed_max`) for comparison.
# * HD95 is medpy's definition throughout (`metrics.hd95`, see `metrics.HD95_DEFINITION`).
#
# Ensemble-size curve (paper Figure 4): members m = 0..N-1 (``<case>_samples.nii.gz``, [X, Y, Z, N] uint8,
# each member's mask). The ensemble of the first k members is ``mean(members[..., :k]) > 0.5`` (strict, the
# rule `segment` uses for its mask; with binary members this is a majority vote and an exact tie is
# background). It is scored for k in `default_ensemble_sizes` (1, 5, 10, ..., N); k = 1 is the single-run
# score (member 0). The engine's mask thresholds the mean of *soft* members, so its score can differ
# slightly from the k = N point.
#
# Uncertainty (where a variance map exists): `uncertainty`. QU-BraTS (the challenge's score, exactly as its
# organisers' scorer computes it: see `qubrats`): the uncertainty is the submitted map, 100 x binary entropy of
# the ensemble mean (``<case>_unc_whole`` when a submission is scored, else computed from ``<case>_mean``),
# thresholds 0, 25, 50, 75, 100; whole tumour only (the challenge also averages tumour core and enhancing
# tumour, which this model does not segment): qu_brats_dice_auc, qu_brats_ftp_auc, qu_brats_ftn_auc and
# qu_brats_score.


def _nan() -> float:
    return math.nan


# ---- geometry helpers ---------------------------------------------------------------------------------

def _as3d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        return a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"expected a 2D or 3D array, got shape {a.shape}")
    return a


def _zooms3(zooms: Sequence[float], ndim: int = 3) -> np.ndarray:
    z = [float(v) for v in list(zooms)[:ndim]]
    z += [1.0] * (ndim - len(z))
    return np.asarray(z, dtype=np.float64)


def _union_box(masks: Sequence[np.ndarray], shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """Bounding box of the union of `masks` grown by one voxel (clipped); None when all are empty."""
    lo = [None] * len(shape)
    hi = [None] * len(shape)
    for m in masks:
        for ax in range(len(shape)):
            other = tuple(i for i in range(m.ndim) if i != ax)
            idx = np.flatnonzero(m.any(axis=other))
            if idx.size:
                lo[ax] = idx[0] if lo[ax] is None else min(lo[ax], idx[0])
                hi[ax] = idx[-1] if hi[ax] is None else max(hi[ax], idx[-1])
    if lo[0] is None:
        return None
    return tuple(slice(max(int(l) - 1, 0), min(int(h) + 2, n)) for l, h, n in zip(lo, hi, shape))


# ---- per-slice protocol -------------------------------------------------------------------------------

@dataclass
class SliceScores:
    """Scores of the test slices (non-empty ground truth) of one volume, along `axis`.

    index: int [T] slice numbers along `axis` (of the full grid); dice, jaccard, hd95 (mm, in-plane spacing):
    float [T]; pred_empty: bool [T].
    """

    axis: int
    index: np.ndarray
    dice: np.ndarray
    jaccard: np.ndarray
    hd95: np.ndarray
    pred_empty: np.ndarray
    gt_voxels: np.ndarray | None = None  # int [T]: true lesion voxels in each test slice

    @property
    def n(self) -> int:
        return int(len(self.index))

    @property
    def n_empty(self) -> int:
        return int(np.count_nonzero(self.pred_empty))

    def summary(self) -> dict[str, float | int]:
        keep = ~self.pred_empty
        return {
            "n_test_slices": self.n, "n_empty_pred": self.n_empty,
            "slice_dice_mean": M.nanmean(self.dice), "slice_dice_mean_nonempty": M.nanmean(self.dice[keep]),
            "slice_jaccard_mean": M.nanmean(self.jaccard),
            "slice_jaccard_mean_nonempty": M.nanmean(self.jaccard[keep]),
            "slice_hd95_mean": M.nanmean(self.hd95), "slice_hd95_mean_nonempty": M.nanmean(self.hd95[keep]),
        }


def slice_scores(pred: np.ndarray, gt: np.ndarray, axis: int, zooms: Sequence[float], *,
                 policy: str | M.EmptyPolicy = M.BRATS, with_hd95: bool = True, offset: int = 0) -> SliceScores:
    """Per-slice Dice/Jaccard/HD95 of the slices along `axis` with non-empty `gt` (3D boolean arrays).

    zooms: the voxel size of the 3 axes (the in-plane two are used). offset: added to the reported slice
    numbers (when `pred`/`gt` are a crop of the full grid)."""
    policy = M.get_policy(policy)
    p = np.moveaxis(_as3d(pred).astype(bool, copy=False), axis, 0)
    g = np.moveaxis(_as3d(gt).astype(bool, copy=False), axis, 0)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    sp = np.delete(_zooms3(zooms), axis)
    gs = g.sum(axis=(1, 2))
    idx = np.flatnonzero(gs > 0)
    ps = p[idx].sum(axis=(1, 2)).astype(np.float64)
    gsel = gs[idx].astype(np.float64)
    inter = (p[idx] & g[idx]).sum(axis=(1, 2)).astype(np.float64)
    empty = ps == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 2.0 * inter / (ps + gsel)
        j = inter / (ps + gsel - inter)
    d[empty] = policy.one_empty_overlap
    j[empty] = policy.one_empty_overlap
    h = np.full(len(idx), math.nan)
    if with_hd95:
        for t, s in enumerate(idx):
            h[t] = M.hd95(p[s], g[s], sp, policy=policy)
    return SliceScores(axis=axis, index=idx + offset, dice=d, jaccard=j, hd95=h, pred_empty=empty,
                       gt_voxels=gs[idx].astype(np.int64))


# ---- per volume ---------------------------------------------------------------------------------------

def volume_scores(p: np.ndarray, g: np.ndarray, zooms: np.ndarray, policy: M.EmptyPolicy,
                  with_hd95: bool = True) -> dict[str, float]:
    """3D Dice, Jaccard, HD95 and MONAI-style HD95 (mm) of boolean `p` against `g`; axes of length 1 are dropped
    first (a 2D slice file scores as 2D). zooms: the voxel size of every axis."""
    keep = [ax for ax in range(p.ndim) if p.shape[ax] > 1] or [0]
    shape = tuple(p.shape[ax] for ax in keep)
    ps, gs, sp = p.reshape(shape), g.reshape(shape), zooms[keep]
    out = {"dice": M.dice(ps, gs, policy), "jaccard": M.jaccard(ps, gs, policy)}
    if with_hd95:
        out["hd95_mm"], out["hd95_directed_max_mm"] = M.hd95_both(ps, gs, sp, policy=policy)
    else:
        out["hd95_mm"] = out["hd95_directed_max_mm"] = math.nan
    return out


# ---- ensemble-size curve ------------------------------------------------------------------------------

def default_ensemble_sizes(n_members: int) -> list[int]:
    """1, 5, 10, 15, ..., and `n_members` itself (the paper's Figure 4 grid)."""
    if n_members < 1:
        raise ValueError("an ensemble needs at least one member")
    return sorted({1, n_members, *range(5, n_members + 1, 5)})


@dataclass
class EnsembleCurve:
    """Scores of the ensemble of the first k members, for k in `sizes` (volume and slice protocol)."""

    n_members: int
    sizes: list[int]
    dice: list[float]
    jaccard: list[float]
    hd95_mm: list[float]
    slice_dice_mean: list[float]
    slice_dice_mean_nonempty: list[float]
    n_empty_pred: list[int]

    @property
    def single_run_dice(self) -> float:
        """Dice of member 0 alone (k = 1)."""
        return self.dice[self.sizes.index(1)] if 1 in self.sizes else math.nan

    @property
    def single_run_slice_dice_mean(self) -> float:
        return self.slice_dice_mean[self.sizes.index(1)] if 1 in self.sizes else math.nan

    def to_dict(self) -> dict:
        return {"n_members": self.n_members, "sizes": list(self.sizes), "dice": self.dice,
                "jaccard": self.jaccard, "hd95_mm": self.hd95_mm, "slice_dice_mean": self.slice_dice_mean,
                "slice_dice_mean_nonempty": self.slice_dice_mean_nonempty, "n_empty_pred": self.n_empty_pred}


def ensemble_curve(members: np.ndarray, gt: np.ndarray, affine: np.ndarray, zooms: Sequence[float], *,
                   sizes: Sequence[int] | None = None, policy: str | M.EmptyPolicy = M.BRATS) -> EnsembleCurve:
    """Score the ensemble of the first k members for each k in `sizes` (default `default_ensemble_sizes`).

    members: [X, Y, Z, N] (or [X, Y, N] for a 2D case), member masks (0/1) or soft maps in [0, 1];
    gt: [X, Y, Z] boolean (label > 0). Ensemble of k = mean(members[..., :k]) > 0.5.
    """
    policy = M.get_policy(policy)
    gt = _as3d(np.asarray(gt).astype(bool, copy=False))
    members = np.asarray(members)
    if members.ndim == 3 and gt.shape[2] == 1 and members.shape[:2] == gt.shape[:2]:
        members = members[:, :, None, :]
    if members.ndim != 4 or members.shape[:3] != gt.shape:
        raise ValueError(f"members shape {members.shape} does not match ground truth {gt.shape} + [N]")
    N = members.shape[-1]
    sizes = default_ensemble_sizes(N) if sizes is None else sorted({int(k) for k in sizes})
    if not sizes or sizes[0] < 1 or sizes[-1] > N:
        raise ValueError(f"ensemble sizes {sizes} must lie in 1..{N}")
    axis = slice_axis(affine, gt.shape)
    z = _zooms3(zooms)
    box = _union_box([gt, members.any(axis=-1) if members.dtype == bool else (members > 0).any(axis=-1)], gt.shape)
    if box is not None:
        gt_c, mem_c = gt[box], members[box]
        offset = box[axis].start
    else:
        gt_c, mem_c, offset = gt, members, 0
    out = EnsembleCurve(N, list(sizes), [], [], [], [], [], [])
    running = np.zeros(gt_c.shape, np.float64)
    done = 0
    for k in sizes:
        while done < k:
            running += mem_c[..., done]
            done += 1
        ens = running / k > 0.5
        v = volume_scores(ens, gt_c, z, policy)
        out.dice.append(v["dice"])
        out.jaccard.append(v["jaccard"])
        out.hd95_mm.append(v["hd95_mm"])
        ss = slice_scores(ens, gt_c, axis, z, policy=policy, with_hd95=False, offset=offset).summary()
        out.slice_dice_mean.append(ss["slice_dice_mean"])
        out.slice_dice_mean_nonempty.append(ss["slice_dice_mean_nonempty"])
        out.n_empty_pred.append(int(ss["n_empty_pred"]))
    return out


def check_sizes(sizes: Sequence[int] | None) -> None:
    """`UsageError` for asked-for ensemble sizes below 1 (sizes above a case's N are left out when it is scored)."""
    if sizes is not None and any(int(k) < 1 for k in sizes):
        raise UsageError(f"ensemble sizes must be at least 1, got {list(sizes)}")


# ---- one case -----------------------------------------------------------------------------------------

@dataclass
class CaseScores:
    """Everything scored for one case. status: "ok", "missing prediction", "error: ..." or
    "segmentation failed: ..."; metrics are NaN unless status is "ok"."""

    case_id: str
    status: str = "ok"
    prediction: str = ""
    dice: float = field(default_factory=_nan)
    jaccard: float = field(default_factory=_nan)
    hd95_mm: float = field(default_factory=_nan)
    hd95_directed_max_mm: float = field(default_factory=_nan)
    gt_voxels: int = 0
    pred_voxels: int = 0
    slices: SliceScores | None = None
    uncertainty: UncertaintyScores | None = None
    qubrats: QuBratsScore | None = None
    curve: EnsembleCurve | None = None
    calibration: CalibrationScores | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def row(self) -> dict[str, Any]:
        """One flat CSV row: every metric of `columns.METRICS` (NaN where a value does not exist)."""
        return columns.row(self)

    def to_dict(self) -> dict:
        d = self.row()
        if self.curve is not None:
            d["ensemble_curve"] = self.curve.to_dict()
        if self.uncertainty is not None:
            d["uncertainty"] = self.uncertainty.to_dict()
        if self.qubrats is not None:
            d["qu_brats"] = self.qubrats.to_dict()
        if self.calibration is not None:
            d["calibration"] = self.calibration.to_dict()
        return d


def score_case(pred_mask_3d: np.ndarray, gt_3d: np.ndarray, affine: np.ndarray, zooms: Sequence[float], *,
               policy: str | M.EmptyPolicy = M.BRATS, case_id: str = "case", variance: np.ndarray | None = None,
               brain: np.ndarray | None = None, members: np.ndarray | None = None,
               ensemble_sizes: Sequence[int] | None = None, top_percent: float = 5.0,
               variance_threshold: float = 0.05, n_levels: int = 100, prediction: str = "",
               qubrats_uncertainty: np.ndarray | None = None, mean: np.ndarray | None = None) -> CaseScores:
    """Score one case: 3D Dice/Jaccard/HD95 (mm), the per-slice protocol, and optionally the uncertainty
    scores (`variance` given; `brain` = where errors count, default the whole grid), the ensemble-size
    curve (`members` [X, Y, Z, N] given), and the error detection and calibration of the variance and of the
    ensemble `mean` (`calibration.calibration_scores`, either given).

    pred_mask_3d, gt_3d: [X, Y, Z] (or [X, Y]); non-zero = tumour. affine: 4x4 voxel -> world (picks the
    axial axis); zooms: voxel size per axis in mm (a missing third entry counts as 1).
    """
    policy = M.get_policy(policy)
    p = _as3d(np.asarray(pred_mask_3d) != 0)
    g = _as3d(np.asarray(gt_3d) != 0)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    z = _zooms3(zooms)
    axis = slice_axis(affine, g.shape)
    box = _union_box([p, g], g.shape)
    pc, gc, offset = (p[box], g[box], box[axis].start) if box is not None else (p, g, 0)
    vol = volume_scores(pc, gc, z, policy)
    cs = CaseScores(case_id=case_id, prediction=prediction, dice=vol["dice"], jaccard=vol["jaccard"],
                    hd95_mm=vol["hd95_mm"], hd95_directed_max_mm=vol["hd95_directed_max_mm"],
                    gt_voxels=int(g.sum()), pred_voxels=int(p.sum()))
    cs.slices = slice_scores(pc, gc, axis, z, policy=policy, offset=offset)
    if variance is not None:
        var = _as3d(np.asarray(variance, np.float32))
        if var.shape != g.shape:
            raise ValueError(f"variance shape {var.shape} differs from ground-truth shape {g.shape}")
        cs.uncertainty = uncertainty_scores(p, g, var, None if brain is None else _as3d(brain), top_percent=top_percent,
                                            variance_threshold=variance_threshold, n_levels=n_levels, policy=policy)
    if qubrats_uncertainty is not None:  # [0, 100], the challenge's map
        u100 = _as3d(np.asarray(qubrats_uncertainty, np.float32))
        if u100.shape != g.shape:
            raise ValueError(f"uncertainty shape {u100.shape} differs from ground-truth shape {g.shape}")
        cs.qubrats = QB.score(p, g, u100, None if brain is None else _as3d(brain))
    if variance is not None or mean is not None:
        cs.calibration = calibration_scores(
            p, g, axis, brain=None if brain is None else _as3d(brain),
            variance=None if variance is None else _as3d(np.asarray(variance, np.float32)),
            mean=None if mean is None else _as3d(np.asarray(mean, np.float32)))
    if members is not None:
        cs.curve = ensemble_curve(members, g, affine, z, sizes=_clip_sizes(ensemble_sizes, members.shape[-1]),
                                  policy=policy)
    return cs


def _clip_sizes(sizes: Sequence[int] | None, n: int) -> list[int] | None:
    if sizes is None:
        return None
    kept = sorted({int(k) for k in sizes if 1 <= int(k) <= n})
    return kept or None
