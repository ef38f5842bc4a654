"""The one small interface every runtime implements: a whole denoising step for a batch.

Owns: `StepBackend` (load, allocate, infer) -- the names and shapes of the step graph it runs are
`step_graph.STEP_INPUTS` --, `open_backend` (name -> backend), `read_card` (a model file's card without loading the model) and
`batch_memory_error` (a runtime's out-of-memory failure -> `BatchMemoryError`, which the sampler answers by
halving the chunk). Imports: numpy, `card`, `errors`, `step_graph`, `weights`, `onnx_file`; implementations import their
runtime lazily, so choosing one never loads another.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..card import CARD_KEY, ModelCard
from ..errors import BatchMemoryError, ModelFileError, UsageError
from ..step_graph import STEP_INPUTS, STEP_OUTPUT  # noqa: F401 - re-exported for older call sites


BACKENDS = ("onnxruntime", "torch", "tensorrt")
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
#: What onnxruntime (CPU arena, CUDA, cuBLAS/cuDNN) and torch say when an allocation fails.
_OOM = re.compile(r"failed to allocate memory|bad_alloc|bad allocation|out of memory|OUT_OF_MEMORY|ALLOC_FAILED"
                  r"|cudaErrorMemoryAllocation|can't allocate memory|not enough memory", re.IGNORECASE)


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

    #: True where `device_loop` runs a whole chunk on the device (x_t never leaves it); the sampler then calls
    #: it once per chunk instead of `infer` once per step. CPU paths keep the host loop.
    has_device_loop: bool = False

    def device_loop(self, image: np.ndarray, slices: np.ndarray, members: np.ndarray, coefs: np.ndarray,
                    timesteps: np.ndarray, key: tuple[int, int], on_progress=None) -> np.ndarray:
        """All K steps of one chunk on the device: `image` [B, C, H, W] and the coefficient rows `coefs` [K, 8]
        and `timesteps` [K] (row i = step i, sampled from K-1 down to 0) are uploaded once, x_T and every z
        are drawn there (diffseg-noise/1 under `key`, rows (slices[b], members[b])), and x_0 [B, 1, H, W]
        float32 comes back once. `on_progress(B)` after each step is queued (no host synchronisation)."""
        raise NotImplementedError(f"the {self.name} backend has no device loop")


def batch_memory_error(exc: BaseException, batch: int, backend: str) -> BatchMemoryError | None:
    """The `BatchMemoryError` for `exc` if it is an allocation failure, else None."""
    text = " ".join(str(exc).split())
    found = _OOM.search(text)
    if not (found or isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"):
        return None
    text = (text[found.start():] if found else text)[:120] or type(exc).__name__  # the runtime's own words
    return BatchMemoryError(f"{backend} ran out of memory at batch size {batch} ({text.rstrip('.')})")


def read_card(model: str | Path) -> ModelCard:
    """The card of a .onnx or .safetensors model file, read cheaply (no session, no weights), so that
    `segment` can check its options and inputs before any model is loaded. An ONNX file is also checked here
    (structure, external data, content digest: `onnx_file.inspect_onnx`); safetensors weights are checked
    against the card's sha256 when they are loaded."""
    model = Path(model)
    if not model.exists():
        raise ModelFileError("model file not found", path=model, fix="check the --model path")
    if model.is_dir():
        raise ModelFileError("is a folder", path=model, fix="give the .onnx or .safetensors file itself")
    if model.suffix == ".onnx":
        from ..onnx_file import inspect_onnx
        return inspect_onnx(model).card
    if model.suffix == ".safetensors":
        from ..weights import read_metadata
        meta = read_metadata(model)
        if CARD_KEY not in meta:
            raise ModelFileError("safetensors file has no diffseg model card in its metadata", path=model,
                                 fix="write it with `diffseg-engine train` or `diffseg-engine export`")
        return ModelCard.from_json(meta[CARD_KEY], source=model).require_diffusion(model)
    if model.suffix == ".plan":
        from ..tensorrt_plan import read_sidecar
        return ModelCard.from_json(json.dumps(read_sidecar(model)["card"]), source=model).require_diffusion(model)
    if model.suffix in (".pt", ".pth"):
        raise ModelFileError("is a PyTorch checkpoint; segment runs .onnx or .safetensors models", path=model,
                             fix="convert it with `diffseg-engine export FILE` (it is never unpickled unless you "
                                 "add --trust-pickle there)")
    raise ModelFileError("is not a model file this engine runs", path=model,
                         fix="give a .onnx or .safetensors file written by diffseg-engine")


def open_backend(name: str, model: str | Path, *, device: str = "auto", threads: int = 0) -> StepBackend:
    """Open `model` (.onnx or .safetensors; for "tensorrt" a .plan, or an .onnx whose cached plan is built
    on first use) on backend `name` ("onnxruntime" | "torch" | "tensorrt").

    threads: CPU threads of the runtime (0: `host.usable_cpus()`, the CPUs this process may use).

    device: "auto" (CUDA where it works, else CPU), "cpu", "cuda" or "cuda:N"; anything else is a UsageError
    (it would otherwise run on the CPU silently)."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise UsageError(f"unknown --device {device!r}", fix="use auto, cpu, cuda or cuda:N")
    if name == "onnxruntime":
        from .ort import OnnxRuntimeBackend
        return OnnxRuntimeBackend.load(model, device=device, threads=threads)
    if name == "torch":
        from .torch_ref import TorchBackend
        return TorchBackend.load(model, device=device, threads=threads)
    if name == "tensorrt":
        if device == "cpu":
            raise UsageError("--backend tensorrt runs only on an NVIDIA GPU", fix="use --device auto or cuda[:N]")
        from .tensorrt import TensorRTBackend
        return TensorRTBackend.load(model, device=device)
    raise UsageError(f"unknown backend {name!r}", fix=f"choose one of {', '.join(BACKENDS)}")
