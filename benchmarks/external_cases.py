"""A model on the two unlabelled BraTS 2020 cases, scored against five BraTS 2020 algorithms' whole tumour.

No expert label exists for TCGA-DU-7294 (the demo case) and TCGA-FG-6692; `algorithm-segmentations/` holds the
outputs of five BraTS 2020 algorithms (isen-20 is nnU-Net). For each case this runs the model through the
Python API (`Segmenter`: the maps `segment` writes) and, optionally, a deterministic U-Net baseline, and reports
the predicted volume against each algorithm's, 3D Dice against each algorithm and against their majority vote.

    python benchmarks/external_cases.py --model diffseg_engine/models/default.onnx \
        --baseline runs/seg/model.safetensors --out benchmarks/results/external_cases-cpu

Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import host_info  # noqa: E402

from diffseg_engine.evaluation import metrics as M  # noqa: E402
from diffseg_engine.api import Segmenter  # noqa: E402
from diffseg_engine.maps.lesions import DEFAULT_MIN_COMPONENT, lesion_mask  # noqa: E402

CASES = ("TCGA-DU-7294", "TCGA-FG-6692")


def baseline_mean(path: str, flair: nib.Nifti1Image) -> np.ndarray:
    """The deterministic U-Net's sigmoid on the input grid (same preprocessing as the engine)."""
    import torch

    from diffseg_engine.inputs.preprocess import prepare_case, restore
    from diffseg_engine.train.losses import segmentation_input
    from diffseg_engine.train.unet import UNetModel, load_state_dict_strict
    from diffseg_engine.artifacts.weights import load_weights
    tensors, card = load_weights(path)
    net = UNetModel(card.architecture)
    load_state_dict_strict(net, {k: torch.as_tensor(v) for k, v in tensors.items()})
    net.eval()
    prepared = prepare_case([np.asarray(flair.dataobj, np.float32)], flair.affine, card.preprocessing)
    with torch.inference_mode():
        x, t = segmentation_input(torch.from_numpy(prepared.inputs))
        p = torch.sigmoid(net(x, t)[:, 0]).numpy()
    return restore(prepared, p)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/unlabelled")
    ap.add_argument("--model", default=None, help=".onnx (default: the shipped model)")
    ap.add_argument("--baseline", default=None, help="deterministic U-Net .safetensors")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    seg = Segmenter(a.model, n=a.n)
    rows = []
    for cid in CASES:
        folder = Path(a.data) / cid
        flair = nib.load(str(folder / f"{cid}_flair.nii.gz"))
        zooms = flair.header.get_zooms()[:3]
        voxel_ml = float(np.prod(zooms)) / 1000
        algos = {p.name.split(".")[0]: np.asarray(nib.load(str(p)).dataobj) > 0
                 for p in sorted((folder / "algorithm-segmentations").glob("*.nii.gz"))}
        vote = np.sum(list(algos.values()), axis=0) >= (len(algos) // 2 + 1)
        preds = {"model": seg.segment(flair, case_id=cid).mask.astype(bool)}
        if a.baseline:
            preds["baseline"] = lesion_mask(baseline_mean(a.baseline, flair), zooms,
                                            min_component=DEFAULT_MIN_COMPONENT).mask.astype(bool)
        for name, m in preds.items():
            rows.append({"case": cid, "prediction": name, "ml": float(m.sum() * voxel_ml),
                         "algorithms_ml": {k: float(v.sum() * voxel_ml) for k, v in algos.items()},
                         "dice_vs_majority": M.dice(m, vote), "hd95_vs_majority_mm": M.hd95(m, vote, zooms),
                         "dice_vs": {k: M.dice(m, v) for k, v in algos.items()}})
    meta = {"command": "python " + " ".join(sys.argv), "machine": f"{host_info()['cpu']}",
            "model": a.model or "shipped default", "baseline": a.baseline, "n": a.n}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    lines = [f"# External cases: {', '.join(CASES)} against five BraTS 2020 algorithms", "",
             f"Command: `{meta['command']}` ({meta['machine']}). No expert labels: the reference is the algorithms' "
             "whole tumour (label > 0) and their majority vote (3 of 5). Masks as `segment` writes them.", "",
             "| case | prediction | volume ml | algorithms ml | Dice vs majority | HD95 vs majority mm | Dice vs isen-20 (nnU-Net) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        al = r["algorithms_ml"]
        lines.append(f"| {r['case']} | {r['prediction']} | {r['ml']:.0f} | {min(al.values()):.0f}-{max(al.values()):.0f} | "
                     f"{r['dice_vs_majority']:.3f} | {r['hd95_vs_majority_mm']:.1f} | {r['dice_vs'].get('isen-20', float('nan')):.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
