"""The torch reference backend: the same step in eager PyTorch.

Owns: `TorchBackend` (torch's out-of-memory errors -> `BatchMemoryError`) and its `run_chunk`: on CUDA the
device loop (image and coefficient rows uploaded once, noise from `sampling.noise_device.TorchNoise`, each step
replayed from a captured CUDA graph, x_0 back once), on the CPU the host loop. Imports: numpy, torch (lazily); `artifacts.weights`, `base`, `core.errors`, `core.host` (lazily), `sampling.noise_device` (lazily), `train.step` (lazily).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import BackendError, ModelFileError
from ..artifacts.weights import load_weights
from .base import StepBackend, batch_memory_error


class TorchBackend(StepBackend):
    name = "torch"

    def __init__(self, step, card, device: str, path: Path | None = None, cuda_graphs: bool = True):
        self.step, self.card, self._device, self.path = step, card, device, path
        self.cuda_graphs = cuda_graphs

    @property
    def has_device_loop(self) -> bool:  # type: ignore[override]
        return self._device.startswith("cuda")

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", threads: int = 0,
             precision: str = "fp32") -> "TorchBackend":
        """precision: fp32, or fp16/bf16 for the convolutions and matmuls (`train.step.half_precision_step`:
        the same mixed-precision step that `export --precision` writes). threads: 0 = `host.usable_cpus()`."""
        try:
            import torch
        except ImportError:
            raise BackendError("--backend torch needs PyTorch", fix="pip install 'diffseg-engine[train]' "
                               "or use --backend onnxruntime") from None
        from ..core.host import usable_cpus
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
        step = build_step(card, tensors)
        if precision != "fp32":
            from ..train.step import half_precision_step
            step = half_precision_step(step, precision)
        return cls(step.to(dev), card, dev, path)

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

    def run_chunk(self, image, slices, members, coefs, timesteps, key, on_progress=None) -> np.ndarray:
        """The device loop on CUDA, the host loop on the CPU."""
        if not self.has_device_loop:
            return super().run_chunk(image, slices, members, coefs, timesteps, key, on_progress)
        return self.device_loop(image, slices, members, coefs, timesteps, key, on_progress)

    def device_loop(self, image, slices, members, coefs, timesteps, key, on_progress=None) -> np.ndarray:
        """All K steps with x_t kept on the torch device (on the CPU too, for tests)."""
        import torch
        try:
            with torch.inference_mode():
                return self._device_loop(torch, image, slices, members, coefs, timesteps, key, on_progress)
        except Exception as exc:
            oom = batch_memory_error(exc, len(image), self.name)
            if oom is None:
                raise
        if self._device.startswith("cuda"):
            torch.cuda.empty_cache()
        raise oom

    def _device_loop(self, torch, image, slices, members, coefs, timesteps, key, on_progress):
        from ..sampling.noise_device import TorchNoise
        dev = torch.device(self._device)
        B, K = len(image), len(coefs)
        img = torch.from_numpy(np.require(image, np.float32, ("C", "W"))).to(dev)
        coef_rows = torch.from_numpy(np.require(coefs, np.float32, ("C", "W"))).to(dev)     # [K, 8], once
        t_rows = torch.from_numpy(np.require(timesteps, np.float32, ("C", "W"))).to(dev)     # [K], once
        noise = TorchNoise(key, slices, members, tuple(image.shape[2:]), dev)
        x = noise.draw()  # x_T: draw 0
        # own buffers (clone, not contiguous(): at B = 1 an expanded row is already contiguous and the in-place
        # copies below would write into coef_rows, which on the CPU shares memory with the caller's plan)
        coef = coef_rows[K - 1].expand(B, -1).clone()
        t = t_rows[K - 1].expand(B).clone()
        z = torch.empty_like(x)
        graph = out = None
        if dev.type == "cuda" and self.cuda_graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(img, x.clone(), t, coef, z)  # warm-up outside the capture (cuDNN plans, allocator)
            torch.cuda.current_stream().wait_stream(side)
            x_in = x.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.step(img, x_in, t, coef, z)
            x_in.copy_(x)
        for i in range(K - 1, -1, -1):
            coef.copy_(coef_rows[i].expand(B, -1))
            t.copy_(t_rows[i].expand(B))
            noise.draw(out=z)
            if graph is not None:
                graph.replay()
                x_in.copy_(out)
            else:
                x = self.step(img, x, t, coef, z)
            if on_progress:
                on_progress(B)
        return (x_in if graph is not None else x).float().cpu().numpy()
