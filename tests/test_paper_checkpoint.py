"""Checkpoints of the paper's own code (`diffseg-engine export model.pt`): safe loading, strict conversion to
safetensors with a paper model card, ONNX export with parity, and segmentation of the reference 2D slices."""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from typer.testing import CliRunner  # noqa: E402

from diffseg_engine.artifacts.card import Architecture  # noqa: E402
from diffseg_engine.cli import app  # noqa: E402
from diffseg_engine.core.errors import EXIT_CODES, ModelFileError  # noqa: E402
from diffseg_engine.export.onnx_export import check_parity  # noqa: E402
from diffseg_engine.export.paper_checkpoint import convert_checkpoint  # noqa: E402
from diffseg_engine.train.perturb import perturbed  # noqa: E402
from diffseg_engine.train.unet import UNetModel  # noqa: E402
from diffseg_engine.artifacts.weights import load_weights  # noqa: E402

MODEL_FILE_EXIT = EXIT_CODES[ModelFileError]

#: The paper's flags: --image_size 256 --num_channels 128 --num_res_blocks 2 --attention_resolutions 16
#: --num_heads 1 --learn_sigma True (channel_mult for 256: 1,1,2,2,4,4), 4 modalities + the noisy mask.
PAPER = Architecture(in_channels=5, model_channels=128, out_channels=2, num_res_blocks=2, attention_ds=(16,),
                     channel_mult=(1, 1, 2, 2, 4, 4), num_heads=1)
#: Test-sized: the paper's first four levels at a quarter of the width (GroupNorm-32-friendly), attention at 8.
SMALL = Architecture(in_channels=5, model_channels=32, out_channels=2, num_res_blocks=2, attention_ds=(8,),
                     channel_mult=(1, 1, 2, 2), num_heads=1)

runner = CliRunner()


def _cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _randomised_small(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    return perturbed(UNetModel(SMALL), seed)


@pytest.fixture(scope="module")
def small_model() -> UNetModel:
    return _randomised_small()


@pytest.fixture(scope="module")
def small_pt(small_model, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("small") / "model.pt"
    torch.save(small_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def exported_small(small_pt):
    """`diffseg-engine export model.pt` once: (CLI result, safetensors path, onnx path)."""
    result = _cli("export", small_pt)
    return result, small_pt.with_suffix(".safetensors"), small_pt.with_suffix(".onnx")


# ---- the paper-sized network -------------------------------------------------------------------------------
def test_paper_sized_checkpoint_converts_with_paper_card(tmp_path):
    with torch.device("meta"):  # names and shapes only; the converter builds the one real 113 M-parameter U-Net
        model = UNetModel(PAPER)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = list(shapes)
    # The state dict torch.save would write for this model, each tensor a constant distinct per name (so a key
    # mix-up would show) stored as a stride-0 view: the file holds one float per tensor instead of 455 MB.
    state = {k: torch.full((), i / 1000).expand(shape) for i, (k, shape) in enumerate(shapes.items())}
    pt = tmp_path / "emasavedmodel_0.9999_000000.pt"
    torch.save(state, pt)
    del model, state

    out = convert_checkpoint(pt, tmp_path / "paper.safetensors")
    assert out == tmp_path / "paper.safetensors"
    tensors, card = load_weights(out)  # verifies the digest in the card
    assert card.architecture == PAPER
    assert sum(int(np.prod(s)) for s in shapes.values()) > 113_000_000
    assert {k: v.shape for k, v in tensors.items()} == shapes
    assert all(v.dtype == np.float32 for v in tensors.values())
    for i in (0, 1, len(names) // 2, len(names) - 1):
        assert np.all(tensors[names[i]] == np.float32(i / 1000)), names[i]
    assert card.name == "paper-emasavedmodel_0.9999_000000" and card.preset == "paper-import"
    assert card.modalities == ("t1", "t1ce", "t2", "flair")
    p = card.preprocessing
    assert (p.intensity, p.crop_size, p.downsample, card.image_size) == ("none", 224, 1, 224)
    d = card.diffusion
    assert (d.schedule, d.timesteps, d.learn_sigma) == ("linear", 1000, True)
    assert (d.mask_low, d.mask_high, d.clip_denoised, d.clip_low, d.clip_high) == (0.0, 1.0, True, -1.0, 1.0)
    assert (d.sampler, d.sampling_steps) == ("ddpm", 1000)  # the paper's own sampler is the default
    assert card.training["source"] == str(pt)
    assert card.training["source_sha256"] == _sha256(pt)
    assert card.training["converted_by"] == "diffseg-engine export"


# ---- a small network through the CLI ------------------------------------------------------------------------
@pytest.mark.slow
def test_export_command_converts_and_onnx_matches_torch(exported_small, small_model, small_pt):
    result, st, onnx_path = exported_small
    assert result.exit_code == 0, result.output
    assert f"converted {small_pt} -> {st}" in result.output
    assert st.is_file() and onnx_path.is_file()
    m = re.search(r"parity: max \|onnxruntime - torch\| = (\S+)", result.output)
    assert m and float(m.group(1)) <= 1e-4, result.output

    tensors, card = load_weights(st)
    assert card.architecture == SMALL and card.name == "paper-model" and card.preset == "paper-import"
    assert card.training["source_sha256"] == _sha256(small_pt) and card.training["loaded_with"] == "weights_only"
    original = small_model.state_dict()
    assert sorted(tensors) == sorted(original)
    for k, v in original.items():  # bit-identical weights: the converted model is the torch module
        np.testing.assert_array_equal(tensors[k], v.numpy(), err_msg=k)

    # onnxruntime vs torch on the converted weights, at other inputs than the export command's check
    assert check_parity(st, onnx_path, batch=1, seed=7) <= 1e-4
    from diffseg_engine.backends.ort import read_onnx_card
    assert read_onnx_card(onnx_path) == card

    # the comparison means something: the network's output is far from the zero of a fresh U-Net, and the
    # module rebuilt from the safetensors computes exactly what the original does (fully convolutional: 32x32)
    from diffseg_engine.train.step import build_step
    x = torch.rand(2, 5, 32, 32, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        eps = small_model(x, t)
        again = build_step(card, tensors).net(x, t)
    assert float(eps.abs().mean()) > 1e-2
    torch.testing.assert_close(again, eps, rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["state_dict", "module_prefix", "both"])
def test_wrapped_checkpoints_convert(small_model, tmp_path, wrap):
    sd = small_model.state_dict()
    if wrap in ("module_prefix", "both"):
        sd = {"module." + k: v for k, v in sd.items()}
    obj = {"state_dict": sd} if wrap in ("state_dict", "both") else sd
    pt = tmp_path / "savedmodel000100.pt"
    torch.save(obj, pt)
    tensors, card = load_weights(convert_checkpoint(pt, tmp_path / "w.safetensors"))
    assert card.architecture == SMALL and card.training["loaded_with"] == "weights_only"
    for k, v in small_model.state_dict().items():
        np.testing.assert_array_equal(tensors[k], v.numpy(), err_msg=k)


def test_half_precision_checkpoint_is_saved_as_float32(small_model, tmp_path):
    pt = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in small_model.state_dict().items()}, pt)
    tensors, _ = load_weights(convert_checkpoint(pt, tmp_path / "half.safetensors"))
    w = small_model.state_dict()["out.2.weight"]
    assert tensors["out.2.weight"].dtype == np.float32
    np.testing.assert_array_equal(tensors["out.2.weight"], w.half().float().numpy())


def test_num_heads_and_modalities_are_recorded(small_model, tmp_path):
    pt = tmp_path / "m.pt"
    torch.save(small_model.state_dict(), pt)
    _, card = load_weights(convert_checkpoint(pt, tmp_path / "m.safetensors", num_heads=2,
                                              modalities=("T1", "t1c", "T2", "FLAIR")))
    assert card.architecture.num_heads == 2
    assert card.modalities == ("t1", "t1ce", "t2", "flair")
    with pytest.raises(ModelFileError, match=r"5 input channels.*1 modalities \['flair'\]") as info:
        convert_checkpoint(pt, tmp_path / "f.safetensors", modalities=("flair",))
    assert "m.pt" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize("change, expect", [
    ("delete", r"1 missing key \(middle_block\.1\.qkv\.weight\)"),
    ("add", r"1 unexpected key \(label_emb\.weight\)"),
])
def test_layout_that_does_not_fit_fails_with_one_line(small_model, tmp_path, change, expect):
    sd = dict(small_model.state_dict())
    if change == "delete":
        del sd["middle_block.1.qkv.weight"]
    else:  # a class-conditional guided-diffusion model has a label embedding
        sd["label_emb.weight"] = torch.zeros(10, 4 * SMALL.model_channels)
    pt = tmp_path / "bad.pt"
    torch.save(sd, pt)
    result = _cli("export", pt)
    assert result.exit_code == MODEL_FILE_EXIT, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(expect, lines[0]) and "bad.pt" in lines[0], lines[0]
    assert not pt.with_suffix(".safetensors").exists() and not pt.with_suffix(".onnx").exists()


# ---- untrusted and damaged files -----------------------------------------------------------------------------
class _TouchOnUnpickle:
    """Unpickling this object creates `marker`: stands for any code a malicious checkpoint could run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_untrusted_pickle_is_refused_without_running_code(small_model, tmp_path):
    marker = tmp_path / "code-ran"
    pt = tmp_path / "evil.pt"
    torch.save({"state_dict": small_model.state_dict(), "payload": _TouchOnUnpickle(marker)}, pt)
    assert not marker.exists()
    result = _cli("export", pt)
    assert result.exit_code == MODEL_FILE_EXIT, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--trust-pickle" in lines[0] and "evil.pt" in lines[0], result.output
    assert "unpickling" in lines[0]
    assert not marker.exists()
    assert not pt.with_suffix(".safetensors").exists()
    with pytest.raises(ModelFileError, match="trust-pickle"):
        convert_checkpoint(pt, tmp_path / "evil.safetensors")
    assert not marker.exists()


def test_trusted_pickle_loads_training_checkpoint(small_model, tmp_path):
    pt = tmp_path / "ckpt.pt"  # a training checkpoint with the run's argparse flags: not weights-only loadable
    torch.save({"state_dict": small_model.state_dict(), "args": argparse.Namespace(num_channels=32)}, pt)
    with pytest.raises(ModelFileError, match="trust-pickle"):
        convert_checkpoint(pt, tmp_path / "a.safetensors")
    tensors, card = load_weights(convert_checkpoint(pt, tmp_path / "b.safetensors", trust_pickle=True))
    assert card.training["loaded_with"] == "full_unpickle" and card.architecture == SMALL
    np.testing.assert_array_equal(tensors["out.2.weight"], small_model.state_dict()["out.2.weight"].numpy())


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "text", "plain_pickle", "not_weights"])
def test_damaged_or_foreign_files_raise_model_file_error(small_model, small_pt, tmp_path, damage):
    pt = tmp_path / f"{damage}.pt"
    data = small_pt.read_bytes()
    if damage == "truncated":
        pt.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        pt.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        pt.write_bytes(b"")
    elif damage == "text":
        pt.write_text("this is not a checkpoint\n")
    elif damage == "plain_pickle":
        import pickle
        pt.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    else:
        torch.save([1, 2, 3], pt)
    for trust in (False, True):
        with pytest.raises(ModelFileError) as info:
            convert_checkpoint(pt, tmp_path / "x.safetensors", trust_pickle=trust)
        msg = str(info.value)
        assert str(pt) in msg and "\n" not in msg and len(msg) < 400, msg
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ModelFileError, match="not found"):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "x.safetensors")


# ---- the reference 2D slices, end to end ----------------------------------------------------------------------
SLICE_FOLDERS = ("000246", "001919")


@pytest.mark.slow
@pytest.mark.parametrize("folder_name", SLICE_FOLDERS)
def test_reference_slices_segment_with_converted_model(exported_small, shared_data, tmp_path, folder_name):
    import nibabel as nib

    from diffseg_engine.inputs.cases import find_case
    from diffseg_engine.inputs.preprocess import prepare_case

    root = shared_data / "slices2d-unlabelled"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == list(SLICE_FOLDERS)
    result, st, onnx_path = exported_small
    assert result.exit_code == 0, result.output
    _, card = load_weights(st)
    folder = root / folder_name
    case = find_case(folder)
    assert case.layout == "slices2d" and sorted(case.modalities) == sorted(card.modalities)
    imgs = [nib.load(case.modalities[m]) for m in card.modalities]
    raw = [im.get_fdata() for im in imgs]
    for a in raw:  # the reference slices: 240x240 float64 already in [0, 1]
        assert a.shape == (240, 240) and a.dtype == np.float64 and a.min() >= 0 and a.max() <= 1
    prepared = prepare_case(raw, imgs[0].affine, card.preprocessing)
    assert prepared.inputs.shape == (1, 4, 224, 224)
    for c, a in enumerate(raw):  # the network sees exactly the reference crop [8:-8, 8:-8], in card order
        np.testing.assert_array_equal(prepared.inputs[0, c], a[8:-8, 8:-8].astype(np.float32))

    out = tmp_path / "out"
    res = _cli("segment", folder, "--model", onnx_path, "--out", out, "--steps", 3, "--n", 2,
               "--sampler", "ddim", "--quiet")
    assert res.exit_code == 0, res.output
    brain = np.any([a != 0 for a in raw], axis=0)
    for kind in ("mean", "variance", "mask"):
        f = out / f"{folder_name}_{kind}.nii.gz"
        img = nib.load(f)
        assert img.shape == (240, 240), (f, img.shape)  # 2D like the input
        np.testing.assert_array_equal(img.affine, imgs[0].affine)
        data = img.get_fdata()
        assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1
        outside = np.ones((240, 240), bool)
        outside[8:-8, 8:-8] = False
        assert not data[outside | ~brain].any(), kind  # nothing outside the crop window or the brain
    mask = nib.load(out / f"{folder_name}_mask.nii.gz")
    assert mask.get_data_dtype() == np.uint8
    prov = json.loads((out / f"{folder_name}_provenance.json").read_text())
    assert prov["complete"] and prov["model_card"]["name"] == "paper-model"
    assert prov["sampling"]["n"] == 2 and prov["sampling"]["slices"] == 1
