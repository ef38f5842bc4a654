"""The step graph's interface: the names, order and shapes of its inputs and its output.

Owns: `STEP_INPUTS`, `STEP_OUTPUT` and `input_shapes` -- the one definition that the exporter
(`export/onnx_export.py`, `export/triton.py`), the backends (`backends/`) and the ONNX file checks agree on, so
that `export/` and `backends/` need not import each other for it.
Imports: the standard library only (a ground-floor module: nothing of this package, no numpy, no torch).
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
