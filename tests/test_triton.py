"""`export --triton-repo`: the model repository's layout and its config.pbtxt, parsed against Triton's schema.

The schema is the subset of Triton's `model_config.proto` (triton-inference-server/common, protobuf/
model_config.proto) that the config uses, with the same message, field and enum names and field numbers, built
here as a protobuf descriptor: `text_format.Parse` refuses any field name, nesting or value type that Triton's
parser would refuse.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("google.protobuf")
from google.protobuf import descriptor_pb2, descriptor_pool, text_format  # noqa: E402
from google.protobuf import message_factory  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from diffseg_engine.core.errors import OutputError  # noqa: E402
from diffseg_engine.artifacts.step_graph import STEP_INPUTS, STEP_OUTPUT  # noqa: E402

F = descriptor_pb2.FieldDescriptorProto


def _model_config_class():
    fp = descriptor_pb2.FileDescriptorProto(name="model_config_subset.proto", package="inference", syntax="proto3")
    dt = fp.enum_type.add(name="DataType")
    for i, n in enumerate(["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
                           "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32",
                           "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]):
        dt.value.add(name=n, number=i)

    def msg(name, fields, enums=None):
        m = fp.message_type.add(name=name)
        for ename, values in (enums or {}).items():
            e = m.enum_type.add(name=ename)
            for i, v in enumerate(values):
                e.value.add(name=v, number=i)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
        return m
    one, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg("ModelTensorReshape", [("shape", 1, F.TYPE_INT64, rep, None)])
    msg("ModelInput", [("name", 1, F.TYPE_STRING, one, None), ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
                       ("format", 3, F.TYPE_ENUM, one, ".inference.ModelInput.Format"),
                       ("dims", 4, F.TYPE_INT64, rep, None),
                       ("reshape", 5, F.TYPE_MESSAGE, one, ".inference.ModelTensorReshape"),
                       ("is_shape_tensor", 6, F.TYPE_BOOL, one, None), ("allow_ragged_batch", 7, F.TYPE_BOOL, one, None),
                       ("optional", 8, F.TYPE_BOOL, one, None)],
        {"Format": ["FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"]})
    msg("ModelOutput", [("name", 1, F.TYPE_STRING, one, None), ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
                        ("dims", 3, F.TYPE_INT64, rep, None), ("label_filename", 4, F.TYPE_STRING, one, None),
                        ("reshape", 5, F.TYPE_MESSAGE, one, ".inference.ModelTensorReshape"),
                        ("is_shape_tensor", 6, F.TYPE_BOOL, one, None)])
    msg("ModelInstanceGroup", [("name", 1, F.TYPE_STRING, one, None), ("count", 2, F.TYPE_INT32, one, None),
                               ("gpus", 3, F.TYPE_INT32, rep, None),
                               ("kind", 4, F.TYPE_ENUM, one, ".inference.ModelInstanceGroup.Kind")],
        {"Kind": ["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]})
    msg("ModelDynamicBatching", [("preferred_batch_size", 1, F.TYPE_INT32, rep, None),
                                 ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, one, None),
                                 ("preserve_ordering", 3, F.TYPE_BOOL, one, None)])
    msg("ModelConfig", [("name", 1, F.TYPE_STRING, one, None), ("platform", 2, F.TYPE_STRING, one, None),
                        ("max_batch_size", 4, F.TYPE_INT32, one, None),
                        ("input", 5, F.TYPE_MESSAGE, rep, ".inference.ModelInput"),
                        ("output", 6, F.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
                        ("instance_group", 7, F.TYPE_MESSAGE, rep, ".inference.ModelInstanceGroup"),
                        ("default_model_filename", 8, F.TYPE_STRING, one, None),
                        ("dynamic_batching", 11, F.TYPE_MESSAGE, one, ".inference.ModelDynamicBatching"),
                        ("backend", 17, F.TYPE_STRING, one, None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ModelConfig = _model_config_class()


def _parse(path: Path):
    return text_format.Parse(path.read_text(), ModelConfig())


def test_schema_subset_refuses_what_triton_refuses():
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "x"\nmax_batch: 4\n', ModelConfig())  # unknown field
    with pytest.raises(text_format.ParseError):
        text_format.Parse('input [ { name: "x" data_type: FP32 } ]', ModelConfig())  # enum value without TYPE_
    with pytest.raises(text_format.ParseError):
        text_format.Parse('dynamic_batching { max_queue_delay_microseconds: -1 }', ModelConfig())


def test_triton_repository_layout_and_config(tiny_model, tmp_path):
    import onnxruntime as ort

    from diffseg_engine.backends import read_card
    from diffseg_engine.cli import app
    _, onnx_path = tiny_model
    card = read_card(onnx_path)
    plan = onnx_path.with_suffix(".plan")
    plan.write_bytes(b"not a real engine: the repository only copies it")
    repo = tmp_path / "repo"
    try:
        res = CliRunner().invoke(app, ["export", str(onnx_path), "--triton-repo", str(repo)])
    finally:
        plan.unlink()
    assert res.exit_code == 0, res.output
    name = card.name
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()) == [
        f"{name}/1/model.onnx", f"{name}/config.pbtxt", f"{name}_trt/1/model.plan", f"{name}_trt/config.pbtxt"]
    assert (repo / name / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    sess = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    graph_inputs = {i.name: i.shape for i in sess.get_inputs()}
    for folder, platform in ((name, "onnxruntime_onnx"), (f"{name}_trt", "tensorrt_plan")):
        cfg = _parse(repo / folder / "config.pbtxt")
        assert cfg.name == folder and cfg.platform == platform
        assert cfg.max_batch_size == 256 and cfg.HasField("dynamic_batching")
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
        assert [i.name for i in cfg.input] == list(STEP_INPUTS) == list(graph_inputs)
        assert [o.name for o in cfg.output] == [STEP_OUTPUT] == [o.name for o in sess.get_outputs()]
        for i in cfg.input:  # the graph's shape without its batch axis; [B] alone: dims [1] reshaped to []
            assert i.data_type == 11  # TYPE_FP32
            want = list(graph_inputs[i.name][1:])
            if want:
                assert list(i.dims) == want and not i.HasField("reshape"), i
            else:
                assert list(i.dims) == [1] and i.HasField("reshape") and list(i.reshape.shape) == [], i
        assert list(cfg.output[0].dims) == list(sess.get_outputs()[0].shape[1:]) == [1, card.image_size,
                                                                                      card.image_size]
        assert len(cfg.instance_group) == 1 and cfg.instance_group[0].count == 1
    # a batch as Triton would form it runs on the copied graph
    B, C, H = 3, len(card.modalities), card.image_size
    feeds = {"image": np.zeros((B, C, H, H), np.float32), "x_t": np.zeros((B, 1, H, H), np.float32),
             "timestep": np.zeros(B, np.float32), "coef": np.zeros((B, 8), np.float32),
             "noise": np.zeros((B, 1, H, H), np.float32)}
    assert sess.run([STEP_OUTPUT], feeds)[0].shape == (B, 1, H, H)
    # a second export into the same repository is refused, one line
    res = CliRunner().invoke(app, ["export", str(onnx_path), "--triton-repo", str(repo)])
    try:
        text = res.output + (res.stderr or "")
    except ValueError:
        text = res.output
    assert res.exit_code == OutputError("x").exit_code and "already holds a model folder" in text, text
