"""The torch reference backend: the same step in eager PyTorch (the only runtime module that imports train/).

Owns: `TorchBackend` (and turning torch's out-of-memory errors into `BatchMemoryError`). Imports: torch,
`diffseg_engine.train.step`, `weights`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendError, ModelFileError
from ..weights import load_weights
from .base import StepBackend, batch_memory_error


class TorchBackend(StepBackend):
    name = "torch"

    def __init__(self, step, card, device: str, path: Path | None = None):
        self.step, self.card, self._device, self.path = step, card, device, path

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", threads: int = 0) -> "TorchBackend":
        try:
            import torch
        except ImportError:
            raise BackendError("--backend torch needs PyTorch", fix="pip install 'diffseg-engine[train]' "
                               "or use --backend onnxruntime") from None
        from ..host import usable_cpus
        torch.set_num_threads(threads or usable_cpus())
        from ..train.step import build_step
        path = Path(path)
        if path.suffix == ".onnx":
            raise ModelFileError("the torch backend needs the safetensors weights, not an ONNX file", path=path,
                                 fix="pass the .safetensors file, or use --backend onnxruntime")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"--device {device}: PyTorch has no usable CUDA device here",
                               fix="install a CUDA build of torch, or use --device cpu")
        tensors, card = load_weights(path)
        dev = device if device.startswith("cuda") else "cuda" if device == "auto" and torch.cuda.is_available() \
            else "cpu"
        return cls(build_step(card, tensors).to(dev), card, dev, path)

    @property
    def device(self) -> str:
        return self._device

    def infer(self, image, x_t, timestep, coef, noise) -> np.ndarray:
        import torch
        try:
            with torch.inference_mode():
                args = [torch.from_numpy(np.require(a, np.float32, ("C", "W"))).to(self._device)  # W: no read-only
                        for a in (image, x_t, timestep, coef, noise)]
                return self.step(*args).float().cpu().numpy()
        except Exception as exc:  # torch.cuda.OutOfMemoryError, or the CPU allocator's RuntimeError
            oom = batch_memory_error(exc, len(x_t), self.name)
            if oom is None:
                raise
        if self._device.startswith("cuda"):
            torch.cuda.empty_cache()  # give the failed batch's blocks back before the sampler retries smaller
        raise oom
