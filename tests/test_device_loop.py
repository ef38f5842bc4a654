"""The device loop behind the backend interface: a whole chunk in one backend call, noise drawn where the
backend runs. On the CPU the torch backend's device loop runs too (CUDA graphs aside), which is how its
parity with the host loop (numpy noise, one `infer` per step) is tested here; the CUDA paths are marked `gpu`.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from diffseg_engine.backends import open_backend  # noqa: E402
from diffseg_engine.backends.torch_ref import TorchBackend  # noqa: E402
from diffseg_engine.core.noise import NoiseStreams  # noqa: E402
from diffseg_engine.sampling.sampler import plan_sampling, sample_ensemble  # noqa: E402


def _run(backend, images, *, loop: bool, batch_size: int, members: int = 3, steps: int = 8, sampler="ddpm",
         plan=None):
    plan = plan or plan_sampling(backend.card, sampler, steps)
    counted = []
    run = backend.device_loop if loop else backend.run_chunk  # on the CPU run_chunk is the host loop
    stats = sample_ensemble(run, images, members=members, plan=plan, streams=NoiseStreams(4, "loop"),
                            slice_ids=np.array([7, 30]), card=backend.card, batch_size=batch_size,
                            on_progress=counted.append)
    return stats, sum(counted)


@pytest.fixture(scope="module")
def backend(tiny_model):
    weights, _ = tiny_model
    return TorchBackend.load(weights, device="cpu")


@pytest.fixture(scope="module")
def images(backend):
    h = backend.card.image_size
    return np.random.default_rng(2).random((2, 1, h, h), dtype=np.float32)


def test_device_loop_matches_the_host_loop_on_the_same_streams(backend, images):
    assert not backend.has_device_loop  # on the CPU segment keeps the host loop
    host, n_host = _run(backend, images, loop=False, batch_size=4)
    dev, n_dev = _run(backend, images, loop=True, batch_size=4)
    assert n_host == n_dev == 2 * 3 * 8  # progress: every step of every work item, once
    assert np.std(host.mean) > 0.05  # not a trivial (all-0 or all-1) result
    np.testing.assert_allclose(dev.mean, host.mean, atol=1e-4)  # noise agrees to float32 rounding
    np.testing.assert_allclose(dev.variance, host.variance, atol=1e-4)
    np.testing.assert_array_equal(dev.mean > 0.5, host.mean > 0.5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_device_loop_does_not_depend_on_chunking(backend, images, sampler):
    """Chunks of 6, 4 and 1 items (1: an expanded coefficient row is already contiguous; the loop once wrote
    into the caller's plan there, so every later chunk started from the wrong row) give the same ensemble,
    and the caller's plan is left untouched."""
    plan = plan_sampling(backend.card, sampler, 8)
    before = plan.coefs.copy(), plan.timesteps.copy()
    a, _ = _run(backend, images, loop=True, batch_size=6, sampler=sampler)
    for bs in (4, 1):
        b, _ = _run(backend, images, loop=True, batch_size=bs, plan=plan)
        np.testing.assert_allclose(a.mean, b.mean, atol=1e-5, err_msg=f"batch {bs}")
    np.testing.assert_array_equal(plan.coefs, before[0])
    np.testing.assert_array_equal(plan.timesteps, before[1])


def test_tensorrt_backend_refuses_cpu_and_missing_plans(tmp_path):
    from diffseg_engine.core.errors import ModelFileError, UsageError
    with pytest.raises(UsageError, match="only on an NVIDIA GPU"):
        open_backend("tensorrt", tmp_path / "m.plan", device="cpu")
    with pytest.raises(ModelFileError, match="not found"):
        open_backend("tensorrt", tmp_path / "m.plan", device="auto")


# ------------------------------------------------------------------------------------------- on a GPU
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.gpu
def test_cuda_device_loop_with_graphs_agrees_with_the_cpu_engine(tiny_model, images):
    _cuda()
    weights, onnx_path = tiny_model
    gpu = TorchBackend.load(weights, device="cuda")
    assert gpu.has_device_loop and gpu.cuda_graphs
    cpu = open_backend("onnxruntime", onnx_path, device="cpu")
    a, _ = _run(gpu, images, loop=True, batch_size=6)
    b, _ = _run(cpu, images, loop=False, batch_size=6)
    np.testing.assert_allclose(a.mean, b.mean, atol=2e-3)
    assert (((a.mean > 0.5) != (b.mean > 0.5)).mean()) < 1e-3


@pytest.mark.gpu
def test_torch_noise_on_cuda_is_the_reference(tiny_model):
    _cuda()
    from diffseg_engine.core.noise import normals
    from diffseg_engine.sampling.noise_device import TorchNoise
    key = NoiseStreams(1, "cuda").key
    got = TorchNoise(key, [3, 3], [0, 1], (17, 17), "cuda").draw().cpu().numpy().reshape(2, -1)
    np.testing.assert_array_max_ulp(got, normals(key, [3, 3], [0, 1], 0, 17 * 17), maxulp=1)


@pytest.mark.gpu
def test_cuda_kernel_through_cuda_bindings_is_the_reference():
    _cuda()
    pytest.importorskip("cuda.bindings")
    from cuda.bindings import runtime as cudart

    from diffseg_engine.core.noise import normals
    from diffseg_engine.sampling.noise_device import CudaNoise
    from diffseg_engine.artifacts.tensorrt_plan import cuda_devices
    key, n = NoiseStreams(2, "kernel").key, 31 * 31
    rows = np.array([[5, 0], [5, 7]], np.uint32)
    cudart.cudaSetDevice(0)
    _, d_rows = cudart.cudaMalloc(rows.nbytes)
    _, d_out = cudart.cudaMalloc(2 * n * 4)
    cudart.cudaMemcpy(d_rows, rows.ctypes.data, rows.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
    gen = CudaNoise(key, int(d_rows), 2, n, cuda_devices()[0]["compute_capability"])
    gen.draw(int(d_out))
    gen.draw(int(d_out))  # draw 1
    out = np.empty((2, n), np.float32)
    cudart.cudaMemcpy(out.ctypes.data, d_out, out.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
    cudart.cudaFree(d_rows)
    cudart.cudaFree(d_out)
    np.testing.assert_array_max_ulp(out, normals(key, [5, 5], [0, 7], 1, n), maxulp=1)


@pytest.mark.gpu
def test_onnxruntime_cuda_io_binding_loop_agrees_with_cpu(tiny_model, images):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    pytest.importorskip("cuda.bindings")
    _, onnx_path = tiny_model
    gpu = open_backend("onnxruntime", onnx_path, device="cuda")
    assert gpu.has_device_loop
    cpu = open_backend("onnxruntime", onnx_path, device="cpu")
    a, _ = _run(gpu, images, loop=True, batch_size=6)
    b, _ = _run(cpu, images, loop=False, batch_size=6)
    np.testing.assert_allclose(a.mean, b.mean, atol=2e-3)

