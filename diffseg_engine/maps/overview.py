"""The picture a user looks at first: `overview.png` of a segmented case.

Owns: `write_overview` — a few axial slices through the lesion: the input, the ensemble mean as an overlay
(with the 0.5 contour of the mask), and the variance map, each with a colour bar.
Imports: matplotlib (lazily), numpy; `inputs.preprocess`, `io.atomic`. Never torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..io.atomic import atomic_write
from ..inputs.preprocess import slice_axis


def pick_slices(mean_axial: np.ndarray, brain_axial: np.ndarray, k: int = 4) -> list[int]:
    """Axial indices: the slices with the most tumour probability, spread out; brain-centred if none."""
    load = mean_axial.reshape(len(mean_axial), -1).sum(1)
    if load.max() <= 0:
        brain = np.flatnonzero(brain_axial.reshape(len(brain_axial), -1).any(1))
        lo, hi = (brain[0], brain[-1]) if len(brain) else (0, len(mean_axial) - 1)
        return sorted({int(round(x)) for x in np.linspace(lo + (hi - lo) * 0.3, lo + (hi - lo) * 0.7, k)})
    lesion = np.flatnonzero(load > 0.05 * load.max())
    picks = np.linspace(lesion[0], lesion[-1], k + 2)[1:-1] if len(lesion) > k else lesion
    return sorted({int(round(p)) for p in picks})


def write_overview(path: str | Path, image: np.ndarray, mean: np.ndarray, variance: np.ndarray,
                   affine: np.ndarray, *, title: str = "", image_label: str = "input", file: BinaryIO | None = None
                   ) -> Path:
    """image, mean, variance: 3D arrays on the input grid. Rows: slices; columns: input, mean, variance.

    Writes the PNG to `path` (atomically), or into `file` where one is given (`path` is then only returned)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    axis = slice_axis(affine, image.shape)
    ax_img, ax_mean, ax_var = (np.moveaxis(a, axis, 0) for a in (image, mean, variance))
    picks = pick_slices(ax_mean, ax_img != 0)
    vmax_var = max(float(ax_var.max()), 1e-6)
    lo, hi = np.percentile(ax_img[ax_img != 0], [1, 99]) if (ax_img != 0).any() else (0.0, 1.0)
    fig, axes = plt.subplots(len(picks), 3, figsize=(10.5, 3.4 * len(picks)), squeeze=False)
    view = lambda a: np.rot90(a)  # noqa: E731 - first in-plane axis to the horizontal, as radiology viewers do
    for row, z in enumerate(picks):
        a0, a1, a2 = axes[row]
        a0.imshow(view(ax_img[z]), cmap="gray", vmin=lo, vmax=hi)
        a0.set_title(f"{image_label}, slice {z}")
        a1.imshow(view(ax_img[z]), cmap="gray", vmin=lo, vmax=hi)
        # opacity follows the mean, so a confident mask stands out and a faint, uncertain haze stays faint
        m = a1.imshow(view(np.ma.masked_less(ax_mean[z], 0.02)), cmap="autumn", vmin=0, vmax=1,
                      alpha=view(np.clip(ax_mean[z], 0.0, 1.0) * 0.85))
        if (ax_mean[z] > 0.5).any() and (ax_mean[z] < 0.5).any():
            a1.contour(view(ax_mean[z]), levels=[0.5], colors="cyan", linewidths=0.8)
        a1.set_title("ensemble mean (cyan: mask > 0.5)")
        fig.colorbar(m, ax=a1, fraction=0.046, pad=0.02)
        v = a2.imshow(view(ax_var[z]), cmap="viridis", vmin=0, vmax=vmax_var)
        a2.set_title("ensemble variance")
        fig.colorbar(v, ax=a2, fraction=0.046, pad=0.02)
        for a in (a0, a1, a2):
            a.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    try:
        if file is not None:
            fig.savefig(file, format="png", dpi=90)
        else:
            with atomic_write(path) as f:
                fig.savefig(f, format="png", dpi=90)
    finally:
        plt.close(fig)
    return path
