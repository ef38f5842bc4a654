"""A spatial T1-vs-FLAIR feature, measured on every 3D FLAIR and T1 under a data folder (issue 13's open point).

Cortex (grey matter) is brighter than deep white matter in FLAIR and darker in T1. Feature: median intensity
of the tissue (above 35 % of the 1st-99th percentile range, so CSF is left out) in a 1-6 mm shell under the
brain surface, over the same in the core (20 mm or more from the surface). Brain: the non-zero voxels, opened
twice, largest component, holes filled.

    python benchmarks/t1_vs_flair_spatial.py ../shared/data

Prints one Markdown row per volume. The verdict of the measurement is in
benchmarks/results/input_sanity-measurements.md ("A spatial feature, tried").
"""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def shell_core_ratio(v: np.ndarray, zooms) -> float:
    brain = ndimage.binary_opening(v > 0, iterations=2)
    lab, k = ndimage.label(brain)
    if k > 1:
        brain = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    brain = ndimage.binary_fill_holes(brain)
    d = ndimage.distance_transform_edt(brain, sampling=zooms)
    p1, p99 = np.percentile(v[brain], [1, 99])
    tissue = brain & (v > p1 + 0.35 * (p99 - p1))
    shell, core = v[tissue & (d > 1) & (d <= 6)], v[tissue & (d >= 20)]
    return float(np.median(shell) / np.median(core)) if shell.size and core.size else float("nan")


def main(root: str) -> None:
    print("| file | shell/core (tissue) |\n|---|---|")
    for f in sorted(Path(root).rglob("*.nii.gz")):
        name = f.name.lower()
        if any(k in str(f) for k in ("seg", "algorithm", "native", "slices2d")):
            continue
        if not any(k in name for k in ("flair", "_t1.", "t1n", "t2f")):
            continue
        img = nib.load(str(f))
        print(f"| {f.relative_to(root)} | {shell_core_ratio(np.asarray(img.dataobj, np.float32), img.header.get_zooms()[:3]):.3f} |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
