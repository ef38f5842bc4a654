"""The TensorRT backend: a plan of the step graph, device buffers from cuda-bindings, CUDA-graph replay.

Owns: `TensorRTBackend` — load (the plan's sidecar checked by `artifacts.tensorrt_plan.check_plan` before any
TensorRT runtime object exists; an .onnx model is built into the plan cache on first use), `allocate` (device
buffers of the shapes `artifacts.step_graph` defines), `infer` (one step from host arrays) and `run_chunk`
(a whole chunk on the GPU: noise from the `sampling.noise_device` CUDA kernel, one captured CUDA graph per
direction replayed per step, x_0 downloaded once). Imports: cuda-bindings (lazily), numpy; `artifacts.card`, `artifacts.step_graph`, `artifacts.tensorrt_plan`, `base`, `core.errors`, `sampling.noise_device` (lazily). Never torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..artifacts.card import ModelCard
from ..core.errors import BackendError, BatchMemoryError, ModelFileError
from ..artifacts.step_graph import NUM_COEFS, STEP_INPUTS, STEP_OUTPUT, input_shapes, output_shape
from ..artifacts.tensorrt_plan import check_plan, ensure_plan, trt_module
from .base import StepBackend


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def _ok(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        if "MemoryAllocation" in str(err):
            raise BatchMemoryError(f"tensorrt ran out of memory ({what}: {err})")
        raise BackendError(f"CUDA: {what} failed ({err})", fix="check the NVIDIA driver and cuda-bindings")
    return rest[0] if len(rest) == 1 else (rest or None)


class TensorRTBackend(StepBackend):
    name = "tensorrt"

    def __init__(self, engine, side: dict, path: Path, device_index: int, trt):
        self.trt, self.engine, self.side, self.path, self.index = trt, engine, side, path, device_index
        self.card = ModelCard.from_json(json.dumps(side["card"]), source=path)
        self.context = engine.create_execution_context()
        self.cudart = _cudart()
        self.stream = _ok(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.max_batch = int(side["profile"]["max"])
        self._buffers: dict[str, int] = {}
        self._batch = 0
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if names != [*STEP_INPUTS, STEP_OUTPUT]:
            raise ModelFileError(f"TensorRT plan has tensors {names}, expected the step graph", path=path,
                                 fix="rebuild it with `diffseg-engine export MODEL --engine tensorrt`")

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", max_batch: int | None = None) -> "TensorRTBackend":
        path = Path(path)
        index = int(device.split(":")[1]) if ":" in device else 0
        if path.suffix == ".onnx":
            from ..artifacts.tensorrt_plan import DEFAULT_MAX_BATCH
            path, _ = ensure_plan(path, max_batch=max_batch or DEFAULT_MAX_BATCH, device_index=index)
        elif path.suffix != ".plan":
            raise ModelFileError("the TensorRT backend runs a .plan (or builds one from an .onnx step graph)",
                                 path=path, fix="export it with `diffseg-engine export MODEL --engine tensorrt`")
        side = check_plan(path, device_index=index)  # refusals, and a CUDA device, before any runtime object
        trt = trt_module(side["tensorrt"]["module"])
        _ok(_cudart().cudaSetDevice(index), "cudaSetDevice")
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ModelFileError("TensorRT could not deserialise this plan", path=path,
                                 fix=f"rebuild it: diffseg-engine export {side.get('onnx', 'MODEL')} --engine tensorrt")
        obj = cls(engine, side, path, index, trt)
        obj._runtime = runtime  # keeps the runtime alive as long as its engine
        return obj

    @property
    def device(self) -> str:
        return f"cuda:{self.index} ({(self.side.get('gpu') or {}).get('name') or 'TensorRT'})"

    # ---- buffers ----------------------------------------------------------------------------------------
    def allocate(self, max_batch: int) -> None:
        """Device buffers for batches up to min(max_batch, the plan's profile maximum)."""
        batch = min(int(max_batch), self.max_batch)
        if batch <= self._batch:
            return
        self._free()
        sizes = {name: int(np.prod(shape)) for name, shape in self._item_shapes().items()}
        for name, per_item in sizes.items():
            self._buffers[name] = int(_ok(self.cudart.cudaMalloc(4 * per_item * batch), f"cudaMalloc {name}"))
        self._batch = batch

    def _free(self) -> None:
        for ptr in self._buffers.values():
            self.cudart.cudaFree(ptr)
        self._buffers.clear()
        self._batch = 0

    def __del__(self):  # pragma: no cover - GPU only
        try:
            self._free()
        except Exception:
            pass

    def _item_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape without the batch axis (`artifacts.step_graph`), the output's included."""
        return {**input_shapes(len(self.card.modalities), self.card.image_size),
                STEP_OUTPUT: output_shape(self.card.image_size)}

    def _bind(self, batch: int, x_in: int, x_out: int) -> None:
        for name, shape in input_shapes(len(self.card.modalities), self.card.image_size).items():
            self.context.set_input_shape(name, (batch, *shape))
        for name in ("image", "timestep", "coef", "noise"):
            self.context.set_tensor_address(name, self._buffers[name])
        self.context.set_tensor_address("x_t", x_in)
        self.context.set_tensor_address(STEP_OUTPUT, x_out)

    def _upload(self, name: str, array: np.ndarray, offset: int = 0) -> None:
        a = np.ascontiguousarray(array, np.float32)
        _ok(self.cudart.cudaMemcpyAsync(self._buffers[name] + offset, a.ctypes.data, a.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), "upload")
        _ok(self.cudart.cudaStreamSynchronize(self.stream), "sync")  # `a` may be freed after this returns

    # ---- one step -----------------------------------------------------------------------------------------
    def infer(self, image, x_t, timestep, coef, noise) -> np.ndarray:
        B = len(x_t)
        if B > self.max_batch:
            raise BatchMemoryError(f"tensorrt plan's profile allows batch {self.max_batch}, asked {B}")
        self.allocate(B)
        for name, a in (("image", image), ("x_t", x_t), ("timestep", timestep), ("coef", coef), ("noise", noise)):
            self._upload(name, a)
        self._bind(B, self._buffers["x_t"], self._buffers[STEP_OUTPUT])
        if not self.context.execute_async_v3(self.stream):
            raise BackendError("TensorRT execution failed", fix="see TensorRT's messages above")
        out = np.empty((B, *output_shape(self.card.image_size)), np.float32)
        _ok(self.cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[STEP_OUTPUT], out.nbytes,
                                        self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), "download")
        _ok(self.cudart.cudaStreamSynchronize(self.stream), "sync")
        return out

    # ---- a whole chunk on the device ---------------------------------------------------------------------
    def run_chunk(self, image, slices, members, coefs, timesteps, key, on_progress=None) -> np.ndarray:
        from ..sampling.noise_device import CudaNoise
        cu = self.cudart
        B, K = len(image), len(coefs)
        if B > self.max_batch:
            raise BatchMemoryError(f"tensorrt plan's profile allows batch {self.max_batch}, asked {B}")
        self.allocate(B)
        n = int(np.prod(output_shape(self.card.image_size)))
        self._upload("image", image)
        # all K coefficient rows and timesteps, broadcast over the batch, uploaded once
        table = _ok(cu.cudaMalloc(4 * K * B * (NUM_COEFS + 1)), "cudaMalloc coefficients")
        rows = _ok(cu.cudaMalloc(8 * B), "cudaMalloc rows")
        x_b = _ok(cu.cudaMalloc(4 * B * n), "cudaMalloc x")
        try:
            host = np.concatenate([np.broadcast_to(coefs[:, None, :], (K, B, NUM_COEFS)),
                                   np.broadcast_to(timesteps[:, None, None], (K, B, 1))], axis=2)
            coef_t = np.ascontiguousarray(host[:, :, :NUM_COEFS], np.float32)  # [K, B, 8]
            time_t = np.ascontiguousarray(host[:, :, NUM_COEFS], np.float32)   # [K, B]
            rows_h = np.ascontiguousarray(np.stack([slices, members], 1), np.uint32)
            for dst, a in ((int(table), coef_t), (int(table) + coef_t.nbytes, time_t), (int(rows), rows_h)):
                _ok(cu.cudaMemcpy(dst, a.ctypes.data, a.nbytes, cu.cudaMemcpyKind.cudaMemcpyHostToDevice), "upload")
            cc = (self.side.get("gpu") or {}).get("compute_capability")
            if cc is None:
                prop = _ok(cu.cudaGetDeviceProperties(self.index), "cudaGetDeviceProperties")
                cc = f"{prop.major}.{prop.minor}"
            noise = CudaNoise(key, int(rows), B, n, cc)
            xs = (self._buffers["x_t"], int(x_b))
            graphs = [self._capture(B, xs[j], xs[1 - j]) for j in (0, 1)]  # (their warm-up calls write x)
            noise.draw(xs[0], self.stream)  # x_T, draw 0
            d2d = cu.cudaMemcpyKind.cudaMemcpyDeviceToDevice
            for k, i in enumerate(range(K - 1, -1, -1)):
                _ok(cu.cudaMemcpyAsync(self._buffers["coef"], int(table) + 4 * NUM_COEFS * B * i, 4 * NUM_COEFS * B, d2d,
                                       self.stream), "coef row")
                _ok(cu.cudaMemcpyAsync(self._buffers["timestep"], int(table) + coef_t.nbytes + 4 * B * i, 4 * B,
                                       d2d, self.stream), "timestep row")
                noise.draw(self._buffers["noise"], self.stream)
                graph = graphs[k % 2]
                if graph is not None:
                    _ok(cu.cudaGraphLaunch(graph, self.stream), "cudaGraphLaunch")
                else:
                    self._bind(B, xs[k % 2], xs[1 - k % 2])
                    if not self.context.execute_async_v3(self.stream):
                        raise BackendError("TensorRT execution failed", fix="see TensorRT's messages above")
                if on_progress:
                    on_progress(B)
            out = np.empty((B, *output_shape(self.card.image_size)), np.float32)
            _ok(cu.cudaMemcpyAsync(out.ctypes.data, xs[K % 2], out.nbytes,
                                   cu.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), "download")
            _ok(cu.cudaStreamSynchronize(self.stream), "sync")
            for g in graphs:
                if g is not None:
                    cu.cudaGraphExecDestroy(g)
            return out
        finally:
            for ptr in (table, rows, x_b):
                cu.cudaFree(ptr)

    def _capture(self, batch: int, x_in: int, x_out: int):
        """A CUDA graph of one engine call reading x_in and writing x_out, or None where capture fails (the
        loop then enqueues the engine directly)."""
        cu = self.cudart
        self._bind(batch, x_in, x_out)
        if not self.context.execute_async_v3(self.stream):  # the first call after a shape change: outside capture
            raise BackendError("TensorRT execution failed", fix="see TensorRT's messages above")
        try:
            _ok(cu.cudaStreamBeginCapture(self.stream, cu.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
                "cudaStreamBeginCapture")
            self.context.execute_async_v3(self.stream)
            graph = _ok(cu.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            return _ok(cu.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except BackendError:
            return None
