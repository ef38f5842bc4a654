"""The step loop of one chunk: a chunk of (slice, member) work items through all K timesteps.

Owns: `ChunkFn` (the signature every backend's `run_chunk` has and `sampling.sampler.sample_ensemble` calls),
`host_loop` (the loop on the host: one one-step call per timestep, x_T and each z drawn from the Philox streams,
`noise.BatchNoise`) and `host_runner` (a one-step function made into a `ChunkFn`). Imports: numpy; `noise`. Never torch.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .noise import BatchNoise


class StepFn(Protocol):
    """One denoising step (network + update): returns x_prev [B, 1, H, W] float32."""

    def __call__(self, image: np.ndarray, x_t: np.ndarray, timestep: np.ndarray, coef: np.ndarray,
                 noise: np.ndarray) -> np.ndarray: ...


class NoiseSource(Protocol):
    """`draw()` -> the next [B, 1, h, w] float32 array: x_T first, then one z per step in sampling order (the
    last step's z is drawn and multiplied by 0)."""

    def draw(self) -> np.ndarray: ...


class ChunkFn(Protocol):
    """All K steps of one chunk: `image` [B, C, H, W] float32, the work items' stream rows `slices` [B] and
    `members` [B], the coefficient rows `coefs` [K, 8] and network timesteps `timesteps` [K] (row i = step i,
    sampled from K-1 down to 0), the Philox `key` of the case; returns x_0 [B, 1, H, W] float32.
    `on_progress(B)` after each step. Raises `BatchMemoryError` when the chunk does not fit."""

    def __call__(self, image: np.ndarray, slices: np.ndarray, members: np.ndarray, coefs: np.ndarray,
                 timesteps: np.ndarray, key: tuple[int, int],
                 on_progress: Callable[[int], None] | None = None) -> np.ndarray: ...


#: Makes the noise source of one chunk from its work items [(slice id, member)] and (h, w).
NoiseFactory = Callable[[list[tuple[int, int]], tuple[int, int]], NoiseSource]


def host_loop(step: StepFn, image: np.ndarray, slices: np.ndarray, members: np.ndarray, coefs: np.ndarray,
              timesteps: np.ndarray, key: tuple[int, int], on_progress: Callable[[int], None] | None = None, *,
              noise: NoiseSource | None = None) -> np.ndarray:
    """A `ChunkFn` on the host: `step` once per timestep, x_t back on the host after each. `noise` replaces
    the Philox streams of (slices[b], members[b]) under `key` (tests feed recorded draws through it)."""
    B, K = len(image), len(coefs)
    if noise is None:
        noise = BatchNoise(key, list(zip((int(s) for s in slices), (int(m) for m in members))), image.shape[2:])
    x = noise.draw().copy()  # x_T ~ N(0, I)
    for i in range(K - 1, -1, -1):
        coef = np.broadcast_to(coefs[i], (B, coefs.shape[1]))
        t = np.full(B, timesteps[i], np.float32)
        z = noise.draw()
        x = step(image, x, t, coef, z)  # network + update, one engine call
        if on_progress:
            on_progress(B)
    return x


def host_runner(step: StepFn, noise_factory: NoiseFactory | None = None) -> ChunkFn:
    """`host_loop` over `step` as a `ChunkFn`; `noise_factory(items, (h, w))`, if given, makes each chunk's
    source of x_T and z from its work items [(slice id, member)] instead of the Philox streams."""
    def run(image, slices, members, coefs, timesteps, key, on_progress=None):
        noise = None
        if noise_factory is not None:
            noise = noise_factory([(int(s), int(m)) for s, m in zip(slices, members)], tuple(image.shape[2:]))
        return host_loop(step, image, slices, members, coefs, timesteps, key, on_progress, noise=noise)
    return run
