"""Export of the denoising step (U-Net + fused update) to ONNX, with the model card inside.

Owns: `export_onnx` (safetensors -> .onnx with a dynamic batch axis, checked by onnx.checker, card and
content digest in `metadata_props`) and `check_parity` (onnxruntime vs torch on the same inputs).
Imports: torch, onnx, `diffseg_engine.train.step`, runtime ground floor. Nothing in the runtime imports this
except `backends.ort.ensure_onnx`, lazily, when the user hands it safetensors weights.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from diffseg_engine.atomic import atomic_write
from diffseg_engine.step_graph import STEP_INPUTS, STEP_OUTPUT
from diffseg_engine.card import CARD_KEY, ModelCard
from diffseg_engine.errors import ModelFileError
from diffseg_engine.onnx_file import DIGEST_KEY, content_digest
from diffseg_engine.weights import load_weights

from ..train.step import DenoisingStep, build_step

OPSET = 17


def example_inputs(card: ModelCard, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random but realistic step inputs [B, ...] for tracing and parity checks."""
    rng = np.random.default_rng(seed)
    h = card.image_size
    c = len(card.modalities)
    coef = np.tile(np.array([1.2, 0.6, 0.5, 0.5, -6.0, -4.0, 1.0, 0.0], np.float32), (batch, 1))
    return {"image": rng.random((batch, c, h, h), dtype=np.float32),
            "x_t": rng.standard_normal((batch, 1, h, h)).astype(np.float32),
            "timestep": rng.integers(0, card.diffusion.timesteps, batch).astype(np.float32),
            "coef": coef, "noise": rng.standard_normal((batch, 1, h, h)).astype(np.float32)}


def export_step_module(step: DenoisingStep, card: ModelCard, out: str | Path) -> Path:
    """Trace `step` to ONNX at `out` (atomically), dynamic batch, card in metadata_props; onnx.checker'd."""
    import onnx
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ex = example_inputs(card, 2)
    args = tuple(torch.from_numpy(ex[k]) for k in STEP_INPUTS)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".trace.tmp", dir=out.parent)
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
            torch.onnx.export(step.eval(), args, tmp, input_names=list(STEP_INPUTS), output_names=[STEP_OUTPUT],
                              dynamic_axes={**{k: {0: "batch"} for k in STEP_INPUTS}, STEP_OUTPUT: {0: "batch"}},
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        model = onnx.load(tmp)
        onnx.checker.check_model(model)
        del model.metadata_props[:]
        for k, v in {CARD_KEY: card.to_json(), "diffseg_graph": "denoising_step",
                     "diffseg_inputs": ",".join(STEP_INPUTS)}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        model.producer_name = "diffseg-engine"
        digest = content_digest(model.SerializeToString())  # covers everything but its own entry, added last
        entry = model.metadata_props.add()
        entry.key, entry.value = DIGEST_KEY, digest
        with atomic_write(out) as f:
            f.write(model.SerializeToString())
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def export_onnx(weights: str | Path, out: str | Path) -> Path:
    """safetensors weights (with card) -> ONNX step graph at `out`."""
    tensors, card = load_weights(weights)
    return export_step_module(build_step(card, tensors), card, out)


def check_parity(weights: str | Path, onnx_path: str | Path, *, batch: int = 3, seed: int = 0) -> float:
    """Max |onnxruntime - torch| of the step output on the same random inputs."""
    from diffseg_engine.backends.ort import OnnxRuntimeBackend
    tensors, card = load_weights(weights)
    step = build_step(card, tensors)
    ex = example_inputs(card, batch, seed)
    with torch.no_grad():
        ref = step(*(torch.from_numpy(ex[k]) for k in STEP_INPUTS)).numpy()
    got = OnnxRuntimeBackend.load(onnx_path, device="cpu").infer(**ex)
    err = float(np.max(np.abs(got - ref)))
    if not np.isfinite(err):
        raise ModelFileError("ONNX output is not finite", path=onnx_path)
    return err


def export_network_only(weights: str | Path, out: str | Path) -> Path:
    """The bare U-Net (x [B, C+1, H, W], timestep [B]) -> [B, 2, H, W], for measuring the network alone."""
    tensors, card = load_weights(weights)
    net = build_step(card, tensors).net.eval()
    ex = example_inputs(card, 2)
    x = torch.from_numpy(np.concatenate([ex["image"], ex["x_t"]], axis=1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x, torch.from_numpy(ex["timestep"])), str(out), input_names=["x", "timestep"],
                          output_names=["out"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"x": {0: "batch"}, "timestep": {0: "batch"}, "out": {0: "batch"}})
    return Path(out)
