"""The contract every runtime implements: `StepBackend` runs a chunk through all timesteps.

Owns: `StepBackend` (load in the constructor, `allocate`, `infer` one step, `run_chunk` a whole chunk: by
default `core.steps.host_loop` over `infer`; a runtime with a device loop overrides it), `BACKENDS`,
`DEVICE_PATTERN` and `batch_memory_error`. Imports: numpy; `artifacts.card`, `core.errors`, `core.steps`. Never torch.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from ..artifacts.card import ModelCard
from ..core.errors import BatchMemoryError
from ..core.steps import host_loop


BACKENDS = ("onnxruntime", "torch", "tensorrt")
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
#: What onnxruntime (CPU arena, CUDA, cuBLAS/cuDNN) and torch say when an allocation fails.
_OOM = re.compile(r"failed to allocate memory|bad_alloc|bad allocation|out of memory|OUT_OF_MEMORY|ALLOC_FAILED"
                  r"|cudaErrorMemoryAllocation|can't allocate memory|not enough memory", re.IGNORECASE)


class StepBackend(ABC):
    """load (in the constructor) -> allocate(max_batch) -> run_chunk(...) once per chunk."""

    name: str = "?"
    card: ModelCard

    @property
    @abstractmethod
    def device(self) -> str:
        """Where the network really runs, e.g. "cpu" or "cuda:0 (NVIDIA H100)"."""

    def allocate(self, max_batch: int) -> None:  # noqa: B027 - optional phase
        """Prepare for batches up to `max_batch` (no-op where the runtime allocates lazily)."""

    @abstractmethod
    def infer(self, image: np.ndarray, x_t: np.ndarray, timestep: np.ndarray, coef: np.ndarray,
              noise: np.ndarray) -> np.ndarray:
        """One step: returns x_prev [B, 1, H, W] float32."""

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device}

    def run_chunk(self, image: np.ndarray, slices: np.ndarray, members: np.ndarray, coefs: np.ndarray,
                  timesteps: np.ndarray, key: tuple[int, int],
                  on_progress: Callable[[int], None] | None = None) -> np.ndarray:
        """All K steps of one chunk (`core.steps.ChunkFn`): x_T and every z of item b from stream
        (slices[b], members[b]) under `key`; returns x_0 [B, 1, H, W] float32. Here the host loop, one
        `infer` per step; a runtime that keeps x_t on its device overrides this."""
        return host_loop(self.infer, image, slices, members, coefs, timesteps, key, on_progress)


def batch_memory_error(exc: BaseException, batch: int, backend: str) -> BatchMemoryError | None:
    """The `BatchMemoryError` for `exc` if it is an allocation failure, else None."""
    text = " ".join(str(exc).split())
    found = _OOM.search(text)
    if not (found or isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"):
        return None
    text = (text[found.start():] if found else text)[:120] or type(exc).__name__  # the runtime's own words
    return BatchMemoryError(f"{backend} ran out of memory at batch size {batch} ({text.rstrip('.')})")
