"""A case's maps from its ensemble statistics, on the input grid.

Owns: `CaseMaps` and `ensemble_maps` (mean, variance, the cleaned mask, entropy and, for ``--n auto``, the
members each slice got), `members_map`, `members_summary`. Imports: numpy; `core.ensemble`, `inputs.preprocess`, `lesions`, `qubrats`. Never torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..core.ensemble import EnsembleStats
from ..inputs.preprocess import PreparedCase, restore
from .lesions import MaskResult, lesion_mask
from .qubrats import binary_entropy


@dataclass
class CaseMaps:
    """One case's maps on the input grid [X, Y, Z]."""

    mean: np.ndarray  # float32
    variance: np.ndarray  # float32
    mask: np.ndarray  # uint8, components under min_component of the largest dropped
    entropy: np.ndarray  # float32, binary entropy of the mean in bits
    cleaned: MaskResult  # what the clean-up did
    members: np.ndarray | None = None  # --n auto: uint16, the members each voxel's slice got


def ensemble_maps(prepared: PreparedCase, stats: EnsembleStats, zooms: Sequence[float], *, min_component: float,
                  members: bool = False) -> CaseMaps:
    """The maps of `stats` restored to the input grid; `members`: also the member-count map (``--n auto``)."""
    mean = restore(prepared, stats.mean).astype(np.float32)
    variance = restore(prepared, stats.variance).astype(np.float32)
    cleaned = lesion_mask(mean, zooms, min_component=min_component)
    return CaseMaps(mean, variance, cleaned.mask, binary_entropy(mean).astype(np.float32), cleaned,
                    members_map(prepared, stats.count) if members else None)


def members_map(prepared: PreparedCase, counts: np.ndarray) -> np.ndarray:
    """The members each slice got [S] as a uint16 volume on the input grid (0 outside the brain and the
    processed slices, as the other maps)."""
    per_slice = np.broadcast_to(np.asarray(counts, np.float32)[:, None, None],
                                (len(counts), prepared.geometry.image_size, prepared.geometry.image_size))
    return np.rint(restore(prepared, per_slice)).astype(np.uint16)


def members_summary(counts: np.ndarray, prepared: PreparedCase, n_max: int) -> dict:
    """``--n auto`` in the provenance: members drawn in all, their spread, how many slices stopped before
    `n_max`, and every slice's count with its voxel index along the input's slice axis."""
    counts = np.asarray(counts, np.int64)
    return {"total": int(counts.sum()), "min": int(counts.min()) if counts.size else 0,
            "max": int(counts.max()) if counts.size else 0,
            "mean": round(float(counts.mean()), 3) if counts.size else 0.0,
            "slices_stopped_early": int((counts < n_max).sum()),
            "slice_axis": int(prepared.geometry.axis), "slice_index": [int(i) for i in prepared.slice_index],
            "per_slice": [int(c) for c in counts]}
