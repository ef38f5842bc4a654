"""The runtimes of the step graph and their registry: `open_backend` (name -> backend), `read_card`, `BACKENDS`.

Imports: `artifacts`, `base`, `core`, `ort` (lazily), `tensorrt` (lazily), `torch_ref` (lazily). Never torch.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..artifacts.card import CARD_KEY, ModelCard
from ..core.errors import ModelFileError, UsageError
from .base import BACKENDS, DEVICE_PATTERN, StepBackend, batch_memory_error

__all__ = ["BACKENDS", "DEVICE_PATTERN", "StepBackend", "batch_memory_error", "open_backend", "read_card"]


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
        from ..artifacts.onnx_file import inspect_onnx
        return inspect_onnx(model).card
    if model.suffix == ".safetensors":
        from ..artifacts.weights import read_metadata
        meta = read_metadata(model)
        if CARD_KEY not in meta:
            raise ModelFileError("safetensors file has no diffseg model card in its metadata", path=model,
                                 fix="write it with `diffseg-engine train` or `diffseg-engine export`")
        return ModelCard.from_json(meta[CARD_KEY], source=model).require_diffusion(model)
    if model.suffix == ".plan":
        from ..artifacts.tensorrt_plan import read_sidecar
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
