"""Interruption and resume, the output lock, memory pressure and a full disk, on a real BraTS volume.

A run killed with SIGKILL or SIGINT resumes from its last finished chunk and writes the very bytes an
uninterrupted run writes; a resume with other parameters is refused; a second run on the same case and --out
fails at once; a chunk that does not fit in memory is halved and retried (same bytes as the smaller
--batch-size), and at batch 1 the run stops with a clear message; a full disk leaves no partial outputs and
earlier outputs untouched.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from typer.testing import CliRunner

from diffseg_engine.cli import app
from diffseg_engine.core.errors import EXIT_CODES, BatchMemoryError, OutputBusyError, OutputError, ResourceError
from diffseg_engine.io.lock import OutputLock

CASE = "BraTS18_CBICA_ASK"
MAPS = ("mean", "variance", "entropy", "mask")
RUN = ["--n", "2", "--steps", "3", "--batch-size", "4", "--seed", "0", "-q"]  # 12 slices x 2 = 6 chunks of 4
runner = CliRunner()

#: Runs the CLI with every engine call slowed down, so that a test can interrupt it between chunks.
SLOW_CLI = (
    "import signal, sys, time\n"
    # a shell that starts pytest in the background (`make test &`) hands its children SIGINT ignored: restore
    # the default, which Python turns into KeyboardInterrupt, so the SIGINT test means what it says
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "from diffseg_engine.backends.ort import OnnxRuntimeBackend\n"
    "real = OnnxRuntimeBackend.infer\n"
    "def slow(self, *a):\n"
    "    time.sleep(0.15)\n"
    "    return real(self, *a)\n"
    "OnnxRuntimeBackend.infer = slow\n"
    "from diffseg_engine.cli import main\n"
    "main(sys.argv[1:])\n")


def _segment(*args) -> tuple[int, str]:
    res = runner.invoke(app, ["segment", *[str(a) for a in args]])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def reference(flair, tiny_model, tmp_path_factory) -> dict[str, bytes]:
    """The maps of one uninterrupted run with `RUN`."""
    out = tmp_path_factory.mktemp("reference") / "out"
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, *RUN)
    assert code == 0, output
    return {k: (out / f"{CASE}_{k}.nii.gz").read_bytes() for k in MAPS}


def _maps(out: Path) -> dict[str, bytes]:
    return {k: (out / f"{CASE}_{k}.nii.gz").read_bytes() for k in MAPS}


def _provenance(out: Path) -> dict:
    return json.loads((out / f"{CASE}_provenance.json").read_text())


def _start_slow_run(flair: Path, model: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_CLI, "segment", str(flair), "--model", str(model),
                             "--out", str(out), *RUN, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for_chunk(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    partial = out / f".{CASE}.partial"
    t0 = time.monotonic()
    while not list(partial.glob("chunk-*.npz")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "no chunk was saved"
        time.sleep(0.02)


# ---- interruption and resume ----------------------------------------------------------------------------------
def test_sigkill_then_resume_is_bit_identical_and_other_parameters_are_refused(flair, tiny_model, reference,
                                                                                tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_run(flair, tiny_model[1], out)
    _wait_for_chunk(proc, out)
    proc.kill()  # SIGKILL: no handler runs, no cleanup
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / f"{CASE}_provenance.json").exists()
    assert not any((out / f"{CASE}_{k}.nii.gz").exists() for k in MAPS)
    partial = out / f".{CASE}.partial"
    assert (partial / "params.json").is_file() and list(partial.glob("chunk-*.npz"))

    # other parameters: refused, naming what differs; the unfinished work stays
    chunks = sorted(p.name for p in partial.iterdir())
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, *RUN, "--seed", "1")
    assert code == EXIT_CODES[OutputError], output
    assert len(output.strip().splitlines()) == 1 and "other parameters" in output and "seed 0 -> 1" in output
    assert sorted(p.name for p in partial.iterdir()) == chunks

    # the same command resumes (the stale lock file of the killed run does not block it) and finishes with the
    # bytes of an uninterrupted run; the unfinished-work folder and the lock file are gone
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, *RUN)
    assert code == 0, output
    assert _provenance(out)["sampling"]["resumed_from_item"] >= 4
    assert _maps(out) == reference
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{CASE}_{k}.nii.gz" for k in MAPS] + [f"{CASE}_provenance.json", f"{CASE}_overview.png"])


def test_sigint_stops_cleanly_and_the_same_command_resumes(flair, tiny_model, reference, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_run(flair, tiny_model[1], out)
    _wait_for_chunk(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted") and "resume" in err
    assert not (out / f".{CASE}.lock").exists()  # released on the way out
    assert not list(out.rglob("*.tmp")) and not (out / f"{CASE}_provenance.json").exists()
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, *RUN)
    assert code == 0, output
    assert _provenance(out)["sampling"]["resumed_from_item"] > 0
    assert _maps(out) == reference


def _interrupt_after_two_chunks(flair, model, out, monkeypatch) -> None:
    import diffseg_engine.io.partial
    real_save = diffseg_engine.io.partial.PartialRun.save_chunk

    def stop_after_two(self, lo, hi, *a, **k):
        real_save(self, lo, hi, *a, **k)
        if hi >= 8:
            raise KeyboardInterrupt
    monkeypatch.setattr(diffseg_engine.io.partial.PartialRun, "save_chunk", stop_after_two)
    code, output = _segment(flair, "--model", model, "--out", out, *RUN)
    assert code == 130 and "resume" in output
    monkeypatch.setattr(diffseg_engine.io.partial.PartialRun, "save_chunk", real_save)


def test_damaged_unfinished_work_is_refused_unless_overwrite(flair, tiny_model, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupt_after_two_chunks(flair, tiny_model[1], out, monkeypatch)
    last = sorted((out / f".{CASE}.partial").glob("chunk-*.npz"))[-1]
    last.write_bytes(last.read_bytes()[:100])
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, *RUN)
    assert code == EXIT_CODES[OutputError] and "cannot be resumed" in output and "--overwrite" in output, output
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, *RUN, "--overwrite")
    assert code == 0, output
    assert _provenance(out)["sampling"]["resumed_from_item"] == 0 and _maps(out) == reference


def test_overwrite_discards_unfinished_work_of_other_parameters(flair, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupt_after_two_chunks(flair, tiny_model[1], out, monkeypatch)
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, *RUN, "--n", "1", "--overwrite")
    assert code == 0, output
    prov = _provenance(out)
    assert prov["sampling"]["resumed_from_item"] == 0 and prov["sampling"]["n"] == 1
    assert not (out / f".{CASE}.partial").exists()


# ---- the lock ---------------------------------------------------------------------------------------------------
def test_a_second_run_on_the_same_case_and_out_fails_fast(flair, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out, CASE):  # as a first run holds it
        t0 = time.monotonic()
        code, output = _segment(flair, "--model", tiny_model[1], "--out", out, "--n", "1", "--steps", "1", "-q")
        assert time.monotonic() - t0 < 30
        assert code == EXIT_CODES[OutputBusyError] == 17, output
        lines = output.strip().splitlines()
        assert len(lines) == 1 and f"process {os.getpid()}" in lines[0] and CASE in lines[0], output
        assert sorted(p.name for p in out.iterdir()) == [f".{CASE}.lock"]  # only the first run's lock
        # another case may go into the same folder meanwhile
        other = tmp_path / "other_flair.nii.gz"
        other.write_bytes(flair.read_bytes())
        code, output = _segment(other, "--model", tiny_model[1], "--out", out, "--n", "1", "--steps", "1", "-q")
        assert code == 0, output
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, "--n", "1", "--steps", "1", "-q")
    assert code == 0, output
    assert not list(out.glob(".*"))  # no lock file, no unfinished work left behind


# ---- memory pressure ---------------------------------------------------------------------------------------------
ORT_OOM = ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
           "Name:'/net/input_blocks.1/Conv' Status Message: bfc_arena.cc:376 AllocateRawInternal Failed to "
           "allocate memory for requested buffer of size 1073741824")


class _SmallMemorySession:
    """An onnxruntime session that fails, as onnxruntime does, on batches larger than `limit`."""

    def __init__(self, session, limit: int, calls: list[int]):
        self.session, self.limit, self.calls = session, limit, calls

    def run(self, names, feeds):
        batch = len(feeds["x_t"])
        self.calls.append(batch)
        if batch > self.limit:
            raise RuntimeError(ORT_OOM)
        return self.session.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def _small_memory(monkeypatch, limit: int) -> list[int]:
    import diffseg_engine.pipeline.models as models
    calls: list[int] = []
    real_open = models.open_model

    def open_model(*a, **k):
        eng = real_open(*a, **k)
        eng.session = _SmallMemorySession(eng.session, limit, calls)
        return eng
    monkeypatch.setattr(models, "open_model", open_model)
    return calls


def test_out_of_memory_halves_the_chunk_and_matches_the_smaller_batch_size(flair, tiny_model, tmp_path,
                                                                           monkeypatch):
    base = ["--n", "2", "--steps", "2", "--seed", "3", "-q", "--model", tiny_model[1]]
    code, output = _segment(flair, *base, "--batch-size", "2", "--out", tmp_path / "b2")
    assert code == 0, output
    calls = _small_memory(monkeypatch, limit=3)
    code, output = _segment(flair, *base, "--batch-size", "8", "--out", tmp_path / "b8")
    assert code == 0, output
    assert calls[:2] == [8, 4] and set(calls[2:]) == {2}  # 8 and 4 failed at their first step; only 2 ran
    assert len(calls) == 2 + (12 * 2 // 2) * 2
    assert _maps(tmp_path / "b8") == _maps(tmp_path / "b2")
    s = _provenance(tmp_path / "b8")["sampling"]
    assert (s["batch_size"], s["batch_size_final"]) == (8, 2)


def test_out_of_memory_at_batch_size_one_is_a_clear_error(flair, tiny_model, tmp_path, monkeypatch):
    _small_memory(monkeypatch, limit=0)
    out = tmp_path / "out"
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, "--batch-size", "4", "--n", "1",
                            "--steps", "1", "-q")
    assert code == EXIT_CODES[ResourceError] == 16, output
    lines = output.strip().splitlines()
    # each halving is logged as one warning line (4 -> 2 -> 1); the error itself is one line, last
    assert all(line.startswith("warning:") and "ran out of memory at batch size" in line for line in lines[:-1])
    assert len(lines) == 3 and "out of memory even at batch size 1" in lines[-1] and "--device cpu" in lines[-1]
    assert not out.exists()  # no chunk finished: nothing to resume, nothing left


def test_backends_turn_allocation_failures_into_batch_memory_errors(tiny_model):
    import torch

    from diffseg_engine.backends.ort import OnnxRuntimeBackend
    from diffseg_engine.backends.torch_ref import TorchBackend
    weights, onnx_path = tiny_model
    ort_be = OnnxRuntimeBackend.load(onnx_path, device="cpu", threads=1)
    h = ort_be.card.image_size
    args = (np.zeros((3, 1, h, h), np.float32), np.zeros((3, 1, h, h), np.float32), np.zeros(3, np.float32),
            np.zeros((3, 8), np.float32), np.zeros((3, 1, h, h), np.float32))
    ort_be.session = _SmallMemorySession(ort_be.session, 2, [])
    with pytest.raises(BatchMemoryError, match="batch size 3.*Failed to allocate memory"):
        ort_be.infer(*args)
    torch_be = TorchBackend.load(weights, device="cpu")
    for exc in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")):
        def fail(*a, exc=exc):
            raise exc
        torch_be.step = fail
        with pytest.raises(BatchMemoryError, match="torch ran out of memory at batch size 3"):
            torch_be.infer(*args)
    torch_be.step = lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other failures are not mistaken for memory
        torch_be.infer(*args)


# ---- a full disk -------------------------------------------------------------------------------------------------
def _disk_fills(monkeypatch, folder: Path, prefix: str, after: int) -> None:
    """os.write fails with ENOSPC once `after` bytes went into temporary files named `prefix`* under `folder`."""
    real_write = os.write
    written = [0]

    def write(fd, data):
        try:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return real_write(fd, data)
        if str(target).startswith(str(folder)) and target.name.startswith(prefix) and target.suffix == ".tmp":
            n = memoryview(data).nbytes
            if written[0] + n > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written[0] += n
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file a write goes to")
def test_disk_full_while_writing_maps_leaves_earlier_outputs_untouched(flair, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [flair, "--model", tiny_model[1], "--out", out, "--n", "1", "--steps", "1", "-q"]
    code, output = _segment(*args)
    assert code == 0, output
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    _disk_fills(monkeypatch, out, f".{CASE}_", after=20_000)  # in the middle of the first map
    code, output = _segment(*args, "--seed", "5", "--overwrite")
    assert code == EXIT_CODES[ResourceError], output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and os.strerror(errno.ENOSPC) in lines[0] and f"{CASE}_mean.nii.gz" in lines[0], output
    assert not list(out.rglob("*.tmp"))
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if not p.name.startswith(".")}
    assert after == before  # the earlier complete set, provenance included, as it was
    monkeypatch.undo()  # space freed: the same command finishes from the saved chunks
    code, output = _segment(*args, "--seed", "5", "--overwrite")
    assert code == 0, output
    prov = _provenance(out)
    assert prov["sampling"]["seed"] == 5 and prov["sampling"]["resumed_from_item"] == 12


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file a write goes to")
def test_disk_full_at_the_first_checkpoint_leaves_nothing(flair, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "new" / "out"
    _disk_fills(monkeypatch, out, ".chunk-", after=1000)
    code, output = _segment(flair, "--model", tiny_model[1], "--out", out, "--n", "1", "--steps", "1", "-q")
    assert code == EXIT_CODES[ResourceError], output
    assert len(output.strip().splitlines()) == 1 and "chunk-" in output
    assert not (tmp_path / "new").exists()  # the folders this run created are gone again
