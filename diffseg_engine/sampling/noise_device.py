"""The diffseg-noise/1 streams (specification: `noise`) drawn where the backend runs, not on the host.

Owns: `TorchNoise` (torch tensors on any device: the torch backend's device loop; runs, and is tested, on the
CPU too), `CUDA_SOURCE` (the same generator as one CUDA C kernel, for the runtimes that must not import torch:
TensorRT and onnxruntime's CUDA provider; the file also compiles as C, which is how the tests check its
arithmetic on a machine without a GPU) and `CudaNoise` (that kernel compiled with NVRTC and launched through
cuda-bindings on a raw device pointer).
Imports: cuda-bindings (lazily), numpy, torch (lazily); `core.errors` (lazily), `core.noise`.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ..core.noise import PHILOX_M, PHILOX_W, ROUNDS

_M32 = 0xFFFFFFFF


class TorchNoise:
    """`draw(out=None)` -> the next [B, 1, h, w] float32 noise of rows (slices[i], members[i]) under `key`, as a
    tensor on `device`; draw 0 is x_T. Philox runs in int64 tensors (32x32-bit products split into 16-bit
    halves, so nothing overflows), Box–Muller in float64, as the specification says."""

    def __init__(self, key: tuple[int, int], slices, members, shape: tuple[int, int], device="cpu"):
        import torch
        self.torch = torch
        self.key, self.shape, self.device = key, tuple(shape), torch.device(device)
        self.n = shape[0] * shape[1]
        g = (self.n + 3) // 4
        self.groups = torch.arange(g, dtype=torch.int64, device=self.device).reshape(1, g)
        self.slices = torch.as_tensor(np.asarray(slices, np.int64), device=self.device).reshape(-1, 1)
        self.members = torch.as_tensor(np.asarray(members, np.int64), device=self.device).reshape(-1, 1)
        self.draws = 0

    def _mulhilo(self, a, m: int):
        lo16, hi16 = m & 0xFFFF, m >> 16
        x = a * lo16  # < 2^48
        y = a * hi16  # < 2^48
        lo = (((y & 0xFFFF) << 16) + x) & _M32
        hi = (y + (x >> 16)) >> 16
        return hi, lo

    def philox(self, c0, c1, c2, c3):
        k0, k1 = self.key
        for r in range(ROUNDS):
            ka, kb = (k0 + r * PHILOX_W[0]) & _M32, (k1 + r * PHILOX_W[1]) & _M32
            hi0, lo0 = self._mulhilo(c0, PHILOX_M[0])
            hi1, lo1 = self._mulhilo(c2, PHILOX_M[1])
            c0, c1, c2, c3 = hi1 ^ c1 ^ ka, lo1, hi0 ^ c3 ^ kb, lo0
        return c0, c1, c2, c3

    def _box_muller(self, a, b):
        t = self.torch
        u1 = ((a >> 8) + 1).to(t.float64) * 2.0 ** -24
        u2 = (b >> 8).to(t.float64) * 2.0 ** -24
        r = t.sqrt(-2.0 * t.log(u1))
        theta = (2.0 * np.pi) * u2
        return r * t.cos(theta), r * t.sin(theta)

    def draw(self, out=None):
        t = self.torch
        B = self.slices.shape[0]
        shape = (B, self.groups.shape[1])
        c0 = self.groups.expand(shape)
        c1 = t.full(shape, self.draws, dtype=t.int64, device=self.device)
        x0, x1, x2, x3 = self.philox(c0, c1, self.slices.expand(shape), self.members.expand(shape))
        self.draws += 1
        z0, z1 = self._box_muller(x0, x1)
        z2, z3 = self._box_muller(x2, x3)
        z = t.stack([z0, z1, z2, z3], dim=-1).reshape(B, -1)[:, :self.n].to(t.float32)
        z = z.reshape(B, 1, *self.shape)
        if out is not None:
            out.copy_(z)
            return out
        return z


#: The generator as CUDA C (also valid C: compiled without nvcc/NVRTC, `__device__`/`__global__` vanish and
#: `diffseg_normals_host` runs the same code on the CPU). rows: [B, 2] uint32 (slice, member); out: [B, n] float.
CUDA_SOURCE = r"""
#ifndef __CUDACC__
#define __device__
#define __global__
#include <math.h>
#endif
typedef unsigned int u32;
typedef unsigned long long u64;
#ifdef __cplusplus
extern "C" {
#endif
__device__ static inline void diffseg_philox(u32 c[4], u32 k0, u32 k1) {
    for (int r = 0; r < %(rounds)d; ++r) {
        u64 p0 = (u64)%(m0)uU * (u64)c[0];
        u64 p1 = (u64)%(m1)uU * (u64)c[2];
        u32 n0 = (u32)(p1 >> 32) ^ c[1] ^ k0, n2 = (u32)(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0; c[1] = (u32)p1; c[2] = n2; c[3] = (u32)p0;
        k0 += %(w0)uU; k1 += %(w1)uU;
    }
}
__device__ static inline void diffseg_box_muller(u32 a, u32 b, float *z0, float *z1) {
    double u1 = (double)((a >> 8) + 1u) * 5.9604644775390625e-08;  /* 2^-24 */
    double u2 = (double)(b >> 8) * 5.9604644775390625e-08;
    double r = sqrt(-2.0 * log(u1));
    double th = 6.283185307179586 * u2;
    *z0 = (float)(r * cos(th));
    *z1 = (float)(r * sin(th));
}
__device__ static inline void diffseg_group(const u32 *rows, u32 k0, u32 k1, u32 draw, int n, float *out,
                                            long long idx) {
    long long G = (n + 3) / 4;
    long long b = idx / G, g = idx %% G;
    u32 c[4] = {(u32)g, draw, rows[2 * b], rows[2 * b + 1]};
    float z[4];
    diffseg_philox(c, k0, k1);
    diffseg_box_muller(c[0], c[1], &z[0], &z[1]);
    diffseg_box_muller(c[2], c[3], &z[2], &z[3]);
    for (int j = 0; j < 4; ++j) {
        long long e = 4 * g + j;
        if (e < n) out[b * n + e] = z[j];
    }
}
__global__ void diffseg_normals(const u32 *rows, u32 k0, u32 k1, u32 draw, int B, int n, float *out) {
#ifdef __CUDACC__
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < (long long)B * ((n + 3) / 4)) diffseg_group(rows, k0, k1, draw, n, out, idx);
#endif
}
#ifndef __CUDACC__
void diffseg_normals_host(const u32 *rows, u32 k0, u32 k1, u32 draw, int B, int n, float *out) {
    for (long long idx = 0; idx < (long long)B * ((n + 3) / 4); ++idx) diffseg_group(rows, k0, k1, draw, n, out, idx);
}
#endif
#ifdef __cplusplus
}
#endif
""" % {"rounds": ROUNDS, "m0": PHILOX_M[0], "m1": PHILOX_M[1], "w0": PHILOX_W[0], "w1": PHILOX_W[1]}


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        from ..core.errors import BackendError
        raise BackendError(f"CUDA: {what} failed ({err})", fix="check the NVIDIA driver and cuda-bindings")
    return rest[0] if len(rest) == 1 else rest


class CudaNoise:
    """`CUDA_SOURCE` compiled with NVRTC for the current device and launched on device pointers (no torch).

    `draw(out_ptr, stream)` writes the next [B, n] float32 normals of `rows` (a device array of B (slice, member)
    uint32 pairs, uploaded once per chunk) to `out_ptr`, asynchronously on `stream`. Needs cuda-bindings and a
    current CUDA context."""

    def __init__(self, key: tuple[int, int], rows_ptr: int, batch: int, n: int, compute_capability: str):
        from cuda.bindings import driver, nvrtc
        self.driver, self.key, self.rows, self.batch, self.n, self.draws = driver, key, rows_ptr, batch, n, 0
        prog = _check(nvrtc.nvrtcCreateProgram(CUDA_SOURCE.encode(), b"diffseg_noise.cu", 0, [], []),
                      "nvrtcCreateProgram")
        arch = "sm_" + compute_capability.replace(".", "")
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
        if int(nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            from ..core.errors import BackendError
            raise BackendError(f"NVRTC could not compile the noise kernel: {log.decode()[:300]}")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        self.module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
        self.kernel = _check(driver.cuModuleGetFunction(self.module, b"diffseg_normals"), "cuModuleGetFunction")

    def draw(self, out_ptr: int, stream=0) -> None:
        groups = self.batch * ((self.n + 3) // 4)
        block = 256
        args = ((self.rows, self.key[0], self.key[1], self.draws, self.batch, self.n, out_ptr),
                (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int, ctypes.c_int,
                 ctypes.c_void_p))
        _check(self.driver.cuLaunchKernel(self.kernel, (groups + block - 1) // block, 1, 1, block, 1, 1, 0, stream,
                                          args, 0), "cuLaunchKernel")
        self.draws += 1
