"""NIfTI I/O, case discovery and preprocessing on the real BraTS data in ../shared/data."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from diffseg_engine.artifacts.card import Preprocessing
from diffseg_engine.inputs.cases import classify_file, discover_cases, find_case
from diffseg_engine.core.errors import InputImageError, MissingModalityError
from diffseg_engine.io.nifti_io import load_4d_modalities, load_image, save_like
from diffseg_engine.inputs.preprocess import (centre_crop, downsample, normalise_intensity, prepare_case, prepare_label,
                                       restore, slice_axis, to_axial, uncrop, upsample)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DIFFSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
pytestmark = pytest.mark.skipif(not (DATA / "train").is_dir(),
                                reason=f"real BraTS data not found at {DATA} (set DIFFSEG_SHARED_DATA)")
ALL4 = ["t1", "t1ce", "t2", "flair"]


@pytest.fixture(scope="module")
def hg0001():
    case = find_case(DATA / "train" / "BRATS2012_HG0001")
    return case, [load_image(p) for p in case.require(ALL4)], load_image(case.label)


@pytest.fixture(scope="module")
def aoo():
    case = find_case(DATA / "train" / "BraTS18_CBICA_AOO")
    return case, [load_image(p) for p in case.require(["flair", "t1"])], load_image(case.label)


# ---- cases ------------------------------------------------------------------------------------------

def test_discover_train_cases():
    cases = discover_cases(DATA / "train")
    # the data folder's README: 40 labelled patients; six BraTS 2018 cases carry a T1 beside the FLAIR, the 28
    # others the FLAIR only
    assert len(cases) == 40 and [c.case_id for c in cases] == sorted(c.case_id for c in cases)
    with_t1 = {f"BraTS18_{s}" for s in ("CBICA_AOO", "TCIA02_471", "CBICA_ARW", "CBICA_ASK", "CBICA_ATV", "CBICA_ASA")}
    for c in cases:
        assert c.layout == "brats" and c.label is not None and c.label.name == f"{c.case_id}_seg.nii.gz"
        want = {"BraTS18": {"flair", "t1"} if c.case_id in with_t1 else {"flair"}, "BRATS2013": {"flair", "t1ce"},
                "BRATS2012": set(ALL4)}
        assert set(c.modalities) == want[c.case_id.split("_")[0]]
        assert all(p.name == f"{c.case_id}_{m}.nii.gz" for m, p in c.modalities.items())


def test_discover_unlabelled_and_2023_names():
    cases = {c.case_id: c for c in discover_cases(DATA / "unlabelled")}
    assert sorted(cases) == ["BraTS-GLI-00001-000", "TCGA-DU-7294", "TCGA-FG-6692"]
    gli = cases["BraTS-GLI-00001-000"]
    assert gli.layout == "brats2023" and gli.label is None
    assert {m: p.name.split("-")[-1] for m, p in gli.modalities.items()} == {
        "flair": "t2f.nii.gz", "t1": "t1n.nii.gz", "t1ce": "t1c.nii.gz", "t2": "t2w.nii.gz"}
    for cid in ("TCGA-DU-7294", "TCGA-FG-6692"):
        assert (cases[cid].folder / "algorithm-segmentations").is_dir()
        assert cases[cid].label is None and set(cases[cid].modalities) == set(ALL4)
    assert [p.name for p in gli.require(["t2f", "t1"])] == ["BraTS-GLI-00001-000-t2f.nii.gz",
                                                            "BraTS-GLI-00001-000-t1n.nii.gz"]


def test_discover_slices2d_and_single_case_folder():
    cases = discover_cases(DATA / "slices2d-unlabelled")
    assert [c.case_id for c in cases] == ["000246", "001919"]
    for c in cases:
        assert c.layout == "slices2d" and set(c.modalities) == set(ALL4) and c.label is None
        assert all(f"_{m}_" in p.name for m, p in c.modalities.items())
    one = discover_cases(DATA / "train" / "BRATS2013_pat0002")
    assert len(one) == 1 and one[0].case_id == "BRATS2013_pat0002"


def test_aliases_duplicates_and_missing(tmp_path):
    def touch(*names):
        for n in names:
            (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / n).write_bytes(b"")
    touch("P1_T1w.nii.gz", "P1-t2W.nii", "P1_FLA.nii.gz", "P1_labels.nii.gz", "sub/P1_seg.nii.gz", "notes.txt")
    case = find_case(tmp_path)
    assert {m: p.name for m, p in case.modalities.items()} == {
        "t1": "P1_T1w.nii.gz", "t2": "P1-t2W.nii", "flair": "P1_FLA.nii.gz"}
    assert case.label.name == "P1_labels.nii.gz"
    assert classify_file(tmp_path / "notes.txt") is None
    with pytest.raises(MissingModalityError, match=r"no t1ce image \(present: flair, t1, t2\)") as err:
        case.require(["flair", "t1ce"])
    assert str(tmp_path) in str(err.value)
    touch("P1_t2f.nii.gz")
    with pytest.raises(MissingModalityError, match="P1_FLA.nii.gz and P1_t2f.nii.gz"):
        find_case(tmp_path)


# ---- NIfTI I/O --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", [
    "train/BraTS18_CBICA_AOO/BraTS18_CBICA_AOO_flair.nii.gz",  # sform 2, qform 0
    "train/BRATS2012_HG0001/BRATS2012_HG0001_seg.nii.gz",  # 160x216x176, uint8, offset origin
    "unlabelled/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1c.nii.gz",  # int16, header extension
    "unlabelled/TCGA-FG-6692/TCGA-FG-6692_t2.nii.gz",  # sform 1, qform 2
    "slices2d-unlabelled/001919/brats_train_040_t2_087_w.nii.gz",  # 2D float64
])
def test_save_like_round_trip(tmp_path, rel):
    ref = load_image(DATA / rel)
    for dtype, arr in ((np.uint8, (ref.data > 0).astype(np.uint8)), (np.float32, ref.data * 0.5)):
        out = save_like(ref, arr, tmp_path / "out.nii.gz", dtype)
        a, b = nib.load(DATA / rel), nib.load(out)
        ha, hb = a.header, b.header
        assert b.shape == a.shape and hb.get_data_dtype() == np.dtype(dtype)
        assert np.array_equal(b.affine, a.affine)
        assert np.array_equal(hb.get_sform(), ha.get_sform()) and np.array_equal(hb.get_qform(), ha.get_qform())
        assert (int(hb["sform_code"]), int(hb["qform_code"])) == (int(ha["sform_code"]), int(ha["qform_code"]))
        assert hb.get_zooms() == ha.get_zooms() and hb.get_xyzt_units() == ha.get_xyzt_units()
        assert np.array_equal(np.asarray(b.dataobj).reshape(arr.shape), arr)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]  # no temp file left behind


def test_corrupt_gzip_is_rejected(tmp_path):
    blob = (DATA / "train/BRATS2012_HG0015/BRATS2012_HG0015_seg.nii.gz").read_bytes()
    mid = len(blob) // 2
    bad = {
        "truncated": blob[:mid],
        "no_trailer": blob[:-4],  # nibabel alone reads this without complaint
        "flipped_crc": blob[:-8] + bytes([blob[-8] ^ 0xFF]) + blob[-7:],  # nibabel alone misses this too
        "flipped_data": blob[:mid] + bytes([blob[mid] ^ 0x01]) + blob[mid + 1:],
        "not_nifti": gzip.compress(b"hello" * 200),
    }
    for name, data in bad.items():
        path = tmp_path / f"{name}.nii.gz"
        path.write_bytes(data)
        with pytest.raises(InputImageError, match=name + r".*(truncated|corrupt|not a NIfTI)"):
            load_image(path)
    with pytest.raises(InputImageError, match="file not found"):
        load_image(tmp_path / "absent.nii.gz")


def test_bad_voxels_and_headers(tmp_path):
    ref = nib.load(DATA / "slices2d-unlabelled/000246/brats_train_006_t1_080_w.nii.gz")
    nan = np.asarray(ref.dataobj).copy()
    nan[100, 100] = np.nan
    nib.save(nib.Nifti1Image(nan, ref.affine, ref.header), tmp_path / "nan.nii.gz")
    with pytest.raises(InputImageError, match="non-finite voxels"):
        load_image(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.complex64), np.eye(4)), tmp_path / "c.nii")
    nib.save(nib.Nifti1Image(np.zeros((2,) * 5, np.float32), np.eye(4)), tmp_path / "d5.nii")
    for name, match in (("c.nii", "complex"), ("d5.nii", "5 dimensions")):
        with pytest.raises(InputImageError, match=match):
            load_image(tmp_path / name)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape((4096, 4096, 4096))  # header only: must be refused before any data is read
    (tmp_path / "big.nii").write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 64)
    with pytest.raises(InputImageError, match="more than the limit"):
        load_image(tmp_path / "big.nii")
    img = nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4))
    img.header["srow_z"] = 0  # sform with a zero column
    img.header["sform_code"] = 1
    (tmp_path / "sing.nii").write_bytes(img.header.binaryblock + b"\0" * 4 + np.ones(27, np.float32).tobytes())
    with pytest.raises(InputImageError, match="singular affine"):
        load_image(tmp_path / "sing.nii")


def test_load_4d_modalities(tmp_path):
    vols = [np.full((3, 4, 5), i, np.float32) for i in range(3)]
    nib.save(nib.Nifti1Image(np.stack(vols, -1), np.eye(4)), tmp_path / "stack.nii.gz")
    got = load_4d_modalities(tmp_path / "stack.nii.gz")
    assert len(got) == 3 and all(np.array_equal(g, v) for g, v in zip(got, vols))


# ---- preprocessing ----------------------------------------------------------------------------------

def test_brats2012_grid_prepares_and_restores(hg0001):
    _, images, _ = hg0001
    assert images[0].data.shape == (160, 216, 176)
    for ds in (1, 2):
        prep = Preprocessing(crop_size=224, downsample=ds)
        pc = prepare_case([im.data for im in images], images[0].affine, prep)
        s = pc.slice_index.size
        assert pc.inputs.shape == (s, 4, 224 // ds, 224 // ds) and pc.inputs.dtype == np.float32
        assert 0 < s <= 176 and pc.geometry.axis == 2 and 0 <= pc.inputs.min() and pc.inputs.max() <= 1
        ones = restore(pc, np.ones((s, 224 // ds, 224 // ds), np.float32))
        assert ones.shape == (160, 216, 176) and ones.dtype == np.float32
        brain = np.any([im.data != 0 for im in images], axis=0)
        assert np.array_equal(ones, brain.astype(np.float32))  # constant maps come back exactly, on the brain


def test_restore_inverts_prepare_exactly_on_a_240_volume(aoo):
    _, images, _ = aoo
    prep = Preprocessing(crop_size=224, downsample=1)
    pc = prepare_case([im.data for im in images], images[0].affine, prep)
    norm = normalise_intensity(images[0].data, prep)
    back = restore(pc, pc.inputs[:, 0])
    inside = np.zeros(back.shape, bool)
    inside[8:-8, 8:-8, pc.slice_index] = True
    inside &= (images[0].data != 0) | (images[1].data != 0)
    assert np.array_equal(back[inside], norm[inside]) and not back[~inside].any()
    axial = to_axial(norm, 2)[pc.slice_index]
    assert np.array_equal(pc.inputs[:, 0], axial[:, 8:-8, 8:-8])  # 240 -> 224 is exactly [8:-8, 8:-8]
    assert norm.min() == 0 and norm.max() == 1 and not norm[images[0].data == 0].any()


def test_crop_pad_and_resampling_helpers():
    x = np.random.default_rng(0).random((2, 240, 240), dtype=np.float32)
    assert np.array_equal(centre_crop(x, 224), x[:, 8:-8, 8:-8])
    assert np.array_equal(uncrop(centre_crop(x, 224), (240, 240))[:, 8:-8, 8:-8], x[:, 8:-8, 8:-8])
    y = x[:, :160, :215]
    assert np.array_equal(uncrop(centre_crop(y, 224), (160, 215)), y)  # padding is exactly undone
    for ds in (2, 4):
        c = np.full((3, 224, 224), 0.7, np.float32)
        assert np.array_equal(upsample(downsample(c, ds), ds), c)
    small = x[:, :4, :4]
    up = upsample(small, 2)
    assert up.shape == (2, 8, 8) and small.min() <= up.min() and up.max() <= small.max()
    assert np.allclose(up[:, 1, 1], 0.5625 * small[:, 0, 0] + 0.1875 * (small[:, 0, 1] + small[:, 1, 0])
                       + 0.0625 * small[:, 1, 1])  # bilinear, half-pixel centres


def test_2d_reference_slice_with_intensity_none(tmp_path):
    case = discover_cases(DATA / "slices2d-unlabelled")[0]
    images = [load_image(p) for p in case.require(ALL4)]
    assert images[0].data.shape == (240, 240, 1) and images[0].image.shape == (240, 240)
    prep = Preprocessing(intensity="none", crop_size=224, orientation="")  # as stored: paper-converted models
    pc = prepare_case([im.data for im in images], images[0].affine, prep)
    assert pc.inputs.shape == (1, 4, 224, 224) and list(pc.slice_index) == [0]
    assert np.array_equal(pc.inputs[0, 3], images[3].data[8:-8, 8:-8, 0])
    # their identity (RAS) affine, taken at its word by an LPS model, turns them by 180 degrees in-plane
    lps = prepare_case([im.data for im in images], images[0].affine, Preprocessing(intensity="none"))
    assert np.array_equal(lps.inputs[0, 3], images[3].data[::-1, ::-1, 0][8:-8, 8:-8])
    back = restore(pc, np.ones((1, 224, 224), np.float32))
    assert back.shape == (240, 240, 1) and back[:8].sum() == 0
    out = save_like(images[3], (back > 0.5).astype(np.uint8), tmp_path / "mask.nii.gz", np.uint8)
    assert nib.load(out).shape == (240, 240)
    raw = load_image(DATA / "train/BraTS18_CBICA_AOO/BraTS18_CBICA_AOO_flair.nii.gz")
    with pytest.raises(InputImageError, match=r"expects intensities in \[0, 1\]"):
        prepare_case([raw.data], raw.affine, prep)


def test_input_validation():
    with pytest.raises(InputImageError, match="constant"):
        normalise_intensity(np.full((4, 4, 4), 5, np.float32), Preprocessing())
    with pytest.raises(InputImageError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        prepare_case([np.ones((4, 4, 4)), np.ones((4, 4, 5))], np.eye(4), Preprocessing())
    # an image stored with the superior-inferior axis first is sliced along that axis
    aff = np.array([[0, 0, -1, 0], [0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    assert slice_axis(aff, (10, 20, 30)) == 0


def test_labels(aoo, hg0001):
    _, images, label = aoo
    for ds in (1, 2):
        prep = Preprocessing(downsample=ds)
        pc = prepare_case([im.data for im in images], images[0].affine, prep)
        wt = prepare_label(label.data, pc, label.affine)
        assert wt.shape == (pc.slice_index.size, 224 // ds, 224 // ds) and wt.dtype == np.float32
        assert set(np.unique(wt)) == {0.0, 1.0} and 0 < wt.mean() < 0.5
    _, images, label = hg0001  # labels 0/1/2 -> whole tumour {0, 1}
    pc = prepare_case([im.data for im in images], images[0].affine, Preprocessing())
    wt = prepare_label(label.data, pc.geometry)
    assert set(np.unique(label.data)) == {0, 1, 2} and set(np.unique(wt)) == {0.0, 1.0}
    assert wt.sum() == (label.data > 0)[:, :, pc.slice_index].sum()  # 160x216 is padded: nothing lost
