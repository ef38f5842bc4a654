"""The onnxruntime backend: the exported step graph (network + fused update) on CPU or CUDA.

Owns: `OnnxRuntimeBackend`, checking that a requested CUDA provider is really active (onnxruntime falls
back to CPU silently), reading the model card from ONNX `metadata_props`, and turning onnxruntime's
allocation failures into `BatchMemoryError`. Every file is checked by `onnx_file.inspect_onnx` before
onnxruntime opens it. Imports: numpy, onnxruntime (lazily), `card`, `errors`, `onnx_file`, `backends.base`.
Must not import torch.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..card import CARD_KEY, ModelCard
from ..errors import BackendError, ModelFileError
from ..onnx_file import inspect_onnx
from ..step_graph import STEP_INPUTS, STEP_OUTPUT
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
        if path.suffix != ".onnx":
            path = ensure_onnx(path)
        available = ort.get_available_providers()
        want_cuda = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
        if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
            raise BackendError(f"--device {device}: onnxruntime has no CUDA provider here (has {available})",
                               fix="pip install onnxruntime-gpu, or use --device cpu")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.log_severity_level = 3
        if want_cuda:
            dev_id = int(device.split(":")[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": dev_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        sess = _session(path, providers, opts)
        # onnxruntime-gpu lists the CUDA provider even where CUDA cannot start; an explicit --device cuda must
        # not run on the CPU silently, but `auto` means "CUDA if it works", so there the CPU session stands.
        if device.startswith("cuda") and sess.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendError(f"onnxruntime fell back to {sess.get_providers()[0]} although CUDA was requested",
                               fix="check the CUDA/cuDNN libraries onnxruntime-gpu needs, or use --device cpu")
        return cls(sess, _card_of(sess, path), path)

    @property
    def device(self) -> str:
        p = self.session.get_providers()[0]
        return "cuda" if p == "CUDAExecutionProvider" else "cpu"

    def infer(self, image, x_t, timestep, coef, noise) -> np.ndarray:
        feeds = {"image": image, "x_t": x_t, "timestep": timestep, "coef": coef, "noise": noise}
        try:
            return self.session.run([STEP_OUTPUT], {k: np.ascontiguousarray(v, np.float32)
                                                    for k, v in feeds.items()})[0]
        except Exception as exc:  # onnxruntime raises its own RuntimeException / Fail types
            oom = batch_memory_error(exc, len(x_t), self.name)
            if oom is not None:
                raise oom from None
            raise


def ensure_onnx(weights: str | Path) -> Path:
    """The ONNX step graph for safetensors `weights`: a sibling `<name>.onnx` whose card carries the same
    weights digest, else one exported into the user cache (needs the `export` extra)."""
    from ..weights import read_metadata
    from ..card import CARD_KEY as KEY
    weights = Path(weights)
    meta = read_metadata(weights)
    if KEY not in meta:
        raise ModelFileError("safetensors file has no diffseg model card", path=weights)
    card = ModelCard.from_json(meta[KEY], source=weights)
    candidates = [weights.with_suffix(".onnx"),
                  _cache_dir() / f"{card.weights_sha256[:32]}.onnx"]
    for cand in candidates:
        if cand.is_file():
            try:
                if read_onnx_card(cand).weights_sha256 == card.weights_sha256:
                    return cand
            except ModelFileError:
                pass
    try:
        from ..export.onnx_export import export_onnx
    except ImportError:
        raise BackendError("the onnxruntime backend needs an ONNX export of these weights, and exporting needs "
                           "PyTorch", fix=f"run `diffseg-engine export {weights}` where torch is installed, "
                           "or pass the .onnx file as --model") from None
    out = candidates[1]
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(weights, out)
    return out


def _cache_dir() -> Path:
    base = os.environ.get("DIFFSEG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diffseg-engine")
    return Path(base)
