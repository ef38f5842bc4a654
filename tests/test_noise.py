"""The counter-based noise (diffseg-noise/1): Philox4x32-10 as published, every implementation bit-identical
whatever the batch or chunking, and the numpy reference, the torch implementation and the CUDA C kernel (run
here as C) agreeing to float32 rounding."""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from diffseg_engine.core.noise import BatchNoise, NoiseStreams, normals, philox4x32
from diffseg_engine.sampling.noise_device import CUDA_SOURCE


def test_philox_matches_random123_known_answers():
    """Known-answer vectors of Random123's kat_vectors (philox4x32, 10 rounds)."""
    cases = [((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for (c0, c1, c2, c3, k0, k1), want in cases:
        assert tuple(int(x) for x in philox4x32(c0, c1, c2, c3, k0, k1)) == want


def test_noise_does_not_depend_on_batch_or_chunking_bit_exactly():
    streams = NoiseStreams(7, "BraTS18_CBICA_ASK")
    items = [(5, 0), (5, 1), (9, 3), (0, 2), (5, 2)]
    whole = BatchNoise(streams, items, (9, 7))  # 63 elements: the last Philox group is cut
    ref = [whole.draw().copy() for _ in range(4)]
    for split in ([1, 4], [2, 2, 1], [5]):
        lo = 0
        for size in split:
            part = BatchNoise(streams, items[lo:lo + size], (9, 7))
            for d in range(4):
                np.testing.assert_array_equal(part.draw(), ref[d][lo:lo + size])
            lo += size
    # one member drawn alone, in step order, through the Generator-like call the reference sampler makes
    g = streams.generator(9, 3)
    for d in range(4):
        np.testing.assert_array_equal(g.standard_normal((1, 1, 9, 7), dtype=np.float32)[0], ref[d][2])
    # draws, members, slices, seeds and cases all give different noise
    rows = [r[i, 0].ravel() for r in ref for i in range(len(items))]
    rows += [BatchNoise(NoiseStreams(8, "BraTS18_CBICA_ASK"), items[:1], (9, 7)).draw()[0, 0].ravel(),
             BatchNoise(NoiseStreams(7, "BraTS18_CBICA_ASL"), items[:1], (9, 7)).draw()[0, 0].ravel()]
    assert len({r.tobytes() for r in rows}) == len(rows)


def test_normals_are_standard_normal():
    z = normals(NoiseStreams(0, "stats").key, np.arange(8), np.zeros(8), 0, 2**17).ravel().astype(np.float64)
    assert abs(z.mean()) < 0.004 and abs(z.std() - 1) < 0.004  # 1M samples: 4 standard errors
    assert np.abs(z).max() <= np.sqrt(2 * 24 * np.log(2)) + 1e-6
    from scipy import stats
    assert stats.kstest(z[:200_000], "norm").pvalue > 1e-3


def _reference(key, slices, members, draws, n):
    return np.stack([normals(key, slices, members, d, n) for d in range(draws)])


def test_torch_implementation_agrees_and_is_batch_independent():
    torch = pytest.importorskip("torch")
    from diffseg_engine.sampling.noise_device import TorchNoise
    key = NoiseStreams(3, "case").key
    slices, members, shape = [4, 4, 11, 0], [0, 1, 2, 9], (13, 11)
    dev = TorchNoise(key, slices, members, shape, "cpu")
    got = np.stack([dev.draw().numpy().reshape(4, -1) for _ in range(3)])
    ref = _reference(key, slices, members, 3, 13 * 11)
    np.testing.assert_array_max_ulp(got, ref, maxulp=1)  # float32 rounding of the same float64 values
    assert (got == ref).mean() > 0.999
    alone = TorchNoise(key, slices[2:3], members[2:3], shape, "cpu")
    for d in range(3):  # bit-identical whatever else is in the batch
        np.testing.assert_array_equal(alone.draw().numpy().reshape(1, -1), got[d, 2:3])
    out = torch.empty(4, 1, *shape)
    again = TorchNoise(key, slices, members, shape, "cpu")
    assert again.draw(out=out) is out and np.array_equal(out.numpy().reshape(4, -1), got[0])


def test_cuda_kernel_source_computes_the_specification(tmp_path):
    """The CUDA kernel's code, compiled here as C (no GPU needed), against the numpy reference."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "noise.c"
    src.write_text(CUDA_SOURCE)
    lib = tmp_path / "libnoise.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src), "-lm"], check=True)
    fn = ctypes.CDLL(str(lib)).diffseg_normals_host
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p]
    key = NoiseStreams(11, "kernel").key
    slices, members, n = [2, 2, 70], [0, 5, 1], 10 * 10 + 3
    rows = np.ascontiguousarray(np.stack([slices, members], 1), np.uint32)
    for draw in (0, 1, 25):
        out = np.full((3, n), np.nan, np.float32)
        fn(rows.ctypes.data, key[0], key[1], draw, 3, n, out.ctypes.data)
        np.testing.assert_array_max_ulp(out, normals(key, slices, members, draw, n), maxulp=1)
