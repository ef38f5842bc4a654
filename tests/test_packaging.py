"""The package installs as designed: no top-level train/export modules, and the runtime never imports torch."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RUNTIME_MODULES = [
    "diffseg_engine", "diffseg_engine.cli", "diffseg_engine.artifacts.card", "diffseg_engine.core.errors",
    "diffseg_engine.artifacts.weights", "diffseg_engine.sampling.schedule", "diffseg_engine.io.nifti_io", "diffseg_engine.inputs.cases",
    "diffseg_engine.inputs.preprocess", "diffseg_engine.core.progress", "diffseg_engine.sampling.sampler", "diffseg_engine.pipeline.segment",
    "diffseg_engine.evaluation.metrics", "diffseg_engine.pipeline.evaluate", "diffseg_engine.backends.ort", "diffseg_engine.maps.overview",
]


def test_runtime_imports_without_torch():
    code = ("import sys, importlib\n"
            f"for m in {RUNTIME_MODULES!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print('TORCH' if bad else 'CLEAN')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "CLEAN"


def test_train_and_export_live_inside_the_package():
    import diffseg_engine.export
    import diffseg_engine.train
    assert Path(diffseg_engine.train.__file__).parent.name == "train"
    assert Path(diffseg_engine.export.__file__).parent.name == "export"


@pytest.mark.slow
def test_wheel_has_no_top_level_train_or_export(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("diffseg_engine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "train" not in tops and "export" not in tops, tops
    assert "diffseg_engine/train/unet.py" in names and "diffseg_engine/export/__init__.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def _copy_source(dst: Path) -> Path:
    """The repository's tracked and new files, without build outputs, virtualenvs or caches."""
    import shutil
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                  "runs", "out", "demo-out", "benchmarks", "tests")
    shutil.copytree(REPO, dst, ignore=skip)
    return dst


@pytest.mark.slow
def test_wheel_from_python_m_build_runs_in_a_fresh_venv_without_torch(tmp_path):
    """What a user gets from `pip install diffseg-engine`: `python -m build`, a fresh venv, the wheel with its
    declared dependencies only (no torch), then the CLI, the shipped model and the demo volume."""
    pytest.importorskip("build")
    src = _copy_source(tmp_path / "src")
    dist = tmp_path / "dist"
    out = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(dist), str(src)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = dist.glob("diffseg_engine-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    from diffseg_engine import __version__
    lic = f"diffseg_engine-{__version__}.dist-info/licenses/"
    for want in ("diffseg_engine/models/default.onnx", "diffseg_engine/models/default.safetensors",
                 "diffseg_engine/models/modality.safetensors",  # the input check's classifier (resolve_case below)
                 "diffseg_engine/demo/TCGA-DU-7294_flair.nii.gz", "diffseg_engine/demo/NOTICE.md",
                 lic + "LICENSE", lic + "DATA_LICENSE.md", lic + "CITATION.cff"):
        assert want in names, want
    meta = zipfile.ZipFile(wheel).read(f"diffseg_engine-{__version__}.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in meta and "Requires-Dist: torch" not in meta.split("Provides-Extra")[0]

    venv = tmp_path / "venv"
    assert subprocess.run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    bin_ = venv / "bin"
    out = subprocess.run([str(bin_ / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                          str(wheel)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = subprocess.run([str(bin_ / "python"), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "None", "torch was installed as a runtime dependency"

    env = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), "DIFFSEG_CACHE": str(tmp_path / "cache")}
    ver = subprocess.run([str(bin_ / "diffseg-engine"), "--version"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert ver.returncode == 0 and ver.stdout.strip() == f"diffseg-engine {__version__}", ver.stderr
    # the shipped model and demo volume, through the installed runtime: one real denoising step (the full demo
    # takes minutes on a loaded 2-core machine; tests/test_default_model.py runs it from the source tree)
    code = ("import sys, numpy as np\n"
            "from diffseg_engine.pipeline.models import DEMO_INPUT, open_model\n"
            "from diffseg_engine.pipeline.segment import resolve_case\n"
            "eng = open_model(None, 'onnxruntime', 'cpu', threads=1)\n"
            "case = resolve_case([DEMO_INPUT], [], eng.card)\n"
            "img = case.prepared.inputs[len(case.prepared.inputs) // 2][None].astype(np.float32)\n"
            "h = img.shape[-1]\n"
            "x = eng.infer(img, np.zeros((1, 1, h, h), np.float32), np.full((1,), 10, np.float32),\n"
            "              np.zeros((1, 8), np.float32), np.zeros((1, 1, h, h), np.float32))\n"
            "assert x.shape == (1, 1, h, h) and np.isfinite(x).all(), x.shape\n"
            "print('TORCH' if any(m.split('.')[0] == 'torch' for m in sys.modules) else 'CLEAN', eng.card.modalities)\n")
    run = subprocess.run([str(bin_ / "python"), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[0] == "CLEAN"
    helps = subprocess.run([str(bin_ / "diffseg-engine"), "segment", "--help"], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert helps.returncode == 0 and "--format" in helps.stdout
    train = subprocess.run([str(bin_ / "diffseg-engine"), "train", "--data", ".", "--out", "r"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert train.returncode == 15 and "diffseg-engine[train]" in train.stderr  # BackendError, with the fix
