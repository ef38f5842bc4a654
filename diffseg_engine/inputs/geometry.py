"""Canonical geometry: where an input volume's axes point, how its slices become the model's axial stack, and
in-plane resampling to the model's voxel spacing, each with its exact inverse.

Owns: `AxialFrame` / `axial_frame` (reorientation of a volume to the card's canonical orientation and the
axial stack [S, h, w] cut from it), `check_orientation`, `input_orientation` (nibabel axis codes of an
affine), `lr_network_axis` (which network axis is left-right), `needs_resampling` / `resampled_size` /
`resample_axis` (linear in-plane resampling with the inverse mapping) and the tolerances below.

Imports: nibabel, numpy, scipy (lazily); `core.errors`. Never torch.
Definitions and conventions: the comment below the imports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from ..core.errors import InputImageError, UsageError

# Orientation: the card names the canonical voxel orientation as nibabel axis codes (``"LPS"``: voxel axis 0
# runs to the patient's Left, 1 to Posterior, 2 to Superior, as BraTS stores its volumes). An input's own
# codes come from its affine (`nibabel.orientations.io_orientation`, the nearest axis-aligned orientation), the
# array is flipped/transposed to the canonical codes (`ornt_transform` + `apply_orientation`, exact: no
# interpolation) and the canonical S (or I) axis moves to the front. The inverse transposes and flips back, so
# a map comes back on the input's voxels exactly. A 2D slice ([X, Y, 1]) is axial by definition: its axis 2 is
# S and its in-plane codes come from the x/y (R-L, A-P) components of its first two affine columns.
# Orientation ``""`` means "the array as stored": no reorientation, the axial axis is the voxel axis closest to
# superior-inferior (`slice_axis`) moved to the front, the other two kept in order (models converted from the
# paper's code, whose loader used the arrays as stored).
#
# Spacing: the in-plane spacing of each stack axis is the length of its affine column (mm). An axis whose
# spacing differs from the card's `spacing_mm` by more than `SPACING_TOLERANCE` (relative) is resampled to
# exactly `spacing_mm` (linear, with a Gaussian anti-aliasing pre-filter when shrinking); the new grid keeps the
# centre of the field of view where it was. An axis within the tolerance is used as it is (no interpolation).

#: In-plane spacing differing from the card's by at most this fraction is used as it is (no resampling).
SPACING_TOLERANCE = 0.05
#: The world axis (RAS+ index) of each code letter, and the letter pairs of nibabel's axis codes.
_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_WORLD = {c: i for i, pair in enumerate(_LABELS) for c in pair}


def check_orientation(orientation: str) -> str:
    """The orientation in upper case if it is ``""`` or three axis codes naming each world axis once
    (e.g. ``"LPS"``, ``"RAS"``, ``"SLP"``); `UsageError` otherwise."""
    codes = str(orientation).upper()
    if codes and (len(codes) != 3 or any(c not in _WORLD for c in codes)
                  or sorted(_WORLD[c] for c in codes) != [0, 1, 2]):
        raise UsageError(f"orientation {orientation!r} is not three axis codes naming L/R, A/P and S/I once each",
                         fix="use e.g. 'LPS' (BraTS) or '' (the arrays as stored)")
    return codes


def _axial_axis(affine: np.ndarray, shape: Sequence[int]) -> int:
    """The voxel axis closest to superior-inferior (a trailing singleton axis is axial: axis 2)."""
    if len(shape) == 3 and shape[2] == 1:
        return 2
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    if rot.shape != (3, 3) or not np.isfinite(rot).all() or np.any(norms == 0):
        raise InputImageError("the image affine is non-finite or singular", fix="repair the header's sform/qform")
    return int(np.argmax(np.abs(rot[2]) / norms))


def input_orientation(affine: np.ndarray, shape: Sequence[int], *, source: object | None = None) -> np.ndarray:
    """nibabel orientation [3, 2] (world axis, direction) of each voxel axis of an array of 3D `shape`.

    3D: `io_orientation(affine)`. A 2D slice [X, Y, 1]: axis 2 is S; axes 0 and 1 take the nearest of the
    x (R-L) and y (A-P) world axes from their affine columns (a slice that is not axial is refused).
    """
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise InputImageError("the image affine is not a finite 4x4 matrix", path=source,
                              fix="repair the header's sform/qform")
    if len(shape) == 3 and shape[2] == 1:
        plane = np.eye(3)
        plane[:2, :2] = aff[:2, :2]
        ornt = io_orientation(plane)
        if not np.isfinite(ornt).all():
            raise InputImageError("is a 2D slice that is not axial (its plane has no left-right or "
                                  "anterior-posterior direction)", path=source,
                                  fix="give axial slices, or the whole 3D volume")
        return np.vstack([ornt, [[2.0, 1.0]]])
    ornt = io_orientation(aff)
    if not np.isfinite(ornt).all():
        raise InputImageError("the image affine is singular (a voxel axis without a direction)", path=source,
                              fix="repair the header's sform/qform")
    return ornt


def codes_of(ornt: np.ndarray) -> str:
    """Axis codes ("LPS", ...) of a nibabel orientation array."""
    return "".join(_LABELS[int(w)][int(d > 0)] for w, d in ornt)


def lr_network_axis(orientation: str) -> int:
    """The axis of a network slice [..., h, w] that runs left-right, for a card orientation: -2 or -1.

    ``""`` (arrays as stored) assumes BraTS storage (L, P, S): -2.
    """
    codes = check_orientation(orientation) or "LPS"
    plane = [c for c in codes if _WORLD[c] != 2]
    return -2 if _WORLD[plane[0]] == 0 else -1


@dataclass(frozen=True, eq=False)
class AxialFrame:
    """How an input volume of 3D `shape` becomes the axial stack [S, h, w] and back.

    transform: nibabel orientation transform input -> canonical (None: the array as stored). stack_axis: the
    axis of the canonical array that goes to the front. axis: the input voxel axis that becomes the stack's
    S axis; flipped: the stack's slice order runs against the input's voxel order along `axis`.
    input_codes / codes: axis codes of the input and of the canonical array ("" where unknown: as stored).
    zooms: in-plane voxel spacing (mm) of the stack's axes h and w.
    """

    shape: tuple[int, int, int]
    transform: np.ndarray | None
    stack_axis: int
    axis: int
    flipped: bool
    input_codes: str
    codes: str
    zooms: tuple[float, float]

    def to_stack(self, volume: np.ndarray) -> np.ndarray:
        """Input-grid volume (3D `shape`) -> axial stack [S, h, w] (a view: flips and transposes only)."""
        if self.transform is None:
            return np.moveaxis(volume, self.axis, 0)
        return np.moveaxis(apply_orientation(volume, self.transform), self.stack_axis, 0)

    def from_stack(self, stack: np.ndarray) -> np.ndarray:
        """Inverse of `to_stack`: [S, h, w] -> the input's voxel order and shape (a view)."""
        if self.transform is None:
            return np.moveaxis(stack, 0, self.axis)
        inverse = np.empty_like(self.transform)
        for i, (j, d) in enumerate(self.transform):
            inverse[int(j)] = (i, d)
        return apply_orientation(np.moveaxis(stack, 0, self.stack_axis), inverse)

    def input_slices(self, stack_index: np.ndarray) -> np.ndarray:
        """Stack slice indices -> voxel indices along the input's `axis` (and back: the map is its own inverse)."""
        idx = np.asarray(stack_index, dtype=np.int64)
        return (self.shape[self.axis] - 1 - idx) if self.flipped else idx

    def describe(self) -> dict:
        return {"input_orientation": self.input_codes or "as stored", "orientation": self.codes or "as stored",
                "slice_axis": self.axis, "slices_reversed": self.flipped,
                "in_plane_spacing_mm": [round(z, 6) for z in self.zooms]}


def axial_frame(affine: np.ndarray, shape: Sequence[int], orientation: str, *,
                source: object | None = None) -> AxialFrame:
    """The `AxialFrame` of an input of 3D `shape` with voxel-to-world `affine`, for a card `orientation`."""
    shape = tuple(int(n) for n in shape)
    codes = check_orientation(orientation)
    aff = np.asarray(affine, dtype=np.float64)
    zooms3 = np.linalg.norm(aff[:3, :3], axis=0) if aff.shape == (4, 4) else np.ones(3)
    if not codes:
        axis = _axial_axis(aff, shape)
        plane = [a for a in range(3) if a != axis]
        return AxialFrame(shape, None, axis, axis, False, "", "", (float(zooms3[plane[0]]), float(zooms3[plane[1]])))
    src = input_orientation(aff, shape, source=source)
    dst = axcodes2ornt(codes)
    transform = ornt_transform(src, dst)
    stack_axis = next(i for i, c in enumerate(codes) if _WORLD[c] == 2)
    axis = int(np.flatnonzero(transform[:, 0] == stack_axis)[0])
    canon_zoom = [0.0, 0.0, 0.0]
    for i, (j, _) in enumerate(transform):
        canon_zoom[int(j)] = float(zooms3[i])
    plane = [a for a in range(3) if a != stack_axis]
    return AxialFrame(shape, transform, stack_axis, axis, bool(transform[axis, 1] < 0), codes_of(src), codes,
                      (canon_zoom[plane[0]], canon_zoom[plane[1]]))


# ---- in-plane resampling ----------------------------------------------------------------------------

def needs_resampling(zoom: float, spacing: float) -> bool:
    """True when an axis of spacing `zoom` (mm) differs from `spacing` by more than `SPACING_TOLERANCE`."""
    return abs(zoom / spacing - 1.0) > SPACING_TOLERANCE


def resampled_size(n: int, zoom: float, spacing: float) -> int:
    """Voxels at `spacing` covering the field of view of n voxels at `zoom` (n itself when not resampled)."""
    return max(1, int(round(n * zoom / spacing))) if needs_resampling(zoom, spacing) else n


def sample_positions(n_in: int, n_out: int, step: float) -> np.ndarray:
    """Positions (in input voxel units) of n_out samples `step` input voxels apart, centred on the input's
    centre: p_j = (n_in - 1)/2 + (j - (n_out - 1)/2) * step. With step = out/in spacing this is the forward
    resampling; the inverse uses n_in, n_out swapped and step = in/out spacing (the same world positions)."""
    return (n_in - 1) / 2.0 + (np.arange(n_out, dtype=np.float64) - (n_out - 1) / 2.0) * step


def resample_axis(x: np.ndarray, axis: int, n_out: int, step: float) -> np.ndarray:
    """Linear resampling of `x` along `axis` to n_out samples at `sample_positions(n_in, n_out, step)`.

    Samples beyond the first/last voxel take the edge value (constants stay exactly constant). When shrinking
    (step > 1), a Gaussian pre-filter of sigma (step - 1)/2 input voxels suppresses aliasing. float32 out.
    """
    x = np.asarray(x, dtype=np.float32)
    axis = axis % x.ndim
    n_in = x.shape[axis]
    if step > 1:
        from scipy.ndimage import gaussian_filter1d
        x = gaussian_filter1d(x, sigma=(step - 1) / 2.0, axis=axis, mode="nearest", truncate=3.0)
    pos = np.clip(sample_positions(n_in, n_out, step), 0, n_in - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (pos - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    a, b = np.take(x, i0, axis=axis), np.take(x, i1, axis=axis)
    return a + frac * (b - a)
