"""The onnxruntime backend: the exported step graph (network + fused update) on CPU or CUDA.

Owns: `OnnxRuntimeBackend` (the session, checked by `artifacts.onnx_file.inspect_onnx` first; a requested
CUDA provider that is not really active is refused; allocation failures -> `BatchMemoryError`) and its
`run_chunk`: on the CUDA provider with cuda-bindings a device loop (IO binding, noise from
`sampling.noise_device`), else the host loop. Imports: cuda-bindings (lazily), numpy, onnxruntime (lazily); `artifacts`, `base`, `core`, `sampling` (lazily). Never torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts.card import CARD_KEY, ModelCard
from ..core.errors import BackendError, ModelFileError
from ..core.host import usable_cpus
from ..artifacts.onnx_file import inspect_onnx
from ..artifacts.step_graph import STEP_INPUTS, STEP_OUTPUT
from .base import StepBackend, batch_memory_error


def read_onnx_card(path: str | Path) -> ModelCard:
    """The model card stored in an ONNX file's metadata_props (no onnx package, no session needed)."""
    return inspect_onnx(path).card


def _card_of(sess, path: Path) -> ModelCard:
    meta = sess.get_modelmeta().custom_metadata_map
    if CARD_KEY not in meta:
        raise ModelFileError("ONNX model has no diffseg model card in its metadata", path=path,
                             fix="export it with `diffseg-engine export`")
    return ModelCard.from_json(meta[CARD_KEY], source=path)


def _session(path: Path, providers: list[str], opts):
    import onnxruntime as ort
    inspect_onnx(path)  # structure, external data inside its folder, content digest: before onnxruntime parses it
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / ... types
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"onnxruntime cannot load this model ({msg})", path=path,
                             fix="re-export it with `diffseg-engine export`") from None


class OnnxRuntimeBackend(StepBackend):
    name = "onnxruntime"

    def __init__(self, session, card: ModelCard, path: Path):
        self.session, self.card, self.path = session, card, path
        names = [i.name for i in session.get_inputs()]
        if names != list(STEP_INPUTS) or [o.name for o in session.get_outputs()] != [STEP_OUTPUT]:
            raise ModelFileError(f"ONNX graph has inputs {names}, expected the step graph {list(STEP_INPUTS)}",
                                 path=path, fix="re-export it with `diffseg-engine export`")

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", threads: int = 0) -> "OnnxRuntimeBackend":
        import onnxruntime as ort
        path = Path(path)
        if path.suffix != ".onnx":  # safetensors weights: `pipeline.models.open_model` finds or exports the graph
            raise ModelFileError("the onnxruntime backend runs an .onnx step graph", path=path,
                                 fix=f"export it with `diffseg-engine export {path}`, or open it through "
                                     "`diffseg_engine.pipeline.models.open_model`")
        available = ort.get_available_providers()
        want_cuda = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
        if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
            raise BackendError(f"--device {device}: onnxruntime has no CUDA provider here (has {available})",
                               fix="pip install onnxruntime-gpu, or use --device cpu")
        opts = session_options(threads)
        stream = None
        if want_cuda:
            dev_id = int(device.split(":")[1]) if ":" in device else 0
            cuda_opts = {"device_id": dev_id}
            stream = _compute_stream(dev_id)  # None without cuda-bindings: then the host loop runs
            if stream is not None:
                cuda_opts["user_compute_stream"] = str(stream)
            providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        sess = _session(path, providers, opts)
        # onnxruntime-gpu lists the CUDA provider even where CUDA cannot start; an explicit --device cuda must
        # not run on the CPU silently, but `auto` means "CUDA if it works", so there the CPU session stands.
        if device.startswith("cuda") and sess.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendError(f"onnxruntime fell back to {sess.get_providers()[0]} although CUDA was requested",
                               fix="check the CUDA/cuDNN libraries onnxruntime-gpu needs, or use --device cpu")
        obj = cls(sess, _card_of(sess, path), path)
        if obj.device == "cuda":
            obj.stream, obj.device_id = stream, dev_id
        return obj

    @property
    def device(self) -> str:
        p = self.session.get_providers()[0]
        return "cuda" if p == "CUDAExecutionProvider" else "cpu"

    @property
    def has_device_loop(self) -> bool:  # type: ignore[override]
        return self.device == "cuda" and self.stream is not None

    stream = None  # the CUDA stream handed to the provider as its compute stream (set by `load`)
    device_id = 0

    def run_chunk(self, image, slices, members, coefs, timesteps, key, on_progress=None) -> np.ndarray:
        """The device loop where the CUDA provider and cuda-bindings are there, else the host loop."""
        if not self.has_device_loop:
            return super().run_chunk(image, slices, members, coefs, timesteps, key, on_progress)
        return self.device_loop(image, slices, members, coefs, timesteps, key, on_progress)

    def device_loop(self, image, slices, members, coefs, timesteps, key, on_progress=None) -> np.ndarray:
        """All K steps on the CUDA provider with IO binding (x_t never leaves the device)."""
        import onnxruntime as ort

        from ..sampling.noise_device import CudaNoise
        from ..artifacts.tensorrt_plan import cuda_devices
        B, K = len(image), len(coefs)
        h, w = image.shape[2:]
        dev = self.device_id

        def put(a: np.ndarray):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", dev)
        try:
            img = put(image.astype(np.float32))
            coef_v = [put(np.broadcast_to(coefs[i], (B, coefs.shape[1])).astype(np.float32)) for i in range(K)]
            time_v = [put(np.full(B, timesteps[i], np.float32)) for i in range(K)]
            rows = put(np.stack([slices, members], 1).astype(np.uint32))
            xs = [ort.OrtValue.ortvalue_from_shape_and_type((B, 1, h, w), np.float32, "cuda", dev) for _ in (0, 1)]
            z = ort.OrtValue.ortvalue_from_shape_and_type((B, 1, h, w), np.float32, "cuda", dev)
            cc = next(d["compute_capability"] for d in cuda_devices() or [] if d["index"] == dev)
            noise = CudaNoise(key, rows.data_ptr(), B, h * w, cc)
            noise.draw(xs[0].data_ptr(), self.stream)  # x_T on the provider's compute stream: ordered with it
            run = ort.RunOptions()
            run.add_run_config_entry("disable_synchronize_execution_providers", "1")  # no host sync per step
            binding = self.session.io_binding()
            binding.bind_ortvalue_input("image", img)
            binding.bind_ortvalue_input("noise", z)
            for k, i in enumerate(range(K - 1, -1, -1)):
                noise.draw(z.data_ptr(), self.stream)
                binding.bind_ortvalue_input("x_t", xs[k % 2])
                binding.bind_ortvalue_input("timestep", time_v[i])
                binding.bind_ortvalue_input("coef", coef_v[i])
                binding.bind_ortvalue_output(STEP_OUTPUT, xs[1 - k % 2])
                self.session.run_with_iobinding(binding, run)
                if on_progress:
                    on_progress(B)
            binding.synchronize_outputs()
            return xs[K % 2].numpy()
        except Exception as exc:
            oom = batch_memory_error(exc, B, self.name)
            if oom is not None:
                raise oom from None
            raise

    def infer(self, image, x_t, timestep, coef, noise) -> np.ndarray:
        try:
            return self.session.run([STEP_OUTPUT], step_feeds(image, x_t, timestep, coef, noise))[0]
        except Exception as exc:  # onnxruntime raises its own RuntimeException / Fail types
            oom = batch_memory_error(exc, len(x_t), self.name)
            if oom is not None:
                raise oom from None
            raise


def session_options(threads: int = 0, **config):
    """The options of every session this backend opens: all graph optimisations, `threads` intra-op threads
    (0: `core.host.usable_cpus()`), warnings off; plus session config entries (benchmarks vary them)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or usable_cpus()
    opts.log_severity_level = 3
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    return opts


def step_feeds(image, x_t, timestep, coef, noise) -> dict[str, np.ndarray]:
    """The step graph's inputs as `session.run` takes them (contiguous float32)."""
    feeds = {"image": image, "x_t": x_t, "timestep": timestep, "coef": coef, "noise": noise}
    return {k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items()}


def _compute_stream(device_id: int) -> int | None:
    """A CUDA stream (as an int handle) on `device_id` for the CUDA provider and the noise kernel, or None
    where cuda-bindings is not installed."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    if int(cudart.cudaSetDevice(device_id)[0]) != 0:
        return None
    err, stream = cudart.cudaStreamCreate()
    return int(stream) if int(err) == 0 else None
