#!/bin/bash
# Dice against training steps: every listed snapshot of a diffusion run and of its baseline run through
# recipe_comparison.py in one run. Snapshots are copies of a run's model.safetensors taken at each checkpoint
# (snap-STEP.safetensors; `train` itself keeps only the latest model).
#   benchmarks/steps_curve.sh X0_RUN_DIR SEG_RUN_DIR OUT "1000 2000 ..." "1000 2000 ..."
# Measured: benchmarks/steps_curve.sh /work/runs2/small-x0rec /work/runs2/small-seg \
#   benchmarks/results/cpu-small-steps-curve-cpu "1000 2000 3000 4000 6000 7970" "1000 2000 3000 4000 6000 8000 10694"
set -euo pipefail
x0=$1; seg=$2; out=$3; x0_steps=$4; seg_steps=$5
tmp=$(mktemp -d)
args=()
for s in $x0_steps; do
  python -c "from diffseg_engine.export.onnx_export import export_onnx; export_onnx('$x0/snap-$s.safetensors', '$tmp/x0-$s.onnx')"
  args+=(--model "x0@$s=$tmp/x0-$s.onnx@ddim:2:1.0:mirror")
done
for s in $seg_steps; do args+=(--baseline "unet@$s=$seg/snap-$s.safetensors"); done
python benchmarks/recipe_comparison.py --data ../shared/data/train --cases BRATS2013_pat0002,BraTS18_CBICA_ASK \
  --n 5 --sizes 5 "${args[@]}" --out "$out"
rm -rf "$tmp"
