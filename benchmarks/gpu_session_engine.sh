#!/usr/bin/env bash
# Issue 11's GPU evidence in one run of at most 8 minutes on a fresh H200 machine (PyTorch 2.11 for CUDA 13,
# CuPy, cuda-bindings, onnx and a CPU onnxruntime are there; nibabel is not).
#
#   benchmarks/gpu_session_engine.sh [OUT_DIR]        (default OUT_DIR: benchmarks/results)
#
# Wheels it brings along, in the git-ignored folder .whl/ at the repository root (carry: [".whl"]), fetched on a
# machine with PyPI access:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl nibabel==5.4.2
# (nibabel is pure Python, about 3 MB; nothing else is missing there. TensorRT is not carried: its wheels are
# several GB, and TensorRT-RTX does not support Hopper. onnxruntime-gpu is over the 64 MiB carry limit.)
# The package itself is installed from the working tree with the machine's own setuptools (no network).
# Writes benchmarks/results/gpu_engine-<device>.{json,md} (every figure with the device name) and a log.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
T0=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_engine-nvidia-smi.txt"
SITE=/tmp/diffseg-site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . || exit 1
export PYTHONPATH=$SITE
echo "installed after $(( $(date +%s) - T0 )) s"
# the device's own evidence, with a deadline that leaves room for the install and the copy-out
LEFT=$(( 450 - ( $(date +%s) - T0 ) ))
timeout $(( LEFT + 20 )) python3 "$PWD/benchmarks/gpu_session_engine.py" --out "$OUT" --deadline-s "$LEFT" 2>&1 \
  | tee "$OUT/gpu_engine-log.txt"
# the GPU tests of the suite (device loop parity, noise on CUDA); TensorRT tests skip without TensorRT
if [ $(( $(date +%s) - T0 )) -lt 430 ]; then
  REPO=$PWD
  # from /tmp: `python3 -m` must not put the source folder (which lacks diffseg_engine.train) on sys.path
  (cd /tmp && timeout 40 python3 -m pytest -q -m gpu -p no:cacheprovider "$REPO/tests/test_device_loop.py" \
    "$REPO/tests/test_tensorrt_plan.py" 2>&1 | tail -n 15) | tee "$OUT/gpu_engine-pytest.txt"
fi
[ -n "${OUT_COPY:-}" ] && cp "$OUT"/gpu_engine-* "$OUT_COPY"/ 2>/dev/null
echo "done after $(( $(date +%s) - T0 )) s"
