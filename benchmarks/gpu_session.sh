#!/usr/bin/env bash
# One GPU session, start to finish, inside a fixed wall-clock budget (how the shipped default model was made).
#
#   benchmarks/gpu_session.sh DATA_ROOT OUT_DIR [TRAIN_MINUTES] [TOTAL_SECONDS]
#
# 1. trains the default model (cpu preset: its architecture must stay cheap enough for 2 CPU cores; FLAIR,
#    batch 64, bf16 autocast) and, side by side on the same GPU for the same minutes, the deterministic U-Net
#    of the same backbone (`--objective segmentation`), both with the same patient-level validation split;
# 2. runs benchmarks/sampler_comparison.py on the validation patients (DDPM 1000 steps vs respaced DDPM and
#    DDIM, ensembles of 1, 5 and 10, and the baseline), skipping what would not fit in TOTAL_SECONDS;
# 3. leaves in OUT_DIR: the resumable training state (split in pieces under 16 MB), the model card, logs,
#    configs, the baseline weights and the comparison reports (results.tar.gz).
# It needs the package importable (PYTHONPATH) and nibabel; everything else comes with PyTorch.
set -u
DATA=$1
OUT=$2
MIN=${3:-4.5}
TOTAL=${4:-560}
T0=$(date +%s)
VAL=BRATS2013_pat0002,BraTS18_CBICA_ASK
DEV=${DEVICE:-cuda}  # DEVICE=cpu PRESET=tiny: a quick dry run of this script on a machine without a GPU
W=$(mktemp -d)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

common=(--data "$DATA" --preset "${PRESET:-cpu}" --modalities flair --device "$DEV" --steps 1000000 --batch-size 64 --val-cases $VAL
        --max-minutes "$MIN" --checkpoint-every 2000 --log-every 200 --quiet)
python3 -m diffseg_engine train "${common[@]}" --out "$W/diffusion" > "$W/diffusion.out" 2>&1 &
P1=$!
python3 -m diffseg_engine train "${common[@]}" --out "$W/baseline" --objective segmentation > "$W/baseline.out" 2>&1 &
P2=$!
wait $P1; RC1=$?
wait $P2; RC2=$?
echo "training exit codes: diffusion $RC1, baseline $RC2 after $(( $(date +%s) - T0 )) s"
tail -n 3 "$W/diffusion.out" "$W/baseline.out"
tail -n 2 "$W/diffusion/train_log.jsonl" "$W/baseline/train_log.jsonl"

mkdir -p "$W/report"
if [ -f "$W/diffusion/model.safetensors" ]; then
  LEFT=$(( TOTAL - ( $(date +%s) - T0 ) ))
  base=()
  [ -f "$W/baseline/model.safetensors" ] && base=(--baseline "$W/baseline/model.safetensors")
  python3 "$(dirname "$0")/sampler_comparison.py" --model "$W/diffusion/model.safetensors" "${base[@]}" \
    --data "$DATA" --cases $VAL --n 10 --device "$DEV" --tag gpu \
    --configs ddim:10,ddim:25,ddim:50,ddpm:1000,ddpm:100,ddim:100,ddpm:250 \
    --deadline-s "$LEFT" --out "$W/report" 2>&1 | tail -n 20
  python3 - "$W/diffusion/model.safetensors" "$W/report/model_card.json" <<'EOF'
import sys
from diffseg_engine.artifacts.weights import read_metadata
from diffseg_engine.artifacts.card import CARD_KEY
open(sys.argv[2], "w").write(read_metadata(sys.argv[1])[CARD_KEY])
EOF
  split -b 15000000 -d "$W/diffusion/state.safetensors" "$OUT/state.safetensors.part"
fi
cp "$W"/diffusion/{config.json,train_log.jsonl} "$W/report/" 2>/dev/null
for f in config.json train_log.jsonl model.safetensors; do cp "$W/baseline/$f" "$W/report/baseline_$f" 2>/dev/null; done
cp "$W"/*.out "$W/report/" 2>/dev/null
tar -C "$W/report" -czf "$OUT/results.tar.gz" .
ls -la "$OUT"
echo "done after $(( $(date +%s) - T0 )) s"
