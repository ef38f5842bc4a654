"""Model weights on disk: safetensors files read and written as numpy arrays, never unpickled.

Owns: `save_weights` / `load_weights` / `read_metadata` (and under them `write_tensors` / `read_tensors`, which
the modality classifier's file uses too) (the container itself is the `safetensors` package's
numpy API: parsing, bounds and overlap checks are the library's), the weights digest stored in the model card
(`weights_digest`), and the translation of the library's errors into one-line `ModelFileError`s that name
the file (truncated, trailing bytes, impossible header, not JSON) plus the refusal of files without a card or
whose tensors do not match the card's digest.
Imports: numpy, safetensors; `card`, `core.errors`, `io.atomic`. Never torch.
Definitions and conventions: the comment below the imports.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as _serialize

from ..io.atomic import atomic_write
from .card import CARD_KEY, ModelCard
from ..core.errors import ModelFileError

# Format (https://huggingface.co/docs/safetensors): 8-byte little-endian header length N, N bytes of JSON
# header ``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}``, then the raw data.
# The model card is stored as JSON in ``__metadata__["diffseg_card"]``.

#: dtype names in the digest (safetensors' names; the digest of every file written so far depends on them).
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _dtype_name(dtype: np.dtype) -> str | None:
    """safetensors' name of a numpy dtype; bfloat16 (ml_dtypes, when installed) is BF16."""
    return "BF16" if dtype.name == "bfloat16" else _NAMES.get(dtype.newbyteorder("<"))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a whole file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, dtypes, shapes and little-endian bytes of all tensors, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        h.update(f"{name}|{_dtype_name(arr.dtype) or arr.dtype.str}|{list(arr.shape)}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write `tensors` (little-endian) and string `metadata` as one safetensors file, atomically."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for k, a in arrays.items():
        if _dtype_name(a.dtype) is None:
            raise ModelFileError(f"tensor {k} has unsupported dtype {a.dtype}")
        arrays[k] = a.astype(a.dtype.newbyteorder("<"), copy=False)
    blob = _serialize(arrays, metadata=dict(metadata))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(blob)


def save_weights(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], card: ModelCard,
                 extra_metadata: Mapping[str, str] | None = None) -> ModelCard:
    """Write `tensors` and `card` (with its weights_sha256 filled in) atomically. Returns that card."""
    card = card.replace(weights_sha256=weights_digest(tensors))
    write_tensors(path, tensors, {CARD_KEY: card.to_json(), **dict(extra_metadata or {})})
    return card


#: Words of the safetensors library's error messages (0.8: prose; older releases: the Rust variant's name) ->
#: what a user reads. First match wins.
_LIBRARY_ERRORS = (
    (("too small", "HeaderTooSmall"), "file is too short to be safetensors (truncated?)"),
    (("too large", "header length", "HeaderTooLarge", "InvalidHeaderLength"),
     "safetensors header length is impossible (truncated or not safetensors)"),
    (("not fully covered", "incomplete metadata", "MetadataIncompleteBuffer"),
     "tensor data does not fill the file exactly: truncated, or trailing bytes after the last tensor "
     "(tampered or corrupt)"),
    (("offset", "InvalidOffset"), "tensor offsets overlap or lie outside the file (tampered or truncated)"),
    (("utf", "deserializ", "json", "InvalidHeader"), "safetensors header is not valid JSON (corrupt file)"),
)


def _library_error(exc: Exception, path: Path) -> ModelFileError:
    text = " ".join(str(exc).split())
    for words, message in _LIBRARY_ERRORS:
        if any(w.lower() in text.lower() for w in words):
            return ModelFileError(message, path=path)
    return ModelFileError(f"not a readable safetensors file ({text or type(exc).__name__})", path=path)


def _open(path: Path):
    if not path.is_file():
        raise ModelFileError("model file not found", path=path, fix="check the --model path")
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, ValueError, OSError) as exc:  # the library raises SafetensorError; be lenient
        raise _library_error(exc, path) from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (cheap: reads the header only)."""
    path = Path(path)
    with _open(path) as f:
        return dict(f.metadata() or {})


def read_tensors(path: str | os.PathLike, *, card_key: str = CARD_KEY,
                 missing_card: str = "safetensors file has no diffseg model card in its metadata",
                 missing_fix: str = "write it with `diffseg-engine train` or `diffseg-engine export`",
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file that carries a card under `card_key` (`ModelFileError`
    naming the file, with `missing_card` and `missing_fix`, when it does not)."""
    path = Path(path)
    with _open(path) as f:
        meta = dict(f.metadata() or {})
        if card_key not in meta:
            raise ModelFileError(missing_card, path=path, fix=missing_fix)
        try:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, TypeError, ValueError) as exc:  # e.g. a dtype numpy lacks
            raise _library_error(exc, path) from None
    return tensors, meta


def load_weights(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, np.ndarray], ModelCard]:
    """Read tensors and model card; with `verify`, refuse files whose tensors do not match the card's digest."""
    path = Path(path)
    tensors, meta = read_tensors(path)
    card = ModelCard.from_json(meta[CARD_KEY], source=path)
    if verify:
        digest = weights_digest(tensors)
        if digest != card.weights_sha256:
            raise ModelFileError(
                f"weights do not match the model card's sha256 ({digest[:12]}... != {card.weights_sha256[:12]}...)",
                path=path, fix="the file was modified or corrupted; use an intact copy")
    return tensors, card
