"""The QU-BraTS uncertainty challenge (Mehta et al., MELBA 2022:026): its uncertainty map, its file names and
its score, computed exactly as the challenge's own scorer does.

Owns: `binary_entropy`, `uncertainty_map` (the 0-100 map this engine submits), `submission_paths`,
`label_map` and `score` / `QuBratsScore`. Imports: numpy; `outputs`. Never torch.
Definitions and conventions: the comment below the imports.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .outputs import SUBMISSION_KEYS, output_paths

# The scorer is `BraTS_Seg_Uncertainty.py` of github.com/RagMeh11/QU-BraTS (the challenge organisers' code):
# * uncertainty maps hold values in [0, 100]; 0 = certain, 100 = most uncertain;
# * for each threshold th, voxels with uncertainty > th are filtered out (`unc_mask[u > th] = 0`);
# * Dice(th) is computed on the kept voxels of the *whole grid* (both filtered masks empty -> 1);
# * FTP(th) = (TP_before - TP_after) / (TP_before + eps) and FTN(th) likewise, where TP and TN are counted
#   inside the brain mask only (brain = an image > 0), eps = float32 machine epsilon;
# * each curve's AUC is sklearn's trapezoidal `auc(thresholds, curve) / 100`;
# * the challenge's thresholds are 0, 25, 50, 75 and 100 (the script's `np.arange(0, 100 + eps, 100 /
#   num_points)` with num_points = 4; the script's command-line default of 40 points is also accepted here).
#   The script adds a float32 eps: under numpy 1.x, when the challenge ran, the sum is float64 and 100 is a
#   threshold; under numpy >= 2 (NEP 50) it is float32, 100.0 + eps == 100.0, and np.arange drops the 100
#   threshold. This module follows the challenge (100 included; measured: numpy 2.4 gives [0, 25, 50, 75]);
# * per region, score = (AUC_Dice + (1 - AUC_FTP) + (1 - AUC_FTN)) / 3 (Mehta et al., section 2); the challenge
#   averages it over whole tumour, tumour core and enhancing tumour. This engine models the whole tumour
#   only: its score is the whole-tumour score, not the challenge's three-region average.

#: The challenge's uncertainty thresholds (num_points = 4 in the organisers' scorer).
THRESHOLDS = (0.0, 25.0, 50.0, 75.0, 100.0)
#: Label written for the whole tumour in the submitted label map. 2 (oedema in BraTS labels) keeps the
#: tumour-core (1, 4) and enhancing (4) regions empty: this model does not separate them.
WHOLE_TUMOUR_LABEL = 2
_EPS = float(np.finfo(np.float32).eps)


def thresholds(num_points: int = 4) -> np.ndarray:
    """The organisers' thresholds: np.arange(0, 100 + eps, 100 / num_points) ([num_points + 1])."""
    return np.arange(0.0, 100.0 + _EPS, 100.0 / num_points)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) = -p log2 p - (1-p) log2 (1-p), in bits: 0 at p in {0, 1}, 1 at p = 0.5. Same shape as p."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(p < 1, (1 - p) * np.log2(1 - p), 0.0))
    return np.clip(h, 0.0, 1.0)


def uncertainty_map(mean: np.ndarray) -> np.ndarray:
    """The submitted whole-tumour uncertainty: 100 x binary entropy of the ensemble mean, rounded to uint8
    (0 where every member agrees, 100 where the mean is 0.5)."""
    return np.rint(100.0 * binary_entropy(mean)).astype(np.uint8)


def label_map(mask: np.ndarray) -> np.ndarray:
    """The submitted segmentation: `WHOLE_TUMOUR_LABEL` where mask != 0, else 0 (uint8)."""
    return np.where(np.asarray(mask) != 0, WHOLE_TUMOUR_LABEL, 0).astype(np.uint8)


def submission_paths(out_dir: Path, case_id: str) -> dict[str, Path]:
    """{"label": <ID>.nii.gz, "unc_whole": <ID>_unc_whole.nii.gz}, the names the challenge expects."""
    return output_paths(out_dir, case_id, SUBMISSION_KEYS)


@dataclass
class QuBratsScore:
    """One region's curves at `thresholds` and their AUCs; `score` = (dice_auc + 1-ftp_auc + 1-ftn_auc) / 3."""

    thresholds: np.ndarray
    dice: np.ndarray
    ftp: np.ndarray
    ftn: np.ndarray
    dice_auc: float
    ftp_auc: float
    ftn_auc: float
    score: float

    def to_dict(self) -> dict:
        return {"thresholds": self.thresholds.tolist(), "dice": self.dice.tolist(), "ftp_ratio": self.ftp.tolist(),
                "ftn_ratio": self.ftn.tolist(), "dice_auc": self.dice_auc, "ftp_auc": self.ftp_auc,
                "ftn_auc": self.ftn_auc, "score": self.score}


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(x)
    x, y = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def score(pred: np.ndarray, gt: np.ndarray, uncertainty: np.ndarray, brain: np.ndarray | None = None, *,
          num_points: int = 4) -> QuBratsScore:
    """The organisers' `make` + AUCs for one binary region. pred, gt: non-zero = region; uncertainty: [0, 100];
    brain: where TP and TN are counted (default: the whole grid); all of one shape [X, Y, Z]."""
    p, g = np.asarray(pred) != 0, np.asarray(gt) != 0
    u = np.asarray(uncertainty, np.float64)
    b = np.ones(p.shape, bool) if brain is None else np.asarray(brain) != 0
    if not (p.shape == g.shape == u.shape == b.shape):
        raise ValueError(f"shapes differ: pred {p.shape}, gt {g.shape}, uncertainty {u.shape}, brain {b.shape}")
    th = thresholds(num_points)
    # kept voxels at th are those with u <= th: count them per threshold from sorted values
    kept = lambda sel: np.searchsorted(np.sort(u[sel]), th, side="right").astype(np.float64)  # noqa: E731
    tp_all, fp_all, fn_all = kept(p & g), kept(p & ~g), kept(~p & g)
    denom = 2 * tp_all + fp_all + fn_all
    dice = np.where(denom > 0, 2 * tp_all / np.where(denom > 0, denom, 1), 1.0)
    tp_b, tn_b = p & g & b, ~p & ~g & b
    n_tp, n_tn = float(tp_b.sum()), float(tn_b.sum())
    ftp = (n_tp - kept(tp_b)) / (n_tp + _EPS)
    ftn = (n_tn - kept(tn_b)) / (n_tn + _EPS)
    d_auc, p_auc, n_auc = (_auc(th, c) / 100.0 for c in (dice, ftp, ftn))
    return QuBratsScore(thresholds=th, dice=dice, ftp=ftp, ftn=ftn, dice_auc=d_auc, ftp_auc=p_auc, ftn_auc=n_auc,
                        score=(d_auc + (1.0 - p_auc) + (1.0 - n_auc)) / 3.0)
