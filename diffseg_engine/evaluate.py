"""`evaluate`: scoring segmentations against ground truth, the paper's way and a few more.

Owns: `score_case` / `CaseScores`, the per-slice protocol (`slice_scores` / `SliceScores`), ensemble-size
curves (`ensemble_curve` / `EnsembleCurve`), uncertainty-vs-error scores (`uncertainty_scores` /
`UncertaintyScores`), matching a prediction folder to labelled cases (`find_prediction`, `score_folder`),
the report writers (`write_reports`) and `evaluate_folder`, which the CLI calls.

Protocol (Wolleb et al., MIDL 2022, section 4 and Table 1):

* Ground truth: whole tumour = label > 0. Prediction: mask > 0.5 (``<case>_mask.nii.gz`` holds 0/1; a plain
  ``<case>.nii.gz`` label map counts every label >= 1 as tumour).
* Per slice: the axial slices (axis = `preprocess.slice_axis`) whose ground truth is non-empty are the test
  slices. For each: Dice, Jaccard, HD95 (in-plane spacing, mm). An empty prediction on a test slice gives Dice
  0, Jaccard 0 and an undefined HD95 (`metrics.EmptyPolicy` decides what is stored: 373.13 under ``brats``,
  NaN under ``nan``). Reported: means over all test slices and, "in brackets", over the test slices with a
  non-empty prediction, plus the number of empty predictions. ``slice_hd95_mean_nonempty`` (HD95 over
  non-empty predictions only) is the paper's HD95 column. The paper keeps only slices 80..128 of 155 and
  crops to 224x224; this module scores every axial slice of the input grid with non-empty ground truth.
  False positives on slices without tumour are invisible to this protocol (as in the paper); the 3D
  scores see them.
* Per volume: 3D Dice, Jaccard, HD95 in mm (axes of length 1 are dropped first, so a 2D slice file scores
  as 2D) and the MONAI-style HD95 (`metrics.hd95_directed_max`) for comparison.
* HD95 is medpy's definition throughout (`metrics.hd95`, see `metrics.HD95_DEFINITION`).

Ensemble-size curve (paper Figure 4): members m = 0..N-1 (``<case>_samples.nii.gz``, [X, Y, Z, N] uint8,
each member's mask). The ensemble of the first k members is ``mean(members[..., :k]) > 0.5`` (strict, the
rule `segment` uses for its mask; with binary members this is a majority vote and an exact tie is
background). It is scored for k in `default_ensemble_sizes` (1, 5, 10, ..., N); k = 1 is the single-run
score (member 0). The engine's mask thresholds the mean of *soft* members, so its score can differ
slightly from the k = N point.

Uncertainty vs error (only where a variance map exists). u = clip(variance / 0.25, 0, 1) (0.25 is the
largest population variance of values in [0, 1]). Errors E = (prediction != ground truth) inside the brain
(any modality non-zero, as in preprocessing; the whole grid when no image is at hand).

* Enrichment: the top-q % set T = the ceil(q/100 * |brain|) brain voxels of largest variance (all brain
  voxels with variance >= that k-th largest value, and > 0, so ties and zero variance are handled
  deterministically). error_fraction_in_top = |E∩T|/|E|; top_fraction = |T|/|brain|;
  enrichment = error_fraction_in_top / top_fraction (1 = uncertainty no better than chance; NaN if no
  errors or T is empty). high_variance_error_dice = Dice(brain ∩ {variance > threshold}, E).
* Variance-filtered Dice (this tool's dense curve, in the spirit of QU-BraTS but NOT its score): for tau in
  linspace(0, 1, n_levels), the voxels with u > tau are filtered out (removed from prediction and ground
  truth) and Dice is computed on the voxels kept (u <= tau); both filtered masks empty -> 1. tau = 1 keeps
  every voxel (the unfiltered Dice). var_filtered_dice_auc = trapezoid area under Dice(tau) over [0, 1];
  the filtered true-positive / true-negative ratio curves of the same u are in the JSON report.
* QU-BraTS (the challenge's score, exactly as its organisers' scorer computes it: see `qubrats`): the
  uncertainty is the submitted map, 100 x binary entropy of the ensemble mean (``<case>_unc_whole`` when a
  submission is scored, else computed from ``<case>_mean``), thresholds 0, 25, 50, 75, 100; whole tumour
  only (the challenge also averages tumour core and enhancing tumour, which this model does not segment):
  qu_brats_dice_auc, qu_brats_ftp_auc, qu_brats_ftn_auc and qu_brats_score.

Imports: numpy, scipy (through `metrics`), nibabel (through `nifti_io`; the samples file is read with
nibabel directly, as uint8), matplotlib (lazily, Agg canvas, no pyplot), and this package's `cases`,
`nifti_io`, `preprocess`, `atomic`, `progress`, `errors`; `segment` only inside `evaluate_folder` when it
segments. Never torch.
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .atomic import atomic_write
from .cases import Case, discover_cases
from .errors import BackendError, DatasetError, DiffsegError, InputImageError, MissingModalityError, OutputError, UsageError
from .nifti_io import load_image
from .preprocess import slice_axis
from .progress import ProgressBar
from . import qubrats as QB
from .qubrats import QuBratsScore

try:
    from . import metrics as M
except ImportError as _exc:  # scipy missing
    raise BackendError(f"evaluation needs scipy, which cannot be imported ({_exc})",
                       fix="pip install scipy") from None

#: Largest variance of a quantity in [0, 1]: u = variance / MAX_VARIANCE is the normalised uncertainty.
MAX_VARIANCE = 0.25

REPORT_NAMES = {"cases_csv": "evaluation_cases.csv", "slices_csv": "evaluation_slices.csv",
                "summary_md": "evaluation_summary.md", "summary_json": "evaluation_summary.json",
                "ensemble_png": "evaluation_ensemble_size.png"}

DEFINITIONS = {
    "ground_truth": "whole tumour: label > 0",
    "prediction": "mask > 0.5 (<case>_mask.nii.gz), or label > 0 of a plain <case>.nii.gz label map",
    "test_slices": "axial slices (axis closest to superior-inferior in the affine) with non-empty ground truth",
    "slice_means": "mean over all test slices; *_nonempty: over test slices with a non-empty prediction "
                   "(the paper's values in brackets); slice_hd95_mean_nonempty is the paper's HD95 column",
    "hd95": M.HD95_DEFINITION,
    "hd95_directed_max": "MONAI style: max of the two directed 95th percentiles (comparison only)",
    "ensemble_curve": "ensemble of the first k members = mean(members[:k]) > 0.5 (strict); k=1 is the single run",
    "uncertainty": "u = clip(variance/0.25, 0, 1); errors = (pred != gt) inside the brain (any modality != 0)",
    "enrichment": "(|errors in top-q% variance voxels| / |errors|) / (|top-q% voxels| / |brain|)",
    "high_variance_error_dice": "Dice(brain & variance > threshold, errors)",
    "filtered_dice": "variance-filtered Dice (not the QU-BraTS score): Dice on voxels with u <= tau, tau in "
                     "linspace(0,1,n_levels); both empty -> 1; AUC = trapezoid over tau in [0,1]",
    "qu_brats": "QU-BraTS whole tumour, as the organisers' scorer (github.com/RagMeh11/QU-BraTS): uncertainty = "
                "100 x entropy of the mean, thresholds 0,25,50,75,100, voxels with u > th filtered; Dice on the "
                "grid, FTP/FTN inside the brain; score = (AUC_Dice + 1-AUC_FTP + 1-AUC_FTN)/3",
}


def _nan() -> float:
    return math.nan


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    if len(x) < 2:
        return float(y[0]) if len(y) else math.nan
    return float(np.sum((y[1:] + y[:-1]) * 0.5 * np.diff(x)))


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
    return SliceScores(axis=axis, index=idx + offset, dice=d, jaccard=j, hd95=h, pred_empty=empty)


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
        v = _volume_scores(ens, gt_c, z, policy)
        out.dice.append(v["dice"])
        out.jaccard.append(v["jaccard"])
        out.hd95_mm.append(v["hd95_mm"])
        ss = slice_scores(ens, gt_c, axis, z, policy=policy, with_hd95=False, offset=offset).summary()
        out.slice_dice_mean.append(ss["slice_dice_mean"])
        out.slice_dice_mean_nonempty.append(ss["slice_dice_mean_nonempty"])
        out.n_empty_pred.append(int(ss["n_empty_pred"]))
    return out


# ---- uncertainty vs error -----------------------------------------------------------------------------

@dataclass
class UncertaintyScores:
    """See the module docstring for every definition."""

    top_percent: float
    top_fraction: float
    error_fraction_in_top: float
    enrichment: float
    variance_threshold: float
    high_variance_error_dice: float
    n_brain: int
    n_error: int
    taus: np.ndarray
    filtered_dice: np.ndarray
    filtered_dice_auc: float
    ftp_ratio: np.ndarray
    ftn_ratio: np.ndarray
    ftp_auc: float
    ftn_auc: float
    brain_source: str = "images"

    def row(self) -> dict[str, float | int]:
        return {"unc_top_percent": self.top_percent, "unc_top_fraction": self.top_fraction,
                "unc_error_fraction_in_top": self.error_fraction_in_top, "unc_enrichment": self.enrichment,
                "unc_variance_threshold": self.variance_threshold,
                "unc_high_variance_error_dice": self.high_variance_error_dice, "unc_n_error": self.n_error,
                "var_filtered_dice_auc": self.filtered_dice_auc}

    def to_dict(self) -> dict:
        return {**self.row(), "var_ftp_auc": self.ftp_auc, "var_ftn_auc": self.ftn_auc,
                "n_brain": self.n_brain, "brain_source": self.brain_source,
                "taus": self.taus.tolist(), "filtered_dice": self.filtered_dice.tolist(),
                "ftp_ratio": self.ftp_ratio.tolist(), "ftn_ratio": self.ftn_ratio.tolist()}


def _count_le(sorted_values: np.ndarray, taus: np.ndarray) -> np.ndarray:
    return np.searchsorted(sorted_values, taus, side="right").astype(np.float64)


def filtered_dice_curve(pred: np.ndarray, gt: np.ndarray, uncertainty: np.ndarray, taus: np.ndarray,
                        brain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(filtered Dice, FTP ratio, FTN ratio) at each tau: voxels with uncertainty > tau are removed.

    uncertainty: normalised to [0, 1]. brain: where true negatives are counted (default: everywhere)."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    u = np.asarray(uncertainty, np.float64)
    taus = np.asarray(taus, np.float64)
    tp = np.sort(u[p & g])
    fp = np.sort(u[p & ~g])
    fn = np.sort(u[~p & g])
    tn_mask = ~p & ~g if brain is None else (~p & ~g & np.asarray(brain, bool))
    tn = np.sort(u[tn_mask])
    TP, FP, FN, TN = (_count_le(a, taus) for a in (tp, fp, fn, tn))
    denom = 2 * TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(denom > 0, 2 * TP / np.where(denom > 0, denom, 1), 1.0)
    ftp = (len(tp) - TP) / len(tp) if len(tp) else np.zeros_like(taus)
    ftn = (len(tn) - TN) / len(tn) if len(tn) else np.zeros_like(taus)
    return d, ftp, ftn


def uncertainty_scores(pred: np.ndarray, gt: np.ndarray, variance: np.ndarray, brain: np.ndarray | None = None, *,
                       top_percent: float = 5.0, variance_threshold: float = 0.05, n_levels: int = 100,
                       policy: str | M.EmptyPolicy = M.BRATS) -> UncertaintyScores:
    """Enrichment of errors among high-variance voxels, their overlap, and the filtered-Dice curve."""
    if not 0 < top_percent <= 100:
        raise UsageError(f"top percent must lie in (0, 100], got {top_percent}")
    if n_levels < 2:
        raise UsageError(f"the filtered-Dice curve needs at least 2 levels, got {n_levels}")
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    var = np.asarray(variance, np.float64)
    if not (p.shape == g.shape == var.shape):
        raise ValueError(f"shapes differ: prediction {p.shape}, ground truth {g.shape}, variance {var.shape}")
    source = "images"
    if brain is None:
        brain, source = np.ones(p.shape, bool), "whole grid"
    brain = np.asarray(brain, bool)
    err = (p != g) & brain
    n_brain, n_err = int(brain.sum()), int(err.sum())
    vb = var[brain]
    if vb.size:
        k = max(1, math.ceil(top_percent / 100.0 * vb.size))
        t = np.partition(vb, vb.size - k)[vb.size - k]
        top = brain & (var >= t) & (var > 0)
    else:
        top = np.zeros(p.shape, bool)
    n_top = int(top.sum())
    top_fraction = n_top / n_brain if n_brain else math.nan
    err_in_top = int((err & top).sum()) / n_err if n_err else math.nan
    enrich = err_in_top / top_fraction if (n_err and n_top) else math.nan
    high = brain & (var > variance_threshold)
    hv_dice = M.dice(high, err, policy)
    taus = np.linspace(0.0, 1.0, int(n_levels))
    u = np.clip(var / MAX_VARIANCE, 0.0, 1.0)
    fd, ftp, ftn = filtered_dice_curve(p, g, u, taus, brain if source == "images" else None)
    auc, ftp_auc, ftn_auc = _trapezoid(fd, taus), _trapezoid(ftp, taus), _trapezoid(ftn, taus)
    return UncertaintyScores(
        top_percent=float(top_percent), top_fraction=top_fraction, error_fraction_in_top=err_in_top,
        enrichment=enrich, variance_threshold=float(variance_threshold), high_variance_error_dice=hv_dice,
        n_brain=n_brain, n_error=n_err, taus=taus, filtered_dice=fd, filtered_dice_auc=auc, ftp_ratio=ftp,
        ftn_ratio=ftn, ftp_auc=ftp_auc, ftn_auc=ftn_auc, brain_source=source)


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

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def row(self) -> dict[str, Any]:
        """One flat CSV row (NaN where a value does not exist)."""
        r: dict[str, Any] = {"case_id": self.case_id, "status": self.status, "dice": self.dice,
                             "hd95_mm": self.hd95_mm, "jaccard": self.jaccard,
                             "hd95_directed_max_mm": self.hd95_directed_max_mm,
                             "gt_voxels": self.gt_voxels, "pred_voxels": self.pred_voxels}
        s = self.slices.summary() if self.slices is not None else {}
        for key in SLICE_KEYS:
            r[key] = s.get(key, math.nan if key not in ("n_test_slices", "n_empty_pred") else "")
        r["single_run_dice"] = self.curve.single_run_dice if self.curve else math.nan
        r["single_run_slice_dice_mean"] = self.curve.single_run_slice_dice_mean if self.curve else math.nan
        r["n_members"] = self.curve.n_members if self.curve else ""
        u = self.uncertainty.row() if self.uncertainty is not None else {}
        for key in UNC_KEYS:
            r[key] = u.get(key, math.nan)
        q = self.qubrats
        for key, val in zip(QUBRATS_KEYS, (q.dice_auc, q.ftp_auc, q.ftn_auc, q.score) if q else [math.nan] * 4):
            r[key] = val
        r["prediction"] = self.prediction
        return r

    def to_dict(self) -> dict:
        d = self.row()
        if self.curve is not None:
            d["ensemble_curve"] = self.curve.to_dict()
        if self.uncertainty is not None:
            d["uncertainty"] = self.uncertainty.to_dict()
        if self.qubrats is not None:
            d["qu_brats"] = self.qubrats.to_dict()
        return d


SLICE_KEYS = ("slice_dice_mean", "slice_dice_mean_nonempty", "slice_jaccard_mean", "slice_jaccard_mean_nonempty",
              "slice_hd95_mean", "slice_hd95_mean_nonempty", "n_empty_pred", "n_test_slices")
UNC_KEYS = ("unc_top_percent", "unc_top_fraction", "unc_error_fraction_in_top", "unc_enrichment",
            "unc_variance_threshold", "unc_high_variance_error_dice", "unc_n_error", "var_filtered_dice_auc")
QUBRATS_KEYS = ("qu_brats_dice_auc", "qu_brats_ftp_auc", "qu_brats_ftn_auc", "qu_brats_score")
CSV_COLUMNS = ("case_id", "status", "dice", "hd95_mm", "jaccard", "hd95_directed_max_mm", "gt_voxels",
               "pred_voxels", *SLICE_KEYS, "single_run_dice", "single_run_slice_dice_mean", "n_members",
               *UNC_KEYS, *QUBRATS_KEYS, "prediction")


def _volume_scores(p: np.ndarray, g: np.ndarray, zooms: np.ndarray, policy: M.EmptyPolicy,
                   with_hd95: bool = True) -> dict[str, float]:
    keep = [ax for ax in range(p.ndim) if p.shape[ax] > 1] or [0]
    shape = tuple(p.shape[ax] for ax in keep)
    ps, gs, sp = p.reshape(shape), g.reshape(shape), zooms[keep]
    out = {"dice": M.dice(ps, gs, policy), "jaccard": M.jaccard(ps, gs, policy)}
    if with_hd95:
        out["hd95_mm"], out["hd95_directed_max_mm"] = M.hd95_both(ps, gs, sp, policy=policy)
    else:
        out["hd95_mm"] = out["hd95_directed_max_mm"] = math.nan
    return out


def score_case(pred_mask_3d: np.ndarray, gt_3d: np.ndarray, affine: np.ndarray, zooms: Sequence[float], *,
               policy: str | M.EmptyPolicy = M.BRATS, case_id: str = "case", variance: np.ndarray | None = None,
               brain: np.ndarray | None = None, members: np.ndarray | None = None,
               ensemble_sizes: Sequence[int] | None = None, top_percent: float = 5.0,
               variance_threshold: float = 0.05, n_levels: int = 100, prediction: str = "",
               qubrats_uncertainty: np.ndarray | None = None) -> CaseScores:
    """Score one case: 3D Dice/Jaccard/HD95 (mm), the per-slice protocol, and optionally the uncertainty
    scores (`variance` given; `brain` = where errors count, default the whole grid) and the ensemble-size
    curve (`members` [X, Y, Z, N] given).

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
    vol = _volume_scores(pc, gc, z, policy)
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
    if members is not None:
        cs.curve = ensemble_curve(members, g, affine, z, sizes=_clip_sizes(ensemble_sizes, members.shape[-1]),
                                  policy=policy)
    return cs


def _clip_sizes(sizes: Sequence[int] | None, n: int) -> list[int] | None:
    if sizes is None:
        return None
    kept = sorted({int(k) for k in sizes if 1 <= int(k) <= n})
    return kept or None


# ---- a folder of predictions --------------------------------------------------------------------------

_NIFTI_EXT = (".nii.gz", ".nii")
_ENGINE_SUFFIXES = ("_mask", "_mean", "_variance", "_entropy", "_samples", "_unc_whole")


def _strip_ext(name: str) -> str | None:
    low = name.lower()
    for ext in _NIFTI_EXT:
        if low.endswith(ext):
            return name[: -len(ext)]
    return None


def _first_existing(folder: Path, stem: str) -> Path | None:
    for ext in _NIFTI_EXT:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def find_prediction(pred_dir: Path, case_id: str) -> dict[str, Path]:
    """Files of `case_id` in `pred_dir`: {"mask", optional "variance", "samples"}; {} if there is no mask.

    Looked for, in order: ``<case>_mask.nii[.gz]`` (engine output, also in ``<case>/``), then a plain label
    map ``<case>.nii[.gz]``."""
    pred_dir = Path(pred_dir)
    for folder in (pred_dir, pred_dir / case_id):
        mask = _first_existing(folder, f"{case_id}_mask")
        if mask is not None:
            found = {"mask": mask}
            for key in ("variance", "samples", "mean", "unc_whole"):
                p = _first_existing(folder, f"{case_id}_{key}")
                if p is not None:
                    found[key] = p
            return found
    plain = _first_existing(pred_dir, case_id)
    if plain is None:
        return {}
    unc = _first_existing(pred_dir, f"{case_id}_unc_whole")  # a QU-BraTS submission
    return {"mask": plain, **({"unc_whole": unc} if unc is not None else {})}


def _prediction_ids(pred_dir: Path) -> set[str]:
    ids = set()
    for p in pred_dir.iterdir():
        stem = _strip_ext(p.name)
        if stem is None or p.name.startswith(".") or not p.is_file():
            continue
        for suf in _ENGINE_SUFFIXES:
            if stem.endswith(suf):
                if suf == "_mask":
                    ids.add(stem[: -len(suf)])
                break
        else:
            ids.add(stem)
    return ids


def _brain_mask(case: Case, shape: tuple[int, ...]) -> np.ndarray | None:
    brain = None
    for path in dict.fromkeys(case.modalities.values()):
        try:
            im = load_image(path)
        except InputImageError:
            continue
        d = im.data
        if d.ndim == 4:
            d = (d != 0).any(axis=-1)
        if d.shape != shape:
            continue
        brain = (d != 0) if brain is None else (brain | (d != 0))
    return brain


def _load_members(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The samples file [X, Y, Z, N] as uint8 (read with nibabel directly: float32 would be 4x the memory)."""
    import nibabel as nib
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputImageError(f"cannot be read as NIfTI ({exc})", path=path,
                              fix="re-run segmentation with --save-samples") from None
    if arr.ndim == 3 and len(shape) == 3 and shape[2] == 1 and arr.shape[:2] == shape[:2]:
        arr = arr[:, :, None, :]
    if arr.ndim != 4 or arr.shape[:3] != tuple(shape):
        raise InputImageError(f"has shape {arr.shape}; expected {tuple(shape)} + [members]", path=path,
                              fix="use the samples file written with this case's mask")
    if arr.dtype != np.uint8:
        arr = (arr > 0.5).astype(np.uint8)
    return arr


def _score_one(case: Case, files: dict[str, Path], *, policy: M.EmptyPolicy, ensemble_sizes: Sequence[int] | None,
               top_percent: float, variance_threshold: float, n_levels: int, uncertainty: bool,
               curves: bool) -> CaseScores:
    gt_img = load_image(case.label)
    pred_img = load_image(files["mask"])
    gt, pred = gt_img.data, pred_img.data
    if gt.ndim != 3 or pred.shape != gt.shape:
        raise InputImageError(f"prediction has shape {pred.shape}, ground truth {case.label.name} has {gt.shape}",
                              path=files["mask"], fix="score predictions made on the ground truth's grid")
    if not np.allclose(pred_img.affine, gt_img.affine, atol=1e-3, rtol=0):
        raise InputImageError(f"prediction's affine differs from that of {case.label.name}", path=files["mask"],
                              fix="score predictions made on the ground truth's grid")
    zooms = tuple(float(v) for v in gt_img.image.header.get_zooms()[:3])
    variance = brain = members = None
    if uncertainty and "variance" in files:
        v = load_image(files["variance"])
        if v.data.shape != gt.shape:
            raise InputImageError(f"variance has shape {v.data.shape}, expected {gt.shape}", path=files["variance"],
                                  fix="use the variance map written with this case's mask")
        variance = v.data
    u100 = None
    if uncertainty and ("unc_whole" in files or "mean" in files):
        key = "unc_whole" if "unc_whole" in files else "mean"
        m = load_image(files[key])
        if m.data.shape != gt.shape:
            raise InputImageError(f"has shape {m.data.shape}, expected {gt.shape}", path=files[key],
                                  fix="use the maps written with this case's mask")
        u100 = m.data if key == "unc_whole" else QB.uncertainty_map(m.data)
    if variance is not None or u100 is not None:
        brain = _brain_mask(case, gt.shape)
    if curves and "samples" in files:
        members = _load_members(files["samples"], gt.shape)
    return score_case(pred > 0.5, gt > 0, gt_img.affine, zooms, policy=policy, case_id=case.case_id,
                      variance=variance, brain=brain, members=members, ensemble_sizes=ensemble_sizes,
                      top_percent=top_percent, variance_threshold=variance_threshold, n_levels=n_levels,
                      prediction=str(files["mask"]), qubrats_uncertainty=u100)


class FolderScores(list):
    """A list of `CaseScores` that also remembers predictions that matched no case."""

    def __init__(self, items: Sequence[CaseScores] = (), unmatched_predictions: Sequence[str] = ()):
        super().__init__(items)
        self.unmatched_predictions = list(unmatched_predictions)


def labelled_cases(gt_root: str | Path) -> list[Case]:
    """The cases under `gt_root` that have a label file; `DatasetError` if none has."""
    cases = discover_cases(gt_root)
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise DatasetError(f"no case with a label file found ({len(cases)} case(s) without one)", path=gt_root,
                           fix="give the folder of labelled cases (files named <case>_seg.nii.gz)")
    return labelled


def score_folder(pred_dir: str | Path, gt_root: str | Path, *, policy: str | M.EmptyPolicy = M.BRATS,
                 ensemble_sizes: Sequence[int] | None = None, top_percent: float = 5.0,
                 variance_threshold: float = 0.05, n_levels: int = 100, uncertainty: bool = True,
                 curves: bool = True, quiet: bool = True,
                 failures: dict[str, str] | None = None) -> FolderScores:
    """Score every labelled case under `gt_root` (any layout, `discover_cases`) against its prediction in
    `pred_dir` (`find_prediction`). Every labelled case gets a row: the reason in `failures` (case id ->
    status, e.g. "segmentation failed: ...") for the cases listed there, "missing prediction" when there is none, "error: ..." when its files cannot be scored. The returned list also
    holds `unmatched_predictions` (prediction ids without a labelled case). `DatasetError` when `pred_dir` is
    not a folder or holds no prediction for any case."""
    policy = M.get_policy(policy)
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DatasetError("prediction folder not found", path=pred_dir,
                           fix="give the folder holding <case>_mask.nii.gz files")
    cases = labelled_cases(gt_root)
    failures = failures or {}
    found = {c.case_id: find_prediction(pred_dir, c.case_id) for c in cases}
    if not any(found.values()):
        raise DatasetError(f"holds no prediction for any of the {len(cases)} labelled case(s) under {gt_root} "
                           f"(e.g. {cases[0].case_id}_mask.nii.gz)", path=pred_dir,
                           fix="check the folder, or that the predictions are named <case>_mask.nii.gz or <case>.nii.gz")
    results = []
    with ProgressBar(len(cases), "evaluate", unit="case", quiet=quiet) as bar:
        for case in cases:
            files = found[case.case_id]
            if case.case_id in failures:  # an older prediction left in the folder must not stand in for it
                results.append(CaseScores(case.case_id, status=failures[case.case_id]))
            elif not files:
                results.append(CaseScores(case.case_id, status="missing prediction"))
            else:
                try:
                    results.append(_score_one(case, files, policy=policy, ensemble_sizes=ensemble_sizes,
                                              top_percent=top_percent, variance_threshold=variance_threshold,
                                              n_levels=n_levels, uncertainty=uncertainty, curves=curves))
                except DiffsegError as exc:
                    results.append(CaseScores(case.case_id, status=f"error: {exc}", prediction=str(files["mask"])))
            bar.advance(1)
    unmatched = sorted(_prediction_ids(pred_dir) - {c.case_id for c in cases})
    return FolderScores(results, unmatched)


# ---- summaries and writers ----------------------------------------------------------------------------

def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x == x and np.isfinite(x)], np.float64)
    if not v.size:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def _pooled_slices(scores: Sequence[CaseScores]) -> dict[str, Any]:
    sl = [c.slices for c in scores if c.ok and c.slices is not None]
    if not sl:
        return {"n_test_slices": 0}
    pooled = SliceScores(axis=-1, index=np.concatenate([s.index for s in sl]),
                         dice=np.concatenate([s.dice for s in sl]), jaccard=np.concatenate([s.jaccard for s in sl]),
                         hd95=np.concatenate([s.hd95 for s in sl]), pred_empty=np.concatenate([s.pred_empty for s in sl]))
    return pooled.summary()


def summarize(scores: Sequence[CaseScores], *, policy: str | M.EmptyPolicy = M.BRATS,
              meta: dict | None = None) -> dict[str, Any]:
    """The summary dict written as JSON (NaN -> null) and rendered as Markdown."""
    from . import __version__
    policy = M.get_policy(policy)
    ok = [c for c in scores if c.ok]
    vol = {}
    for key in ("dice", "jaccard", "hd95_mm", "hd95_directed_max_mm"):
        m, s, n = _mean_std([getattr(c, key) for c in ok])
        vol[f"{key}_mean"], vol[f"{key}_std"], vol[f"{key}_n"] = m, s, n
    per_case_slices = {}
    for key in SLICE_KEYS[:6]:
        per_case_slices[key] = _mean_std([c.slices.summary()[key] for c in ok if c.slices is not None])[0]
    unc_cases = [c for c in ok if c.uncertainty is not None]
    unc = {"n_cases": len(unc_cases)}
    for key in UNC_KEYS:
        unc[key] = _mean_std([c.uncertainty.row()[key] for c in unc_cases])[0]
    qb_cases = [c for c in ok if c.qubrats is not None]
    unc["qu_brats_n_cases"] = len(qb_cases)
    for key in QUBRATS_KEYS:
        unc[key] = _mean_std([c.row()[key] for c in qb_cases])[0]
    if unc_cases:
        unc["taus"] = unc_cases[0].uncertainty.taus.tolist()
        unc["filtered_dice_mean"] = np.mean([c.uncertainty.filtered_dice for c in unc_cases], axis=0).tolist()
    curve_cases = [c for c in ok if c.curve is not None]
    curve: dict[str, Any] = {"n_cases": len(curve_cases)}
    if curve_cases:
        common = sorted(set.intersection(*(set(c.curve.sizes) for c in curve_cases)))
        curve["sizes"] = common
        for key in ("dice", "jaccard", "hd95_mm", "slice_dice_mean"):
            curve[key if key == "slice_dice_mean" else f"{key}_mean"] = [_mean_std([getattr(c.curve, key)[c.curve.sizes.index(k)] for c in curve_cases])[0]
                                    for k in common]
        curve["single_run_dice_mean"] = _mean_std([c.curve.single_run_dice for c in curve_cases])[0]
        curve["single_run_slice_dice_mean"] = _mean_std([c.curve.single_run_slice_dice_mean for c in curve_cases])[0]
    unmatched = list(getattr(scores, "unmatched_predictions", []))
    return {
        "tool": "diffseg-engine evaluate", "version": __version__,
        "policy": policy.to_dict(), "hd95_definition": M.HD95_DEFINITION, "definitions": DEFINITIONS,
        "cases": {"total": len(scores), "scored": len(ok),
                  "missing_prediction": [c.case_id for c in scores if c.status == "missing prediction"],
                  "not_scored": {c.case_id: c.status for c in scores if not c.ok},
                  "unmatched_predictions": unmatched},
        "slices_pooled": _pooled_slices(scores),
        "slices_per_case_mean": per_case_slices,
        "volume_3d": vol, "uncertainty": unc, "ensemble_curve": curve,
        "per_case": [c.to_dict() for c in scores],
        "meta": meta or {},
    }


def _json_clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_clean(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _csv_value(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(float(v)) else f"{float(v):.6g}"
    return v


def _f(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _markdown(summary: dict) -> str:
    s, v, c = summary["slices_pooled"], summary["volume_3d"], summary["cases"]
    lines = ["# Segmentation evaluation", ""]
    meta = summary.get("meta") or {}
    if meta:
        lines += [f"- {k}: {meta[k]}" for k in sorted(meta)] + [""]
    lines += [f"- Cases: {c['total']} labelled, {c['scored']} scored.",
              f"- Empty-mask policy: {summary['policy']['text']}.",
              f"- {summary['hd95_definition']}.",
              f"- Ground truth: {DEFINITIONS['ground_truth']}; prediction: {DEFINITIONS['prediction']}.", ""]
    if c["not_scored"]:
        lines += ["Not scored:", ""] + [f"- {k}: {msg}" for k, msg in sorted(c["not_scored"].items())] + [""]
    if c["unmatched_predictions"]:
        lines += [f"Predictions without a labelled case: {', '.join(c['unmatched_predictions'])}", ""]
    lines += ["## Per-slice scores (paper Table 1 protocol, pooled over all test slices)", "",
              f"Test slices: axial slices with non-empty ground truth. Means over all test slices; in brackets over "
              f"test slices with a non-empty prediction. HD95 (mm) over non-empty predictions only "
              f"(over all test slices under the policy: {_f(s.get('slice_hd95_mean'))}).", "",
              "| Dice | HD95 | Jaccard | empty | test slices |", "|---|---|---|---|---|"]
    if s.get("n_test_slices"):
        lines.append(f"| {_f(s['slice_dice_mean'])} [{_f(s['slice_dice_mean_nonempty'])}] | "
                     f"{_f(s['slice_hd95_mean_nonempty'])} | {_f(s['slice_jaccard_mean'])} "
                     f"[{_f(s['slice_jaccard_mean_nonempty'])}] | {s['n_empty_pred']} | {s['n_test_slices']} |")
    else:
        lines.append("| – | – | – | – | 0 |")
    lines += ["", "## Per-volume scores (3D, mean ± sd over scored cases)", "",
              "| Dice | Jaccard | HD95 (mm, medpy) | HD95 (mm, MONAI directed max) |", "|---|---|---|---|",
              f"| {_f(v['dice_mean'])} ± {_f(v['dice_std'])} | {_f(v['jaccard_mean'])} ± {_f(v['jaccard_std'])} | "
              f"{_f(v['hd95_mm_mean'], 2)} ± {_f(v['hd95_mm_std'], 2)} | {_f(v['hd95_directed_max_mm_mean'], 2)} |", "",
              "## Per case", "",
              "| case | status | Dice 3D | HD95 mm | Jaccard 3D | slice Dice [non-empty] | slice HD95 | empty / slices |",
              "|---|---|---|---|---|---|---|---|"]
    for r in summary["per_case"]:
        lines.append(f"| {r['case_id']} | {r['status'].replace('|', '/')} | {_f(r['dice'])} | {_f(r['hd95_mm'], 2)} | "
                     f"{_f(r['jaccard'])} | {_f(r['slice_dice_mean'])} [{_f(r['slice_dice_mean_nonempty'])}] | "
                     f"{_f(r['slice_hd95_mean_nonempty'], 2)} | {_f(r['n_empty_pred'] if r['n_empty_pred'] != '' else None)} / "
                     f"{_f(r['n_test_slices'] if r['n_test_slices'] != '' else None)} |")
    u = summary["uncertainty"]
    if u.get("n_cases"):
        lines += ["", f"## Uncertainty vs error ({u['n_cases']} case(s) with a variance map; means over cases)", "",
                  f"- Errors among the top {_f(u['unc_top_percent'], 1)} % variance voxels: "
                  f"{_f(u['unc_error_fraction_in_top'])} of all errors, vs {_f(u['unc_top_fraction'], 4)} of brain "
                  f"voxels: enrichment {_f(u['unc_enrichment'], 2)}x.",
                  f"- Dice(variance > {_f(u['unc_variance_threshold'], 3)}, errors): "
                  f"{_f(u['unc_high_variance_error_dice'])}.",
                  f"- Variance-filtered Dice AUC: {_f(u['var_filtered_dice_auc'])}.",
                  f"- QU-BraTS, whole tumour ({u['qu_brats_n_cases']} case(s)): Dice AUC "
                  f"{_f(u['qu_brats_dice_auc'])}, FTP AUC {_f(u['qu_brats_ftp_auc'])}, FTN AUC "
                  f"{_f(u['qu_brats_ftn_auc'], 4)}; score {_f(u['qu_brats_score'])}.",
                  f"- Definitions: {DEFINITIONS['uncertainty']}; {DEFINITIONS['enrichment']}; "
                  f"{DEFINITIONS['filtered_dice']}; {DEFINITIONS['qu_brats']}."]
    cv = summary["ensemble_curve"]
    if cv.get("n_cases") and cv.get("sizes"):
        lines += ["", f"## Dice against ensemble size (paper Figure 4; {cv['n_cases']} case(s))", "",
                  f"Single run (member 0): Dice 3D {_f(cv['single_run_dice_mean'])}, slice Dice "
                  f"{_f(cv['single_run_slice_dice_mean'])}. {DEFINITIONS['ensemble_curve']}.", "",
                  "| members | Dice 3D | Jaccard 3D | HD95 mm | slice Dice |", "|---|---|---|---|---|"]
        for i, k in enumerate(cv["sizes"]):
            lines.append(f"| {k} | {_f(cv['dice_mean'][i])} | {_f(cv['jaccard_mean'][i])} | "
                         f"{_f(cv['hd95_mm_mean'][i], 2)} | {_f(cv['slice_dice_mean'][i])} |")
    return "\n".join(lines) + "\n"


def _write_bytes(path: Path, data: bytes) -> Path:
    try:
        with atomic_write(path) as f:
            f.write(data)
    except OSError as exc:
        raise OutputError(f"cannot be written ({exc.strerror or exc})", path=path,
                          fix="check the output folder exists, is writable and has free space") from None
    return path


def _plot_curves(scores: Sequence[CaseScores], path: Path) -> Path | None:
    curve_cases = [c for c in scores if c.ok and c.curve is not None and len(c.curve.sizes) > 0]
    if not curve_cases:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for c in curve_cases:
        ax.plot(c.curve.sizes, c.curve.dice, marker="o", ms=3, lw=1, alpha=0.7, label=c.case_id)
    if len(curve_cases) > 1:
        common = sorted(set.intersection(*(set(c.curve.sizes) for c in curve_cases)))
        mean = [np.nanmean([c.curve.dice[c.curve.sizes.index(k)] for c in curve_cases]) for k in common]
        ax.plot(common, mean, color="black", lw=2.5, label="mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Number of samples in ensemble")
    ax.set_ylabel("Dice (3D, whole tumour)")
    ax.set_title("Dice against ensemble size")
    ax.grid(alpha=0.3)
    if len(curve_cases) <= 12:
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return _write_bytes(path, buf.getvalue())


def write_reports(scores: Sequence[CaseScores], out_dir: str | Path, *, policy: str | M.EmptyPolicy = M.BRATS,
                  meta: dict | None = None) -> dict[str, Path]:
    """Write `REPORT_NAMES` into `out_dir` (atomically): per-case CSV, per-slice CSV, Markdown and JSON
    summaries, and the Dice-vs-ensemble-size PNG when any case has a curve. Returns name -> path."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot be created ({exc.strerror or exc})", path=out_dir,
                          fix="choose a writable output folder") from None
    summary = summarize(scores, policy=policy, meta=meta)
    paths: dict[str, Path] = {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for c in scores:
        r = c.row()
        w.writerow([_csv_value(r[k]) for k in CSV_COLUMNS])
    paths["cases_csv"] = _write_bytes(out_dir / REPORT_NAMES["cases_csv"], buf.getvalue().encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("case_id", "axis", "slice", "dice", "jaccard", "hd95_mm", "pred_empty"))
    for c in scores:
        if c.ok and c.slices is not None:
            s = c.slices
            for t in range(s.n):
                w.writerow((c.case_id, s.axis, int(s.index[t]), _csv_value(s.dice[t]), _csv_value(s.jaccard[t]),
                            _csv_value(s.hd95[t]), int(bool(s.pred_empty[t]))))
    paths["slices_csv"] = _write_bytes(out_dir / REPORT_NAMES["slices_csv"], buf.getvalue().encode())
    clean = _json_clean(summary)
    paths["summary_json"] = _write_bytes(out_dir / REPORT_NAMES["summary_json"],
                                         (json.dumps(clean, indent=2, allow_nan=False) + "\n").encode())
    paths["summary_md"] = _write_bytes(out_dir / REPORT_NAMES["summary_md"], _markdown(clean).encode())
    png = _plot_curves(scores, out_dir / REPORT_NAMES["ensemble_png"])
    if png is not None:
        paths["ensemble_png"] = png
    return paths


# ---- what the CLI calls -------------------------------------------------------------------------------

@dataclass
class EvaluationResult:
    scores: list[CaseScores]
    reports: dict[str, Path]
    summary: dict[str, Any]
    predictions: Path


def _reusable(prov_path: Path, card: Any, n: int, seed: int, plan: Any, need_samples: bool) -> bool:
    """A complete earlier segmentation by the same model (name, modalities, weights digest) with the same
    sampling settings: resume instead of re-sampling."""
    try:
        prov = json.loads(prov_path.read_text())
    except (OSError, ValueError):
        return False
    s = prov.get("sampling", {})
    want = {**plan.describe(), "n": n, "seed": seed}
    mc = prov.get("model_card", {})
    same_model = (mc.get("name") == card.name and list(mc.get("modalities", [])) == list(card.modalities)
                  and mc.get("weights_sha256") == card.weights_sha256)
    same = prov.get("complete") and same_model and all(s.get(k) == v for k, v in want.items())
    return bool(same) and (not need_samples or "samples" in prov.get("outputs", {}))


def evaluate_folder(gt_root: str | Path, out_dir: str | Path, *, predictions: str | Path | None = None,
                    backend: Any = None, plan: Any = None, n: int = 5, seed: int = 0, batch_size: int = 0,
                    policy: str | M.EmptyPolicy = "brats", ensemble_sizes: Sequence[int] | None = None,
                    top_percent: float = 5.0, variance_threshold: float = 0.05, n_levels: int = 100,
                    overwrite: bool = False, quiet: bool = False, overview: bool = False, command: str = "",
                    progress_factory: Callable[..., ProgressBar] = ProgressBar, force: bool = False) -> EvaluationResult:
    """Score segmentations of the labelled cases under `gt_root` and write the reports into `out_dir`.

    Exactly one of:
    * ``predictions``: an existing folder of ``<case>_mask.nii.gz`` (+ optional ``_variance``, ``_samples``)
      or of plain ``<case>.nii.gz`` masks -- scored as they are;
    * ``backend`` (a `StepBackend`, e.g. `segment.open_model(...)`) and ``plan`` (`sampler.plan_sampling`):
      every labelled case is first segmented into ``out_dir/predictions`` with `segment_case` (``n`` members,
      ``seed``, ``batch_size``, ``save_samples=True`` so the ensemble-size curve can be drawn), then scored.
      Cases already segmented there by the same model with the same sampler/steps/eta/n/seed are reused
      (resume); other earlier results there raise `OutputError` unless ``overwrite``; a case whose
      modalities are missing or unreadable is reported as "segmentation failed: ...".

    The reports (`REPORT_NAMES`) are refused if already in `out_dir` unless ``overwrite``; ``overwrite`` also
    re-segments cases. Raises `UsageError` for bad options, `DatasetError` for folders without usable cases,
    `OutputError` for unwritable outputs.
    """
    policy_obj = M.get_policy(policy) if isinstance(policy, M.EmptyPolicy) else _policy_or_usage(policy)
    if (predictions is None) == (backend is None):
        raise UsageError("give either a prediction folder or a model to segment with, not both (nor neither)",
                         fix="pass --predictions DIR to score existing results, or --model to segment first")
    if backend is not None and plan is None:
        raise UsageError("segmenting needs a sampling plan", fix="pass plan=sampler.plan_sampling(card, ...)")
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if not 0 < top_percent <= 100:
        raise UsageError(f"--top-percent must lie in (0, 100], got {top_percent}")
    if n_levels < 2:
        raise UsageError(f"--levels must be at least 2, got {n_levels}")
    if ensemble_sizes is not None and any(int(k) < 1 for k in ensemble_sizes):
        raise UsageError(f"ensemble sizes must be at least 1, got {list(ensemble_sizes)}")
    out_dir = Path(out_dir)
    existing = [out_dir / name for name in REPORT_NAMES.values() if (out_dir / name).exists()]
    if existing and not overwrite:
        raise OutputError(f"already holds evaluation results ({existing[0].name})", path=out_dir,
                          fix="pass --overwrite to replace them, or choose another --out")
    cases = labelled_cases(gt_root)
    meta: dict[str, Any] = {"ground_truth": str(gt_root), "command": command}
    failures: dict[str, str] = {}
    t0 = time.perf_counter()
    if backend is not None:
        from .segment import output_paths, resolve_case, segment_case
        pred_dir = out_dir / "predictions"
        meta.update({"mode": "segment then score", "sampling": {**plan.describe(), "n": n, "seed": seed},
                     "backend": backend.describe(), "model": backend.card.name})
        for case in cases:
            prov = output_paths(pred_dir, case.case_id)["provenance"]
            if not overwrite and prov.exists() and _reusable(prov, backend.card, n, seed, plan, True):
                continue
            try:
                ci = resolve_case([case.folder], [], backend.card, force=force)
            except (InputImageError, MissingModalityError) as exc:
                failures[case.case_id] = f"segmentation failed: {exc}"
                continue
            segment_case(ci, backend, pred_dir, n=n, plan=plan, seed=seed, batch_size=batch_size,
                         overwrite=overwrite or not prov.exists(), quiet=quiet, save_samples=True,
                         overview=overview, command=command, progress_factory=progress_factory)
        meta["segmentation_s"] = round(time.perf_counter() - t0, 3)
    else:
        pred_dir = Path(predictions)
        meta["mode"] = "score existing predictions"
    meta["predictions"] = str(pred_dir)
    scores = score_folder(pred_dir, gt_root, policy=policy_obj, ensemble_sizes=ensemble_sizes,
                          top_percent=top_percent, variance_threshold=variance_threshold, n_levels=n_levels,
                          quiet=quiet, failures=failures)
    reports = write_reports(scores, out_dir, policy=policy_obj, meta=meta)
    summary = json.loads(reports["summary_json"].read_text())
    return EvaluationResult(scores=list(scores), reports=reports, summary=summary, predictions=pred_dir)


def _policy_or_usage(name: str) -> M.EmptyPolicy:
    try:
        return M.get_policy(name)
    except ValueError:
        raise UsageError(f"unknown empty-mask policy {name!r}", fix=f"choose one of {', '.join(M.POLICIES)}") from None
