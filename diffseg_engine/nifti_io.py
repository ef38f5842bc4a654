"""Reading and writing NIfTI files.

Owns: `LoadedImage`, `load_image`, `load_4d_modalities` and `save_like`. Reading checks everything a user
can get wrong (missing file, not NIfTI, truncated or corrupt gzip -- the gzip stream is read here so its CRC
is checked, which nibabel does not do --, NaN/Inf voxels, complex data, 2-4 dimensions, oversized headers,
singular affines) and raises `InputImageError` one-liners. Writing copies the reference's geometry exactly
(affine, sform/qform with codes, zooms, units) and is atomic (temp file + fsync + os.replace).
Imports: numpy, nibabel, the standard library and `errors` only. Must not import torch, onnxruntime or
any other module of this package (no preprocessing or case logic here).
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .atomic import atomic_write
from .errors import InputImageError, OutputError

#: Largest image accepted, in voxels (checked from the header before any data is read).
MAX_VOXELS = 2**28
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
    k = min(len(shape), 3)
    cols = affine[:3, :k]
    if not np.isfinite(affine).all():
        raise _fail(path, "has a non-finite affine (NaN/Inf in sform/qform)", fix="repair the header's sform/qform")
    sv = np.linalg.svd(cols, compute_uv=False)
    if sv[-1] <= 1e-6 * max(sv[0], 1e-12):
        raise _fail(path, "has a singular affine (zero voxel size or collinear axes)",
                    fix="repair the header's pixdim/sform/qform")
    return shape, dtype


def _read_all(path: Path, max_voxels: int) -> tuple[type, bytes, tuple[int, ...], np.dtype]:
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
            raw = head + f.read()  # GzipFile.read verifies length and CRC-32 at the end of the stream
    except InputImageError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        what = "gzip stream is truncated or corrupt" if gz else "cannot be read"
        raise _fail(path, f"{what} ({exc})") from None
    need = int(header["vox_offset"]) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) < need:
        raise _fail(path, f"is truncated: holds {len(raw)} bytes, the header declares {need}")
    return hdr_cls, raw, shape, dtype


def load_image(path: str | os.PathLike, *, max_voxels: int = MAX_VOXELS) -> LoadedImage:
    """Read and validate a 2D/3D/4D NIfTI file (.nii or .nii.gz); see `LoadedImage` for the data shape.

    Raises `InputImageError` (one line, naming the file and the fix) for anything unusable.
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "file not found", fix="check the path (and the case folder's file names)")
    if not path.is_file():
        raise _fail(path, "is not a file", fix="give a .nii or .nii.gz image")
    hdr_cls, raw, shape, _ = _read_all(path, max_voxels)
    img_cls = nib.Nifti2Image if hdr_cls is nib.Nifti2Header else nib.Nifti1Image
    try:
        img = img_cls.from_bytes(raw)
        data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as exc:
        raise _fail(path, f"cannot be decoded as NIfTI ({exc})") from None
    if not np.isfinite(data).all():
        bad = int(data.size - np.isfinite(data).sum())
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


def save_like(reference: LoadedImage, array: np.ndarray, path: str | os.PathLike,
              dtype: np.dtype | type | str = np.float32) -> Path:
    """Write `array` on the reference's grid: same affine, sform/qform (codes too), zooms and xyzt units.

    array: shape `reference.image.shape` (the file's original shape) or `reference.data.shape`; a 2D
    reference gives a 2D file. dtype: on-disk type (uint8 for masks, float32 for maps); values are stored
    exactly (scl_slope/scl_inter reset; integer dtypes require integer values in range, else ValueError).
    The file (.nii or .nii.gz) is written to a temp file in the destination folder, flushed, fsynced and
    renamed over `path`. Raises `OutputError` when it cannot be written.
    """
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
    try:
        with atomic_write(path) as f:
            if name.endswith(".gz"):
                with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=1, mtime=0) as gz:
                    gz.write(blob)
            else:
                f.write(blob)
    except OSError as exc:
        raise OutputError(f"cannot be written ({exc.strerror or exc})", path=path,
                          fix="check the output folder exists, is writable and has free space") from None
    return path
