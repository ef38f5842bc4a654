"""Canonical geometry on real data: reorientation to the card's orientation, in-plane resampling to its spacing,
the field-of-view refusals, training data through the same path and the left-right flip augmentation.

Every volume under ../shared/data is LPS with 1 mm voxels except other/AURORA-example (RAS) and
other/TCGA-FG-6692-native (LAS, 0.9 mm, not skull-stripped); the other orientations and spacings below are
made from real BraTS volumes with nibabel, their affines adjusted so that every voxel keeps its world position.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from typer.testing import CliRunner

from diffseg_engine.artifacts.card import ModelCard, Preprocessing
from diffseg_engine.inputs.cases import find_case
from diffseg_engine.core.errors import InputImageError, UsageError
from diffseg_engine.inputs.geometry import SPACING_TOLERANCE, check_orientation, lr_network_axis
from diffseg_engine.io.nifti_io import load_image
from diffseg_engine.inputs.preprocess import (prepare_case, prepare_geometry, prepare_label, prepare_map, restore)

ALL4 = ["t1", "t1ce", "t2", "flair"]
AOO = "BraTS18_CBICA_AOO"
LPS = axcodes2ornt("LPS")


def _to_codes(img: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    """`img` stored with axis codes `codes` (nibabel moves the voxels and adjusts the affine)."""
    return img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(codes)))


def _save(img, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _maps(prepared, seed=0) -> np.ndarray:
    s = prepared.geometry.image_size
    return np.random.default_rng(seed).random((len(prepared.inputs), s, s), dtype=np.float32)


@pytest.fixture(scope="module")
def aoo(shared_data):
    """flair, t1 and label of BraTS18_CBICA_AOO as nibabel images (LPS, 1 mm, 240x240x155)."""
    folder = shared_data / "train" / AOO
    return {m: nib.load(str(folder / f"{AOO}_{m}.nii.gz")) for m in ("flair", "t1", "seg")}


def _data(img) -> np.ndarray:
    return np.asarray(img.dataobj, dtype=np.float32)


# ---- orientation ------------------------------------------------------------------------------------------
def test_aurora_ras_gives_the_inputs_and_outputs_of_its_lps_copy(shared_data, tmp_path):
    """AURORA is stored RAS: its network inputs equal those of the same data reoriented to LPS by nibabel and
    saved with the LPS affine, which are its stored slices turned by 180 degrees; maps restored onto the RAS
    grid are the LPS results reoriented."""
    case = find_case(shared_data / "other" / "AURORA-example")
    ras = [load_image(p) for p in case.require(ALL4)]
    assert "".join(nib.aff2axcodes(ras[0].affine)) == "RAS"
    lps = [load_image(_save(_to_codes(nib.load(str(im.path)), "LPS"), tmp_path / im.path.name)) for im in ras]
    assert "".join(nib.aff2axcodes(lps[0].affine)) == "LPS"
    prep = Preprocessing()  # the default card: LPS, 1 mm
    a = prepare_case([im.data for im in ras], ras[0].affine, prep)
    b = prepare_case([im.data for im in lps], lps[0].affine, prep)
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.slice_index, b.slice_index)
    assert a.geometry.frame.input_codes == "RAS" and b.geometry.frame.input_codes == "LPS"
    # as stored the slices would be [S, R, A]: the network sees them turned by 180 degrees in-plane
    stored = prepare_case([im.data for im in ras], ras[0].affine, Preprocessing(orientation=""))
    assert np.array_equal(a.inputs, stored.inputs[..., ::-1, ::-1]) and not np.array_equal(a.inputs, stored.inputs)
    maps = _maps(a)
    back_ras, back_lps = restore(a, maps), restore(b, maps)
    assert back_ras.shape == ras[0].data.shape and back_ras.any()
    lps_to_ras = ornt_transform(LPS, axcodes2ornt("RAS"))
    assert np.array_equal(back_ras, apply_orientation(back_lps, lps_to_ras))
    assert not back_ras[np.all([im.data == 0 for im in ras], axis=0)].any()  # nothing outside the brain


def test_aurora_segments_on_its_own_grid_like_its_lps_copy(shared_data, tiny_model, tmp_path):
    """End to end through the CLI (8 slices, tiny model): the RAS file's mean map, on the RAS grid, is the LPS
    copy's mean map reoriented, bit for bit (same network inputs, same noise)."""
    from diffseg_engine.cli import app
    src = nib.load(str(shared_data / "other" / "AURORA-example" / "AURORA-example_flair.nii.gz")).slicer[:, :, 70:78]
    ras = _save(src, tmp_path / "ras" / "AURORA-example_flair.nii.gz")
    lps = _save(_to_codes(src, "LPS"), tmp_path / "lps" / "AURORA-example_flair.nii.gz")
    means = {}
    for name, path in (("ras", ras), ("lps", lps)):
        out = tmp_path / f"out_{name}"
        res = CliRunner().invoke(app, ["segment", str(path), "--model", str(tiny_model[1]), "--out", str(out), "-q",
                                       "--steps", "2", "--n", "2", "--batch-size", "4"])
        assert res.exit_code == 0, res.output
        img = nib.load(str(out / "AURORA-example_mean.nii.gz"))
        np.testing.assert_array_equal(img.affine, nib.load(str(path)).affine)
        means[name] = np.asarray(img.dataobj)
    assert means["ras"].any()
    lps_to_ras = ornt_transform(LPS, axcodes2ornt("RAS"))
    np.testing.assert_array_equal(means["ras"], apply_orientation(means["lps"], lps_to_ras))


@pytest.mark.parametrize("codes", ["RAS", "PRI", "SAL", "ILA", "LSP", "AIR"])
def test_any_axis_order_and_direction_gives_the_same_inputs_and_maps_on_the_right_voxels(aoo, codes):
    """A BraTS volume permuted/flipped by nibabel (affine adjusted): identical network inputs and labels, slice
    indices along the new slice axis, and restored maps that are the original's reoriented — the same world
    positions."""
    prep = Preprocessing(downsample=2)
    ref = prepare_case([_data(aoo["flair"]), _data(aoo["t1"])], aoo["flair"].affine, prep)
    ref_label = prepare_label(_data(aoo["seg"]), ref, aoo["seg"].affine)
    imgs = {m: _to_codes(im, codes) for m, im in aoo.items()}
    assert "".join(nib.aff2axcodes(imgs["flair"].affine)) == codes
    pc = prepare_case([_data(imgs["flair"]), _data(imgs["t1"])], imgs["flair"].affine, prep)
    assert np.array_equal(pc.inputs, ref.inputs)
    assert np.array_equal(prepare_label(_data(imgs["seg"]), pc, imgs["seg"].affine), ref_label)
    g = pc.geometry
    assert g.axis == codes.replace("I", "S").index("S") and g.frame.flipped == ("I" in codes)
    assert np.array_equal(pc.slice_index, 154 - ref.slice_index if "I" in codes else ref.slice_index)
    maps = _maps(pc)
    back, ref_back = restore(pc, maps), restore(ref, maps)
    transform = ornt_transform(LPS, axcodes2ornt(codes))
    assert np.array_equal(back, apply_orientation(ref_back, transform))
    # the voxel holding the largest value lies at the same world position in both
    vox = np.array(np.unravel_index(np.argmax(back), back.shape) + (1,))
    ref_vox = np.array(np.unravel_index(np.argmax(ref_back), ref_back.shape) + (1,))
    np.testing.assert_allclose(imgs["flair"].affine @ vox, aoo["flair"].affine @ ref_vox, atol=1e-4)
    with pytest.raises(InputImageError, match="oriented differently"):
        prepare_label(_data(imgs["seg"]), pc, aoo["seg"].affine)


def test_orientation_codes_are_checked():
    assert check_orientation("lps") == "LPS" and check_orientation("") == ""
    for bad in ("LP", "LLS", "LPX", "RAL"):
        with pytest.raises(UsageError, match="axis codes"):
            check_orientation(bad)
    assert Preprocessing(orientation="ras").orientation == "RAS"
    with pytest.raises(ValueError):
        Preprocessing(orientation="LPP")
    assert lr_network_axis("LPS") == -2 and lr_network_axis("PLS") == -1 and lr_network_axis("SRA") == -2
    assert lr_network_axis("") == -2  # as stored: BraTS storage assumed


def test_cards_without_orientation_keep_their_meaning():
    """The shipped default card has no orientation field: LPS at 1 mm, what it was trained on. A paper-import
    card written before the field existed keeps using the arrays as stored."""
    from diffseg_engine.pipeline.models import DEFAULT_MODEL_DIR
    from diffseg_engine.backends import read_card
    card = read_card(DEFAULT_MODEL_DIR / "default.onnx")
    assert (card.preprocessing.orientation, card.preprocessing.spacing_mm) == ("LPS", 1.0)
    data = card.to_dict()
    del data["preprocessing"]["orientation"]
    data["preset"] = "paper-import"
    assert ModelCard.from_dict(data).preprocessing.orientation == ""
    data["preprocessing"]["orientation"] = "LPS"
    assert ModelCard.from_dict(data).preprocessing.orientation == "LPS"


# ---- spacing ----------------------------------------------------------------------------------------------
def _rescaled(img: nib.Nifti1Image, factor: int, coarser: bool) -> nib.Nifti1Image:
    """`img` at `factor` times coarser (2x2 block means) or finer (voxels repeated) in-plane spacing; the affine
    keeps the field of view in place."""
    d = _data(img)
    a = img.affine
    if coarser:
        x, y, z = d.shape
        d = d.reshape(x // factor, factor, y // factor, factor, z).mean(axis=(1, 3))
        aff = a @ np.diag([factor, factor, 1, 1.0])
        aff[:3, 3] = (a @ [(factor - 1) / 2, (factor - 1) / 2, 0, 1])[:3]
    else:
        d = np.repeat(np.repeat(d, factor, 0), factor, 1)
        aff = a @ np.diag([1 / factor, 1 / factor, 1, 1.0])
        aff[:3, 3] = (a @ [-(factor - 1) / (2 * factor), -(factor - 1) / (2 * factor), 0, 1])[:3]
    return nib.Nifti1Image(d.astype(np.float32), aff)


def _dice(a, b) -> float:
    return 2 * float((a * b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("mm", [2.0, 0.5])
def test_other_voxel_sizes_are_resampled_to_the_cards(aoo, mm):
    """A BraTS volume at 2 mm (2x2 block means) or 0.5 mm (voxels repeated), affine updated: the network inputs
    are close to the 1 mm ones — mean |difference| over brain pixels < 0.06 at 2 mm (the detail 2 mm voxels
    lose), < 0.015 at 0.5 mm; a one-pixel shift would be worse (the grids are aligned) — and the labels agree
    (Dice > 0.95 / 0.99). restore() returns the input's shape; a smooth map survives the round trip (< 0.005)."""
    flair, seg = aoo["flair"].slicer[:, :, 60:100], aoo["seg"].slicer[:, :, 60:100]
    prep = Preprocessing()
    ref = prepare_case([_data(flair)], flair.affine, prep)
    ref_label = prepare_label(_data(seg), ref)
    coarser = mm > 1
    f = int(max(mm, 1 / mm))
    img = _rescaled(flair, f, coarser)
    lab = _rescaled(nib.Nifti1Image((_data(seg) > 0).astype(np.float32), seg.affine), f, coarser)
    np.testing.assert_allclose(img.header.get_zooms()[:2], (mm, mm))
    pc = prepare_case([_data(img)], img.affine, prep)
    g = pc.geometry
    assert g.resampled == (True, True) and g.grid == (240, 240) and g.plane == img.shape[:2]
    assert np.array_equal(pc.slice_index, ref.slice_index)
    brain = ref.inputs > 0
    err = np.abs(pc.inputs - ref.inputs)[brain].mean()
    shifted = min(np.abs(np.roll(pc.inputs, s, axis=a) - ref.inputs)[brain].mean() for s in (-1, 1) for a in (-2, -1))
    assert err < (0.06 if coarser else 0.015) and err < shifted, (err, shifted)
    assert _dice(prepare_label(_data(lab) >= 0.5, pc), ref_label) > (0.95 if coarser else 0.99)
    back = restore(pc, pc.inputs[:, 0])
    assert back.shape == img.shape and back.dtype == np.float32
    x, y, z = np.meshgrid(*[np.arange(n) for n in img.shape], indexing="ij")
    r2 = (((x - img.shape[0] / 2) * mm) ** 2 + ((y - img.shape[1] / 2) * mm) ** 2 + (z - 20) ** 2)
    smooth = np.exp(-r2 / (2 * 40.0 ** 2)).astype(np.float32)
    round_trip = restore(pc, prepare_map(smooth, pc))
    inside = _data(img) != 0
    assert np.abs(round_trip - smooth)[inside].max() < 0.005 and not round_trip[~inside].any()


def test_spacing_within_the_tolerance_is_used_as_is(aoo):
    flair = aoo["flair"].slicer[:, :, 60:70]
    ref = prepare_case([_data(flair)], flair.affine, Preprocessing())
    scale = 1 + 0.6 * SPACING_TOLERANCE
    pc = prepare_case([_data(flair)], flair.affine @ np.diag([scale, scale, 1, 1]), Preprocessing())
    assert pc.geometry.resampled == (False, False) and np.array_equal(pc.inputs, ref.inputs)


# ---- field of view ----------------------------------------------------------------------------------------
def test_every_skull_stripped_case_fits_the_window(shared_data):
    """All BraTS grids (240x240 and BRATS2012's 160x216) pass the field-of-view checks at 1 mm, and AURORA."""
    for root in ("train", "unlabelled", "other"):
        for folder in sorted(p for p in (shared_data / root).iterdir() if p.is_dir()):
            if folder.name == "TCGA-FG-6692-native":
                continue
            im = load_image(find_case(folder).require(["flair"])[0])
            for ds in (1, 2, 4):
                g = prepare_geometry([im.data], im.affine, Preprocessing(downsample=ds), names=[im.path])
                assert g.grid == g.plane and g.plane in ((240, 240), (160, 216))


@pytest.mark.parametrize("change, needle", [
    ("wide_mm", "crop window"),  # a 240-voxel BraTS plane labelled 1.5 mm: the brain spans ~280 mm > 224
    ("off_centre", "crop window"),  # zero padding on one side pushes the brain out of the central window
    ("double_mm", "in-plane size"),  # labelled 2 mm: a 480 mm field of view is no head
    ("small", "in-plane size"),  # a 40 mm patch
])
def test_a_field_of_view_that_cannot_hold_the_brain_is_refused(aoo, change, needle):
    flair = aoo["flair"].slicer[:, :, 60:70]
    d, a = _data(flair), flair.affine
    if change == "wide_mm":
        a = a @ np.diag([1.5, 1.5, 1, 1])
    elif change == "double_mm":
        a = a @ np.diag([2, 2, 1, 1])
    elif change == "off_centre":
        d = np.pad(d, ((140, 0), (0, 0), (0, 0)))
    else:
        d = d[100:140, 100:140]
    with pytest.raises(InputImageError, match=needle) as err:
        prepare_case([d], a, Preprocessing(), names=["scan_flair.nii.gz"])
    msg = str(err.value)
    assert "scan_flair.nii.gz" in msg and "Fix:" in msg and "\n" not in msg


def test_native_scanner_scan_is_refused_not_cropped(shared_data):
    """The native TCGA acquisition (LAS, 0.9 mm, not skull-stripped) reorients and resamples, but its head
    fills the field of view past the 224 mm window: refused, naming the file."""
    path = shared_data / "other" / "TCGA-FG-6692-native" / "TCGA-FG-6692-native_flair.nii.gz"
    im = load_image(path)
    with pytest.raises(InputImageError, match="crop window.*skull-strip") as err:
        prepare_geometry([im.data], im.affine, Preprocessing(), names=[path])
    assert str(path) in str(err.value)
    skull_free = im.data.copy()
    skull_free[:20], skull_free[-20:], skull_free[:, :20], skull_free[:, -20:] = 0, 0, 0, 0
    g = prepare_geometry([skull_free], im.affine, Preprocessing())
    assert g.frame.input_codes == "LAS" and g.resampled == (True, True)
    zooms = np.linalg.norm(im.affine[:3, :2], axis=0)
    assert np.allclose(zooms, 0.898, atol=1e-3)
    assert g.grid == tuple(int(round(n * z)) for n, z in zip(im.data.shape[:2], zooms))


# ---- training data -----------------------------------------------------------------------------------------
def _case(tmp: Path, imgs: dict) -> Path:
    for m, im in imgs.items():
        _save(im, tmp / AOO / f"{AOO}_{m}.nii.gz")
    return tmp / AOO


def test_training_slices_and_labels_follow_the_reorientation(aoo, tmp_path):
    """A training case stored RAI (nibabel-reoriented) gives the same slices and masks as the LPS original."""
    from diffseg_engine.train.data import load_case_slices
    from diffseg_engine.train.presets import build_card, get_preset
    card = build_card(get_preset("tiny"), ("flair", "t1"))
    ref = load_case_slices(find_case(_case(tmp_path / "lps", aoo)), card)
    moved = load_case_slices(find_case(_case(tmp_path / "rai", {m: _to_codes(im, "RAI") for m, im in aoo.items()})),
                             card)
    assert ref.has_tumour.any()
    for k in ("images", "masks", "has_tumour"):
        assert np.array_equal(getattr(moved, k), getattr(ref, k)), k
    assert np.array_equal(moved.slice_index, 154 - ref.slice_index)


def test_flip_augmentation_mirrors_left_right(aoo, tmp_path):
    """BatchSampler's flip equals the slices of the volume mirrored along its L-R voxel axis (nibabel), and is
    not the anterior-posterior flip."""
    from diffseg_engine.train.data import BatchSampler, SliceSet, flip_axis, load_case_slices
    from diffseg_engine.train.presets import build_card, get_preset
    card = build_card(get_preset("tiny"), ("flair",))
    assert flip_axis(card) == -2
    lr = int(np.flatnonzero(io_orientation(aoo["flair"].affine)[:, 0] == 0)[0])
    assert lr == 0  # BraTS: L, P, S
    mirror = np.array([[0, 1], [1, 1], [2, 1]], float)
    mirror[lr, 1] = -1  # nibabel orientation: flip the L-R voxel axis, keep the affine (the mirrored patient)
    mirrored = {m: nib.Nifti1Image(apply_orientation(_data(im), mirror), im.affine) for m, im in aoo.items()
                if m != "t1"}
    ref = load_case_slices(find_case(_case(tmp_path / "a", {m: aoo[m] for m in ("flair", "seg")})), card)
    mir = load_case_slices(find_case(_case(tmp_path / "b", mirrored)), card)
    k = int(np.argmax(ref.masks.reshape(len(ref), -1).sum(1)))  # the slice with the most tumour
    one = SliceSet(images=ref.images[k:k + 1], masks=ref.masks[k:k + 1], case_ids=ref.case_ids[k:k + 1],
                   slice_index=ref.slice_index[k:k + 1])
    img, msk = BatchSampler(one, 32, flip=True, seed=0, flip_axis=flip_axis(card)).next()
    def same(a, b):  # area averaging sums a mirrored block in the other order: equal to float32 rounding
        return np.allclose(a, b, rtol=0, atol=1e-6)
    assert same(mir.images[k], np.flip(ref.images[k], -2)) and np.array_equal(mir.masks[k], np.flip(ref.masks[k], -2))
    is_mirror = [same(i, mir.images[k]) and np.array_equal(m, mir.masks[k]) for i, m in zip(img, msk)]
    is_same = [np.array_equal(i, ref.images[k]) and np.array_equal(m, ref.masks[k]) for i, m in zip(img, msk)]
    assert all(a or b for a, b in zip(is_mirror, is_same)) and any(is_mirror) and any(is_same)
    assert not same(mir.images[k], np.flip(ref.images[k], -1))  # the old, anterior-posterior flip
    img, _ = BatchSampler(one, 8, flip=False, seed=0).next()
    assert all(np.array_equal(i, ref.images[k]) for i in img)


def test_all_48_orientations_round_trip_exactly():
    """Every axis order and direction of a small volume maps onto the same LPS stack, and back onto its own
    voxels exactly; a 2D slice keeps axis 2 as its slice axis."""
    import itertools

    from diffseg_engine.inputs.geometry import axial_frame
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    base = nib.Nifti1Image(vol, np.diag([-1.0, -1.0, 1.0, 1.0]))  # LPS
    ref = axial_frame(base.affine, vol.shape, "LPS").to_stack(vol)
    seen = set()
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((-1, 1), repeat=3):
            ornt = np.array([[p, s] for p, s in zip(perm, signs)], float)
            img = base.as_reoriented(ornt)
            data = np.asarray(img.dataobj)
            frame = axial_frame(img.affine, data.shape, "LPS")
            seen.add(frame.input_codes)
            assert np.array_equal(frame.to_stack(data), ref)
            assert np.array_equal(frame.from_stack(frame.to_stack(data)), data)
    assert len(seen) == 48
    flat = np.arange(12, dtype=np.float32).reshape(3, 4, 1)
    frame = axial_frame(np.eye(4), flat.shape, "LPS")  # 2D, RAS: turned by 180 degrees in-plane
    assert frame.axis == 2 and np.array_equal(frame.to_stack(flat)[0], flat[::-1, ::-1, 0])
    coronal = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    with pytest.raises(InputImageError, match="not axial"):
        axial_frame(coronal, flat.shape, "LPS")
