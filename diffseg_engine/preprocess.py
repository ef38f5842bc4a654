"""Turning a case into network input, and the exact inverse for the network's output maps.

Owns: axial re-ordering, the in-plane size check (`check_plane`), intensity normalisation, in-plane centre
crop / zero pad, area-average downsampling, bilinear upsampling, `prepare_case` / `restore` / `prepare_label`
and the `Geometry` that links them. The pipeline, for a volume V of shape `shape` and each modality:

1. axial order: the voxel axis whose affine direction is closest to superior-inferior moves to the front,
   giving [S, X, Y] with the two other axes in their original order and direction (never flipped, so the
   inverse is an exact transpose). A 3D array with a trailing singleton axis (a 2D slice) has S = 1.
2. `normalise_intensity` (per modality, over the whole volume).
3. keep the slices that contain brain (any modality non-zero).
4. `centre_crop` to crop_size x crop_size (crop at (n - crop)//2, zero pad at (crop - n)//2 per axis).
5. `downsample` by area averaging.

`restore` inverts 5-1 for a map: bilinear `upsample` (half-pixel centres, edge clamped, so a constant map
stays exactly that constant), `uncrop` (zeros outside the crop window), zeros on unprocessed slices and
outside the brain mask, and back to the original voxel order and shape.
Imports: numpy, `card` and `errors` only. Must not import nibabel (arrays and affines come in from
`nifti_io`), torch or onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .card import Preprocessing
from .errors import InputImageError, UsageError

#: How far outside [0, 1] intensities may lie when the model expects already normalised input.
NONE_TOLERANCE = 1e-3
#: In-plane sizes (voxels) accepted, as fractions of the model's crop window: smaller images would be mostly
#: zero padding, larger ones mostly cut away (a different field of view or resolution than the model's).
PLANE_RANGE = (0.5, 2.0)


@dataclass(eq=False)
class Geometry:
    """What `restore` and `prepare_label` need to map between the input grid and network slices.

    shape: original volume shape (3D; a 2D slice is [X, Y, 1]). axis: the slice (superior-inferior) voxel
    axis. plane: in-plane shape (X, Y) in axial order. slice_index: int [S_sel], the processed slices.
    brain: bool [S, X, Y], any modality non-zero, in axial order.
    """

    shape: tuple[int, int, int]
    axis: int
    plane: tuple[int, int]
    crop_size: int
    downsample: int
    slice_index: np.ndarray
    brain: np.ndarray

    @property
    def image_size(self) -> int:
        return self.crop_size // self.downsample


@dataclass(eq=False)
class PreparedCase:
    """Network input of one case. inputs: float32 [S_sel, C, h, w] (C in the requested modality order,
    h = w = crop_size // downsample); slice_index: int [S_sel] into the axial axis; geometry: see `Geometry`."""

    inputs: np.ndarray
    slice_index: np.ndarray
    geometry: Geometry


# ---- building blocks --------------------------------------------------------------------------------

def check_preprocessing(prep: Preprocessing) -> None:
    """`UsageError` unless `prep` describes a pipeline this module can run."""
    if prep.intensity not in ("percentile", "none"):
        raise UsageError(f"unknown intensity normalisation {prep.intensity!r}", fix="use 'percentile' or 'none'")
    if not 0 <= prep.percentile_low < prep.percentile_high <= 100:
        raise UsageError(f"percentiles {prep.percentile_low}, {prep.percentile_high} must satisfy 0 <= low < high <= 100")
    if prep.crop_size < 1 or prep.downsample < 1 or prep.crop_size % prep.downsample:
        raise UsageError(f"crop_size {prep.crop_size} must be a positive multiple of downsample {prep.downsample}")


def check_plane(plane: Sequence[int], prep: Preprocessing, *, source: object | None = None) -> None:
    """`InputImageError` unless the in-plane size (X, Y) lies within `PLANE_RANGE` of the crop window."""
    lo, hi = (int(round(f * prep.crop_size)) for f in PLANE_RANGE)
    if not all(lo <= n <= hi for n in plane):
        raise InputImageError(
            f"has an in-plane size of {plane[0]}x{plane[1]} voxels; this model looks at a {prep.crop_size}x"
            f"{prep.crop_size} window and takes {lo} to {hi} voxels per in-plane axis", path=source,
            fix="give the full axial field of view at about 1 mm (BraTS: 240x240), resampling if needed")


def slice_axis(affine: np.ndarray, shape: Sequence[int]) -> int:
    """The voxel axis closest to superior-inferior in world space (3D `shape`; a trailing 1 gives axis 2)."""
    if len(shape) == 3 and shape[2] == 1:
        return 2
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    if rot.shape != (3, 3) or not np.isfinite(rot).all() or np.any(norms == 0):
        raise InputImageError("the image affine is non-finite or singular", fix="repair the header's sform/qform")
    return int(np.argmax(np.abs(rot[2]) / norms))


def to_axial(volume: np.ndarray, axis: int) -> np.ndarray:
    """[..3D..] -> [S, X, Y]: `axis` to the front, other axes kept in order (a view, no flip)."""
    return np.moveaxis(volume, axis, 0)


def from_axial(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of `to_axial`: [S, X, Y] -> original axis order."""
    return np.moveaxis(stack, 0, axis)


def _window(n: int, size: int) -> tuple[slice, slice]:
    """(source slice in length n, destination slice in length size) of the centred crop / pad."""
    if n >= size:
        o = (n - size) // 2
        return slice(o, o + size), slice(0, size)
    p = (size - n) // 2
    return slice(0, n), slice(p, p + n)


def centre_crop(x: np.ndarray, size: int) -> np.ndarray:
    """[..., X, Y] -> [..., size, size]: centre crop and/or zero pad each in-plane axis (240 -> [8:-8])."""
    (sx, dx), (sy, dy) = _window(x.shape[-2], size), _window(x.shape[-1], size)
    out = np.zeros(x.shape[:-2] + (size, size), dtype=x.dtype)
    out[..., dx, dy] = x[..., sx, sy]
    return out


def uncrop(y: np.ndarray, plane: tuple[int, int]) -> np.ndarray:
    """Inverse of `centre_crop`: [..., size, size] -> [..., X, Y], zeros outside the crop window."""
    size = y.shape[-1]
    (sx, dx), (sy, dy) = _window(plane[0], size), _window(plane[1], size)
    out = np.zeros(y.shape[:-2] + tuple(plane), dtype=y.dtype)
    out[..., sx, sy] = y[..., dx, dy]
    return out


def downsample(x: np.ndarray, factor: int) -> np.ndarray:
    """[..., H, W] -> [..., H/f, W/f] by averaging f x f blocks (H, W multiples of f)."""
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    return x.reshape(x.shape[:-2] + (h // factor, factor, w // factor, factor)).mean(axis=(-3, -1), dtype=x.dtype)


def _upsample_axis(y: np.ndarray, factor: int, axis: int) -> np.ndarray:
    m = y.shape[axis]
    pos = (np.arange(m * factor) + 0.5) / factor - 0.5  # half-pixel centres (align_corners=False)
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0).astype(y.dtype).reshape([-1 if a == axis % y.ndim else 1 for a in range(y.ndim)])
    a = np.take(y, np.clip(i0, 0, m - 1), axis=axis)
    b = np.take(y, np.clip(i0 + 1, 0, m - 1), axis=axis)
    return a + frac * (b - a)  # exact where a == b, so constants stay constant


def upsample(y: np.ndarray, factor: int) -> np.ndarray:
    """[..., h, w] -> [..., h*f, w*f], bilinear with half-pixel centres and clamped edges
    (like torch `interpolate(mode="bilinear", align_corners=False)`); values stay within the input range."""
    if factor == 1:
        return y
    return _upsample_axis(_upsample_axis(y, factor, -2), factor, -1)


def normalise_intensity(volume: np.ndarray, prep: Preprocessing, *, source: object | None = None) -> np.ndarray:
    """float32 copy of `volume` (any shape) normalised as `prep.intensity` says.

    "percentile": over non-zero voxels, clip at the percentile_low/high percentiles and scale to [0, 1];
    zero voxels stay 0. A constant volume raises `InputImageError`. "none": values unchanged, but they
    must lie in [0, 1] (within `NONE_TOLERANCE`), else `InputImageError`. `source` names the file in errors.
    """
    vol = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(vol).all():
        raise InputImageError("image has NaN/Inf voxels", path=source, fix="replace them (e.g. by 0)")
    if prep.intensity == "none":
        lo, hi = (float(vol.min()), float(vol.max())) if vol.size else (0.0, 0.0)
        if lo < -NONE_TOLERANCE or hi > 1 + NONE_TOLERANCE:
            raise InputImageError(f"intensities span [{lo:g}, {hi:g}] but this model expects intensities in [0, 1]",
                                  path=source, fix="rescale the images to [0, 1] or use a model with percentile "
                                                   "intensity normalisation")
        return vol.copy()
    if prep.intensity != "percentile":
        check_preprocessing(prep)
    brain = vol != 0
    values = vol[brain]
    lo, hi = (np.percentile(values, [prep.percentile_low, prep.percentile_high]) if values.size else (0, 0))
    lo, hi = np.float32(lo), np.float32(hi)
    if not hi > lo:
        raise InputImageError(f"image is constant ({float(lo):g}) over its non-zero voxels; nothing to segment",
                              path=source, fix="check that the right file was given and is not empty")
    out = np.zeros_like(vol)
    out[brain] = (np.clip(values, lo, hi) - lo) / (hi - lo)
    return out


# ---- a case -----------------------------------------------------------------------------------------

def prepare_case(images: Sequence[np.ndarray], affine: np.ndarray, prep: Preprocessing, *,
                 names: Sequence[object] | None = None) -> PreparedCase:
    """Modality volumes (all the same 3D shape [X, Y, Z]; 2D [X, Y] taken as [X, Y, 1]) -> network input.

    affine: the 4x4 voxel -> world matrix shared by the images. names: optional file names for errors.
    Returns `PreparedCase` with inputs float32 [S_sel, C, h, w] of the brain-containing axial slices.
    """
    check_preprocessing(prep)
    names = list(names) if names is not None else [None] * len(images)
    vols = [np.asarray(v) for v in images]
    vols = [v[:, :, None] if v.ndim == 2 else v for v in vols]
    if not vols:
        raise UsageError("no modality images given")
    for v, name in zip(vols, names):
        if v.ndim != 3:
            raise InputImageError(f"has shape {v.shape}; expected a 3D volume or a 2D slice", path=name)
        if v.shape != vols[0].shape:
            raise InputImageError(f"modality images have different shapes: {vols[0].shape} ({names[0] or 'first'})"
                                  f" and {v.shape} ({name or 'another'})",
                                  fix="give the co-registered images of one case, all on the same grid")
    shape = tuple(int(n) for n in vols[0].shape)
    axis = slice_axis(affine, shape)
    brain3 = np.zeros(shape, dtype=bool)
    for v in vols:
        brain3 |= v != 0
    brain = np.ascontiguousarray(to_axial(brain3, axis))
    sel = np.flatnonzero(brain.any(axis=(1, 2)))
    if sel.size == 0:
        raise InputImageError("every modality is zero everywhere: no brain to segment", path=names[0])
    size = prep.crop_size // prep.downsample
    inputs = np.empty((sel.size, len(vols), size, size), dtype=np.float32)
    for c, (v, name) in enumerate(zip(vols, names)):
        norm = normalise_intensity(v, prep, source=name)
        inputs[:, c] = downsample(centre_crop(to_axial(norm, axis)[sel], prep.crop_size), prep.downsample)
    check_plane((brain.shape[1], brain.shape[2]), prep, source=names[0])
    geometry = Geometry(shape=shape, axis=axis, plane=(brain.shape[1], brain.shape[2]), crop_size=prep.crop_size,
                        downsample=prep.downsample, slice_index=sel, brain=brain)
    return PreparedCase(inputs=inputs, slice_index=sel, geometry=geometry)


def _geometry(target: PreparedCase | Geometry) -> Geometry:
    return target.geometry if isinstance(target, PreparedCase) else target


def restore(prepared: PreparedCase | Geometry, maps: np.ndarray) -> np.ndarray:
    """Network maps float [S_sel, h, w] -> float32 volume in the input's original voxel order and shape.

    Zero on slices that were not processed, outside the crop window and outside the brain mask.
    """
    g = _geometry(prepared)
    maps = np.asarray(maps, dtype=np.float32)
    want = (g.slice_index.size, g.image_size, g.image_size)
    if maps.shape != want:
        raise ValueError(f"maps have shape {maps.shape}; expected {want} [S_sel, h, w]")
    full = np.zeros((g.brain.shape[0],) + g.plane, dtype=np.float32)
    full[g.slice_index] = uncrop(upsample(maps, g.downsample), g.plane)
    full *= g.brain
    return np.ascontiguousarray(from_axial(full, g.axis))


def prepare_label(label_volume: np.ndarray, prepared: PreparedCase | Geometry,
                  affine: np.ndarray | None = None, *, source: object | None = None) -> np.ndarray:
    """Whole-tumour target (label > 0) on the network grid: float32 {0, 1} [S_sel, h, w].

    Same slices, crop and downsampling as `prepare_case`; after area averaging, blocks with at least half
    tumour (>= 0.5) are tumour. `affine`, if given, must put the slice axis where the images had it.
    """
    g = _geometry(prepared)
    lab = np.asarray(label_volume)
    lab = lab[:, :, None] if lab.ndim == 2 else lab
    if lab.shape != g.shape:
        raise InputImageError(f"label has shape {lab.shape} but the images have shape {g.shape}", path=source,
                              fix="give the label of this case, on the images' grid")
    if affine is not None and slice_axis(affine, lab.shape) != g.axis:
        raise InputImageError("label is oriented differently from the images", path=source,
                              fix="resample the label onto the images' grid")
    wt = (to_axial(lab, g.axis)[g.slice_index] > 0).astype(np.float32)
    small = downsample(centre_crop(wt, g.crop_size), g.downsample)
    return (small >= 0.5).astype(np.float32)
