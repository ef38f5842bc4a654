"""The torch reference backend: the same step in eager PyTorch (the only runtime module that imports train/).

Owns: `TorchBackend`. Imports: torch, `diffseg_engine.train.step`, `weights`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BackendError, ModelFileError
from ..weights import load_weights
from .base import StepBackend


class TorchBackend(StepBackend):
    name = "torch"

    def __init__(self, step, card, device: str):
        self.step, self.card, self._device = step, card, device

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> "TorchBackend":
        try:
            import torch
        except ImportError:
            raise BackendError("--backend torch needs PyTorch", fix="pip install 'diffseg-engine[train]' "
                               "or use --backend onnxruntime") from None
        from ..train.step import build_step
        path = Path(path)
        if path.suffix == ".onnx":
            raise ModelFileError("the torch backend needs the safetensors weights, not an ONNX file", path=path,
                                 fix="pass the .safetensors file, or use --backend onnxruntime")
        tensors, card = load_weights(path)
        dev = "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"
        return cls(build_step(card, tensors).to(dev), card, dev)

    @property
    def device(self) -> str:
        return self._device

    def infer(self, image, x_t, timestep, coef, noise) -> np.ndarray:
        import torch
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(self._device)
                    for a in (image, x_t, timestep, coef, noise)]
            return self.step(*args).float().cpu().numpy()
