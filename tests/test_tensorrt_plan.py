"""TensorRT plans built with the real TensorRT builder (tensorrt-rtx builds without a GPU): the shipped default's
fp32 and fp16 step graphs, the sidecar, the cache key, rebuilds and refusals. Execution of a plan needs an
NVIDIA GPU with TensorRT: those tests are marked `gpu` and skip here.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffseg_engine.backends import open_backend, read_card
from diffseg_engine.core.errors import BackendError, ModelFileError
from diffseg_engine.pipeline.models import DEFAULT_MODEL_DIR

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx (the test extra) builds plans without a GPU")

from diffseg_engine.artifacts import tensorrt_plan as tp  # noqa: E402
from diffseg_engine.artifacts.onnx_file import inspect_onnx  # noqa: E402

MAX_BATCH = 4


@pytest.fixture(scope="module")
def default_onnx():
    path = DEFAULT_MODEL_DIR / "default.onnx"
    if not path.is_file():
        pytest.skip("no shipped default.onnx")
    return path


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory):
    """The shipped default's weights exported with --precision fp16."""
    pytest.importorskip("torch")
    from diffseg_engine.export.onnx_export import export_onnx
    weights = DEFAULT_MODEL_DIR / "default.safetensors"
    if not weights.is_file():
        pytest.skip("no shipped default.safetensors")
    return export_onnx(weights, tmp_path_factory.mktemp("fp16") / "default.fp16.onnx", "fp16")


@pytest.fixture(scope="module")
def plans(tmp_path_factory, default_onnx, fp16_onnx):
    """The cache folder after building the default's fp32 and fp16 plans once each (the real builder)."""
    folder = tmp_path_factory.mktemp("plans")
    fp32, built32 = tp.ensure_plan(default_onnx, max_batch=MAX_BATCH, folder=folder, trt=trt)
    fp16, built16 = tp.ensure_plan(fp16_onnx, max_batch=MAX_BATCH, folder=folder, trt=trt)
    assert built32 and built16
    return {"folder": folder, "fp32": fp32, "fp16": fp16, "onnx32": default_onnx, "onnx16": fp16_onnx}


@pytest.mark.slow
def test_default_step_graphs_build_with_sidecar(plans):
    for prec, onnx_key in (("fp32", "onnx32"), ("fp16", "onnx16")):
        plan = plans[prec]
        side = tp.read_sidecar(plan)
        assert plan.stat().st_size == side["plan_bytes"] > 100_000
        assert side["tensorrt"] == {"module": "tensorrt_rtx", "version": trt.__version__}
        assert side["precision"] == prec
        assert side["onnx_sha256"] == tp.file_sha256(plans[onnx_key])
        assert side["plan_sha256"] == tp.file_sha256(plan)
        assert side["profile"] == {"min": 1, "opt": MAX_BATCH, "max": MAX_BATCH}
        card = inspect_onnx(plans[onnx_key]).card
        assert side["card"] == json.loads(card.to_json())
        h = card.image_size
        assert side["input_shapes"]["x_t"] == [[1, 1, h, h], [MAX_BATCH, 1, h, h], [MAX_BATCH, 1, h, h]]
        assert set(side["gpu"]) == {"name", "compute_capability"}  # null name: a portable TensorRT-RTX plan
        assert plan.name == side["key"][:32] + ".plan"
    assert tp.read_sidecar(plans["fp32"])["key"] != tp.read_sidecar(plans["fp16"])["key"]


@pytest.mark.slow
def test_cached_plan_is_reused_and_damaged_one_rebuilt(plans):
    plan = plans["fp32"]
    mtime = plan.stat().st_mtime_ns
    again, built = tp.ensure_plan(plans["onnx32"], max_batch=MAX_BATCH, folder=plans["folder"], trt=trt)
    assert (again, built) == (plan, False) and plan.stat().st_mtime_ns == mtime
    data = bytearray(plan.read_bytes())  # a damaged cache entry (bit flip in the middle) is rebuilt, not used
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    again, built = tp.ensure_plan(plans["onnx32"], max_batch=MAX_BATCH, folder=plans["folder"], trt=trt)
    assert (again, built) == (plan, True)
    assert tp.file_sha256(plan) == tp.read_sidecar(plan)["plan_sha256"]


def test_cache_key_covers_everything_that_decides_the_plan():
    base = dict(onnx_sha256="a" * 64, runtime={"module": "tensorrt", "version": "10.9"},
                target={"name": "NVIDIA H200", "compute_capability": "9.0"}, precision="fp16",
                profile={"min": 1, "opt": 8, "max": 8})
    key = tp.plan_key(**base)
    for field, other in (("onnx_sha256", "b" * 64), ("runtime", {"module": "tensorrt", "version": "10.10"}),
                         ("runtime", {"module": "tensorrt_rtx", "version": "10.9"}),
                         ("target", {"name": "NVIDIA H100", "compute_capability": "9.0"}),
                         ("precision", "bf16"), ("profile", {"min": 1, "opt": 8, "max": 16})):
        assert tp.plan_key(**{**base, field: other}) != key, field
    assert tp.plan_key(**base) == key


@pytest.mark.slow
def test_refusals_on_real_plans(plans, tmp_path, monkeypatch):
    src = plans["fp16"]
    plan = tmp_path / "model.plan"
    shutil.copyfile(src, plan)
    # no sidecar
    with pytest.raises(ModelFileError, match="no sidecar.*--engine tensorrt"):
        tp.check_plan(plan, trt=trt)
    side = tp.read_sidecar(src)
    # built by another TensorRT: refused with the command that rebuilds it (precision included)
    tp.sidecar_path(plan).write_text(json.dumps({**side, "tensorrt": {"module": "tensorrt_rtx",
                                                                        "version": "1.0.0.1"}}))
    with pytest.raises(ModelFileError, match=r"built by tensorrt_rtx 1\.0\.0\.1.*export .*default\.fp16\.onnx "
                                             r"--engine tensorrt --precision fp16"):
        tp.check_plan(plan, trt=trt)
    # a plan that is not the one the sidecar describes
    tp.sidecar_path(plan).write_text(json.dumps(side))
    plan.write_bytes(plan.read_bytes()[:-1])
    with pytest.raises(ModelFileError, match="does not match the sha256"):
        tp.check_plan(plan, trt=trt)
    shutil.copyfile(src, plan)
    # the right plan on a machine without a CUDA device: refused before any TensorRT runtime object exists
    assert read_card(plan) == inspect_onnx(plans["onnx16"]).card  # `segment` reads the card from the sidecar
    if tp.cuda_devices():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(BackendError, match="cuda-bindings|no CUDA device"):
        tp.check_plan(plan, trt=trt)
    with pytest.raises(BackendError, match="cuda-bindings|no CUDA device"):
        open_backend("tensorrt", plan, device="auto")  # the CLI's path: an error message, not a crash
    # built for another GPU than this one (the device query answered as on a GPU machine)
    tp.sidecar_path(plan).write_text(json.dumps({**side, "gpu": {"name": "NVIDIA H200",
                                                                  "compute_capability": "9.0"}}))
    monkeypatch.setattr(tp, "cuda_devices", lambda: [{"index": 0, "name": "NVIDIA GeForce RTX 4090",
                                                      "compute_capability": "8.9"}])
    with pytest.raises(ModelFileError, match="built for NVIDIA H200.*this is NVIDIA GeForce RTX 4090"):
        tp.check_plan(plan, trt=trt)
    monkeypatch.setattr(tp, "cuda_devices", lambda: [{"index": 0, "name": "NVIDIA H200",
                                                      "compute_capability": "9.0"}])
    assert tp.check_plan(plan, trt=trt)["precision"] == "fp16"


def test_cli_export_tensorrt_from_onnx(tmp_path, default_onnx, monkeypatch, capsys):
    from diffseg_engine.cli import main
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIFFSEG_TENSORRT", "tensorrt_rtx")
    out = tmp_path / "copy" / "default.plan"
    with pytest.raises(SystemExit) as exc:
        main(["export", str(default_onnx), "--engine", "tensorrt", "--max-batch", "2", "--out", str(out)])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "built " in text and "tensorrt_rtx" in text and "batch 1..2" in text
    assert tp.read_sidecar(out)["plan_sha256"] == tp.file_sha256(out)
    cached = list((tmp_path / "cache" / "tensorrt").glob("*.plan"))
    assert len(cached) == 1 and cached[0].read_bytes() == out.read_bytes()
    with pytest.raises(SystemExit) as exc:  # --precision that is not the ONNX file's own: a usage error
        main(["export", str(default_onnx), "--engine", "tensorrt", "--precision", "fp16"])
    assert exc.value.code == 2


@pytest.mark.gpu
def test_plan_runs_like_onnxruntime_on_gpu(plans):
    """On a machine with an NVIDIA GPU and TensorRT: the fp32 plan's step matches onnxruntime's."""
    if not tp.cuda_devices():
        pytest.skip("needs a CUDA device")
    from diffseg_engine.backends.ort import OnnxRuntimeBackend
    from diffseg_engine.backends.tensorrt import TensorRTBackend
    from diffseg_engine.export.onnx_export import example_inputs
    eng = TensorRTBackend.load(plans["fp32"])
    ex = example_inputs(eng.card, 3)
    ref = OnnxRuntimeBackend.load(plans["onnx32"], device="cpu").infer(**ex)
    assert np.abs(eng.infer(**ex) - ref).max() < 1e-3
