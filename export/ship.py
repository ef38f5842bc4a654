"""Packaging a trained run as the default model shipped inside `diffseg_engine/models/`.

Owns: `ship_default` — EMA weights stored as float16 safetensors (the shipped model IS these rounded weights),
the ONNX step graph exported from exactly those weights, the training log, and a MODEL.md summary.
Imports: numpy; `artifacts.weights`, `onnx_export`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from diffseg_engine.artifacts.weights import load_weights, save_weights

from .onnx_export import check_parity, export_onnx

MODELS_DIR = Path(__file__).resolve().parents[1] / "diffseg_engine" / "models"


def ship_default(run_dir: str | Path, models_dir: str | Path = MODELS_DIR, *, name: str = "default",
                 sampling: tuple | None = None) -> dict:
    """Ship the run's EMA weights as `models_dir/name.*`; `sampling` = (sampler, steps, eta[, mirror]) sets the
    card's default sampler (what `segment` runs when none is asked for), chosen from the validation
    measurements."""
    run_dir, models_dir = Path(run_dir), Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    tensors, card = load_weights(run_dir / "model.safetensors")
    if sampling is not None:
        sampler, steps, eta, *rest = sampling
        card = card.replace(diffusion=dataclasses.replace(card.diffusion, sampler=sampler, sampling_steps=int(steps),
                                                           eta=float(eta), mirror=bool(rest[0]) if rest else False))
    log = run_dir / "train_log.jsonl"
    if log.exists():  # where it was trained, from the log's session lines
        sessions = [json.loads(line) for line in log.read_text().splitlines() if '"session"' in line]
        devices = sorted({s["device"] for s in sessions if s.get("event") == "session"})
        if devices:
            card = card.replace(training={**card.training, "devices": devices})
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}
    card = save_weights(models_dir / f"{name}.safetensors", half,
                        card.replace(name=f"diffseg-{name}-{card.preset}-{'-'.join(card.modalities)}"))
    export_onnx(models_dir / f"{name}.safetensors", models_dir / f"{name}.onnx")
    err = check_parity(models_dir / f"{name}.safetensors", models_dir / f"{name}.onnx")
    if (run_dir / "train_log.jsonl").exists():
        shutil.copyfile(run_dir / "train_log.jsonl", models_dir / f"{name}_train_log.jsonl")
    info = {"card": card.to_dict(), "onnx_parity_max_abs": err}
    (models_dir / f"{name}_card.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


if __name__ == "__main__":
    import sys
    # python -m diffseg_engine.export.ship RUN_DIR [SAMPLER:STEPS:ETA[:mirror]]
    spec = sys.argv[2].split(":") if len(sys.argv) > 2 else None
    sampling = (spec[0], int(spec[1]), float(spec[2]), len(spec) > 3 and spec[3] == "mirror") if spec else None
    print(json.dumps(ship_default(sys.argv[1], sampling=sampling), indent=2)[:2000])
