"""Which MR contrast does a volume look like? The learned modality classifier that `sanity` asks.

Owns: the classifier's input (`classifier_slices`: axial slices of the brain, [K, 2, size, size]), its forward
pass in numpy (`forward`, a four-layer CNN, 61 k parameters), its file (safetensors, with a
`ModalityClassifierCard` in the metadata, tensors checked against the card's digest) and the verdict on one
volume (`ModalityClassifier.predict` -> `ModalityGuess`). Trained by `diffseg_engine.train.modality` (torch),
which imports `brain_band` and `classifier_slices` from here, so training and inference see the same input.
Imports: numpy, scipy; `artifacts.card`, `artifacts.weights`, `core.errors`, `preprocess`. Never torch.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from scipy import ndimage

from ..core.errors import ModelFileError
from ..artifacts.card import Preprocessing
from .preprocess import normalise_intensity, slice_axis, to_axial
from ..artifacts.weights import read_tensors, weights_digest, write_tensors

#: The classifier's classes, in the order of its outputs (canonical modality names, `cases.MODALITIES`).
CLASSES = ("flair", "t1", "t1ce", "t2")
CARD_KEY = "diffseg_modality_card"
DEFAULT_FILE = Path(__file__).parents[1] / "models" / "modality.safetensors"


@dataclass(frozen=True)
class ModalityClassifierCard:
    """What a modality-classifier file is: its classes, its input and where its numbers come from.

    size: in-plane pixels of each input slice; n_slices: slices per volume at inference; band: the part of the
    brain's axial extent the slices come from (fractions of the slices whose brain area is at least
    `min_area` of the largest); trained_on: the cohorts of its training volumes; heldout: a one-line summary
    of the leave-one-cohort-out accuracy (the results file has the table).
    """

    classes: tuple[str, ...] = CLASSES
    size: int = 64
    n_slices: int = 16
    band: tuple[float, float] = (0.25, 0.75)
    min_area: float = 0.3
    channels: tuple[str, ...] = ("intensity_p1_p99", "brain_mask")
    widths: tuple[int, ...] = (16, 32, 64, 64)
    trained_on: tuple[str, ...] = ()
    train_steps: int = 0
    heldout: str = ""
    weights_sha256: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: object | None = None) -> "ModalityClassifierCard":
        try:
            raw = json.loads(text)
            raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in cls.__dataclass_fields__}
            return cls(**raw)
        except (ValueError, TypeError) as exc:
            raise ModelFileError(f"modality classifier card is not readable ({exc})", path=source) from None


@dataclass(frozen=True)
class ModalityGuess:
    """The classifier's verdict on one volume. probs: class -> probability (mean over `n_slices` slices)."""

    probs: Mapping[str, float] = field(default_factory=dict)
    n_slices: int = 0

    @property
    def best(self) -> str:
        return max(self.probs, key=self.probs.get)

    def describe(self) -> str:
        """e.g. ``"t1 0.97, flair 0.01, t1ce 0.02, t2 0.00"`` (best first)."""
        return ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.probs.items(), key=lambda kv: -kv[1]))


# ---- input --------------------------------------------------------------------------------------------------

#: The classifier's intensity channel: the engine's percentile normalisation (non-zero voxels, 1st-99th).
INTENSITY = Preprocessing(intensity="percentile", percentile_low=1.0, percentile_high=99.0)


def brain_band(volume: np.ndarray, affine: np.ndarray, *, size: int = 64, band: tuple[float, float] = (0.25, 0.75),
               min_area: float = 0.3, n_slices: int | None = None) -> np.ndarray:
    """Axial slices of the brain's central band, as the classifier sees it: float32 [S, 2, size, size] (all of
    the band's slices, or `n_slices` of them evenly spaced over it).

    Channel 0: intensity, `preprocess.normalise_intensity` with `INTENSITY` over the whole volume; channel 1:
    the brain mask (non-zero voxels). In-plane, the brain's bounding box over the band is padded to a square and
    resampled to size x size (linear), so voxel size and field of view do not matter. The band: of the slices
    whose brain area is at least `min_area` of the largest, the fractions band[0]..band[1] of their extent (a
    2D slice or a short stack gives what it has). An empty volume gives [0, 2, size, size]; NaN voxels and a
    constant brain raise `normalise_intensity`'s `InputImageError`.
    """
    vol = np.asarray(volume, dtype=np.float32)
    vol = vol[:, :, None] if vol.ndim == 2 else vol
    ax = to_axial(vol, slice_axis(affine, vol.shape))
    mask = ax != 0
    area = mask.sum(axis=(1, 2))
    if not area.any():
        return np.zeros((0, 2, size, size), np.float32)
    keep = np.flatnonzero(area >= min_area * area.max())
    lo, n = keep[0], keep[-1] - keep[0] + 1
    s0 = lo + int(np.floor(band[0] * (n - 1) + 0.5))
    s1 = lo + int(np.floor(band[1] * (n - 1) + 0.5))
    m = mask[s0:s1 + 1]
    picks = np.arange(m.shape[0])
    if n_slices is not None and m.shape[0] > n_slices:
        picks = np.round(np.linspace(0, m.shape[0] - 1, n_slices)).astype(int)
    img = normalise_intensity(ax, INTENSITY)[s0:s1 + 1]
    rows = np.flatnonzero(m.any(axis=(0, 2)))
    cols = np.flatnonzero(m.any(axis=(0, 1)))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(r1 - r0, c1 - c0)
    # the square box centred on the brain's bounding box; pixel centres of the output grid inside it
    t = (np.arange(size) + 0.5) * side / size - side / 2.0 - 0.5
    grid = np.meshgrid((r0 + r1) / 2.0 + t, (c0 + c1) / 2.0 + t, indexing="ij")
    out = np.empty((len(picks), 2, size, size), np.float32)
    for k, i in enumerate(picks):
        out[k, 0] = ndimage.map_coordinates(img[i], grid, order=1, mode="constant", cval=0.0)
        out[k, 1] = ndimage.map_coordinates(m[i].astype(np.float32), grid, order=1, mode="constant", cval=0.0)
    return out


def classifier_slices(volume: np.ndarray, affine: np.ndarray, card: ModalityClassifierCard) -> np.ndarray:
    """The classifier's input for one volume: float32 [K <= card.n_slices, 2, size, size]."""
    return brain_band(volume, affine, size=card.size, band=card.band, min_area=card.min_area, n_slices=card.n_slices)


# ---- network ------------------------------------------------------------------------------------------------

def _conv3x3_relu(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[B, C, H, W] * [O, C, 3, 3] (zero padding 1) + b, then ReLU -> [B, O, H, W]."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # [B, C, H, W, 3, 3]
    y = np.einsum("bchwij,ocij->bohw", win, w, optimize=True) + b[None, :, None, None]
    return np.maximum(y, 0.0)


def _maxpool2(x: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    return x[:, :, :h - h % 2, :w - w % 2].reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def forward(weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits [B, len(CLASSES)] of slices x [B, 2, size, size]: three conv-ReLU-maxpool blocks, one conv-ReLU,
    global mean, linear. Same layers and names as `diffseg_engine.train.modality.ModalityNet`."""
    h = np.asarray(x, np.float32)
    n_conv = sum(1 for k in weights if k.startswith("conv") and k.endswith(".weight"))
    for i in range(n_conv):
        h = _conv3x3_relu(h, weights[f"conv{i}.weight"], weights[f"conv{i}.bias"])
        if i < n_conv - 1:
            h = _maxpool2(h)
    h = h.mean(axis=(2, 3))
    return h @ weights["fc.weight"].T + weights["fc.bias"]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ---- file ---------------------------------------------------------------------------------------------------

def save_classifier(path: str | Path, tensors: Mapping[str, np.ndarray], card: ModalityClassifierCard) -> ModalityClassifierCard:
    """Write float32 `tensors` with `card` (its digest filled in) atomically; returns that card."""
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
    card = ModalityClassifierCard(**{**asdict(card), "weights_sha256": weights_digest(arrays)})
    write_tensors(path, arrays, {CARD_KEY: card.to_json()})
    return card


class ModalityClassifier:
    """The classifier loaded from one file: `load`, then `predict` per volume."""

    def __init__(self, weights: Mapping[str, np.ndarray], card: ModalityClassifierCard):
        self.weights, self.card = dict(weights), card

    @classmethod
    def load(cls, path: str | Path = DEFAULT_FILE) -> "ModalityClassifier":
        """Read and verify a classifier file (`ModelFileError` naming it when unreadable or tampered)."""
        if not Path(path).is_file():
            raise ModelFileError("modality classifier file not found", path=path,
                                 fix="reinstall diffseg-engine (the file ships inside the package)")
        tensors, meta = read_tensors(path, card_key=CARD_KEY, missing_card="safetensors file has no modality "
                                     "classifier card", missing_fix="write it with `python -m diffseg_engine.train.modality`")
        card = ModalityClassifierCard.from_json(meta[CARD_KEY], source=path)
        if weights_digest(tensors) != card.weights_sha256:
            raise ModelFileError("modality classifier tensors do not match the digest in its card (tampered or "
                                 "corrupt)", path=path, fix="reinstall diffseg-engine")
        return cls(tensors, card)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """[K, 2, size, size] -> [K, classes]."""
        return forward(self.weights, x)

    def predict(self, volume: np.ndarray, affine: np.ndarray) -> ModalityGuess:
        """Class probabilities of one volume (3D, or a 2D slice as [X, Y] / [X, Y, 1]): the mean over its
        classifier slices of each slice's softmax. An empty volume gives an empty guess."""
        x = classifier_slices(volume, affine, self.card)
        if x.shape[0] == 0:
            return ModalityGuess({}, 0)
        p = _softmax(self.logits(x)).mean(axis=0)
        return ModalityGuess({c: float(v) for c, v in zip(self.card.classes, p)}, int(x.shape[0]))


@functools.lru_cache(maxsize=1)
def default_classifier() -> ModalityClassifier:
    """The shipped classifier (`models/modality.safetensors`), loaded once per process."""
    return ModalityClassifier.load(DEFAULT_FILE)

