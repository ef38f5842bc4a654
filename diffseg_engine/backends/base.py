"""The one small interface every runtime implements: a whole denoising step for a batch.

Owns: `StepBackend` (load, allocate, infer), `STEP_INPUTS` (names and shapes of the step graph), and
`open_backend` (name -> backend). Imports: numpy, `card`, `errors`; implementations import their runtime
lazily, so choosing one never loads another.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..card import ModelCard
from ..errors import BackendError, UsageError

#: Inputs of the step graph, in order: name -> shape (B = batch, C = modalities, H = W = image size).
STEP_INPUTS = {
    "image": "[B, C, H, W] float32",
    "x_t": "[B, 1, H, W] float32",
    "timestep": "[B] float32",
    "coef": "[B, 8] float32 (schedule.COEF_NAMES)",
    "noise": "[B, 1, H, W] float32",
}
STEP_OUTPUT = "x_prev"

BACKENDS = ("onnxruntime", "torch")


class StepBackend(ABC):
    """load (in the constructor) -> allocate(max_batch) -> infer(...) once per timestep per chunk."""

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


def open_backend(name: str, model: str | Path, *, device: str = "auto") -> StepBackend:
    """Open `model` (.onnx or .safetensors) on backend `name` ("onnxruntime" | "torch").

    device: "auto" (CUDA where it works, else CPU), "cpu", "cuda" or "cuda:N"; anything else is a UsageError
    (it would otherwise run on the CPU silently)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"unknown --device {device!r}", fix="use auto, cpu, cuda or cuda:N")
    if name == "onnxruntime":
        from .ort import OnnxRuntimeBackend
        return OnnxRuntimeBackend.load(model, device=device)
    if name == "torch":
        from .torch_ref import TorchBackend
        return TorchBackend.load(model, device=device)
    if name == "tensorrt":
        raise BackendError("the TensorRT backend is not available in this version",
                           fix="use --backend onnxruntime (its CUDA provider runs on NVIDIA GPUs)")
    raise UsageError(f"unknown backend {name!r}", fix=f"choose one of {', '.join(BACKENDS)}")
