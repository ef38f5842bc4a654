"""The command line answers bad requests with one line, the right exit code, and nothing written."""
from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from diffseg_engine.cli import app
from diffseg_engine.core.errors import EXIT_CODES, BackendError, MissingModalityError, OutputError, UsageError

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("opts, needle", [
    (["--n", "0"], "--n"), (["--steps", "0"], "--steps"), (["--steps", "5000"], "--steps"),
    (["--seed", "-1"], "--seed"), (["--batch-size", "-3"], "--batch-size"), (["--sampler", "euler"], "sampler"),
    (["--eta", "2"], "--eta"), (["--backend", "magic"], "backend"),
])
def test_invalid_options_exit_with_usage_code(shared_data, tiny_model, tmp_path, opts, needle):
    case = shared_data / "train" / "BraTS18_CBICA_ASK"
    res = _run("segment", case, "--model", tiny_model[1], "--out", tmp_path / "o", "-q", *opts)
    assert res.exit_code == EXIT_CODES[UsageError], res.output
    assert needle in res.output and res.output.count("\n") == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cuda_requested_without_cuda_is_an_error_not_a_silent_cpu_run(shared_data, tiny_model, tmp_path):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    case = shared_data / "train" / "BraTS18_CBICA_ASK"
    res = _run("segment", case, "--model", tiny_model[1], "--device", "cuda", "--out", tmp_path / "o", "-q")
    assert res.exit_code == EXIT_CODES[BackendError]
    assert "CUDA" in res.output and "--device cpu" in res.output


def test_missing_modality_names_it(shared_data, tiny_model, tmp_path):
    # a flair-only model given only a t1ce file by name
    t1ce = shared_data / "train" / "BRATS2013_pat0002" / "BRATS2013_pat0002_t1ce.nii.gz"
    res = _run("segment", "--modality", f"t1ce={t1ce}", "--model", tiny_model[1], "--out", tmp_path / "o", "-q")
    assert res.exit_code == EXIT_CODES[MissingModalityError]
    assert "flair" in res.output
    res = _run("segment", t1ce, "--model", tiny_model[1], "--out", tmp_path / "o", "-q")
    assert res.exit_code == EXIT_CODES[MissingModalityError] and "flair" in res.output


def test_rerun_into_a_folder_with_results_is_refused(shared_data, tiny_model, tmp_path):
    case = shared_data / "train" / "BraTS18_CBICA_ASK"
    args = ["segment", case, "--model", tiny_model[1], "--out", tmp_path / "o", "-q", "--steps", "2", "--n", "1"]
    assert _run(*args).exit_code == 0
    res = _run(*args)
    assert res.exit_code == EXIT_CODES[OutputError] and "--overwrite" in res.output


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "diffseg_engine", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("train", "export", "segment", "demo"):
        assert cmd in out.stdout
