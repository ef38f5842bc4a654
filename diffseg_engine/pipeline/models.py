"""Which model file runs: the shipped default, the ONNX graph of safetensors weights, a model's identity.

Owns: `DEFAULT_MODEL_DIR`, `DEMO_INPUT`, `default_model`, `ensure_onnx` (safetensors weights -> their ONNX step
graph: a sibling file or one exported into the user cache), `open_model` (a backend on a model file, or on
the default) and `model_sha256`. Imports: `artifacts`, `backends`, `core`, `export` (lazily). Never torch.
"""
from __future__ import annotations

from pathlib import Path

from ..artifacts.card import CARD_KEY, ModelCard
from ..artifacts.onnx_file import inspect_onnx
from ..artifacts.weights import file_sha256, read_metadata
from ..backends import StepBackend, open_backend
from ..core.errors import BackendError, ModelFileError, UsageError
from ..core.host import user_cache_dir

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models"
DEMO_INPUT = Path(__file__).resolve().parents[1] / "demo" / "TCGA-DU-7294_flair.nii.gz"


def default_model() -> Path:
    for name in ("default.onnx", "default.safetensors"):
        if (DEFAULT_MODEL_DIR / name).is_file():
            return DEFAULT_MODEL_DIR / name
    raise UsageError("no --model given and no default model is installed with this package",
                     fix="pass --model PATH (a .onnx or .safetensors file written by diffseg-engine)")


def ensure_onnx(weights: str | Path) -> Path:
    """The ONNX step graph for safetensors `weights`: a sibling `<name>.onnx` whose card carries the same
    weights digest, else one exported into the user cache (needs the `export` extra)."""
    weights = Path(weights)
    meta = read_metadata(weights)
    if CARD_KEY not in meta:
        raise ModelFileError("safetensors file has no diffseg model card", path=weights)
    card = ModelCard.from_json(meta[CARD_KEY], source=weights)
    candidates = [weights.with_suffix(".onnx"), user_cache_dir() / f"{card.weights_sha256[:32]}.onnx"]
    for cand in candidates:
        if cand.is_file():
            try:
                info = inspect_onnx(cand)
                if info.card.weights_sha256 == card.weights_sha256 and info.precision == "fp32":
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


def open_model(model: str | Path | None, backend: str, device: str = "auto", threads: int = 0) -> StepBackend:
    """`open_backend` on `model`, or on the shipped default model when `model` is None; safetensors weights
    given to onnxruntime run their ONNX step graph (`ensure_onnx`)."""
    path = Path(model) if model else default_model()
    if backend == "onnxruntime" and path.suffix == ".safetensors":
        path = ensure_onnx(path)
    return open_backend(backend, path, device=device, threads=threads)


def model_sha256(backend: StepBackend) -> str | None:
    """The sha256 of the model file a backend was opened from (None where it has no file)."""
    model_path = getattr(backend, "path", None)
    return file_sha256(model_path) if model_path is not None and Path(model_path).is_file() else None
