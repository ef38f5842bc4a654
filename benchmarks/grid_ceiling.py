"""The ceiling of a network grid: the ground truth taken down to the grid and back, scored like a prediction.

For each labelled case, the whole-tumour label goes through the training path (`preprocess.prepare_map`:
reorientation, crop, area averaging to the grid of `--downsample` 2 (112²) or 4 (56²)) and back through the
inference path (`preprocess.restore`: bilinear upsampling, un-crop), then `> 0.5`, as `segment` makes a mask:

* binary targets: the grid's blocks with at least half tumour are tumour (`prepare_label`, what a model
  trained on binarised targets is asked to reproduce);
* soft targets: the area fraction of each block (what a model trained on area-fraction targets is asked for).

A perfect model of that grid and target scores these numbers: per-slice Dice (the paper's protocol: slices
whose ground truth holds tumour, empty masks count 0), 3D Dice and HD95 (mm), and the tumour slices whose mask
comes back empty, by true lesion size in the slice (voxels).

    python benchmarks/grid_ceiling.py --data ../shared/data/train --out benchmarks/results/grid_ceiling-cpu

Writes OUT.json (every case) and OUT.md (per case and the means). numpy only; a few minutes for 40 cases.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import host_info  # noqa: E402

from diffseg_engine.evaluation import metrics as M  # noqa: E402
from diffseg_engine.artifacts.card import Preprocessing  # noqa: E402
from diffseg_engine.inputs.cases import discover_cases  # noqa: E402
from diffseg_engine.evaluation.protocol import slice_scores  # noqa: E402
from diffseg_engine.io.nifti_io import load_image  # noqa: E402
from diffseg_engine.inputs.preprocess import prepare_geometry, prepare_map, restore, slice_axis  # noqa: E402

#: Lesion-size bins (true tumour voxels in the slice) for the empty-mask count.
SIZE_BINS = (1, 100, 300, 1000, 10**9)


def size_bin_labels() -> list[str]:
    out = []
    for lo, hi in zip(SIZE_BINS[:-1], SIZE_BINS[1:]):
        out.append(f"{lo}-{hi - 1}" if hi < 10**9 else f">={lo}")
    return out


def empties_by_size(gt_sizes: np.ndarray, empty: np.ndarray) -> dict[str, list[int]]:
    """{bin label: [empty masks, tumour slices]} for slices binned by their true lesion size (voxels)."""
    out = {}
    for label, lo, hi in zip(size_bin_labels(), SIZE_BINS[:-1], SIZE_BINS[1:]):
        sel = (gt_sizes >= lo) & (gt_sizes < hi)
        out[label] = [int(empty[sel].sum()), int(sel.sum())]
    return out


def case_ceiling(case, downsample: int) -> dict:
    flair = load_image(case.require(["flair"])[0])
    label = load_image(case.label)
    gt = np.asarray(label.data) > 0
    prep = Preprocessing(downsample=downsample)
    g = prepare_geometry([flair.data], flair.affine, prep, names=[flair.path])
    frac = prepare_map(gt, g)  # [S, h, w] area fraction on the network grid
    zooms = flair.image.header.get_zooms()[:3]
    axis = slice_axis(flair.affine, gt.shape)
    sp = np.asarray(zooms, np.float64)
    gt_sizes = np.moveaxis(gt, axis, 0).sum(axis=(1, 2))
    out = {}
    for target, grid_map in (("binary", (frac >= 0.5).astype(np.float32)), ("soft", frac.astype(np.float32))):
        mask = restore(g, grid_map) > 0.5
        sl = slice_scores(mask, gt, axis, zooms, with_hd95=False)
        out[target] = {"dice_3d": M.dice(mask, gt), "hd95_3d_mm": M.hd95(mask, gt, sp),
                       "slice_dice": sl.dice.tolist(), "slice_empty": sl.pred_empty.tolist(),
                       "slice_gt_voxels": gt_sizes[sl.index].tolist(),
                       "empties_by_size": empties_by_size(gt_sizes[sl.index], sl.pred_empty)}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/train")
    ap.add_argument("--downsample", default="4,2", help="grid factors of the 224² crop (4: 56², 2: 112²)")
    ap.add_argument("--out", required=True, help="output path without extension")
    a = ap.parse_args(argv)
    factors = [int(f) for f in a.downsample.split(",")]
    cases = [c for c in discover_cases(a.data) if c.label is not None]
    res: dict = {}
    for case in cases:
        res[case.case_id] = {str(224 // f): case_ceiling(case, f) for f in factors}
        print(case.case_id, {k: {t: round(v[t]["dice_3d"], 4) for t in v} for k, v in res[case.case_id].items()},
              flush=True)
    meta = {"command": "python " + " ".join(["benchmarks/grid_ceiling.py", *sys.argv[1:]]),
            "machine": f"{host_info()['cpu']}, {host_info()['logical_cpus']} cores"}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cases": res}, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(res, meta, [str(224 // f) for f in factors]))
    print(markdown(res, meta, [str(224 // f) for f in factors]))


def markdown(res: dict, meta: dict, grids: list[str]) -> str:
    cols = [(g, t) for g in grids for t in ("binary", "soft")]
    head = " | ".join(f"{g}² {t}" for g, t in cols)
    lines = ["# The ceiling of each network grid", "",
             "The ground truth taken to the grid (area averaging of the 224² crop) and back (bilinear upsampling, "
             "`> 0.5`), through the engine's own `prepare_map` / `restore`: what a perfect model of that grid and "
             "target would score. Binary: blocks with at least half tumour; soft: the area fraction.", "",
             f"Command: `{meta['command']}` ({meta['machine']})", "",
             "## Means over the cases", "",
             f"| | {head} |", "|---|" + "---|" * len(cols)]
    def mean(key, fn):
        return " | ".join(f"{np.mean([fn(res[c][g][t][key]) for c in res]):.4f}" for g, t in cols)
    lines.append(f"| 3D Dice (mean over cases) | {mean('dice_3d', float)} |")
    lines.append("| 3D Dice (lowest case) | " + " | ".join(
        f"{min(res[c][g][t]['dice_3d'] for c in res):.4f}" for g, t in cols) + " |")
    lines.append(f"| 3D HD95 mm (mean) | {mean('hd95_3d_mm', float)} |")
    lines.append("| per-slice Dice (pooled over all tumour slices) | " + " | ".join(
        f"{np.mean(np.concatenate([res[c][g][t]['slice_dice'] for c in res])):.4f}" for g, t in cols) + " |")
    lines.append("| per-slice Dice (mean of the cases' means) | " + " | ".join(
        f"{np.mean([np.mean(res[c][g][t]['slice_dice']) for c in res]):.4f}" for g, t in cols) + " |")
    for label in size_bin_labels():
        cells = []
        for g, t in cols:
            e = sum(res[c][g][t]["empties_by_size"][label][0] for c in res)
            n = sum(res[c][g][t]["empties_by_size"][label][1] for c in res)
            cells.append(f"{e}/{n} ({100 * e / max(n, 1):.1f} %)")
        lines.append(f"| empty masks, true lesion {label} voxels | " + " | ".join(cells) + " |")
    lines += ["", "## Per case: 3D Dice / per-slice Dice", "", f"| case | {head} |", "|---|" + "---|" * len(cols)]
    for c in sorted(res):
        lines.append(f"| {c} | " + " | ".join(
            f"{res[c][g][t]['dice_3d']:.3f} / {np.mean(res[c][g][t]['slice_dice']):.3f}" for g, t in cols) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
