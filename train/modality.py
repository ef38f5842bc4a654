"""Training and held-out evaluation of the modality classifier (`diffseg_engine.inputs.modality`).

Owns: the classifier network in torch (`ModalityNet`, layer for layer what `modality.forward` computes in
numpy), the training volumes found in a BraTS-style data folder (`find_volumes`, one cohort label each), the
augmentation that stands in for the scanners and protocols we do not have (`augment`), `train_classifier`,
and the leave-one-cohort-out evaluation (`heldout_rows`; benchmarks/modality_classifier.py renders it).
Imports: nibabel (lazily), numpy, torch; `inputs.cases`, `inputs.modality`.

    python -m diffseg_engine.train.modality train ../shared/data diffseg_engine/models/modality.safetensors
    python -m diffseg_engine.train.modality heldout ../shared/data benchmarks/results/modality_classifier-cpu.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffseg_engine.inputs.cases import classify_file
from diffseg_engine.inputs.modality import (CLASSES, ModalityClassifier, ModalityClassifierCard, brain_band,
                                     classifier_slices, save_classifier)

#: Training slices come from a wider band than the inference slices (variety; the inference band is inside it).
TRAIN_BAND = (0.15, 0.85)


@dataclass
class Volume:
    """One training volume: its file, modality (canonical), cohort, the training band [S, 2, size, size] and
    the inference input [K, 2, size, size]."""

    path: Path
    modality: str
    cohort: str
    band: np.ndarray
    inputs: np.ndarray


def cohort_of(path: Path) -> str | None:
    """The cohort a file of a BraTS-style data folder comes from (None: not a training volume)."""
    s = str(path)
    if "algorithm-segmentations" in s or "-native" in s:
        return None
    if "slices2d" in s:
        return "reference 2D slices"
    for key, name in (("BraTS18_", "BraTS 2018"), ("BRATS2013_", "BRATS 2013"), ("BRATS2012_", "BRATS 2012"),
                      ("BraTS-GLI-", "BraTS 2023"), ("TCGA-", "BraTS 2020"), ("AURORA", "AURORA")):
        if key in path.name:
            return name
    return "other"


def find_volumes(root: str | Path, card: ModalityClassifierCard, *, log=print) -> list[Volume]:
    """Every BraTS-preprocessed image volume under `root` (labels, algorithm outputs and native scans left out)."""
    import nibabel as nib
    out = []
    for p in sorted(Path(root).rglob("*.nii*")):
        role = classify_file(p)
        cohort = cohort_of(p)
        if not role or role[0] != "modality" or cohort is None:
            continue
        img = nib.load(str(p))
        vol = np.asarray(img.dataobj, np.float32)
        band = brain_band(vol, img.affine, size=card.size, band=TRAIN_BAND, min_area=card.min_area)
        out.append(Volume(p, role[1], cohort, band, classifier_slices(vol, img.affine, card)))
        log(f"  {p.relative_to(root)}: {role[1]}, {cohort}, {band.shape[0]} band slices")
    return out


class ModalityNet(nn.Module):
    """conv3x3-ReLU-maxpool x3, conv3x3-ReLU, global mean, linear: [B, 2, s, s] -> [B, classes]."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 64), n_classes: int = len(CLASSES)):
        super().__init__()
        chans = [2, *widths]
        for i in range(len(widths)):
            setattr(self, f"conv{i}", nn.Conv2d(chans[i], chans[i + 1], 3, padding=1))
        self.n_conv = len(widths)
        self.fc = nn.Linear(widths[-1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.n_conv):
            x = F.relu(getattr(self, f"conv{i}")(x))
            if i < self.n_conv - 1:
                x = F.max_pool2d(x, 2)
        return self.fc(x.mean(dim=(2, 3)))

    def numpy_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in self.state_dict().items()}


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Scanner and protocol variety on a batch [B, 2, s, s] (intensity, mask): flips and transposes (any
    orientation), rotation +-15 deg and scale 0.85-1.15, gamma 0.6-1.6, a smooth multiplicative bias field
    (+-25 %), contrast and offset jitter, blur (sigma up to 1.2 px, half the batch) and noise; the intensity is
    clipped to [0, 1] and zero outside the (moved) brain."""
    b, _, s, _ = x.shape
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    flip_r, flip_c, tr = u(b) < 0.5, u(b) < 0.5, u(b) < 0.5
    x = torch.where(flip_r[:, None, None, None], x.flip(2), x)
    x = torch.where(flip_c[:, None, None, None], x.flip(3), x)
    x = torch.where(tr[:, None, None, None], x.transpose(2, 3), x)
    ang = (u(b) - 0.5) * (math.pi / 6)
    sc = 0.85 + 0.3 * u(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / sc, -torch.sin(ang) / sc
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / sc, torch.cos(ang) / sc
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img, mask = x[:, :1], (x[:, 1:] > 0.5).float()
    img = img.clamp(0, 1) ** torch.exp((u(b, 1, 1, 1) - 0.5) * 1.0)
    field = F.interpolate(torch.randn(b, 1, 4, 4, generator=g), size=(s, s), mode="bilinear", align_corners=False)
    img = img * torch.exp(0.25 * u(b, 1, 1, 1) * field)
    img = img * (0.85 + 0.3 * u(b, 1, 1, 1)) + (u(b, 1, 1, 1) - 0.5) * 0.1
    sigma = 1.2 * u(b) * (u(b) < 0.5)
    k = torch.arange(-2, 3, dtype=torch.float32)
    ker = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    ker = ker / ker.sum(dim=1, keepdim=True)  # [B, 5]
    img = F.conv2d(img.transpose(0, 1), ker[:, None, :, None], padding=(2, 0), groups=b)
    img = F.conv2d(img, ker[:, None, None, :], padding=(0, 2), groups=b).transpose(0, 1)
    img = img + torch.randn(img.shape, generator=g) * 0.03 * u(b, 1, 1, 1)
    img = img.clamp(0, 1) * mask
    return torch.cat([img, mask], dim=1)


def train_classifier(volumes: Sequence[Volume], card: ModalityClassifierCard, *, steps: int = 3000,
                     batch: int = 64, lr: float = 3e-3, seed: int = 0, log=print) -> ModalityNet:
    """Train on `volumes`: each batch item picks a class uniformly, a volume of that class uniformly, a slice
    of its training band uniformly, then `augment`. AdamW with cosine decay. Deterministic for a seed."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = ModalityNet(card.widths, len(card.classes))
    by_class = {c: [v for v in volumes if v.modality == c and v.band.shape[0]] for c in card.classes}
    present = [c for c in card.classes if by_class[c]]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.perf_counter()
    for step in range(steps):
        cls = rng.choice(len(present), size=batch)
        items, labels = [], []
        for ci in cls:
            pool = by_class[present[ci]]
            v = pool[rng.integers(len(pool))]
            items.append(v.band[rng.integers(v.band.shape[0])])
            labels.append(card.classes.index(present[ci]))
        x = augment(torch.from_numpy(np.stack(items)), g)
        loss = F.cross_entropy(net(x), torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0 or step == 0:
            log(f"  step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    return net.eval()


def predict_volume(net: ModalityNet, v: Volume, card: ModalityClassifierCard) -> dict[str, float]:
    """Class probabilities of one volume by the runtime's numpy path (`ModalityClassifier`)."""
    clf = ModalityClassifier(net.numpy_weights(), card)
    p = torch.softmax(torch.from_numpy(clf.logits(v.inputs)), dim=1).mean(0).numpy()
    return {c: float(x) for c, x in zip(card.classes, p)}


def heldout_rows(volumes: Sequence[Volume], card: ModalityClassifierCard, *, steps: int, seed: int = 0,
                 log=print) -> list[dict]:
    """Leave one cohort out: for each cohort, train on all others and predict its volumes. One row per volume."""
    rows = []
    for cohort in sorted({v.cohort for v in volumes}):
        train = [v for v in volumes if v.cohort != cohort]
        test = [v for v in volumes if v.cohort == cohort]
        log(f"held out: {cohort} ({len(test)} volumes; training on {len(train)})")
        net = train_classifier(train, card, steps=steps, seed=seed, log=log)
        with torch.no_grad():
            for v in test:
                rows.append({"file": str(v.path), "modality": v.modality, "cohort": cohort,
                             "probs": predict_volume(net, v, card)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffseg_engine.train.modality", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["train", "heldout"])
    ap.add_argument("data", type=Path, help="a BraTS-style data folder (e.g. ../shared/data)")
    ap.add_argument("out", type=Path, help="train: the .safetensors to write; heldout: a .json of the rows")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--heldout", default="", help="train: the one-line held-out summary stored in the card")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    card = ModalityClassifierCard()
    log = lambda m: print(m, flush=True)  # noqa: E731
    volumes = find_volumes(a.data, card, log=log)
    if a.what == "heldout":
        rows = heldout_rows(volumes, card, steps=a.steps, seed=a.seed, log=log)
        a.out.write_text(json.dumps(rows, indent=1))
        right = sum(max(r["probs"], key=r["probs"].get) == r["modality"] for r in rows)
        print(f"held-out accuracy {right}/{len(rows)}; rows in {a.out} (the table: benchmarks/modality_classifier.py)")
        return 0
    net = train_classifier(volumes, card, steps=a.steps, seed=a.seed, log=log)
    cohorts = tuple(sorted({v.cohort for v in volumes}))
    card = replace(card, trained_on=cohorts, train_steps=a.steps, heldout=a.heldout)
    card = save_classifier(a.out, net.numpy_weights(), card)
    with torch.no_grad():
        for v in volumes:
            p = predict_volume(net, v, card)
            best = max(p, key=p.get)
            print(f"  {v.path.name}: {v.modality} -> {best} {p[best]:.3f}" + ("" if best == v.modality else " WRONG"))
    print(f"wrote {a.out} ({card.weights_sha256[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
