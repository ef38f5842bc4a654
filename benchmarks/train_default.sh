#!/bin/bash
# The default model and its same-budget deterministic baseline, trained side by side (one thread each) on the
# 32 training patients of ../shared/data/train; the 8 validation patients are never trained on.
#
#   benchmarks/train_default.sh RUNS_DIR [STEPS]
#
# RUNS_DIR/default: the diffusion model (the recipe the recipe study favoured: x0 prediction without
# recycling, MSE + BCE on soft area-fraction targets, 40 % tumour-free slices, left-right flips) on the
# PRESET grid (default cpu-small, 56²; PRESET=cpu-small-112 for 112² at four times the compute per step),
# STEPS optimiser steps of batch 16 (benchmarks/results/train_speed-cpu.md for the rate). Running the command again
# resumes an interrupted run (bit-exact). RUNS_DIR/baseline: the same U-Net, data, split, targets, flips and
# empty share with `--objective segmentation`, trained beside it for the same number of steps (a step of
# either costs the same: 68 and 67 minutes for 5000 steps on one core each), so both had the same CPU budget.
# Then: python -m diffseg_engine.export.ship RUNS_DIR/default SAMPLER:STEPS:ETA[:mirror] (the sampler the
# validation study chose, e.g. ddpm:10:1.0:mirror)
set -euo pipefail
runs=$1; steps=${2:-5000}
VAL=BRATS2013_pat0002,BraTS18_CBICA_ASK,BraTS18_TCIA10_639,BraTS18_2013_23,BraTS18_CBICA_AQQ,BraTS18_TCIA01_425,BraTS18_CBICA_ATB,BraTS18_TCIA02_606
DATA=${DATA:-../shared/data/train}
common=(--data "$DATA" --val-cases "$VAL" --preset "${PRESET:-cpu-small}" --threads 1 --precision auto --compile
        --empty-share 0.4 --targets soft --checkpoint-every 1000 --quiet)
resume() { [ -f "$1/state.safetensors" ] && echo --resume || true; }

diffseg-engine train --out "$runs/default" "${common[@]}" --steps "$steps" --prediction x0 --no-recycling \
  --dice-weight 0 $(resume "$runs/default") &
default_pid=$!
start=$(date +%s)
diffseg-engine train --out "$runs/baseline" "${common[@]}" --steps "$steps" --objective segmentation \
  $(resume "$runs/baseline") &
baseline_pid=$!
wait $default_pid
echo "default: $(( ($(date +%s) - start) / 60 )) minutes"
wait $baseline_pid
