"""Reading and writing NIfTI files.

Owns: `LoadedImage`, `load_image`, `load_4d_modalities`, `encode_like` and `save_like`. Reading checks
everything a user can get wrong before the voxels are used: missing file, not NIfTI, truncated or corrupt
gzip (the gzip stream is read here so its CRC is checked, which nibabel does not do), a stream that
decompresses to far more than its header declares, 2-4 dimensions, oversized headers (from the header, before
any data is read), complex or RGB data, singular, sheared or non-finite affines, sform and qform that
disagree, non-finite or extreme scaling (scl_slope/scl_inter) and NaN/Inf voxels, each as an
`InputImageError` one-liner. Writing copies the reference's geometry exactly (affine, sform/qform with codes,
zooms, units) and is atomic (temp file + fsync + os.replace).
Imports: nibabel, numpy; `atomic`, `core.errors`. Never torch.
"""
from __future__ import annotations

import gzip
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .atomic import atomic_write
from ..core.errors import InputImageError, OutputError

#: Largest image accepted, in voxels (checked from the header before any data is read).
MAX_VOXELS = 2**28
#: Most bytes a file may hold beyond what its header declares (header extensions sit before vox_offset).
MAX_TRAILING = 64 << 20
#: Largest vox_offset accepted (header extensions), in bytes.
MAX_VOX_OFFSET = 64 << 20
#: Scaling slopes outside [1/MAX_SLOPE, MAX_SLOPE] in magnitude are refused as corrupt.
MAX_SLOPE = 1e20
#: Two columns of the affine whose directions have |cos| above this are sheared.
SHEAR_TOLERANCE = 1e-3
#: sform and qform may differ by this much (mm, per matrix entry) and still agree.
SFORM_QFORM_TOLERANCE = 1e-3
_GZIP_MAGIC = b"\x1f\x8b"
_FIX_REEXPORT = "re-export or re-download the image as a single-file NIfTI (.nii or .nii.gz)"


@dataclass
class LoadedImage:
    """One NIfTI file in memory.

    data: float32 voxels; a 2D file [X, Y] becomes [X, Y, 1], trailing singleton axes past the third are
    dropped ([X, Y, Z, 1] -> [X, Y, Z]); 4D stays [X, Y, Z, T].
    image: the nibabel image (its header and affine are the file's; its data is a view of `data` in the
    file's original shape `image.shape`).
    """

    data: np.ndarray
    image: Any
    path: Path

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel -> world (RAS+ mm) matrix."""
        return np.asarray(self.image.affine, dtype=np.float64)


def _fail(path: Path, message: str, fix: str | None = _FIX_REEXPORT) -> InputImageError:
    return InputImageError(" ".join(message.split()), path=path, fix=fix)  # always one line


def _header_class(head: bytes, path: Path) -> type:
    """The nibabel header class for the first bytes of a file (NIfTI-1 or NIfTI-2, single file only)."""
    if len(head) >= 348:
        size_le, size_be = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
        if 348 in (size_le, size_be) and head[344:348] == b"n+1\x00":
            return nib.Nifti1Header
        if 540 in (size_le, size_be) and len(head) >= 12 and head[4:8] == b"n+2\x00":
            return nib.Nifti2Header
        if head[344:348] == b"ni1\x00" or head[4:8] == b"ni2\x00":
            raise _fail(path, "is a NIfTI header of a .hdr/.img pair, not a single-file NIfTI",
                        fix="convert it to .nii.gz (e.g. nibabel.save(nibabel.load(p), 'x.nii.gz'))")
    raise _fail(path, "is not a NIfTI file (no NIfTI-1/NIfTI-2 header)",
                fix="give a .nii or .nii.gz image")


def _check_header(header: Any, path: Path, max_voxels: int) -> tuple[tuple[int, ...], np.dtype]:
    """Validate dims, size, dtype and affine from the header alone; returns (shape, on-disk dtype)."""
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception as exc:  # nibabel raises several types for malformed fields
        raise _fail(path, f"has a malformed NIfTI header ({exc})") from None
    if not 2 <= len(shape) <= 4:
        raise _fail(path, f"has {len(shape)} dimensions {shape}; expected a 2D slice, a 3D volume or a 4D stack",
                    fix="give one MR image per file (3D), or a 4D file with modalities on the last axis")
    if min(shape) < 1:
        raise _fail(path, f"declares an empty image of shape {shape}")
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > max_voxels:
        raise _fail(path, f"declares {voxels} voxels {shape}, more than the limit {max_voxels}",
                    fix="crop or resample the image to a brain-sized grid")
    if dtype.kind == "c":
        raise _fail(path, f"holds complex {dtype} data; expected real-valued magnitude images",
                    fix="save the magnitude (abs) image")
    if dtype.kind not in "biuf":
        raise _fail(path, f"holds unsupported data type {dtype} (e.g. RGB); expected a grey-value image",
                    fix="save a single-channel integer or float image")
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if slope not in (0.0,) and not np.isnan(slope):  # 0 or NaN: no scaling (the NIfTI standard)
        if not np.isfinite(slope) or not np.isfinite(inter):
            raise _fail(path, f"has non-finite intensity scaling (scl_slope={slope:g}, scl_inter={inter:g})",
                        fix="repair the header's scl_slope/scl_inter (1 and 0 for unscaled data)")
        if not 1 / MAX_SLOPE <= abs(slope) <= MAX_SLOPE:
            raise _fail(path, f"has an extreme intensity scaling scl_slope={slope:g} (corrupt header?)",
                        fix="repair the header's scl_slope/scl_inter (1 and 0 for unscaled data)")
    if int(header["vox_offset"]) > MAX_VOX_OFFSET:
        raise _fail(path, f"declares its voxels at byte {int(header['vox_offset'])}, beyond {MAX_VOX_OFFSET} "
                          "(oversized header extensions)")
    _check_affine(header, affine, len(shape), path)
    return shape, dtype


def _check_affine(header: Any, affine: np.ndarray, ndim: int, path: Path) -> None:
    """Refuse non-finite, singular and sheared voxel-to-world matrices, and sform/qform that disagree."""
    k = min(ndim, 3)
    cols = affine[:3, :k]
    if not np.isfinite(affine).all():
        raise _fail(path, "has a non-finite affine (NaN/Inf in sform/qform)", fix="repair the header's sform/qform")
    sv = np.linalg.svd(cols, compute_uv=False)
    if sv[-1] <= 1e-6 * max(sv[0], 1e-12):
        raise _fail(path, "has a singular affine (zero voxel size or collinear axes)",
                    fix="repair the header's pixdim/sform/qform")
    unit = cols / np.linalg.norm(cols, axis=0)
    cos = np.abs(unit.T @ unit - np.eye(k)).max()
    if cos > SHEAR_TOLERANCE:
        angle = float(np.degrees(np.arcsin(min(cos, 1.0))))
        raise _fail(path, f"has a sheared affine (voxel axes {angle:.2g} degrees from perpendicular)",
                    fix="resample the image onto a rectangular grid (e.g. with FSL flirt -applyxfm or ANTs)")
    if int(header["sform_code"]) > 0 and int(header["qform_code"]) > 0:
        try:
            sform, qform = header.get_sform(), header.get_qform()
        except Exception:  # a malformed quaternion: the finite check above saw the sform only
            sform, qform = None, np.full((4, 4), np.nan)
        diff = float(np.max(np.abs(sform - qform))) if sform is not None and np.isfinite(qform).all() else np.inf
        if not diff <= SFORM_QFORM_TOLERANCE:
            raise _fail(path, f"has sform and qform that disagree (by up to {diff:.3g} mm); tools that read the "
                              "qform would place the segmentation elsewhere",
                        fix="make them agree, e.g. in nibabel img.set_qform(img.get_sform()), or zero the wrong "
                            "one's code")


def _read_all(path: Path, max_voxels: int) -> tuple[Any, bytes, tuple[int, ...], np.dtype]:
    """Read the whole (decompressed) file, checking the header before the data and the gzip CRC at the end."""
    try:
        with open(path, "rb") as raw_f:
            gz = raw_f.read(2) == _GZIP_MAGIC
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or exc})", fix="check the path and its permissions") from None
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(540)
            hdr_cls = _header_class(head, path)
            header = hdr_cls(head[: hdr_cls.sizeof_hdr], check=False)  # extensions are read by nibabel later
            shape, dtype = _check_header(header, path, max_voxels)
            need = int(header["vox_offset"]) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            limit = need + MAX_TRAILING
            # one byte past the limit tells a stream that inflates far beyond its header (a gzip bomb); a
            # read that stops short of it reached the end, where GzipFile verifies length and CRC-32
            raw = head + f.read(max(0, limit + 1 - len(head)))
    except InputImageError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        what = "gzip stream is truncated or corrupt" if gz else "cannot be read"
        raise _fail(path, f"{what} ({exc})") from None
    if len(raw) > limit:
        raise _fail(path, f"holds more than {limit} bytes (decompressed) where its header declares {need}")
    if len(raw) < need:
        raise _fail(path, f"is truncated: holds {len(raw)} bytes, the header declares {need}")
    return header, raw, shape, dtype


def load_image(path: str | os.PathLike, *, max_voxels: int = MAX_VOXELS) -> LoadedImage:
    """Read and validate a 2D/3D/4D NIfTI file (.nii or .nii.gz); see `LoadedImage` for the data shape.

    Raises `InputImageError` (one line, naming the file and the fix) for anything unusable.
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "file not found", fix="check the path (and the case folder's file names)")
    if not path.is_file():
        raise _fail(path, "is not a file", fix="give a .nii or .nii.gz image")
    header, raw, shape, _ = _read_all(path, max_voxels)
    img_cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # overflow is reported below, in one line
            warnings.simplefilter("ignore")
            img = img_cls.from_bytes(raw)
            data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as exc:
        raise _fail(path, f"cannot be decoded as NIfTI ({exc})") from None
    if not np.isfinite(data).all():
        bad = int(data.size - np.isfinite(data).sum())
        slope = float(header["scl_slope"])  # the file's (nibabel resets the image header's)
        if np.isfinite(slope) and slope not in (0.0, 1.0):
            raise _fail(path, f"has {bad} voxels that overflow float32 after scaling by scl_slope={slope:g}",
                        fix="repair the header's scl_slope/scl_inter (1 and 0 for unscaled data)")
        raise _fail(path, f"has {bad} non-finite voxels (NaN/Inf, or values beyond float32)",
                    fix="replace NaN/Inf voxels (e.g. by 0) before segmenting")
    image = img_cls(data, img.affine, img.header)  # geometry of the file; no second copy of the voxels
    if data.ndim == 2:
        data = data[:, :, None]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return LoadedImage(data=data, image=image, path=path)


def load_4d_modalities(path: str | os.PathLike, *, max_voxels: int = MAX_VOXELS) -> list[np.ndarray]:
    """Split a 4D file [X, Y, Z, C] (modalities on the last axis) into C float32 volumes [X, Y, Z]."""
    loaded = load_image(path, max_voxels=max_voxels)
    if loaded.data.ndim != 4:
        raise _fail(loaded.path, f"has shape {loaded.image.shape}; expected 4D with modalities on the last axis",
                    fix="give one 3D file per modality instead")
    return [np.ascontiguousarray(loaded.data[..., c]) for c in range(loaded.data.shape[-1])]


def _cast_exact(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if array.size and (not np.isfinite(array).all() or np.any(array != np.round(array))
                           or array.min() < info.min or array.max() > info.max):
            raise ValueError(f"values cannot be stored exactly as {dtype} (range {info.min}..{info.max}, integers)")
    return np.asarray(array, dtype=dtype)


def encode_like(reference: LoadedImage, array: np.ndarray, path: str | os.PathLike,
                dtype: np.dtype | type | str = np.float32) -> bytes:
    """The bytes `save_like` writes (gzip-compressed when `path` ends in .gz, deterministic: mtime 0)."""
    path, dtype = Path(path), np.dtype(dtype)
    shape = tuple(reference.image.shape)
    arr = np.asarray(array)
    if arr.shape not in (shape, tuple(reference.data.shape)):
        raise ValueError(f"array shape {arr.shape} does not match the reference image shape {shape}")
    out = _cast_exact(arr.reshape(shape), dtype)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise OutputError("output name must end in .nii or .nii.gz", path=path, fix="rename the output")
    hdr = reference.image.header.copy()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"], hdr["cal_max"] = 0, 0
    img = type(reference.image)(out, reference.image.affine, hdr)
    img.header["pixdim"] = reference.image.header["pixdim"]  # set_data_shape resets unused pixdim entries
    blob = img.to_bytes()
    return gzip.compress(blob, compresslevel=1, mtime=0) if name.endswith(".gz") else blob


def save_like(reference: LoadedImage, array: np.ndarray, path: str | os.PathLike,
              dtype: np.dtype | type | str = np.float32) -> Path:
    """Write `array` on the reference's grid: same affine, sform/qform (codes too), zooms and xyzt units.

    array: shape `reference.image.shape` (the file's original shape) or `reference.data.shape`; a 2D
    reference gives a 2D file. dtype: on-disk type (uint8 for masks, float32 for maps); values are stored
    exactly (scl_slope/scl_inter reset; integer dtypes require integer values in range, else ValueError).
    The file (.nii or .nii.gz) is written to a temp file in the destination folder, flushed, fsynced and
    renamed over `path`. Raises `OutputError` when it cannot be written (`ResourceError` when the disk is
    full); an existing file is then left as it was.
    """
    path = Path(path)
    blob = encode_like(reference, array, path, dtype)
    with atomic_write(path) as f:
        f.write(blob)
    return path
