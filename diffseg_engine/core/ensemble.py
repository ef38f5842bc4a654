"""Ensemble statistics, streamed: memory does not grow with the number of members.

Owns: `EnsembleStats` (per-slice running mean and variance, Welford, float64, whose rows can be saved and
restored exactly for resuming, and the change of a slice's maps since a saved row: the adaptive stop rule's
measure), `member_probability` (a sampled mask x_0 -> a value in [0, 1]), and the ensemble size a run asks
for: a fixed N or `AutoN` (``--n auto``: its parameters, its member counts at round ends, `ensemble_identity`).
Imports: numpy. Never torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

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

    def row(self, slice_index: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Copies of (count, mean, m2) of one slice: what `change_since` compares against."""
        return int(self.count[slice_index]), self._mean[slice_index].copy(), self._m2[slice_index].copy()

    def change_since(self, slice_index: int, before: tuple[int, np.ndarray, np.ndarray]) -> float:
        """The largest absolute change, over the slice's pixels, of its mean and of its (population) variance
        since `before` (a `row` of the same slice), in float64: max(max |Δmean|, max |Δvariance|)."""
        count0, mean0, m2_0 = before
        var_now = self._m2[slice_index] / max(int(self.count[slice_index]), 1)
        var_then = m2_0 / max(count0, 1)
        return float(max(np.abs(self._mean[slice_index] - mean0).max(initial=0.0),
                         np.abs(var_now - var_then).max(initial=0.0)))

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


#: ``--n auto`` defaults: the first round, the later rounds, the cap and the tolerance (see `AutoN`).
AUTO_N_MIN, AUTO_N_STEP, AUTO_N_MAX, AUTO_N_TOL = 5, 5, 100, 0.01


@dataclass(frozen=True)
class AutoN:
    """``--n auto``: members are drawn in rounds -- `n_min` for every slice first, then `n_step` more per round
    for the slices still drawing -- and a slice stops after a round that changed neither its mean nor its
    variance by `tol` or more at any pixel (`EnsembleStats.change_since` < tol), or at `n_max` members.
    The first check follows the second round, so no slice stops before n_min + n_step members (or n_max).
    tol = 0 never stops early: every slice gets n_max members, the maps of ``--n n_max``."""

    n_max: int = AUTO_N_MAX
    n_min: int = AUTO_N_MIN
    n_step: int = AUTO_N_STEP
    tol: float = AUTO_N_TOL

    def __post_init__(self) -> None:
        for name in ("n_max", "n_min", "n_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        if self.n_min > self.n_max:
            raise ValueError(f"n_min {self.n_min} exceeds n_max {self.n_max}")
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")

    def bounds(self) -> list[int]:
        """Member counts at the end of each round: n_min, n_min + n_step, ..., n_max."""
        out = [self.n_min]
        while out[-1] < self.n_max:
            out.append(min(out[-1] + self.n_step, self.n_max))
        return out

    def describe(self) -> dict:
        return {"n": "auto", "n_min": int(self.n_min), "n_step": int(self.n_step), "n_max": int(self.n_max),
                "n_tol": float(self.tol)}

    def in_pairs(self) -> "AutoN":
        """The schedule a mirrored ensemble runs (members alternate plain, mirrored): n_min and n_step rounded up
        to even counts and n_max down to one (not below n_min), so every round ends, and every slice stops, with
        as many plain as mirrored members. Odd ends would make the stop rule measure how the two views differ
        (a round of 5 adds 3 of one view and 2 of the other) and leave the mean leaning to one view."""
        lo, step = self.n_min + self.n_min % 2, self.n_step + self.n_step % 2
        return AutoN(n_max=max(lo, self.n_max - self.n_max % 2), n_min=lo, n_step=step, tol=self.tol)


#: What a run asks for: N members per slice, or `AutoN`.
EnsembleSize = Union[int, AutoN]


def is_auto(size: EnsembleSize) -> bool:
    return isinstance(size, AutoN)


def max_members(size: EnsembleSize) -> int:
    """The most members any slice can get: N, or n_max."""
    return size.n_max if isinstance(size, AutoN) else int(size)


def round_bounds(size: EnsembleSize) -> list[int]:
    """Member counts at the end of each round: [N] for a fixed size (one round), `AutoN.bounds` else."""
    return size.bounds() if isinstance(size, AutoN) else [int(size)]


def sampled_size(size: EnsembleSize, mirror: bool) -> EnsembleSize:
    """The ensemble size the sampler runs: `AutoN.in_pairs` for ``--n auto`` with mirrored members, else `size`."""
    return size.in_pairs() if mirror and isinstance(size, AutoN) else size


def ensemble_identity(size: EnsembleSize) -> dict:
    """The ensemble size's part of "the same run" (`segment.run_identity`) and of the provenance:
    {"n": N} for a fixed size (as always), {"n": "auto", "n_min", "n_step", "n_max", "n_tol"} for `AutoN`."""
    return size.describe() if isinstance(size, AutoN) else {"n": int(size)}


def describe_size(size: EnsembleSize) -> str:
    """'N=5' or 'N=auto (5+5..100, tol 0.01)', for titles and logs."""
    if isinstance(size, AutoN):
        return f"N=auto ({size.n_min}+{size.n_step}..{size.n_max}, tol {size.tol:g})"
    return f"N={int(size)}"
