"""A Triton Inference Server model repository for the step graph.

Owns: `write_triton_repository` and `triton_config` (the ``config.pbtxt`` text). The repository serves the
step graph only -- one denoising step (U-Net + fused update) for a batch of work items, the inputs and output of
`step_graph` --; the sampling loop (noise streams, schedule, ensemble statistics) stays in this engine, which
would call the server once per timestep per chunk as it calls a local backend. Layout (Triton's documented
model repository): ``DIR/<name>/config.pbtxt`` + ``DIR/<name>/1/model.onnx`` (platform ``onnxruntime_onnx``)
and, when a TensorRT plan is given, ``DIR/<name>_trt/config.pbtxt`` + ``.../1/model.plan`` (``tensorrt_plan``).
Both declare dynamic batching, so that steps sent by several engines (or chunks) are batched on the GPU.
Imports: `artifacts.card`, `artifacts.onnx_file`, `artifacts.step_graph`, `core.errors`, `io.atomic`.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Sequence

from diffseg_engine.io.atomic import atomic_write
from diffseg_engine.artifacts.card import ModelCard
from diffseg_engine.core.errors import ModelFileError, OutputError, UsageError
from diffseg_engine.artifacts.onnx_file import inspect_onnx
from diffseg_engine.artifacts.step_graph import STEP_INPUTS, STEP_OUTPUT, input_shapes, output_shape

#: Largest batch the server forms (work items per step call); the engine's GPU default batch cap.
DEFAULT_MAX_BATCH = 256
#: How long a request may wait for others to join its batch, in microseconds.
DEFAULT_QUEUE_DELAY_US = 200
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _dims(shape: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def triton_config(card: ModelCard, name: str, platform: str, *, max_batch_size: int = DEFAULT_MAX_BATCH,
                  preferred_batch_sizes: Sequence[int] = (), queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                  instance_kind: str = "KIND_AUTO", instances: int = 1) -> str:
    """The ``config.pbtxt`` of the step graph for `card` (ModelConfig in protobuf text format).

    With max_batch_size > 0 Triton adds the batch axis itself, so each tensor's dims leave it out; the
    per-item timestep (shape [B] in the graph) is declared as dims [ 1 ] reshaped to [ ] (Triton's way of
    declaring a tensor that has only the batch axis)."""
    if max_batch_size < 1:
        raise UsageError(f"max batch size must be at least 1, got {max_batch_size}")
    if any(not 1 <= b <= max_batch_size for b in preferred_batch_sizes):
        raise UsageError(f"preferred batch sizes must lie in 1..{max_batch_size}, got {list(preferred_batch_sizes)}")
    shapes = input_shapes(len(card.modalities), card.image_size)
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {int(max_batch_size)}", "input ["]
    items = []
    for key in STEP_INPUTS:
        shape = shapes[key]
        body = [f'    name: "{key}"', "    data_type: TYPE_FP32"]
        if shape:
            body.append(f"    dims: {_dims(shape)}")
        else:
            body += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        items.append("  {\n" + "\n".join(body) + "\n  }")
    lines.append(",\n".join(items))
    lines += ["]", "output [", "  {", f'    name: "{STEP_OUTPUT}"', "    data_type: TYPE_FP32",
              f"    dims: {_dims(output_shape(card.image_size))}", "  }", "]",
              "instance_group [", "  {", f"    kind: {instance_kind}", f"    count: {int(instances)}", "  }", "]",
              "dynamic_batching {"]
    if preferred_batch_sizes:
        lines.append(f"  preferred_batch_size: {_dims(preferred_batch_sizes)}")
    lines += [f"  max_queue_delay_microseconds: {int(queue_delay_us)}", "}"]
    return "\n".join(lines) + "\n"


def write_triton_repository(onnx_path: str | Path, repo: str | Path, *, name: str | None = None,
                            plan: str | Path | None = None, max_batch_size: int = DEFAULT_MAX_BATCH,
                            preferred_batch_sizes: Sequence[int] = (),
                            queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, overwrite: bool = False) -> dict[str, Path]:
    """Write the model repository for the step graph `onnx_path` (and the TensorRT `plan` built from it, if
    any) into `repo`; returns {"onnx": model folder, "plan": model folder}. The ONNX file is checked
    (`onnx_file.inspect_onnx`: structure, card, digest) and copied with its external data files.

    name: the Triton model name (default: the card's name). Refuses (`OutputError`) a model folder that
    already exists unless `overwrite`."""
    onnx_path = Path(onnx_path)
    info = inspect_onnx(onnx_path)
    card = info.card
    name = name or card.name
    if not _NAME.match(name):
        raise UsageError(f"Triton model name {name!r} may hold only letters, digits, '_', '.' and '-'")
    repo = Path(repo)
    models = {"onnx": (onnx_path, name)}
    if plan is not None:
        plan = Path(plan)
        if not plan.is_file():
            raise ModelFileError("TensorRT plan not found", path=plan, fix="build it first or leave it out")
        models["plan"] = (plan, f"{name}_trt")
    for _, model_name in models.values():
        if (repo / model_name).exists() and not overwrite:
            raise OutputError(f"already holds a model folder {model_name}", path=repo,
                              fix="remove that folder, or choose another --triton-repo")
    written = {}
    for kind, (src, model_name) in models.items():
        platform, filename = PLATFORMS[kind]
        folder = repo / model_name
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "1").mkdir(parents=True)
        shutil.copyfile(src, folder / "1" / filename)
        if kind == "onnx":
            for location in sorted({loc for _, loc in info.external if loc}):
                target = folder / "1" / location
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(onnx_path.parent / location, target)
        text = triton_config(card, model_name, platform, max_batch_size=max_batch_size,
                             preferred_batch_sizes=preferred_batch_sizes, queue_delay_us=queue_delay_us)
        with atomic_write(folder / "config.pbtxt") as f:
            f.write(text.encode())
        written[kind] = folder
    return written
