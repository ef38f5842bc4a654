"""Export of the denoising step (U-Net + fused update) to ONNX, with the model card inside.

Owns: `export_onnx` (safetensors -> .onnx with a dynamic batch axis, checked by onnx.checker, card and
content digest in `metadata_props`), `precision_error` (a half step against fp32 on the same inputs), `check_parity` (onnxruntime vs torch) and
`store_exact_fp16` (float32 weights that are exactly float16 values stored as float16 behind a Cast: lossless,
and half the file for weights shipped in fp16).
Imports: numpy, onnx (lazily), onnxruntime (lazily), torch; `artifacts`, `core`, `io`, `train`.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from diffseg_engine.io.atomic import atomic_write
from diffseg_engine.artifacts.step_graph import PRECISION_KEY, STEP_INPUTS, STEP_OUTPUT
from diffseg_engine.artifacts.card import CARD_KEY, ModelCard
from diffseg_engine.core.errors import ModelFileError
from diffseg_engine.artifacts.onnx_file import DIGEST_KEY, content_digest
from diffseg_engine.artifacts.weights import load_weights

from ..train.step import DenoisingStep, build_step, half_precision_step

OPSET = 17
#: bf16 convolutions are valid ONNX from opset 22 on (Conv-22); the TorchScript exporter writes at most 20,
#: whose operators are unchanged at 22 for everything the step graph uses, so the bf16 graph is written at 20
#: and declared 22, then onnx.checker (full check) validates it at 22.
BF16_OPSET = 22


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


#: initializers smaller than this stay as they are (biases, norms: a Cast node would cost more than it saves)
_MIN_FP16_ELEMENTS = 256


def store_exact_fp16(model) -> int:
    """Store each float32 initializer of `model.graph` whose values are all exactly float16 values as a float16
    initializer `NAME.fp16` followed by a `Cast(to=FLOAT)` node that recreates `NAME`, in place.

    Lossless by construction (the Cast reproduces every float32 bit), so the graph computes exactly what it did;
    onnxruntime folds the Cast at session start. Weights trained in fp32 are not fp16 values and stay float32;
    the shipped default's weights are fp16-rounded, so its file halves. Returns the bytes saved."""
    from onnx import TensorProto, helper, numpy_helper
    graph, saved, casts = model.graph, 0, []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or init.data_location == TensorProto.EXTERNAL:
            continue
        w = numpy_helper.to_array(init)
        if w.size < _MIN_FP16_ELEMENTS or not np.all(np.isfinite(w)):
            continue
        half = w.astype(np.float16)
        if not np.array_equal(half.astype(np.float32).view(np.uint32), w.view(np.uint32)):
            continue  # not exactly representable (or a -0/+0 difference): keep float32
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, f"{name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], to=TensorProto.FLOAT,
                                      name=f"{name}.to_fp32"))
        saved += w.nbytes - half.nbytes
    nodes = casts + list(graph.node)  # the Casts first: the node list stays topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    return saved


def export_step_module(step: DenoisingStep, card: ModelCard, out: str | Path, precision: str = "fp32") -> Path:
    """Trace `step` to ONNX at `out` (atomically), dynamic batch, card and `precision` in metadata_props;
    onnx.checker'd. `step` must already be in `precision` (`half_precision_step`)."""
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
                              opset_version=OPSET if precision != "bf16" else 20, dynamo=False,
                              do_constant_folding=True)
        model = onnx.load(tmp)
        if precision == "bf16":
            model.opset_import[0].version = BF16_OPSET
            model.ir_version = max(model.ir_version, 10)
        store_exact_fp16(model)
        onnx.checker.check_model(model, full_check=precision == "bf16")
        del model.metadata_props[:]
        for k, v in {CARD_KEY: card.to_json(), "diffseg_graph": "denoising_step",
                     "diffseg_inputs": ",".join(STEP_INPUTS),
                     **({PRECISION_KEY: precision} if precision != "fp32" else {})}.items():
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


def export_onnx(weights: str | Path, out: str | Path, precision: str = "fp32") -> Path:
    """safetensors weights (with card) -> ONNX step graph at `out`, convolutions and matmuls in `precision`."""
    tensors, card = load_weights(weights)
    return export_step_module(half_precision_step(build_step(card, tensors), precision), card, out, precision)


def precision_error(weights: str | Path, precision: str, *, batch: int = 3, seed: int = 0) -> float:
    """Max |half step - fp32 step| of x_prev on the same random inputs and noise (torch, on the CPU)."""
    tensors, card = load_weights(weights)
    ex = example_inputs(card, batch, seed)
    args = tuple(torch.from_numpy(ex[k]) for k in STEP_INPUTS)
    with torch.no_grad():
        ref = build_step(card, tensors)(*args)
        got = half_precision_step(build_step(card, tensors), precision)(*args)
    return float((got.float() - ref).abs().max())


def check_parity(weights: str | Path, onnx_path: str | Path, *, batch: int = 3, seed: int = 0,
                 precision: str = "fp32") -> float:
    """Max |onnxruntime - torch| of the step output on the same random inputs (torch in the same `precision`;
    onnxruntime's CPU provider runs fp32 and fp16 graphs, not bf16 convolutions)."""
    import onnxruntime as ort
    tensors, card = load_weights(weights)
    step = half_precision_step(build_step(card, tensors), precision)
    ex = example_inputs(card, batch, seed)
    with torch.no_grad():
        ref = step(*(torch.from_numpy(ex[k]) for k in STEP_INPUTS)).numpy()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    got = sess.run([STEP_OUTPUT], {k: np.ascontiguousarray(ex[k], np.float32) for k in STEP_INPUTS})[0]
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
