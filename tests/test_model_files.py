"""Untrusted model files: tampered or truncated safetensors and ONNX, ONNX external data outside its folder,
weights that do not match the model card, and pickles that must never run. Each is refused by `segment` with
one line naming the file, exit code 12, and nothing written to --out."""
from __future__ import annotations

import json
import pathlib
import struct

import numpy as np
import pytest
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx")

from diffseg_engine.cli import app  # noqa: E402
from diffseg_engine.core.errors import EXIT_CODES, ModelFileError  # noqa: E402
from diffseg_engine.artifacts.onnx_file import DIGEST_KEY, content_digest, inspect_onnx  # noqa: E402

MODEL = EXIT_CODES[ModelFileError]
runner = CliRunner()


def _segment(shared_data, model, out, *extra) -> tuple[int, str]:
    case = shared_data / "train" / "BraTS18_CBICA_ASK"
    res = runner.invoke(app, ["segment", str(case), "--model", str(model), "--out", str(out), "-q", "--n", "1",
                              "--steps", "1", *extra])
    return res.exit_code, res.output


def _refused(code: int, output: str, model: pathlib.Path, needle: str, out: pathlib.Path) -> None:
    assert code == MODEL, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and model.name in lines[0] and needle in lines[0], output
    assert not out.exists()


def _largest_initializer(model):
    return max(model.graph.initializer, key=lambda t: len(t.raw_data))


def _with_digest(model) -> bytes:
    """`model` serialized with a fresh content digest, as `diffseg-engine export` writes it."""
    for i, e in enumerate(model.metadata_props):
        if e.key == DIGEST_KEY:
            del model.metadata_props[i]
            break
    digest = content_digest(model.SerializeToString())
    entry = model.metadata_props.add()
    entry.key, entry.value = DIGEST_KEY, digest
    return model.SerializeToString()


# ---- safetensors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, needle", [
    ("flipped_bit", "sha256"), ("truncated", "truncated"), ("card_of_other_weights", "sha256"),
    ("header_garbage", "not valid JSON"), ("empty", "too short"),
])
def test_damaged_safetensors_are_refused(shared_data, tiny_model, tmp_path, damage, needle):
    weights = tiny_model[0]
    raw = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    bad = tmp_path / f"{damage}.safetensors"
    if damage == "flipped_bit":
        raw[-100] ^= 0x10
    elif damage == "truncated":
        raw = raw[: len(raw) - 4096]
    elif damage == "card_of_other_weights":  # the tensors are intact, the card vouches for other weights
        header = json.loads(raw[8:8 + n])
        card = json.loads(header["__metadata__"]["diffseg_card"])
        card["weights_sha256"] = "0" * 64
        header["__metadata__"]["diffseg_card"] = json.dumps(card)
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        raw = bytearray(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    elif damage == "header_garbage":
        raw[8:16] = b"\xff" * 8
    else:
        raw = bytearray()
    bad.write_bytes(bytes(raw))
    out = tmp_path / "out"
    code, output = _segment(shared_data, bad, out, "--backend", "torch", "--device", "cpu")
    _refused(code, output, bad, needle, out)


# ---- ONNX ---------------------------------------------------------------------------------------------------
def test_exported_onnx_carries_a_digest_that_inspect_checks(tiny_model):
    info = inspect_onnx(tiny_model[1])
    assert info.stored_digest == info.digest and len(info.digest) == 64 and info.external == []


@pytest.mark.parametrize("damage, needle", [
    ("weights_changed", "does not match its sha256"), ("card_changed", "does not match its sha256"),
    ("truncated", "truncated or corrupt"), ("random_bytes", "not a valid ONNX"), ("empty", "empty"),
    ("external_data_parent", "outside the model's folder"), ("external_data_absolute", "outside the model's folder"),
    ("external_data_symlink", "outside the model's folder"),
])
def test_damaged_onnx_is_refused_before_onnxruntime_opens_it(shared_data, tiny_model, tmp_path, damage, needle):
    src = tiny_model[1]
    folder = tmp_path / "models"
    folder.mkdir()
    bad = folder / f"{damage}.onnx"
    model = onnx.load(str(src))
    if damage == "weights_changed":  # one weight nudged, the stored digest kept
        t = _largest_initializer(model)
        arr = np.frombuffer(t.raw_data, np.float32).copy()
        arr[len(arr) // 2] += 0.01
        t.raw_data = arr.tobytes()
        bad.write_bytes(model.SerializeToString())
    elif damage == "card_changed":  # the card edited to claim other preprocessing
        for e in model.metadata_props:
            if e.key == "diffseg_card":
                card = json.loads(e.value)
                card["preprocessing"]["crop_size"] = 240
                e.value = json.dumps(card)
        bad.write_bytes(model.SerializeToString())
    elif damage == "truncated":
        blob = src.read_bytes()
        bad.write_bytes(blob[: len(blob) * 2 // 3])
    elif damage == "random_bytes":
        bad.write_bytes(np.random.default_rng(1).bytes(100_000))
    elif damage == "empty":
        bad.write_bytes(b"")
    else:  # the largest initializer moved to an external file: outside the folder, or a link leading there
        secret = tmp_path / "secret.bin"
        t = _largest_initializer(model)
        secret.write_bytes(t.raw_data)
        location = {"external_data_parent": "../secret.bin", "external_data_absolute": str(secret),
                    "external_data_symlink": "inside.bin"}[damage]
        if damage == "external_data_symlink":
            (folder / "inside.bin").symlink_to(secret)
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", location
        bad.write_bytes(_with_digest(model))  # a consistent file: only the location is wrong
    out = tmp_path / "out"
    code, output = _segment(shared_data, bad, out)
    _refused(code, output, bad, needle, out)


def test_external_data_inside_the_folder_and_files_without_digest_still_load(tiny_model, tmp_path):
    from diffseg_engine.backends.ort import OnnxRuntimeBackend
    model = onnx.load(str(tiny_model[1]))
    t = _largest_initializer(model)
    (tmp_path / "weights.bin").write_bytes(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
    (tmp_path / "external.onnx").write_bytes(_with_digest(model))
    legacy = onnx.load(str(tiny_model[1]))
    kept = [e for e in legacy.metadata_props if e.key != DIGEST_KEY]
    del legacy.metadata_props[:]
    legacy.metadata_props.extend(kept)  # as exported before digests existed
    (tmp_path / "legacy.onnx").write_bytes(legacy.SerializeToString())
    assert inspect_onnx(tmp_path / "legacy.onnx").stored_digest is None
    reference = OnnxRuntimeBackend.load(tiny_model[1], device="cpu", threads=1)
    h = reference.card.image_size
    rng = np.random.default_rng(0)
    args = (rng.random((2, 1, h, h), dtype=np.float32), rng.standard_normal((2, 1, h, h)).astype(np.float32),
            np.array([3.0, 7.0], np.float32), np.tile(np.array([1.2, 0.6, 0.5, 0.5, -6, -4, 1, 0], np.float32),
                                                      (2, 1)), rng.standard_normal((2, 1, h, h)).astype(np.float32))
    want = reference.infer(*args)
    for name in ("external.onnx", "legacy.onnx"):
        np.testing.assert_array_equal(OnnxRuntimeBackend.load(tmp_path / name, device="cpu", threads=1).infer(*args),
                                      want)


# ---- pickles ------------------------------------------------------------------------------------------------------
class _TouchOnUnpickle:
    """Unpickling this creates `marker`: it stands for any code a malicious checkpoint could run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_planted_pickle_never_runs(shared_data, tiny_model, tmp_path):
    import torch
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _TouchOnUnpickle(marker)}, evil)
    out = tmp_path / "out"
    for backend in ("onnxruntime", "torch"):  # segment never unpickles: it points to `export`
        code, output = _segment(shared_data, evil, out, "--backend", backend, "--device", "cpu")
        _refused(code, output, evil, "PyTorch checkpoint", out)
        assert "export" in output and not marker.exists()
    res = runner.invoke(app, ["export", str(evil), "--no-check"])  # export tries weights_only and stops there
    assert res.exit_code == MODEL and "--trust-pickle" in res.output and len(res.output.strip().splitlines()) == 1
    assert not marker.exists()
    assert not evil.with_suffix(".safetensors").exists() and not evil.with_suffix(".onnx").exists()
    # the same file saved as .safetensors or .onnx is just a damaged model file, never unpickled
    for suffix in (".safetensors", ".onnx"):
        disguised = tmp_path / f"evil{suffix}"
        disguised.write_bytes(evil.read_bytes())
        code, output = _segment(shared_data, disguised, out)
        assert code == MODEL and len(output.strip().splitlines()) == 1, output
    assert not marker.exists()
