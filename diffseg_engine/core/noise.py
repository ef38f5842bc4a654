"""Random streams: counter-based normals, one independent stream per (seed, case, slice, member).

Owns: the stream specification below, `NoiseStreams`, `MemberStream`, `BatchNoise`, and the reference
implementation `philox4x32` / `normals` in numpy. Device implementations (`noise_device`) follow the same
specification. Imports: numpy. Never torch.
Definitions and conventions: the comment below the imports.
"""
from __future__ import annotations

import hashlib

import numpy as np

# Specification (diffseg-noise/1)
# -------------------------------
# Every normal is a pure function of (seed, case_id, slice, member, draw, element) — no generator state — so
# the noise of a member does not depend on batch size, chunking, member order or the device that draws it.
#
# * Key (2 x uint32), one per (seed, case): the first 8 bytes of
#   sha256(b"diffseg-noise/1" + seed as 8 bytes little-endian + case_key as 8 bytes little-endian), read as
#   two little-endian uint32 (k0, k1); case_key = the first 8 bytes of sha256(case_id in UTF-8), little-endian.
# * Counter (4 x uint32): (c0, c1, c2, c3) = (g, draw, slice, member), where g is the element group (below),
#   `draw` counts a member's draws (0: x_T; 1 + i: the noise z of the i-th step call, in sampling order),
#   `slice` is the slice's index in the prepared volume and `member` the ensemble member. For a fixed key
#   Philox is a bijection of the counter, so no two (group, draw, slice, member) ever share random bits.
# * Generator: Philox4x32-10 (Salmon et al. 2011, Random123): 10 rounds of
#   (c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0)),
#   M0 = 0xD2511F53, M1 = 0xCD9E8D57, the key bumped by (0x9E3779B9, 0xBB67AE85) mod 2^32 after each round.
#   Output (x0, x1, x2, x3).
# * Uniforms, exact in float32 (24 bits): u1 = ((x >> 8) + 1) * 2^-24 in (0, 1], u2 = (x' >> 8) * 2^-24 in [0, 1).
# * Box–Muller, basic form, in float64: r = sqrt(-2 ln u1), theta = 2 pi u2, (r cos theta, r sin theta);
#   (x0, x1) -> elements 4g, 4g+1; (x2, x3) -> elements 4g+2, 4g+3; the element index runs row-major over the
#   member's [h, w] map (elements past h*w are dropped). Each value is then rounded to float32 (nearest).
#   |z| <= sqrt(2 * 24 ln 2) = 5.77.
#
# Implementations that compute Box–Muller in float64 agree with this reference to float32 rounding (at most one
# unit in the last place, from the last bit of a float64 log/cos/sin); within one implementation results are
# bit-identical whatever the batch or chunking.

SPEC = "diffseg-noise/1"
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10
_MASK = np.uint64(0xFFFFFFFF)


def _case_key(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(case_id.encode("utf-8")).digest()[:8], "little")


def stream_key(seed: int, case_id: str) -> tuple[int, int]:
    """(k0, k1): the Philox key of (seed, case_id)."""
    blob = SPEC.encode() + int(seed).to_bytes(8, "little") + _case_key(case_id).to_bytes(8, "little")
    d = hashlib.sha256(blob).digest()
    return int.from_bytes(d[0:4], "little"), int.from_bytes(d[4:8], "little")


def philox4x32(c0, c1, c2, c3, k0: int, k1: int) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 of counters (uint32 values, any broadcastable shapes) under key (k0, k1): 4 uint64 arrays
    holding uint32 values."""
    c0, c1, c2, c3 = (np.asarray(c, np.uint64) for c in (c0, c1, c2, c3))
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    s32 = np.uint64(32)
    for r in range(ROUNDS):
        ka = np.uint64((k0 + r * PHILOX_W[0]) & 0xFFFFFFFF)
        kb = np.uint64((k1 + r * PHILOX_W[1]) & 0xFFFFFFFF)
        p0 = c0 * m0  # < 2^64: exact in uint64
        p1 = c2 * m1
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ ka, p1 & _MASK, (p0 >> s32) ^ c3 ^ kb, p0 & _MASK
    return c0, c1, c2, c3


def _box_muller(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s8, scale = np.uint64(8), 2.0 ** -24
    u1 = ((a >> s8) + np.uint64(1)).astype(np.float64) * scale
    u2 = (b >> s8).astype(np.float64) * scale
    r = np.sqrt(-2.0 * np.log(u1))
    theta = (2.0 * np.pi) * u2
    return r * np.cos(theta), r * np.sin(theta)


def normals(key: tuple[int, int], slices, members, draw: int, n: int) -> np.ndarray:
    """The reference: [R, n] float32 normals of rows (slices[i], members[i]) at `draw`, elements 0..n-1."""
    slices = np.asarray(slices, np.uint64).reshape(-1, 1)
    members = np.asarray(members, np.uint64).reshape(-1, 1)
    groups = np.arange((n + 3) // 4, dtype=np.uint64).reshape(1, -1)
    x0, x1, x2, x3 = philox4x32(groups, np.uint64(draw), slices, members, *key)
    out = np.empty((len(slices), groups.shape[1], 4), np.float32)
    out[..., 0], out[..., 1] = _box_muller(x0, x1)
    out[..., 2], out[..., 3] = _box_muller(x2, x3)
    return out.reshape(len(slices), -1)[:, :n]


class NoiseStreams:
    """The streams of one (seed, case): `key` is their Philox key; `generator(slice, member)` one member's."""

    def __init__(self, seed: int, case_id: str):
        if not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
        self.seed, self.case_id = int(seed), case_id
        self.key = stream_key(self.seed, case_id)

    def generator(self, slice_index: int, member: int) -> "MemberStream":
        """The stream of one member, drawn from its first draw (x_T) on."""
        return MemberStream(self.key, int(slice_index), int(member))


class MemberStream:
    """One member's draws in order: `standard_normal(shape)` is draw 0, 1, ... (the numpy Generator call the
    reference sampler makes); the same values as that member's row in `BatchNoise.draw()`."""

    def __init__(self, key: tuple[int, int], slice_index: int, member: int):
        self.key, self.slice, self.member, self.draws = key, slice_index, member, 0

    def standard_normal(self, size=None, dtype=np.float32, out: np.ndarray | None = None) -> np.ndarray:
        shape = out.shape if out is not None else (() if size is None else np.atleast_1d(size).tolist())
        n = int(np.prod(shape, dtype=np.int64))
        z = normals(self.key, [self.slice], [self.member], self.draws, n)[0].reshape(shape)
        self.draws += 1
        if out is not None:
            out[...] = z
            return out
        return z.astype(dtype, copy=False)


class BatchNoise:
    """The streams of one chunk of work items; `draw()` gives the next [B, 1, h, w] float32 noise (draw 0 is
    x_T). The returned buffer is reused by the next call."""

    def __init__(self, streams: NoiseStreams | tuple[int, int], items: list[tuple[int, int]],
                 shape: tuple[int, int]):
        self.key = streams.key if isinstance(streams, NoiseStreams) else tuple(streams)
        self.slices = np.array([s for s, _ in items], np.uint64)
        self.members = np.array([m for _, m in items], np.uint64)
        self.shape = tuple(shape)
        self.draws = 0
        self._buf = np.empty((len(items), 1, *shape), np.float32)

    def draw(self) -> np.ndarray:
        n = self.shape[0] * self.shape[1]
        self._buf.reshape(len(self.slices), n)[:] = normals(self.key, self.slices, self.members, self.draws, n)
        self.draws += 1
        return self._buf
