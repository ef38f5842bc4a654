"""Ensemble statistics, streamed: memory does not grow with the number of members.

Owns: `EnsembleStats` (per-slice running mean and variance, Welford, float64, whose rows can be saved and
restored exactly for resuming) and `member_probability`
(a sampled mask x_0 -> a value in [0, 1]).
Imports: numpy only.
"""
from __future__ import annotations

import numpy as np


def member_probability(x0: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map a sampled mask (background `low`, tumour `high`) to [0, 1]: clip((x0 - low) / (high - low))."""
    return np.clip((x0 - low) / (high - low), 0.0, 1.0)


class EnsembleStats:
    """Running mean and (population) variance over members, per slice: maps [S, h, w].

    Members of one slice must be added in member order for bit-identical results across chunkings; the
    sampler guarantees this by ordering work items slice-major, member-minor.
    """

    def __init__(self, num_slices: int, shape: tuple[int, int]):
        self.count = np.zeros(num_slices, np.int64)
        self._mean = np.zeros((num_slices, *shape), np.float64)
        self._m2 = np.zeros((num_slices, *shape), np.float64)

    def add(self, slice_index: int, value: np.ndarray) -> None:
        """Fold in one member's map [h, w] for slice `slice_index`."""
        self.count[slice_index] += 1
        delta = value - self._mean[slice_index]
        self._mean[slice_index] += delta / self.count[slice_index]
        self._m2[slice_index] += delta * (value - self._mean[slice_index])

    @property
    def mean(self) -> np.ndarray:
        return self._mean.astype(np.float32)

    @property
    def variance(self) -> np.ndarray:
        c = np.maximum(self.count, 1)[:, None, None]
        return (self._m2 / c).astype(np.float32)

    def rows(self, first: int, last: int) -> dict[str, np.ndarray]:
        """Copies of count, mean and m2 of slices first..last (inclusive)."""
        sl = slice(first, last + 1)
        return {"count": self.count[sl].copy(), "mean": self._mean[sl].copy(), "m2": self._m2[sl].copy()}

    def set_rows(self, first: int, rows: dict[str, np.ndarray]) -> None:
        """Overwrite slices first.. with `rows` (as returned by `rows`)."""
        sl = slice(first, first + len(rows["count"]))
        self.count[sl], self._mean[sl], self._m2[sl] = rows["count"], rows["mean"], rows["m2"]

    def state(self) -> dict[str, np.ndarray]:
        return {"count": self.count.copy(), "mean": self._mean.copy(), "m2": self._m2.copy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "EnsembleStats":
        obj = cls(len(state["count"]), state["mean"].shape[1:])
        obj.count[:] = state["count"]
        obj._mean[:] = state["mean"]
        obj._m2[:] = state["m2"]
        return obj
