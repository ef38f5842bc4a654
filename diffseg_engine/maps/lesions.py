"""The lesion mask: from the ensemble's mean map to the 0/1 mask a user reads, and what was dropped on the way.

Owns: `lesion_mask` (mean > 0.5, then connected components smaller than `min_component` of the largest one
removed), `MaskResult`, `DEFAULT_MIN_COMPONENT` and `lesion_summary` (a case's lesion size and
uncertainty). The mean and variance maps are never changed here: a user can threshold the mean again.
Imports: numpy, scipy (lazily). Never torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

#: Components smaller than this share of the largest component (in voxels) are removed from the mask.
DEFAULT_MIN_COMPONENT = 0.02
#: 26-connectivity: voxels touching by a corner belong to one lesion (as BraTS tools count components).
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class MaskResult:
    """mask: uint8 [X, Y, Z], 0/1. kept / removed: the components' volumes in ml, largest first."""

    mask: np.ndarray
    kept_ml: list[float] = field(default_factory=list)
    removed_ml: list[float] = field(default_factory=list)

    def describe(self) -> dict:
        return {"components_kept": len(self.kept_ml), "components_removed": len(self.removed_ml),
                "removed_ml": round(float(sum(self.removed_ml)), 4),
                "largest_removed_ml": round(float(max(self.removed_ml, default=0.0)), 4)}


def lesion_mask(mean: np.ndarray, zooms: Sequence[float], *,
                min_component: float = DEFAULT_MIN_COMPONENT) -> MaskResult:
    """mean: float [X, Y, Z] (a 2D [X, Y] is taken as one slice) on the input grid; zooms: voxel size in mm.

    Returns the mask ``mean > 0.5`` without the connected components (26-connected) holding fewer voxels than
    `min_component` x the largest component's. `min_component` in [0, 1); 0 keeps everything."""
    if not 0.0 <= min_component < 1.0:
        raise ValueError(f"min_component must lie in [0, 1), got {min_component}")
    raw = np.asarray(mean) > 0.5
    voxel_ml = float(np.prod(np.asarray(zooms, np.float64)[:3])) / 1000  # a 2D slice: its area x 1 mm
    if not raw.any():
        return MaskResult(raw.astype(np.uint8))
    from scipy import ndimage
    grid = raw if raw.ndim == 3 else raw.reshape(raw.shape + (1,) * (3 - raw.ndim))
    labels, k = ndimage.label(grid, structure=_STRUCTURE)
    sizes = np.bincount(labels.ravel(), minlength=k + 1)[1:]
    keep = sizes >= min_component * sizes.max()
    order = np.argsort(-sizes, kind="stable")
    kept = [float(sizes[i] * voxel_ml) for i in order if keep[i]]
    removed = [float(sizes[i] * voxel_ml) for i in order if not keep[i]]
    if not removed:
        return MaskResult(raw.astype(np.uint8), kept, [])
    lut = np.concatenate([[False], keep])
    return MaskResult(lut[labels].reshape(raw.shape).astype(np.uint8), kept, removed)


def lesion_summary(mask: np.ndarray, variance: np.ndarray, zooms: Sequence[float],
                   uncertain_threshold: float = 0.05) -> dict:
    """What a reviewer reads first about one case: the predicted lesion's size and how sure the ensemble was.

    mask, variance: [X, Y, Z] on the input grid; zooms: voxel size in mm. Returns lesion_voxels,
    lesion_ml (voxels x voxel volume / 1000), mean_variance_in_lesion (None for an empty mask),
    max_variance, and uncertain_ml: the volume where variance > `uncertain_threshold` (members disagree),
    inside the lesion or not."""
    voxel_ml = float(np.prod(np.asarray(zooms, np.float64)[:3])) / 1000.0
    lesion = np.asarray(mask) > 0
    v = np.asarray(variance, np.float64)
    k = int(lesion.sum())
    return {"lesion_voxels": k, "lesion_ml": round(k * voxel_ml, 4),
            "mean_variance_in_lesion": float(v[lesion].mean()) if k else None,
            "max_variance": float(v.max()) if v.size else 0.0,
            "uncertain_ml": round(int((v > uncertain_threshold).sum()) * voxel_ml, 4),
            "uncertain_threshold": uncertain_threshold}
