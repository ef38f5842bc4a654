"""Uncertainty against error, for one case with a variance map.

Owns: `uncertainty_scores` / `UncertaintyScores`, `filtered_dice_curve`, `check_options` (the one check of
the top percent and the number of levels) and `MAX_VARIANCE`.
Imports: numpy; `core.errors`, `metrics`. Never torch.
Definitions and conventions: the comment below the imports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import metrics as M
from ..core.errors import UsageError

# Definitions. u = clip(variance / 0.25, 0, 1) (0.25 is the largest population variance of values in [0, 1]).
# Errors E = (prediction != ground truth) inside the brain (any modality non-zero, as in preprocessing; the
# whole grid when no image is at hand).
#
# * Enrichment: the top-q % set T = the ceil(q/100 * |brain|) brain voxels of largest variance (all brain
#   voxels with variance >= that k-th largest value, and > 0, so ties and zero variance are handled
#   deterministically). error_fraction_in_top = |E∩T|/|E|; top_fraction = |T|/|brain|;
#   enrichment = error_fraction_in_top / top_fraction (1 = uncertainty no better than chance; NaN if no
#   errors or T is empty). high_variance_error_dice = Dice(brain ∩ {variance > threshold}, E).
# * Variance-filtered Dice (this tool's dense curve, in the spirit of QU-BraTS but NOT its score): for tau in
#   linspace(0, 1, n_levels), the voxels with u > tau are filtered out (removed from prediction and ground
#   truth) and Dice is computed on the voxels kept (u <= tau); both filtered masks empty -> 1. tau = 1 keeps
#   every voxel (the unfiltered Dice). var_filtered_dice_auc = trapezoid area under Dice(tau) over [0, 1];
#   the filtered true-positive / true-negative ratio curves of the same u are in the JSON report.
#
# The QU-BraTS score itself (the challenge's, on its own uncertainty map) is `qubrats.score`.

#: Largest variance of a quantity in [0, 1]: u = variance / MAX_VARIANCE is the normalised uncertainty.
MAX_VARIANCE = 0.25


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    if len(x) < 2:
        return float(y[0]) if len(y) else math.nan
    return float(np.sum((y[1:] + y[:-1]) * 0.5 * np.diff(x)))


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


def check_options(top_percent: float, n_levels: int) -> None:
    """`UsageError` unless 0 < top_percent <= 100 and n_levels >= 2."""
    if not 0 < top_percent <= 100:
        raise UsageError(f"top percent must lie in (0, 100], got {top_percent}")
    if n_levels < 2:
        raise UsageError(f"the filtered-Dice curve needs at least 2 levels, got {n_levels}")


def uncertainty_scores(pred: np.ndarray, gt: np.ndarray, variance: np.ndarray, brain: np.ndarray | None = None, *,
                       top_percent: float = 5.0, variance_threshold: float = 0.05, n_levels: int = 100,
                       policy: str | M.EmptyPolicy = M.BRATS) -> UncertaintyScores:
    """Enrichment of errors among high-variance voxels, their overlap, and the filtered-Dice curve."""
    check_options(top_percent, n_levels)
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
