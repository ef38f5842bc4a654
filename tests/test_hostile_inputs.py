"""Hostile inputs through `diffseg-engine segment`, each built in tmp_path from a real BraTS volume.

Every case must end with the exit code of its error kind (errors.EXIT_CODES), one line on stderr naming the
file (or option) at fault, nothing written to --out, and no model loaded: `open_model` is replaced by a
function that fails the test, so each refusal is proven to come before the model is loaded.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from diffseg_engine.cli import app
from diffseg_engine.core.errors import (EXIT_CODES, InputImageError, MissingModalityError, OutputError, UsageError)

IMG, MOD, OUT, USE = (EXIT_CODES[k] for k in (InputImageError, MissingModalityError, OutputError, UsageError))
CASE = "BraTS18_CBICA_ASK"
Z = slice(70, 78)  # eight brain slices: enough for every check, small enough to write fast
runner = CliRunner()


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(shared_data):
    """The cropped real FLAIR and T1 of BraTS18_CBICA_ASK (nibabel images: real headers and affines)."""
    folder = shared_data / "train" / CASE
    return {m: nib.load(str(folder / f"{CASE}_{m}.nii.gz")).slicer[:, :, Z] for m in ("flair", "t1")}


@pytest.fixture(scope="module")
def two_modality_model(tmp_path_factory):
    """A FLAIR + T1 `tiny` model as safetensors (only its card is read by the refusals below)."""
    import torch

    from diffseg_engine.train.presets import build_card, get_preset
    from diffseg_engine.train.unet import UNetModel
    from diffseg_engine.artifacts.weights import save_weights
    card = build_card(get_preset("tiny"), ("flair", "t1"))
    torch.manual_seed(0)
    net = UNetModel(card.architecture)
    path = tmp_path_factory.mktemp("two") / "flair_t1.safetensors"
    save_weights(path, {k: v.numpy() for k, v in net.state_dict().items()}, card)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    import diffseg_engine.pipeline.models as models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were validated")
    monkeypatch.setattr(models, "open_model", refuse)


def _image(data: np.ndarray, like, dtype=None) -> nib.Nifti1Image:
    """`data` with the header and affine of the real image `like`."""
    hdr = like.header.copy()
    hdr.set_data_dtype(dtype or data.dtype)
    img = nib.Nifti1Image(data, like.affine, hdr)
    img.header.set_data_shape(data.shape)
    return img


def _save(img, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _data(real, m="flair") -> np.ndarray:
    return np.array(real[m].dataobj, dtype=np.float32)  # a copy: the fixture is shared


def _gz(real, tmp: Path) -> bytes:
    return _save(real["flair"], tmp / "src" / f"{CASE}_flair.nii.gz").read_bytes()


def _flip(blob: bytes, i: int, bit: int = 0x01) -> bytes:
    return blob[:i] + bytes([blob[i] ^ bit]) + blob[i + 1:]


def _with_header(real, tmp: Path, name: str, **fields) -> Path:
    """The real FLAIR with raw header fields changed (nibabel would otherwise recompute them)."""
    img = _image(_data(real), real["flair"])
    for k, v in fields.items():
        img.header[k] = v
    path = tmp / name
    path.write_bytes(img.header.binaryblock + b"\0" * 4 + _data(real).astype("<f4").tobytes("F"))
    return path


# ---- hostile files (flair model): each builder returns (inputs, expected exit code, text the message has) --
def empty(real, tmp):
    (p := tmp / f"{CASE}_flair.nii.gz").write_bytes(b"")
    return [p], IMG, "not a NIfTI"


def truncated_gzip(real, tmp):
    blob = _gz(real, tmp)
    (p := tmp / f"{CASE}_flair.nii.gz").write_bytes(blob[: len(blob) // 2])
    return [p], IMG, "truncated"


def random_bytes(real, tmp):
    (p := tmp / f"{CASE}_flair.nii.gz").write_bytes(np.random.default_rng(0).bytes(50_000))
    return [p], IMG, "not a NIfTI"


def flipped_byte_in_deflate_stream(real, tmp):
    blob = _gz(real, tmp)
    (p := tmp / f"{CASE}_flair.nii.gz").write_bytes(_flip(blob, len(blob) * 2 // 3))
    return [p], IMG, "corrupt"


def flipped_crc(real, tmp):  # nibabel alone loads this without a word
    blob = _gz(real, tmp)
    (p := tmp / f"{CASE}_flair.nii.gz").write_bytes(_flip(blob, len(blob) - 8, 0xFF))
    return [p], IMG, "corrupt"


def missing_gzip_trailer(real, tmp):  # so does this
    (p := tmp / f"{CASE}_flair.nii.gz").write_bytes(_gz(real, tmp)[:-4])
    return [p], IMG, "truncated or corrupt"


def truncated_uncompressed(real, tmp):
    blob = _save(real["flair"], tmp / "src" / f"{CASE}_flair.nii").read_bytes()
    (p := tmp / f"{CASE}_flair.nii").write_bytes(blob[: len(blob) - 1000])
    return [p], IMG, "truncated"


def enormous_declared_size(real, tmp):
    hdr = real["flair"].header.copy()
    hdr.set_data_shape((4096, 4096, 4096))  # 256 GiB of float32, declared in a 1 KiB file
    (p := tmp / f"{CASE}_flair.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 1024))
    return [p], IMG, "more than the limit"


def gzip_bomb(real, tmp):  # a valid header, then 80 MB of zeros: 80 KB on disk
    img = real["flair"]
    blob = img.header.binaryblock + b"\0" * 4 + _data(real).astype("<f4").tobytes("F")
    (p := tmp / f"{CASE}_flair.nii.gz").write_bytes(gzip.compress(blob + bytes(80 << 20), compresslevel=1))
    return [p], IMG, "header declares"


def five_dimensions(real, tmp):
    d = _data(real)
    return [_save(_image(np.stack([d, d], -1)[:, :, :, None, :], real["flair"]), tmp / f"{CASE}_flair.nii.gz")], \
        IMG, "5 dimensions"


def one_dimension(real, tmp):
    return [_save(_image(_data(real)[:, 120, 4].copy(), real["flair"]), tmp / f"{CASE}_flair.nii.gz")], \
        IMG, "1 dimensions"


def four_d_with_two_volumes(real, tmp):  # a flair-only model cannot tell which volume to use
    d = _data(real)
    return [_save(_image(np.stack([d, d], -1), real["flair"]), tmp / "stack.nii.gz")], MOD, "2 volumes"


def in_plane_too_small(real, tmp):
    return [_save(real["flair"].slicer[100:140, 100:140, :], tmp / f"{CASE}_flair.nii.gz")], IMG, "in-plane size"


def in_plane_too_large(real, tmp):
    d = np.pad(_data(real), ((130, 130), (130, 130), (0, 0)))
    return [_save(_image(d, real["flair"]), tmp / f"{CASE}_flair.nii.gz")], IMG, "in-plane size"


def brain_beyond_the_crop_window(real, tmp):  # 1.5 mm voxels in the header: the brain spans ~280 mm
    img = nib.Nifti1Image(_data(real), real["flair"].affine @ np.diag([1.5, 1.5, 1, 1]), real["flair"].header)
    return [_save(img, tmp / f"{CASE}_flair.nii.gz")], IMG, "crop window"


def singular_affine(real, tmp):
    return [_with_header(real, tmp, f"{CASE}_flair.nii", srow_z=[0, 0, 0, 5], sform_code=1, qform_code=0)], \
        IMG, "singular affine"


def sheared_affine(real, tmp):
    return [_with_header(real, tmp, f"{CASE}_flair.nii", srow_x=[-1, 0.3, 0, 0], sform_code=1, qform_code=0)], \
        IMG, "sheared affine"


def nan_affine(real, tmp):
    return [_with_header(real, tmp, f"{CASE}_flair.nii", srow_y=[0, np.nan, 0, 239], sform_code=1)], \
        IMG, "non-finite affine"


def sform_qform_disagree(real, tmp):
    img = _image(_data(real), real["flair"])
    shifted = img.affine.copy()
    shifted[:3, 3] += [12, 0, 0]
    img.set_sform(img.affine, code=1)
    img.set_qform(shifted, code=1)
    return [_save(img, tmp / f"{CASE}_flair.nii.gz")], IMG, "sform and qform that disagree"


def nan_voxels(real, tmp):
    d = _data(real)
    d[120, 120, 3] = np.nan
    return [_save(_image(d, real["flair"]), tmp / f"{CASE}_flair.nii.gz")], IMG, "non-finite voxels"


def inf_voxels(real, tmp):
    d = _data(real)
    d[100:102, 120, 2] = np.inf
    return [_save(_image(d, real["flair"]), tmp / f"{CASE}_flair.nii.gz")], IMG, "non-finite voxels"


def constant_modality(real, tmp):
    d = _data(real)
    d[d != 0] = 7.0
    return [_save(_image(d, real["flair"]), tmp / f"{CASE}_flair.nii.gz")], IMG, "constant"


def all_zero(real, tmp):
    return [_save(_image(np.zeros_like(_data(real)), real["flair"]), tmp / f"{CASE}_flair.nii.gz")], \
        IMG, "zero everywhere"


def complex_data(real, tmp):
    d = _data(real).astype(np.complex64) * (1 + 1j)
    return [_save(_image(d, real["flair"]), tmp / f"{CASE}_flair.nii.gz")], IMG, "complex"


def rgb_data(real, tmp):
    d = np.clip(_data(real) / 4, 0, 255).astype(np.uint8)
    rgb = np.zeros(d.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = rgb["G"] = rgb["B"] = d
    return [_save(_image(rgb, real["flair"]), tmp / f"{CASE}_flair.nii.gz")], IMG, "unsupported data type"


def extreme_scl_slope(real, tmp):
    img = _image(np.round(_data(real)).astype(np.int16), real["flair"])
    img.header.set_slope_inter(1e25, 0)
    return [_save(img, tmp / f"{CASE}_flair.nii.gz")], IMG, "extreme intensity scaling"


def infinite_scl_slope(real, tmp):  # nibabel silently ignores it: the voxels would come out unscaled
    return [_with_header(real, tmp, f"{CASE}_flair.nii", scl_slope=np.inf, scl_inter=0)], IMG, "non-finite"


def slope_that_overflows_float32(real, tmp):
    img = _image(_data(real) * 1e18, real["flair"])
    img.header.set_slope_inter(1e19, 0)
    return [_save(img, tmp / f"{CASE}_flair.nii.gz")], IMG, "overflow float32"


def gzip_of_text(real, tmp):
    (p := tmp / f"{CASE}_flair.nii.gz").write_bytes(gzip.compress(b"not an image\n" * 100))
    return [p], IMG, "not a NIfTI"


def analyze_pair(real, tmp):
    nib.save(nib.Nifti1Pair(_data(real), real["flair"].affine), str(tmp / "pair.img"))
    return ["--modality", f"flair={tmp / 'pair.hdr'}"], IMG, ".hdr/.img pair"


def folder_as_image(real, tmp):
    (tmp / "adir").mkdir()
    return ["--modality", f"flair={tmp / 'adir'}"], IMG, "not a file"


def missing_file(real, tmp):
    return ["--modality", f"flair={tmp / 'absent_flair.nii.gz'}"], IMG, "not found"


def wrong_modality_by_name(real, tmp):
    return [_save(real["t1"], tmp / f"{CASE}_t1.nii.gz")], MOD, "flair"


FLAIR_CASES = [empty, truncated_gzip, random_bytes, flipped_byte_in_deflate_stream, flipped_crc,
               missing_gzip_trailer, truncated_uncompressed, enormous_declared_size, gzip_bomb, five_dimensions,
               one_dimension, four_d_with_two_volumes, in_plane_too_small, in_plane_too_large,
               brain_beyond_the_crop_window, singular_affine,
               sheared_affine, nan_affine, sform_qform_disagree, nan_voxels, inf_voxels, constant_modality,
               all_zero, complex_data, rgb_data, extreme_scl_slope, infinite_scl_slope,
               slope_that_overflows_float32, gzip_of_text, analyze_pair, folder_as_image, missing_file,
               wrong_modality_by_name]


# ---- hostile cases for a FLAIR + T1 model -----------------------------------------------------------------
def _case_folder(real, tmp, t1=None, extra: dict | None = None) -> Path:
    folder = tmp / CASE
    _save(real["flair"], folder / f"{CASE}_flair.nii.gz")
    _save(t1 if t1 is not None else real["t1"], folder / f"{CASE}_t1.nii.gz")
    for name, img in (extra or {}).items():
        _save(img, folder / name)
    return folder


def shapes_differ(real, tmp):
    t1 = real["t1"].slicer[:, :, :7]
    return [_case_folder(real, tmp, t1)], IMG, "has shape"


def affines_differ(real, tmp):
    t1 = _image(_data(real, "t1"), real["t1"])
    moved = t1.affine.copy()
    moved[:3, 3] += [0, 5, 0]
    t1.set_sform(moved, code=2)
    return [_case_folder(real, tmp, t1)], IMG, "different affine"


def spacings_differ(real, tmp):
    t1 = nib.Nifti1Image(_data(real, "t1"), real["t1"].affine @ np.diag([1.2, 1, 1, 1]), real["t1"].header)
    return [_case_folder(real, tmp, t1)], IMG, "voxel spacing"


def modality_missing(real, tmp):
    folder = tmp / CASE
    _save(real["flair"], folder / f"{CASE}_flair.nii.gz")
    return [folder], MOD, "no t1 image"


def modality_duplicated(real, tmp):  # two files claim FLAIR (BraTS 2018 and 2023 names)
    return [_case_folder(real, tmp, extra={f"{CASE}-t2f.nii.gz": real["flair"]})], MOD, "two files for modality"


def modality_given_twice(real, tmp):
    folder = _case_folder(real, tmp)
    return ["-m", f"flair={folder / f'{CASE}_flair.nii.gz'}", "-m", f"FLAIR={folder / f'{CASE}_flair.nii.gz'}",
            "-m", f"t1={folder / f'{CASE}_t1.nii.gz'}"], MOD, "given twice"


def single_file_for_two_modalities(real, tmp):
    return [_save(real["flair"], tmp / f"{CASE}_flair.nii.gz")], MOD, "2 modalities"


def four_d_with_three_volumes(real, tmp):
    d = _data(real)
    return [_save(_image(np.stack([d, d, d], -1), real["flair"]), tmp / "three.nii.gz")], MOD, "3 volumes"


def inputs_and_modality_options(real, tmp):
    folder = _case_folder(real, tmp)
    return [folder, "-m", f"t1={folder / f'{CASE}_t1.nii.gz'}"], USE, "not both"


TWO_MODALITY_CASES = [shapes_differ, affines_differ, spacings_differ, modality_missing, modality_duplicated,
                      modality_given_twice, single_file_for_two_modalities, four_d_with_three_volumes,
                      inputs_and_modality_options]


def _segment(*args) -> tuple[int, str]:
    res = runner.invoke(app, ["segment", *[str(a) for a in args]])
    return res.exit_code, res.output


def _check_refusal(code: int, output: str, want_code: int, needle: str, names: list[str], out: Path) -> None:
    assert code == want_code, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert needle in lines[0], lines[0]
    assert any(n in lines[0] for n in names), (names, lines[0])
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def _names(inputs: list) -> list[str]:
    return [Path(str(a).split("=", 1)[-1]).name for a in inputs if str(a) not in ("-m", "--modality")]


@pytest.mark.parametrize("build", FLAIR_CASES, ids=[f.__name__ for f in FLAIR_CASES])
def test_hostile_file_is_refused_before_the_model_loads(build, real, tiny_model, tmp_path, no_model_loading):
    inputs, want, needle = build(real, tmp_path)
    out = tmp_path / "out"
    code, output = _segment(*inputs, "--model", tiny_model[1], "--out", out, "-q", "--steps", 2, "--n", 1)
    _check_refusal(code, output, want, needle, _names(inputs), out)


@pytest.mark.parametrize("build", TWO_MODALITY_CASES, ids=[f.__name__ for f in TWO_MODALITY_CASES])
def test_hostile_modalities_are_refused_before_the_model_loads(build, real, two_modality_model, tmp_path,
                                                               no_model_loading):
    inputs, want, needle = build(real, tmp_path)
    out = tmp_path / "out"
    code, output = _segment(*inputs, "--model", two_modality_model, "--out", out, "-q", "--steps", 2)
    names = _names(inputs) + [f"{CASE}_t1.nii.gz", CASE, "--modality"]
    _check_refusal(code, output, want, needle, names, out)


@pytest.mark.parametrize("opts, needle", [
    (["--n", "0"], "--n"), (["--n", "-4"], "--n"), (["--steps", "0"], "--steps"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2**63)], "--seed"), (["--batch-size", "-1"], "--batch-size"), (["--sampler", "dpm"], "sampler"),
    (["--eta", "-0.5"], "--eta"), (["--device", "gpu"], "--device"), (["--backend", "magic"], "backend"),
])
def test_invalid_options_are_refused_before_the_model_file_is_even_opened(shared_data, tmp_path, opts, needle):
    out = tmp_path / "out"
    code, output = _segment(shared_data / "train" / CASE, "--model", tmp_path / "absent.onnx", "--out", out, "-q",
                            *opts)  # a model that does not exist: an option error must come first
    _check_refusal(code, output, USE, needle, [needle], out)


def test_steps_beyond_the_schedule_are_refused_from_the_card(shared_data, tiny_model, tmp_path, no_model_loading):
    out = tmp_path / "out"
    code, output = _segment(shared_data / "train" / CASE, "--model", tiny_model[1], "--out", out, "-q",
                            "--sampler", "ddpm", "--steps", 1001)
    _check_refusal(code, output, USE, "--steps must lie in 1..1000", ["--steps"], out)


# ---- --out --------------------------------------------------------------------------------------------------
def _flair_file(real, tmp):
    return _save(real["flair"], tmp / CASE / f"{CASE}_flair.nii.gz")


@pytest.mark.parametrize("where, needle", [
    ("input_file", "is an input image"), ("input_folder", "folder of an input image"),
    ("existing_file", "is a file"), ("under_a_file", "lies under the file"), ("read_only", "cannot be written"),
])
def test_unusable_out_is_refused_before_the_model_loads(real, tiny_model, tmp_path, no_model_loading, where, needle):
    flair = _flair_file(real, tmp_path)
    (tmp_path / "afile").write_text("x")
    out = {"input_file": flair, "input_folder": flair.parent, "existing_file": tmp_path / "afile",
           "under_a_file": tmp_path / "afile" / "out", "read_only": Path("/sys/diffseg-engine-test-out")}[where]
    before = {p: p.read_bytes() for p in (flair, tmp_path / "afile")}
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, "-q")
    assert code == OUT, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and out.name in lines[0], output
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in flair.parent.iterdir()) == [flair.name]
    assert not Path("/sys/diffseg-engine-test-out").exists()


def test_out_with_results_is_refused_and_left_untouched(real, tiny_model, tmp_path, no_model_loading):
    flair = _flair_file(real, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for kind in ("mean.nii.gz", "provenance.json"):
        (out / f"{CASE}_{kind}").write_text(kind)
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, "-q")
    assert code == OUT and "--overwrite" in output and len(output.strip().splitlines()) == 1, output
    assert sorted(p.name for p in out.iterdir()) == [f"{CASE}_mean.nii.gz", f"{CASE}_provenance.json"]
    assert (out / f"{CASE}_mean.nii.gz").read_text() == "mean.nii.gz"


# ---- and the unmodified real inputs do segment: the refusals above are the mutations' doing -------------------
def test_the_unmodified_inputs_segment(real, tiny_model, two_modality_model, tmp_path):
    flair = _flair_file(real, tmp_path / "a")
    code, output = _segment(flair, "--model", tiny_model[1], "--out", tmp_path / "o1", "-q", "--steps", 1,
                            "--n", 1)
    assert code == 0, output
    assert (tmp_path / "o1" / f"{CASE}_provenance.json").is_file()
    folder = _case_folder(real, tmp_path / "b")
    code, output = _segment(folder, "--model", two_modality_model, "--backend", "torch", "--device", "cpu",
                            "--out", tmp_path / "o2", "-q", "--steps", 1, "--n", 1)
    assert code == 0, output
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == sorted(
        f"{CASE}_{k}" for k in ("mean.nii.gz", "variance.nii.gz", "entropy.nii.gz", "mask.nii.gz", "provenance.json",
                                "overview.png"))
