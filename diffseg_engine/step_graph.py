"""The step graph's interface: the names, shapes and precisions every exporter and runtime agree on.

Owns: `STEP_INPUTS` (input names in order and their shapes), `STEP_OUTPUT`, `PRECISIONS` and the ONNX
metadata key `PRECISION_KEY` under which `export` records the precision of a graph's convolutions and
matmuls. A ground-floor module: `export/` and `backends/` both import it, so they never import each other for
these names. Imports: nothing of this package, nothing outside the standard library.
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
#: The one output: x_prev [B, 1, H, W] float32.
STEP_OUTPUT = "x_prev"

#: Precision of a step graph's convolutions and matmuls. Inputs, outputs, normalisation, softmax, the
#: timestep embedding and the update are float32 in every one of them.
PRECISIONS = ("fp32", "fp16", "bf16")
#: ONNX metadata_props key holding one of PRECISIONS (absent: fp32, as every graph before it).
PRECISION_KEY = "diffseg_precision"
