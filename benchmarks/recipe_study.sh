#!/bin/bash
# Which recipe and sampler make the noise draws carry the ensemble? Candidate recipes trained at equal steps on
# the 32 training patients (the 8 validation patients never seen), then each measured by ensemble_study.py
# (variance split of a mirrored ensemble, ensembles without mirroring, per patient and mean).
#
#   benchmarks/recipe_study.sh RUNS_DIR OUT [STEPS] [PRESET]
#
# RUNS_DIR: where the runs go (a run already there is not trained again); OUT: the results path without
# extension; STEPS: training steps of every candidate (default 6000); PRESET: cpu-small (56², default) or
# cpu-small-112. Two runs train side by side, one thread each. Needs the `train` and `export` extras.
set -euo pipefail
runs=$1; out=$2; steps=${3:-6000}; preset=${4:-cpu-small}
VAL=BRATS2013_pat0002,BraTS18_CBICA_ASK,BraTS18_TCIA10_639,BraTS18_2013_23,BraTS18_CBICA_AQQ,BraTS18_TCIA01_425,BraTS18_CBICA_ATB,BraTS18_TCIA02_606
DATA=${DATA:-../shared/data/train}
common=(--data "$DATA" --val-cases "$VAL" --preset "$preset" --threads 1 --steps "$steps" --precision auto
        --compile --empty-share 0.4 --checkpoint-every 2000 --quiet)

run() {  # NAME FLAGS...: train (unless done) and export a diffusion model to ONNX
  local name=$1; shift
  local done="$runs/$name/model.onnx"
  case " $* " in *" segmentation "*) done="$runs/$name/model.safetensors" ;; esac
  if [ ! -f "$done" ] || ! grep -q '"event": "checkpoint", "step": '"$steps" "$runs/$name/train_log.jsonl"; then
    if [ -f "$runs/$name/state.safetensors" ]; then
      diffseg-engine train --out "$runs/$name" "${common[@]}" "$@" --resume
    else
      diffseg-engine train --out "$runs/$name" "${common[@]}" "$@"
    fi
    case "$done" in *.onnx) diffseg-engine export "$runs/$name" >/dev/null ;; esac
  fi
}

# the candidates (x0 prediction: the network outputs the mask's logit)
run x0-rec-binary   --prediction x0 --recycling --targets binary &                   # the previous default's recipe
run x0-rec-soft     --prediction x0 --recycling --targets soft &
wait
run x0-soft         --prediction x0 --no-recycling --targets soft &                  # x_t from the truth
run x0-soft-nodice  --prediction x0 --no-recycling --targets soft --dice-weight 0 &  # MSE + BCE: posterior mean
wait
run x0-halfrec-soft --prediction x0 --recycling --recycle-share 0.5 --targets soft &  # recycling half the time
run seg-soft        --objective segmentation --targets soft &                         # the deterministic U-Net
wait

m() { echo "--model" "$1=$runs/$2/model.onnx@$3"; }
# samplers: DDIM 2 on the stride grid (t = 500, 0: the previous default), DDPM K (= DDIM eta 1 on the evenly
# spaced grid that starts at T-1)
python benchmarks/ensemble_study.py --data "$DATA" --cases "$VAL" --n 6 --sizes 1,2,5,6 \
  --baseline "unet=$runs/seg-soft/model.safetensors" \
  $(m x0-rec-binary x0-rec-binary ddim:2:1.0) $(m x0-rec-binary x0-rec-binary ddpm:10) \
  $(m x0-rec-soft x0-rec-soft ddim:2:1.0) $(m x0-rec-soft x0-rec-soft ddpm:10) \
  $(m x0-soft x0-soft ddim:2:1.0) $(m x0-soft x0-soft ddpm:10) \
  $(m x0-soft-nodice x0-soft-nodice ddpm:10) \
  $(m x0-halfrec-soft x0-halfrec-soft ddpm:10) \
  --out "$out"
