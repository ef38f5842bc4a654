"""The package installs as designed: no top-level train/export modules, and the runtime never imports torch."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RUNTIME_MODULES = [
    "diffseg_engine", "diffseg_engine.cli", "diffseg_engine.card", "diffseg_engine.errors",
    "diffseg_engine.weights", "diffseg_engine.schedule", "diffseg_engine.nifti_io", "diffseg_engine.cases",
    "diffseg_engine.preprocess", "diffseg_engine.progress", "diffseg_engine.sampler", "diffseg_engine.segment",
    "diffseg_engine.metrics", "diffseg_engine.evaluate", "diffseg_engine.backends.ort", "diffseg_engine.overview",
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
