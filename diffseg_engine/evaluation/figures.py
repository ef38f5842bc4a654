"""The figures of an evaluation, as PNG bytes: what a reader would rather see than read.

Owns: `dice_per_case` (3D and per-slice Dice of every scored case), `reliability_diagram` (the ensemble mean's
calibration, pooled over cases, with its expected calibration error), `error_detection_curves` (ROC of the
variance and of the entropy for finding the errors, per case, with the AUROC the tables report) and
`dice_against_lesion_size` (per-slice Dice against the true lesion's size in the slice, and 3D Dice against
its volume), and `FIGURES` (name -> function), each returning None where no case has what it draws.
Imports: matplotlib (lazily), numpy; `calibration`. Never torch.
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable, Sequence

import numpy as np

from .calibration import Reliability


def _figure(w: float, h: float, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, cols, i + 1) for i in range(cols)]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _scored(scores: Sequence[Any]) -> list[Any]:
    return [c for c in scores if c.ok]


def dice_per_case(scores: Sequence[Any]) -> bytes | None:
    """Horizontal bars of each case's 3D Dice (lowest first), its mean per-slice Dice as a marker."""
    cases = [c for c in _scored(scores) if not math.isnan(c.dice)]
    if not cases:
        return None
    cases.sort(key=lambda c: c.dice)
    fig, (ax,) = _figure(7.0, max(2.8, 0.28 * len(cases) + 1.8))
    y = np.arange(len(cases))
    ax.barh(y, [c.dice for c in cases], color="#4c72b0", label="3D Dice")
    sl = [c.slices.summary()["slice_dice_mean"] if c.slices is not None and c.slices.n else np.nan for c in cases]
    ax.plot(sl, y, "o", color="#dd8452", ms=4, label="per-slice Dice (mean over the case's tumour slices)")
    mean3d = float(np.mean([c.dice for c in cases]))
    ax.axvline(mean3d, color="black", lw=1, ls="--", label=f"mean 3D Dice {mean3d:.3f}")
    ax.set_yticks(y, [c.case_id for c in cases], fontsize=7 if len(cases) > 20 else 8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Dice (whole tumour)")
    ax.set_title(f"Dice per case ({len(cases)} cases)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22 if len(cases) < 8 else -0.08), ncol=3,
              frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def pooled_reliability(scores: Sequence[Any]) -> Reliability | None:
    """The reliability bins of every case summed (voxel-weighted), or None without any."""
    parts = [c.calibration.reliability for c in _scored(scores)
             if c.calibration is not None and c.calibration.reliability is not None]
    if not parts:
        return None
    count = np.sum([r.count for r in parts], axis=0)
    conf = np.sum([np.nan_to_num(r.confidence) * r.count for r in parts], axis=0)
    obs = np.sum([np.nan_to_num(r.observed) * r.count for r in parts], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return Reliability(count, np.where(count > 0, conf / count, np.nan), np.where(count > 0, obs / count, np.nan))


def reliability_diagram(scores: Sequence[Any]) -> bytes | None:
    rel = pooled_reliability(scores)
    if rel is None or not rel.count.sum():
        return None
    from matplotlib.gridspec import GridSpec
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.6, 6.0))
    FigureCanvasAgg(fig)
    gs = GridSpec(2, 1, height_ratios=[3, 1], figure=fig)
    ax, hx = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    bins = len(rel.count)
    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    used = rel.count > 0
    ax.bar(centres[used], rel.observed[used], width=1 / bins, edgecolor="black", color="#4c72b0", alpha=0.8,
           label="observed tumour share")
    ax.plot([0, 1], [0, 1], color="gray", ls="--", label="perfect calibration")
    ax.plot(rel.confidence[used], rel.observed[used], "o-", color="#dd8452", ms=4, label="mean probability in bin")
    n_cases = sum(1 for c in _scored(scores) if c.calibration is not None and c.calibration.reliability is not None)
    ax.set_title(f"Reliability of the ensemble mean ({n_cases} cases, voxels pooled)\nECE {rel.ece:.4f}",
                 fontsize=10)
    ax.set_ylabel("observed tumour share")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    hx.bar(centres, np.maximum(rel.count, 0), width=1 / bins, color="#8c8c8c", edgecolor="black")
    hx.set_yscale("log")
    hx.set_xlim(0, 1)
    hx.set_xlabel("ensemble mean (tumour probability), brain voxels of tumour slices")
    hx.set_ylabel("voxels")
    fig.tight_layout()
    return _png(fig)


def error_detection_curves(scores: Sequence[Any]) -> bytes | None:
    """ROC curves of the variance map and of the entropy of the mean for finding the wrong voxels."""
    cases = [c for c in _scored(scores) if c.calibration is not None
             and (c.calibration.variance is not None or c.calibration.entropy is not None)]
    if not cases:
        return None
    fig, axes = _figure(10.0, 4.6, cols=2)
    for ax, key, title in zip(axes, ("variance", "entropy"), ("variance", "entropy of the ensemble mean")):
        aucs = []
        for c in cases:
            det = getattr(c.calibration, key)
            if det is None or not len(det.fpr):
                continue
            aucs.append(det.auroc)
            ax.plot(det.fpr, det.tpr, lw=1, alpha=0.8,
                    label=f"{c.case_id} ({det.auroc:.3f})" if len(cases) <= 12 else None)
        ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1)
        mean = f"mean AUROC {np.mean(aucs):.3f}" if aucs else "no curve"
        ax.set_title(f"Finding errors with the {title}\n{mean} over {len(aucs)} cases", fontsize=10)
        ax.set_xlabel("false positive rate (correct voxels flagged)")
        ax.set_ylabel("true positive rate (errors flagged)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if aucs and len(cases) <= 12:
            ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def dice_against_lesion_size(scores: Sequence[Any]) -> bytes | None:
    cases = [c for c in _scored(scores) if c.slices is not None and c.slices.n and c.slices.gt_voxels is not None]
    if not cases:
        return None
    fig, (a0, a1) = _figure(10.0, 4.4, cols=2)
    sizes = np.concatenate([c.slices.gt_voxels for c in cases]).astype(np.float64)
    dice = np.concatenate([c.slices.dice for c in cases])
    empty = np.concatenate([c.slices.pred_empty for c in cases]).astype(bool)
    a0.scatter(sizes[~empty], dice[~empty], s=6, alpha=0.5, color="#4c72b0", label="slice")
    a0.scatter(sizes[empty], dice[empty], s=10, marker="x", color="#c44e52",
               label=f"empty mask ({int(empty.sum())} of {len(empty)})")
    a0.set_xscale("log")
    a0.set_xlabel("true lesion in the slice (voxels)")
    a0.set_ylabel("per-slice Dice")
    a0.set_ylim(-0.03, 1.03)
    a0.set_title("Per-slice Dice against lesion size", fontsize=10)
    a0.grid(alpha=0.3)
    a0.legend(fontsize=7, loc="lower right")
    vol = np.array([c.gt_voxels for c in cases], np.float64)
    d3 = np.array([c.dice for c in cases])
    a1.scatter(vol, d3, s=18, color="#4c72b0")
    if len(cases) <= 30:
        for v, d, c in zip(vol, d3, cases):
            a1.annotate(c.case_id, (v, d), fontsize=6, xytext=(3, 2), textcoords="offset points")
    a1.set_xscale("log")
    a1.set_xlabel("true lesion volume (voxels)")
    a1.set_ylabel("3D Dice")
    a1.set_ylim(-0.03, 1.03)
    a1.set_title("3D Dice against lesion volume", fontsize=10)
    a1.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


#: file stem -> (title, function); the page shows them in this order.
FIGURES: dict[str, tuple[str, Callable[[Sequence[Any]], bytes | None]]] = {
    "evaluation_dice_per_case": ("Dice per case", dice_per_case),
    "evaluation_reliability": ("Calibration of the ensemble mean", reliability_diagram),
    "evaluation_error_detection": ("Does the uncertainty find the errors?", error_detection_curves),
    "evaluation_dice_vs_lesion_size": ("Dice against lesion size", dice_against_lesion_size),
}
