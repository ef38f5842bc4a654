"""TensorRT plans of the step graph: building one, the JSON sidecar beside it, the cache key, and the checks
that refuse a plan which does not fit the installed TensorRT or GPU — all before any runtime object exists.

Owns: `trt_module` (the `tensorrt` module, or `tensorrt_rtx`, which has the same builder API), `cuda_devices`
(through cuda-bindings, never through a TensorRT object: deserialising a plan without a CUDA device crashes the
process), `plan_key`, `build_plan`, `ensure_plan` (plans cached under their key), `read_sidecar` and
`check_plan`.

Imports: cuda-bindings (lazily); `core.errors`, `core.host`, `io.atomic`, `onnx_file`, `step_graph`. Never torch.
Definitions and conventions: the comment below the imports.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from pathlib import Path

from ..io.atomic import atomic_write
from ..core.errors import BackendError, ModelFileError, UsageError
from ..core.host import user_cache_dir
from .onnx_file import inspect_onnx
from .step_graph import STEP_INPUTS, STEP_OUTPUT

# A plan is built from an exported step graph (`export --precision`): the network is strongly typed, so the
# ONNX file's own types (fp32, or convolutions and matmuls in fp16/bf16) are the plan's precision; one
# optimization profile spans the batch axis (1 .. max batch); `tensorrt` keeps a timing cache per version and GPU
# (TensorRT-RTX has none: its timing-cache calls are no-ops). The sidecar `<plan>.json` records the TensorRT
# module and version, the GPU name and compute capability the plan was built for (TensorRT-RTX on a machine
# without a GPU builds a portable plan: gpu null), the ONNX file's sha256, the precision, the profile, the plan's
# own sha256 and the model card. The cache key is the sha256 of everything that decides the plan's bytes
# (ONNX sha256, TensorRT module and version, target GPU, precision, profile).

SIDECAR_FORMAT = "diffseg-tensorrt-plan/1"
#: Where `ensure_plan` looks for a module, in order; DIFFSEG_TENSORRT=tensorrt_rtx (or tensorrt) picks one.
TRT_MODULES = ("tensorrt", "tensorrt_rtx")
DEFAULT_MAX_BATCH = 512


def _rebuild_fix(onnx: str | None, precision: str | None = None) -> str:
    src = onnx or "MODEL"
    prec = f" --precision {precision}" if precision and precision != "fp32" else ""
    return f"rebuild it here: diffseg-engine export {src} --engine tensorrt{prec}"


def trt_module(name: str | None = None):
    """The installed TensorRT Python module (`tensorrt`, else `tensorrt_rtx`), or BackendError."""
    names = [name] if name else ([os.environ["DIFFSEG_TENSORRT"]] if os.environ.get("DIFFSEG_TENSORRT")
                                 else list(TRT_MODULES))
    for n in names:
        if n not in TRT_MODULES:
            raise UsageError(f"unknown TensorRT module {n!r}", fix=f"choose one of {', '.join(TRT_MODULES)}")
        try:
            return importlib.import_module(n)
        except ImportError:
            continue
    raise BackendError("TensorRT is not installed (neither `tensorrt` nor `tensorrt_rtx` imports)",
                       fix="pip install tensorrt (or tensorrt-rtx, which builds plans without a GPU), "
                           "or use --backend onnxruntime")


def runtime_of(trt) -> dict:
    """{"module": "tensorrt" | "tensorrt_rtx", "version": "..."} of an imported TensorRT module."""
    return {"module": trt.__name__.split(".")[0], "version": str(trt.__version__)}


def cuda_devices() -> list[dict] | None:
    """[{"index", "name", "compute_capability"}] of the CUDA devices cuda-bindings sees ([] when none or no
    driver), or None when cuda-bindings is not installed. Creates no TensorRT object."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
    except ImportError:
        return None
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception:  # a missing or broken driver library
        return []
    if int(err) != 0:
        return []
    found = []
    for i in range(count):
        err, prop = cudart.cudaGetDeviceProperties(i)
        if int(err) != 0:
            continue
        name = prop.name.decode("utf-8", "replace") if isinstance(prop.name, bytes) else str(prop.name)
        found.append({"index": i, "name": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}"})
    return found


def _target(trt, device_index: int = 0) -> dict:
    """The GPU a plan built now is for: this machine's device `device_index`, or (TensorRT-RTX without a GPU)
    a portable plan, {"name": None, "compute_capability": None}."""
    devices = cuda_devices() or []
    dev = next((d for d in devices if d["index"] == device_index), None)
    if dev is not None:
        return {"name": dev["name"], "compute_capability": dev["compute_capability"]}
    if runtime_of(trt)["module"] == "tensorrt_rtx":
        return {"name": None, "compute_capability": None}
    raise BackendError("TensorRT builds plans only on a machine with an NVIDIA GPU (no CUDA device found)",
                       fix="build on the GPU that will run the plan, or install tensorrt-rtx, which builds "
                           "portable plans without one")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def batch_profile(max_batch: int, opt_batch: int | None = None) -> dict:
    """The optimization profile over the batch axis: {"min": 1, "opt": ..., "max": max_batch}."""
    if not 1 <= int(max_batch) <= 65536:
        raise UsageError(f"--max-batch must lie in 1..65536, got {max_batch}")
    opt = int(opt_batch or max_batch)
    if not 1 <= opt <= max_batch:
        raise UsageError(f"the profile's optimal batch must lie in 1..{max_batch}, got {opt}")
    return {"min": 1, "opt": opt, "max": int(max_batch)}


def plan_key(onnx_sha256: str, runtime: dict, target: dict, precision: str, profile: dict) -> str:
    """sha256 of everything that decides a plan's bytes; plans are cached under it."""
    blob = json.dumps({"onnx_sha256": onnx_sha256, "tensorrt": runtime, "gpu": target, "precision": precision,
                       "profile": profile}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_dir() -> Path:
    """`core.host.user_cache_dir()` / tensorrt: where plans built on first use are kept."""
    return user_cache_dir() / "tensorrt"


def sidecar_path(plan: str | Path) -> Path:
    return Path(str(plan) + ".json")


def build_plan(onnx_path: str | Path, out: str | Path, *, max_batch: int = DEFAULT_MAX_BATCH,
               opt_batch: int | None = None, trt=None, device_index: int = 0) -> dict:
    """Build the plan of step graph `onnx_path` at `out` (and its sidecar `out`.json); returns the sidecar."""
    trt = trt or trt_module()
    onnx_path, out = Path(onnx_path), Path(out)
    info = inspect_onnx(onnx_path)  # structure, card and content digest, before TensorRT parses a byte
    card = info.card
    profile = batch_profile(max_batch, opt_batch)
    runtime, target = runtime_of(trt), _target(trt, device_index)
    onnx_sha = file_sha256(onnx_path)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # the ONNX file's types are the precision
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))[:300]
        raise ModelFileError(f"TensorRT's ONNX parser rejects this step graph ({errors})", path=onnx_path,
                             fix="re-export it with `diffseg-engine export`")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != list(STEP_INPUTS) or [network.get_output(i).name for i in range(network.num_outputs)] != [STEP_OUTPUT]:
        raise ModelFileError(f"ONNX graph has inputs {names}, expected the step graph {list(STEP_INPUTS)}",
                             path=onnx_path, fix="re-export it with `diffseg-engine export`")
    config = builder.create_builder_config()
    opt = builder.create_optimization_profile()
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = list(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise ModelFileError(f"input {tensor.name} has dynamic axes besides the batch ({tuple(tensor.shape)})",
                                 path=onnx_path, fix="re-export it with `diffseg-engine export`")
        shapes[tensor.name] = [[profile[k], *rest] for k in ("min", "opt", "max")]
        opt.set_shape(tensor.name, *shapes[tensor.name])
    config.add_optimization_profile(opt)
    timing_file = None
    if runtime["module"] == "tensorrt":  # TensorRT-RTX has no timing cache (its calls are no-ops)
        timing_file = cache_dir() / f"timing-{runtime['version']}-{(target['name'] or 'any').replace(' ', '_')}.cache"
        blob = timing_file.read_bytes() if timing_file.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(blob), False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise BackendError(f"TensorRT ({runtime['module']} {runtime['version']}) could not build a plan of "
                           f"{onnx_path.name}", fix="see TensorRT's messages above; try a smaller --max-batch")
    data = bytes(memoryview(plan))
    if timing_file is not None:
        timing_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(timing_file) as f:
            f.write(bytes(memoryview(config.get_timing_cache().serialize())))
    sidecar = {
        "format": SIDECAR_FORMAT,
        "key": plan_key(onnx_sha, runtime, target, info.precision, profile),
        "tensorrt": runtime,
        "gpu": target,
        "onnx": str(onnx_path.resolve()),
        "onnx_sha256": onnx_sha,
        "precision": info.precision,
        "profile": profile,
        "input_shapes": shapes,
        "plan_sha256": hashlib.sha256(data).hexdigest(),
        "plan_bytes": len(data),
        "build_seconds": round(seconds, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "card": json.loads(card.to_json()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:  # the plan first: a sidecar never describes a plan that is not there
        f.write(data)
    with atomic_write(sidecar_path(out)) as f:
        f.write(json.dumps(sidecar, indent=1, sort_keys=True).encode("utf-8"))
    return sidecar


def ensure_plan(onnx_path: str | Path, *, max_batch: int = DEFAULT_MAX_BATCH, opt_batch: int | None = None,
                rebuild: bool = False, folder: str | Path | None = None, trt=None,
                device_index: int = 0) -> tuple[Path, bool]:
    """The cached plan of `onnx_path` for this TensorRT, GPU, precision and profile: (path, built_now).
    Built when missing, when its plan or sidecar do not match, or with `rebuild`."""
    trt = trt or trt_module()
    onnx_path = Path(onnx_path)
    info = inspect_onnx(onnx_path)
    profile = batch_profile(max_batch, opt_batch)
    key = plan_key(file_sha256(onnx_path), runtime_of(trt), _target(trt, device_index), info.precision, profile)
    path = Path(folder or cache_dir()) / f"{key[:32]}.plan"
    if not rebuild and path.is_file() and sidecar_path(path).is_file():
        try:
            side = read_sidecar(path)
            if side.get("key") == key and file_sha256(path) == side.get("plan_sha256"):
                return path, False
        except ModelFileError:
            pass  # a damaged entry is rebuilt
    build_plan(onnx_path, path, max_batch=max_batch, opt_batch=opt_batch, trt=trt, device_index=device_index)
    return path, True


def read_sidecar(plan: str | Path) -> dict:
    """The JSON sidecar of `plan`, or ModelFileError naming how to rebuild."""
    side = sidecar_path(plan)
    if not side.is_file():
        raise ModelFileError(f"TensorRT plan has no sidecar {side.name} (TensorRT version, GPU, ONNX digest)",
                             path=plan, fix=_rebuild_fix(None))
    try:
        data = json.loads(side.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"the sidecar {side.name} is not readable JSON ({exc})", path=plan,
                             fix=_rebuild_fix(None)) from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise ModelFileError(f"the sidecar {side.name} is not a diffseg-engine plan sidecar", path=plan,
                             fix=_rebuild_fix(None))
    return data


def check_plan(plan: str | Path, *, trt=None, device_index: int = 0) -> dict:
    """Refuse a plan that is not the one its sidecar describes, that another TensorRT built, or that was built
    for another GPU; and refuse to go on without a CUDA device. Returns the sidecar. Creates no TensorRT object
    (the caller may create the runtime only after this returns)."""
    plan = Path(plan)
    if not plan.is_file():
        raise ModelFileError("TensorRT plan not found", path=plan, fix="check the --model path")
    side = read_sidecar(plan)
    fix = _rebuild_fix(side.get("onnx"), side.get("precision"))
    if file_sha256(plan) != side.get("plan_sha256"):
        raise ModelFileError("TensorRT plan does not match the sha256 in its sidecar (modified or partly written)",
                             path=plan, fix=fix)
    trt = trt or trt_module(side.get("tensorrt", {}).get("module"))
    have, built = runtime_of(trt), side.get("tensorrt", {})
    if have != built:
        raise ModelFileError(f"TensorRT plan was built by {built.get('module')} {built.get('version')}, this "
                             f"machine has {have['module']} {have['version']}", path=plan, fix=fix)
    devices = cuda_devices()
    if devices is None:
        raise BackendError("the TensorRT backend needs cuda-bindings to find the GPU and hold device buffers",
                           fix="pip install cuda-python, or use --backend onnxruntime")
    dev = next((d for d in devices if d["index"] == device_index), None)
    if dev is None:
        raise BackendError(f"no CUDA device {device_index} here; a TensorRT plan runs only on an NVIDIA GPU",
                           fix="use --backend onnxruntime (CPU or CUDA), or run on a machine with a GPU")
    gpu = side.get("gpu") or {}
    if gpu.get("name") is not None and (gpu["name"], gpu.get("compute_capability")) != \
            (dev["name"], dev["compute_capability"]):
        raise ModelFileError(f"TensorRT plan was built for {gpu['name']} (compute capability "
                             f"{gpu.get('compute_capability')}), this is {dev['name']} "
                             f"({dev['compute_capability']})", path=plan, fix=fix)
    return side
