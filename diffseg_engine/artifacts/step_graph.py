"""The step graph's interface: the names, order, shapes and precisions every exporter and runtime agree on.

Owns: `STEP_INPUTS` (input names in order), `STEP_OUTPUT`, `input_shapes` / `output_shape`, `PRECISIONS` and
the ONNX metadata key `PRECISION_KEY` under which `export` records the precision of a graph's convolutions
and matmuls. A ground-floor module: the exporter (`export/onnx_export.py`, `export/triton.py`), the backends
(`backends/`) and the ONNX file checks import it, so `export/` and `backends/` never import each other for it.
Imports: the standard library only. Never torch.
"""
from __future__ import annotations

#: Inputs of the step graph, in order: name -> shape (B = batch, C = modalities, H = W = image size).
STEP_INPUTS = {
    "image": "[B, C, H, W] float32",
    "x_t": "[B, 1, H, W] float32",
    "timestep": "[B] float32",
    "coef": "[B, 8] float32 (schedule.COEF_NAMES)",
    "noise": "[B, 1, H, W] float32",
}
#: The one output: x_{t-1}, [B, 1, H, W] float32.
STEP_OUTPUT = "x_prev"
#: Coefficients per step (`schedule.COEF_NAMES` has their names).
NUM_COEFS = 8


def input_shapes(channels: int, image_size: int) -> dict[str, tuple[int, ...]]:
    """Each input's shape without the batch axis, in `STEP_INPUTS` order (timestep: () per item)."""
    h = w = int(image_size)
    return {"image": (int(channels), h, w), "x_t": (1, h, w), "timestep": (), "coef": (NUM_COEFS,),
            "noise": (1, h, w)}


def output_shape(image_size: int) -> tuple[int, ...]:
    """The output's shape without the batch axis."""
    return (1, int(image_size), int(image_size))

#: Precision of a step graph's convolutions and matmuls. Inputs, outputs, normalisation, softmax, the
#: timestep embedding and the update are float32 in every one of them.
PRECISIONS = ("fp32", "fp16", "bf16")
#: ONNX metadata_props key holding one of PRECISIONS (absent: fp32, as every graph before it).
PRECISION_KEY = "diffseg_precision"
