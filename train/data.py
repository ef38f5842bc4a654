"""The BraTS training data: labelled cases -> preprocessed axial slices in memory, split by patient.

Owns: `SliceSet` (images [N, C, h, w], masks [N, 1, h, w] in {mask_low, mask_high}, the case of each
slice), `load_slices`, `split_cases` (patient-level validation split) and `BatchSampler` (seeded,
tumour-weighted draws with optional left-right flips).
Images and labels go through the inference path (`preprocess.prepare_case` / `prepare_label`): reoriented
to the card's orientation, resampled in-plane to its spacing, cropped and downsampled alike, so training
slices look exactly like the slices the engine later feeds the network.
Imports: numpy; `artifacts.card`, `core.errors`, `inputs.cases`, `inputs.geometry`, `inputs.preprocess`,
`io.nifti_io`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from diffseg_engine.artifacts.card import ModelCard
from diffseg_engine.inputs.cases import Case, discover_cases
from diffseg_engine.core.errors import DatasetError, MissingModalityError
from diffseg_engine.inputs.geometry import lr_network_axis
from diffseg_engine.io.nifti_io import load_image
from diffseg_engine.inputs.preprocess import prepare_case, prepare_label


@dataclass
class SliceSet:
    images: np.ndarray  # [N, C, h, w] float32 in [0, 1]
    masks: np.ndarray  # [N, 1, h, w] float32, mask_low / mask_high (soft targets: in between)
    case_ids: np.ndarray  # [N] str
    slice_index: np.ndarray  # [N] int, voxel index along the slice axis of the case's volume

    def __len__(self) -> int:
        return len(self.images)

    has_tumour: np.ndarray | None = None  # [N] bool, derived from masks when not given

    def __post_init__(self) -> None:
        if self.has_tumour is None:
            flat = self.masks.reshape(len(self.masks), -1)
            self.has_tumour = (flat > flat.min(initial=np.inf)).any(1) if len(flat) else np.zeros(0, bool)


def labelled_cases(root: str | Path, modalities: Sequence[str]) -> tuple[list[Case], list[str]]:
    """Cases under `root` that have a label and every modality; also the reasons others were skipped."""
    usable, skipped = [], []
    for case in discover_cases(root):
        if case.label is None:
            skipped.append(f"{case.case_id}: no label file")
            continue
        try:
            case.require(modalities)
        except MissingModalityError as exc:
            skipped.append(f"{case.case_id}: {exc}")
            continue
        usable.append(case)
    if not usable:
        raise DatasetError(f"no labelled case with modalities {list(modalities)} found",
                           path=root, fix="point --data at a folder of BraTS case folders with *_seg files"
                                          " or choose --modalities the cases have")
    return usable, skipped


def split_cases(case_ids: Sequence[str], *, val_cases: Sequence[str] | None = None, val_count: int | None = None,
                seed: int = 0) -> tuple[list[str], list[str]]:
    """Patient-level split: explicit `val_cases`, else `val_count` cases drawn with `seed` (default ~1/6)."""
    ids = sorted(case_ids)
    if val_cases:
        unknown = sorted(set(val_cases) - set(ids))
        if unknown:
            raise DatasetError(f"validation cases {unknown} are not among the training cases {ids}")
        val = sorted(val_cases)
    else:
        n = val_count if val_count is not None else max(1, round(len(ids) / 6)) if len(ids) > 1 else 0
        val = sorted(np.random.default_rng(seed).permutation(ids)[:n].tolist())
    train = [i for i in ids if i not in val]
    if not train:
        raise DatasetError("the validation split leaves no training case", fix="use fewer --val-count")
    return train, val


def load_case_slices(case: Case, card: ModelCard, *, max_slices: int | None = None,
                     soft_targets: bool = False) -> SliceSet:
    """Preprocess one labelled case into brain-containing axial slices (the card's orientation and spacing;
    the label follows the images' reorientation and resampling). soft_targets: masks carry each network
    pixel's tumour area fraction (low + (high - low)·fraction) instead of the binarised block."""
    paths = case.require(card.modalities)
    images = [load_image(p) for p in paths]
    label = load_image(case.label)
    prepared = prepare_case([im.data for im in images], images[0].affine, card.preprocessing, names=paths)
    wt = prepare_label(label.data, prepared, label.affine, source=case.label, soft=soft_targets)  # [S, h, w]
    lo, hi = card.diffusion.mask_low, card.diffusion.mask_high
    masks = (lo + (hi - lo) * wt)[:, None].astype(np.float32)
    idx = np.arange(len(prepared.inputs))
    if max_slices is not None and len(idx) > max_slices:
        idx = np.linspace(0, len(idx) - 1, max_slices).round().astype(int)
    return SliceSet(images=prepared.inputs[idx].astype(np.float32), masks=masks[idx],
                    case_ids=np.array([case.case_id] * len(idx)), slice_index=prepared.slice_index[idx],
                    has_tumour=(wt[idx] > 0).reshape(len(idx), -1).any(1))


def load_slices(cases: Sequence[Case], card: ModelCard, *, max_slices_per_case: int | None = None,
                soft_targets: bool = False) -> SliceSet:
    parts = [load_case_slices(c, card, max_slices=max_slices_per_case, soft_targets=soft_targets) for c in cases]
    return SliceSet(images=np.concatenate([p.images for p in parts]), masks=np.concatenate([p.masks for p in parts]),
                    case_ids=np.concatenate([p.case_ids for p in parts]),
                    slice_index=np.concatenate([p.slice_index for p in parts]),
                    has_tumour=np.concatenate([p.has_tumour for p in parts]))


#: The augmentations `BatchSampler` applies, as a model card records them (`training["augmentations"]`).
FLIP_AUGMENTATION = "left-right flip of the whole slice (image and mask), probability 0.5"


def flip_axis(card: ModelCard) -> int:
    """The axis of a batch [N, C, h, w] that runs left-right under the card's orientation (LPS: -2)."""
    return lr_network_axis(card.preprocessing.orientation)


class BatchSampler:
    """Seeded batches from a SliceSet: slices with tumour drawn `tumour_weight` times as often, or tumour-free
    slices making up `empty_share` of the draws when given; with `flip`, each slice is mirrored left-right with
    probability 0.5 (`flip_axis`: the network axis that runs left-right, -2 for the canonical LPS slices
    [h = L-R, w = A-P]; see `flip_axis(card)`)."""

    def __init__(self, data: SliceSet, batch_size: int, *, tumour_weight: float = 1.0, flip: bool = True,
                 seed: int = 0, empty_share: float | None = None, flip_axis: int = -2):
        if flip_axis not in (-2, -1):
            raise ValueError(f"flip_axis must be -2 or -1 (an in-plane axis of [N, C, h, w]), got {flip_axis}")
        self.data, self.batch_size, self.flip, self.flip_axis = data, batch_size, flip, flip_axis
        if empty_share is not None and data.has_tumour.any() and not data.has_tumour.all():
            # tumour-free slices together get probability `empty_share`, tumour slices the rest
            n_t = int(data.has_tumour.sum())
            n_e = len(data) - n_t
            w = np.where(data.has_tumour, (1.0 - empty_share) / n_t, empty_share / n_e)
        else:
            w = np.where(data.has_tumour, tumour_weight, 1.0)
        self.p = w / w.sum()
        #: the expected share of tumour-free slices in a batch
        self.empty_share = float(self.p[~data.has_tumour].sum())
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        idx = self.rng.choice(len(self.data), size=self.batch_size, p=self.p)
        img, msk = self.data.images[idx], self.data.masks[idx]
        if self.flip:
            f = self.rng.random(self.batch_size) < 0.5
            img = np.where(f[:, None, None, None], np.flip(img, self.flip_axis), img)
            msk = np.where(f[:, None, None, None], np.flip(msk, self.flip_axis), msk)
        return np.ascontiguousarray(img), np.ascontiguousarray(msk)

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
