"""Is the ensemble's probability calibrated, and does its uncertainty find its errors? One case at a time.

Owns: `auroc` (exact, Mann-Whitney U with average ranks for ties), `roc_points` (the exact ROC curve, thinned
for plotting), `reliability` / `Reliability` (the reliability diagram's bins and the expected calibration
error), `error_detection` / `ErrorDetection`, and `calibration_scores` / `CalibrationScores`, which a case's
scores carry (`protocol.CaseScores.calibration`).
Imports: numpy. Never torch.
Definitions and conventions: the comment below the imports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Definitions. The region: brain voxels (any modality non-zero; the whole grid when no image is at hand) of the
# slices whose ground truth holds tumour -- the voxels where a reader looks for errors. Errors: mask != truth
# there. `variance_auroc` / `entropy_auroc`: the area under the ROC curve of the variance map / the binary
# entropy of the ensemble mean for telling error voxels from correct ones (1: every error more uncertain than
# every correct voxel; 0.5: chance). Reliability: the ensemble mean p of the region's voxels in `BINS` equal bins
# of [0, 1]; per bin the voxel count, the mean p (confidence) and the share that is tumour (observed);
# ECE = sum over bins of (count / total) x |observed - confidence|.

BINS = 10
ROC_POINTS = 200


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of `score` for the boolean `label` (Mann-Whitney U, average ranks for ties);
    NaN without both classes."""
    score, label = np.asarray(score, np.float64).ravel(), np.asarray(label, bool).ravel()
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    edges = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(s)]])
    ranks = np.empty(len(s), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based average rank of each tie run
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_points(score: np.ndarray, label: np.ndarray, max_points: int = ROC_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve (false positive rate, true positive rate), thresholds at every distinct score from the
    highest down, thinned to at most `max_points` points (the ends kept); empty without both classes."""
    score, label = np.asarray(score, np.float64).ravel(), np.asarray(label, bool).ravel()
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-score, kind="mergesort")
    s, lab = score[order], label[order]
    last = np.concatenate([np.flatnonzero(np.diff(s)), [len(s) - 1]])  # the last voxel of each tie run
    tp = np.cumsum(lab)[last]
    fp = (last + 1) - tp
    fpr = np.concatenate([[0.0], fp / n_neg])
    tpr = np.concatenate([[0.0], tp / n_pos])
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return fpr, tpr


@dataclass
class Reliability:
    """The reliability diagram's bins over [0, 1]: count [BINS], mean probability, observed tumour share."""

    count: np.ndarray
    confidence: np.ndarray
    observed: np.ndarray

    @property
    def ece(self) -> float:
        total = int(self.count.sum())
        if not total:
            return math.nan
        used = self.count > 0
        return float(np.sum(self.count[used] / total * np.abs(self.observed[used] - self.confidence[used])))

    def to_dict(self) -> dict:
        return {"count": self.count.tolist(), "confidence": self.confidence.tolist(),
                "observed": self.observed.tolist(), "ece": self.ece}


def reliability(prob: np.ndarray, truth: np.ndarray, bins: int = BINS) -> Reliability:
    """Bins of the probabilities `prob` (any shape, values in [0, 1]) against the boolean `truth`."""
    p = np.clip(np.asarray(prob, np.float64).ravel(), 0.0, 1.0)
    t = np.asarray(truth, bool).ravel()
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=p, minlength=bins) / count
        observed = np.bincount(idx, weights=t.astype(np.float64), minlength=bins) / count
    return Reliability(count.astype(np.int64), np.where(count > 0, confidence, np.nan),
                       np.where(count > 0, observed, np.nan))


@dataclass
class ErrorDetection:
    """How well one uncertainty map finds the errors of the region: AUROC and the ROC curve."""

    auroc: float
    fpr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tpr: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict:
        return {"auroc": self.auroc}  # the curve is drawn (figures.error_detection_curves), not stored


def error_detection(uncertainty: np.ndarray, errors: np.ndarray) -> ErrorDetection:
    fpr, tpr = roc_points(uncertainty, errors)
    return ErrorDetection(auroc(uncertainty, errors), fpr, tpr)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli(p), elementwise (0 at p = 0 or 1)."""
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


@dataclass
class CalibrationScores:
    """One case: the region's size and errors, the error detection of each uncertainty map given (variance,
    entropy of the mean), and the reliability of the ensemble mean (where given)."""

    n_region: int
    n_error: int
    variance: ErrorDetection | None = None
    entropy: ErrorDetection | None = None
    reliability: Reliability | None = None

    def row(self) -> dict[str, float]:
        nan = math.nan
        return {"variance_auroc": self.variance.auroc if self.variance else nan,
                "entropy_auroc": self.entropy.auroc if self.entropy else nan,
                "ece": self.reliability.ece if self.reliability else nan}

    def to_dict(self) -> dict:
        d: dict = {**self.row(), "n_region": self.n_region, "n_error": self.n_error}
        for k in ("variance", "entropy", "reliability"):
            part = getattr(self, k)
            if part is not None:
                d[k] = part.to_dict()
        return d


def calibration_scores(pred: np.ndarray, gt: np.ndarray, axis: int, *, brain: np.ndarray | None = None,
                       variance: np.ndarray | None = None, mean: np.ndarray | None = None) -> CalibrationScores:
    """pred, gt: boolean [X, Y, Z]; axis: the slice axis; brain: where errors count (None: the whole grid);
    variance / mean: the ensemble's maps on the same grid (either may be None)."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    tumour_slices = np.moveaxis(g, axis, 0).reshape(g.shape[axis], -1).any(1)
    region = np.moveaxis(np.broadcast_to(tumour_slices[:, None, None],
                                         np.moveaxis(g, axis, 0).shape), 0, axis).copy()
    if brain is not None:
        region &= np.asarray(brain, bool)
    errors = (p != g)[region]
    out = CalibrationScores(n_region=int(region.sum()), n_error=int(errors.sum()))
    if variance is not None:
        out.variance = error_detection(np.asarray(variance, np.float64)[region], errors)
    if mean is not None:
        m = np.asarray(mean, np.float64)[region]
        out.entropy = error_detection(binary_entropy(m), errors)
        out.reliability = reliability(m, g[region])
    return out
