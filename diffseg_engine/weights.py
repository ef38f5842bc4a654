"""Model weights on disk: safetensors files read and written with numpy, never unpickled.

Owns: the safetensors container (`save_weights`, `load_weights`), the weights digest stored in the model
card (`weights_digest`), and the checks that refuse truncated or tampered files.
Imports: numpy, `card`, `errors`. Must not import torch (the runtime reads weights without it).

Format (https://huggingface.co/docs/safetensors): 8-byte little-endian header length N, N bytes of JSON
header ``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}``, then the raw data.
The model card is stored as JSON in ``__metadata__["diffseg_card"]``.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from .atomic import atomic_write
from .card import CARD_KEY, ModelCard
from .errors import ModelFileError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


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
        h.update(f"{name}|{_NAMES.get(arr.dtype, arr.dtype.str)}|{list(arr.shape)}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_weights(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], card: ModelCard,
                 extra_metadata: Mapping[str, str] | None = None) -> ModelCard:
    """Write `tensors` and `card` (with its weights_sha256 filled in) atomically. Returns that card."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for k, a in arrays.items():
        if a.dtype.newbyteorder("<") not in _NAMES:
            raise ModelFileError(f"tensor {k} has unsupported dtype {a.dtype}")
        arrays[k] = a.astype(a.dtype.newbyteorder("<"), copy=False)
    card = card.replace(weights_sha256=weights_digest(arrays))
    header: dict[str, object] = {"__metadata__": {CARD_KEY: card.to_json(), **dict(extra_metadata or {})}}
    offset = 0
    for name in sorted(arrays):
        a = arrays[name]
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(arrays):
            f.write(arrays[name].tobytes())
    return card


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (cheap: reads the header only)."""
    return _read_header(Path(path))[0].get("__metadata__", {}) or {}


def _read_header(path: Path) -> tuple[dict, int, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelFileError("file is too short to be safetensors (truncated?)", path=path)
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise ModelFileError("safetensors header length is impossible (truncated or not safetensors)",
                                     path=path)
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise ModelFileError("model file not found", path=path, fix="check the --model path") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError("safetensors header is not valid JSON (corrupt file)", path=path) from None
    if not isinstance(header, dict):
        raise ModelFileError("safetensors header is not a JSON object", path=path)
    return header, 8 + n, size


def load_weights(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, np.ndarray], ModelCard]:
    """Read tensors and model card; with `verify`, refuse files whose tensors do not match the card's digest."""
    path = Path(path)
    header, start, size = _read_header(path)
    meta = header.pop("__metadata__", None) or {}
    if CARD_KEY not in meta:
        raise ModelFileError("safetensors file has no diffseg model card in its metadata", path=path,
                             fix="write it with `diffseg-engine train` or `diffseg-engine export`")
    card = ModelCard.from_json(meta[CARD_KEY], source=path)
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else np.zeros(0, np.uint8)
    tensors: dict[str, np.ndarray] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            lo, hi = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"tensor {name!r} has a malformed header entry", path=path) from None
        if not (0 <= lo <= hi <= size - start) or hi - lo != int(np.prod(shape)) * dtype.itemsize:
            raise ModelFileError(f"tensor {name!r} lies outside the file or has the wrong size (truncated?)",
                                 path=path)
        spans.append((lo, hi))
        tensors[name] = np.array(data[start + lo:start + hi].view(dtype).reshape(shape))
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise ModelFileError("tensors overlap in the file (tampered)", path=path)
    if spans and spans[-1][1] != size - start:
        raise ModelFileError("file has trailing bytes after the last tensor (tampered or corrupt)", path=path)
    if verify:
        digest = weights_digest(tensors)
        if digest != card.weights_sha256:
            raise ModelFileError(
                f"weights do not match the model card's sha256 ({digest[:12]}... != {card.weights_sha256[:12]}...)",
                path=path, fix="the file was modified or corrupted; use an intact copy")
    return tensors, card
