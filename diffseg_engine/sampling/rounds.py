"""The order of a run's work items, round by round, and the per-slice stop decisions of ``--n auto``.

Owns: `Rounds`. A run draws its members in rounds: round r gives every slice still drawing the members
bounds[r-1]..bounds[r]-1 (`ensemble.round_bounds`), slice-major and member-minor, so each slice's members are
folded into the statistics in member order. A fixed N is one round of all slices: (s, m) for every slice s
and member m < N, slice-major, the order the sampler always had. With `AutoN`, after every round from the second on each slice of the
round is checked (`EnsembleStats.change_since` its value at the round's start, < tol: it stops); the next
round holds the slices that did not stop. Work items are numbered globally in the order they run, so a
resumed run continues at the same item. Since member m of slice s draws its noise from stream (s, m) and a
slice's decision depends on its own members only, neither the rounds, the chunking nor the batch size change
a slice's maps: a slice that stopped at k members has the maps of a fixed-N = k run.
`state` / `restore` hold what a resume needs beyond the statistics (round, its first item, the slices of the
round, those already found to have converged, and the round-start row of a slice whose members of the round
are split by a chunk's end); `restore` checks it against the statistics.
Imports: numpy; `core.ensemble`. Never torch.
"""
from __future__ import annotations

import numpy as np

from ..core.ensemble import EnsembleSize, EnsembleStats, is_auto, round_bounds


class Rounds:
    """Where a run stands: round `round` (0-based) over the slices in `active`, started at global work item
    `round_lo`. Call `items()` for the round's work items, `before_add` / `after_add` around folding each
    member, `next_round(next_item)` when the round's items are done."""

    def __init__(self, num_slices: int, size: EnsembleSize):
        self.size = size
        self.num_slices = int(num_slices)
        self.bounds = [0, *round_bounds(size)]  # member counts at the start of round 0, end of round 0, ...
        self.tol = float(size.tol) if is_auto(size) else None
        self.round = 0
        self.round_lo = 0
        self.active = np.ones(self.num_slices, bool)
        self.converged = np.zeros(self.num_slices, bool)  # slices of this round that stop after it
        self.open: tuple[int, tuple[int, np.ndarray, np.ndarray]] | None = None  # (slice, its round-start row)
        self.last_rows = (0, -1)  # first and last slice the latest chunk touched

    # ---- the schedule ---------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.round >= len(self.bounds) - 1 or not self.active.any()

    @property
    def members(self) -> tuple[int, int]:
        """The member range [lo, hi) of this round."""
        return self.bounds[self.round], self.bounds[self.round + 1]

    @property
    def checks(self) -> bool:
        """Whether this round ends with a stop check: auto runs, from the second round on, unless it is the last."""
        return self.tol is not None and self.round >= 1 and self.round + 2 < len(self.bounds)

    def items(self) -> list[tuple[int, int]]:
        """This round's work items (slice position, member), slice-major."""
        lo, hi = self.members
        return [(int(s), m) for s in np.flatnonzero(self.active) for m in range(lo, hi)]

    def planned_items(self, next_item: int) -> int:
        """Work items done plus the most still to come (slices that stop shorten it)."""
        lo, hi = self.members
        if self.finished:
            return next_item
        left_now = self.round_lo + int(self.active.sum()) * (hi - lo) - next_item
        may_go_on = int((self.active & ~self.converged).sum())
        return next_item + left_now + may_go_on * (self.bounds[-1] - hi)

    # ---- around each member ---------------------------------------------------------------------------
    def before_add(self, slice_index: int, member: int, stats: EnsembleStats) -> None:
        if self.checks and member == self.members[0]:
            self.open = (slice_index, stats.row(slice_index))

    def after_add(self, slice_index: int, member: int, stats: EnsembleStats) -> None:
        if self.checks and member == self.members[1] - 1:
            if self.open is None or self.open[0] != slice_index:
                raise RuntimeError(f"slice {slice_index} ended its round without its round-start row")
            if stats.change_since(slice_index, self.open[1]) < self.tol:
                self.converged[slice_index] = True
            self.open = None

    def next_round(self, next_item: int) -> None:
        """Start the next round at global work item `next_item`: without the slices that converged."""
        if self.open is not None:
            raise RuntimeError("a round ended with a slice half done")
        self.active &= ~self.converged
        self.converged[:] = False
        self.round += 1
        self.round_lo = int(next_item)

    # ---- resuming -------------------------------------------------------------------------------------
    def state(self, stats: EnsembleStats) -> dict[str, np.ndarray]:
        """Small arrays that, with the statistics, let `restore` continue exactly here."""
        shape = stats.mean.shape[1:]
        open_slice, (c, m, m2) = self.open if self.open is not None else (-1, (0, np.zeros(shape), np.zeros(shape)))
        return {"round": np.int64(self.round), "round_lo": np.int64(self.round_lo), "active": self.active.copy(),
                "converged": self.converged.copy(), "open_slice": np.int64(open_slice), "open_count": np.int64(c),
                "open_mean": np.asarray(m, np.float64), "open_m2": np.asarray(m2, np.float64),
                "count": stats.count.copy()}

    @classmethod
    def restore(cls, num_slices: int, size: EnsembleSize, state: dict[str, np.ndarray], stats: EnsembleStats,
                next_item: int) -> "Rounds":
        """The schedule saved by `state`, checked against `stats` after `next_item` work items: ValueError
        (saying what does not fit) unless every slice's count is what this schedule gives."""
        r = cls(num_slices, size)
        try:
            r.round, r.round_lo = int(state["round"]), int(state["round_lo"])
            r.active = np.asarray(state["active"], bool).copy()
            r.converged = np.asarray(state["converged"], bool).copy()
            open_slice = int(state["open_slice"])
            if open_slice >= 0:
                r.open = (open_slice, (int(state["open_count"]), np.asarray(state["open_mean"], np.float64).copy(),
                                       np.asarray(state["open_m2"], np.float64).copy()))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"schedule state incomplete ({exc})") from None
        if r.active.shape != (r.num_slices,) or r.converged.shape != (r.num_slices,):
            raise ValueError("schedule state is for another number of slices")
        if not 0 <= r.round < len(r.bounds) - 1 or not r.active.any():
            raise ValueError(f"round {r.round} does not exist for this ensemble size")
        lo, hi = r.members
        done = int(next_item) - r.round_lo
        if not 0 <= done <= int(r.active.sum()) * (hi - lo):
            raise ValueError(f"work item {next_item} lies outside round {r.round}")
        want = stats.count.copy()
        positions = np.flatnonzero(r.active)
        want[positions] = lo + np.clip(done - np.arange(len(positions)) * (hi - lo), 0, hi - lo)
        ended = set(r.bounds[2:r.round + 1]) if is_auto(size) else set()  # where a slice may have stopped
        stopped = ~r.active
        if not (np.array_equal(stats.count[r.active], want[r.active])
                and all(int(c) in ended for c in stats.count[stopped])):
            raise ValueError(f"the member counts do not fit round {r.round} after work item {next_item}")
        if r.converged[~r.active].any():
            raise ValueError("a slice outside the round is marked converged")
        mid = done % (hi - lo) if done < len(positions) * (hi - lo) else 0
        expect_open = int(positions[done // (hi - lo)]) if (r.checks and mid) else -1
        if (r.open[0] if r.open is not None else -1) != expect_open:
            raise ValueError("the round-start row of the slice being sampled is missing")
        return r
