"""ONNX files read without the onnx package: metadata, external-data references and the content digest.

Owns: `OnnxFileInfo`, `inspect_onnx`, `content_digest` and `DIGEST_KEY`. An ONNX file is a protobuf
`ModelProto`; this module walks its wire format (varints and length-delimited fields) just far enough to read
`metadata_props` (where the model card lives), to find every tensor stored as external data (in the graph,
its subgraphs, functions and training graphs) and to compute the digest `export` stores under `DIGEST_KEY`:
sha256 over the file's top-level fields except that one metadata entry, so graph, weights and card are all
covered. A truncated or corrupt file, external data outside the model's folder and a digest that does not
match raise `ModelFileError` before onnxruntime parses anything.
Imports: `card`, `core.errors`, `step_graph`. Never torch.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

from .card import CARD_KEY, ModelCard
from ..core.errors import ModelFileError
from .step_graph import PRECISION_KEY

#: metadata_props key of the content digest written by `diffseg-engine export`.
DIGEST_KEY = "diffseg_sha256"

# field numbers of onnx.proto
_MODEL_GRAPH, _MODEL_META, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 14, 20, 25
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE_INIT = 1, 5, 15
_NODE_ATTR, _FUNCTION_NODE = 5, 7
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION, _EXTERNAL = 8, 13, 14, 1
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TRAINING_GRAPHS = (1, 2)
_MAX_DEPTH = 64
_FIX = "re-export it with `diffseg-engine export`, or use an intact copy"


class _Corrupt(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _Corrupt("a number runs past the end of its field")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Corrupt("a number is longer than 10 bytes")


def _fields(buf, start: int, end: int):
    """(field number, wire type, a, b, field start) per field of buf[start:end]: for length-delimited fields
    the payload is buf[a:b], for varints `a` is the value; `b` is always where the field ends."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise _Corrupt("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield num, wire, value, pos, first
            continue
        if wire == 2:
            n, pos = _varint(buf, pos, end)
            a, pos = pos, pos + n
        elif wire == 1:
            a, pos = pos, pos + 8
        elif wire == 5:
            a, pos = pos, pos + 4
        else:
            raise _Corrupt(f"wire type {wire} is not used by ONNX")
        if pos > end:
            raise _Corrupt("a field runs past the end of the file")
        yield num, wire, a, pos, first


def _entry(buf, a: int, b: int) -> tuple[str, str]:
    """A StringStringEntryProto: (key, value)."""
    key = value = ""
    for num, wire, x, y, _ in _fields(buf, a, b):
        if wire == 2 and num in (1, 2):
            text = bytes(buf[x:y]).decode("utf-8")
            key, value = (text, value) if num == 1 else (key, text)
    return key, value


@dataclass
class OnnxFileInfo:
    """What `inspect_onnx` read: metadata_props, the external data (tensor name, location) and the digests."""

    path: Path
    metadata: dict[str, str] = field(default_factory=dict)
    external: list[tuple[str, str]] = field(default_factory=list)
    digest: str = ""  # computed from the file
    stored_digest: str | None = None  # metadata[DIGEST_KEY], where the exporter wrote one

    @property
    def precision(self) -> str:
        """The precision of the graph's convolutions and matmuls (`step_graph.PRECISIONS`; absent: fp32)."""
        return self.metadata.get(PRECISION_KEY, "fp32")

    @property
    def card(self) -> ModelCard:
        if CARD_KEY not in self.metadata:
            raise ModelFileError("ONNX model has no diffseg model card in its metadata", path=self.path,
                                 fix="export it with `diffseg-engine export`")
        return ModelCard.from_json(self.metadata[CARD_KEY], source=self.path)


class _Walker:
    def __init__(self, buf):
        self.buf = buf
        self.external: list[tuple[str, str]] = []

    def graph(self, a: int, b: int, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise _Corrupt("subgraphs nested too deeply")
        for num, wire, x, y, _ in _fields(self.buf, a, b):
            if wire != 2:
                continue
            if num == _GRAPH_INIT:
                self.tensor(x, y)
            elif num == _GRAPH_SPARSE_INIT:
                self.sparse(x, y)
            elif num == _GRAPH_NODE:
                self.node(x, y, depth)

    def node(self, a: int, b: int, depth: int) -> None:
        for num, wire, x, y, _ in _fields(self.buf, a, b):
            if num == _NODE_ATTR and wire == 2:
                self.attribute(x, y, depth)

    def attribute(self, a: int, b: int, depth: int) -> None:
        for num, wire, x, y, _ in _fields(self.buf, a, b):
            if wire != 2:
                continue
            if num in (_ATTR_TENSOR, _ATTR_TENSORS):
                self.tensor(x, y)
            elif num in (_ATTR_GRAPH, _ATTR_GRAPHS):
                self.graph(x, y, depth + 1)
            elif num in (_ATTR_SPARSE, _ATTR_SPARSES):
                self.sparse(x, y)

    def sparse(self, a: int, b: int) -> None:
        for num, wire, x, y, _ in _fields(self.buf, a, b):
            if wire == 2 and num in (_SPARSE_VALUES, _SPARSE_INDICES):
                self.tensor(x, y)

    def tensor(self, a: int, b: int) -> None:
        name, location, external = "", None, False
        for num, wire, x, y, _ in _fields(self.buf, a, b):
            if num == _TENSOR_NAME and wire == 2:
                name = bytes(self.buf[x:y]).decode("utf-8", "replace")
            elif num == _TENSOR_EXTERNAL and wire == 2:
                key, value = _entry(self.buf, x, y)
                external = True
                if key == "location":
                    location = value
            elif num == _TENSOR_LOCATION and wire == 0:
                external = external or x == _EXTERNAL
        if external:
            self.external.append((name, location or ""))


def _walk(buf, end: int) -> tuple[dict[str, str], list[tuple[str, str]], str, bool]:
    """(metadata, external data, content digest, has a graph) of a serialized ModelProto buf[:end]."""
    meta: dict[str, str] = {}
    walker = _Walker(buf)
    h = hashlib.sha256()
    has_graph = False
    for num, wire, a, b, first in _fields(buf, 0, end):
        if num == _MODEL_META and wire == 2:
            key, value = _entry(buf, a, b)
            meta[key] = value
            if key == DIGEST_KEY:
                continue  # the one field the digest does not cover
        h.update(buf[first:b])
        if wire != 2:
            continue
        if num == _MODEL_GRAPH:
            has_graph = True
            walker.graph(a, b, 0)
        elif num == _MODEL_FUNCTIONS:
            for fnum, fwire, x, y, _ in _fields(buf, a, b):
                if fnum == _FUNCTION_NODE and fwire == 2:
                    walker.node(x, y, 0)
        elif num == _MODEL_TRAINING:
            for tnum, twire, x, y, _ in _fields(buf, a, b):
                if tnum in _TRAINING_GRAPHS and twire == 2:
                    walker.graph(x, y, 0)
    return meta, walker.external, h.hexdigest(), has_graph


def content_digest(serialized: bytes) -> str:
    """The digest `inspect_onnx` checks, of a serialized ModelProto (without or with its DIGEST_KEY entry)."""
    return _walk(memoryview(serialized), len(serialized))[2]


def inspect_onnx(path: str | os.PathLike, *, verify: bool = True) -> OnnxFileInfo:
    """Read and check an ONNX file: structure, external data inside its folder and, with `verify`, the
    content digest where the file carries one (files exported before digests existed carry none).

    Raises `ModelFileError` naming the file: not found, empty, truncated or corrupt, external data that is
    an absolute path or leads outside the model's folder, content that does not match its digest.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError("model file not found" if not path.exists() else "is not a file", path=path,
                             fix="check the --model path")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelFileError("is empty, not an ONNX model", path=path, fix=_FIX)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                buf = memoryview(mm)
                try:
                    meta, external, digest, has_graph = _walk(buf, size)
                finally:
                    buf.release()
    except OSError as exc:
        raise ModelFileError(f"cannot be read ({exc.strerror or exc})", path=path,
                             fix="check the path and its permissions") from None
    except (_Corrupt, UnicodeDecodeError) as exc:
        raise ModelFileError(f"is not a valid ONNX file (truncated or corrupt: {exc})", path=path,
                             fix=_FIX) from None
    if not has_graph:
        raise ModelFileError("is not an ONNX model (no graph)", path=path, fix=_FIX)
    info = OnnxFileInfo(path=path, metadata=meta, external=external, digest=digest,
                        stored_digest=meta.get(DIGEST_KEY))
    folder = path.resolve().parent
    for name, location in external:
        target = Path(location)
        inside = bool(location) and not target.is_absolute() and not os.path.splitdrive(location)[0]
        if inside:
            try:
                (folder / target).resolve().relative_to(folder)
            except ValueError:
                inside = False
        if not inside:
            raise ModelFileError(
                f"tensor {name!r} points at external data {location!r} outside the model's folder", path=path,
                fix="keep external data files next to the .onnx and refer to them by plain file name")
    if verify and info.stored_digest is not None and info.stored_digest != digest:
        raise ModelFileError(f"content does not match its sha256 ({digest[:12]}... != "
                             f"{info.stored_digest[:12]}...): tampered or corrupt", path=path, fix=_FIX)
    return info
