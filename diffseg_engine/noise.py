"""Random streams: one independent stream per (seed, case, slice, member).

Owns: `NoiseStreams`. A member's initial x_T and the noise z of every step come from its own Philox stream,
drawn in step order, so results do not depend on batch size, chunking or the order in which members run.
Imports: numpy, hashlib. Must not import anything else of this package.
"""
from __future__ import annotations

import hashlib

import numpy as np


def _case_key(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(case_id.encode("utf-8")).digest()[:8], "little")


class NoiseStreams:
    """`streams.generator(slice_index, member)` -> the np.random.Generator of that ensemble member."""

    def __init__(self, seed: int, case_id: str):
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
        self.seed, self.case_id = int(seed), case_id
        self._case = _case_key(case_id)

    def generator(self, slice_index: int, member: int) -> np.random.Generator:
        ss = np.random.SeedSequence([self.seed, self._case, int(slice_index), int(member)])
        return np.random.Generator(np.random.Philox(ss))


class BatchNoise:
    """The generators of one chunk of work items; `draw()` gives the next [B, 1, h, w] float32 noise."""

    def __init__(self, streams: NoiseStreams, items: list[tuple[int, int]], shape: tuple[int, int]):
        self.gens = [streams.generator(s, m) for s, m in items]
        self.shape = shape
        self._buf = np.empty((len(items), 1, *shape), np.float32)

    def draw(self) -> np.ndarray:
        for i, g in enumerate(self.gens):
            g.standard_normal(dtype=np.float32, out=self._buf[i, 0])
        return self._buf
