"""Does this volume look like a skull-stripped, BraTS-preprocessed <modality>? Checked before any compute.

Owns: the measurements of one input volume (`measure`), the thresholds below and the verdict (`check_volume`,
`check_case`): refuse (`InputImageError`, exit 10) what is clearly not what the model was trained on, warn
(one logging line) where the evidence is weaker. `--force` (``force=True``) turns refusals into warnings.
Thresholds: the constants below, each with the measurements it comes from.
Imports: numpy; `artifacts.card`, `core.errors`, `modality`, `preprocess`. Never torch.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..artifacts.card import Preprocessing
from ..core.errors import InputImageError
from .modality import CLASSES, ModalityGuess, default_classifier
from .preprocess import normalise_intensity, slice_axis, to_axial

log = logging.getLogger(__name__)

PREPROCESS_FIX = ("skull-strip and co-register it as BraTS does (SRI24 atlas, 1 mm), e.g. with the "
                  "`brainles-preprocessing` package; or pass --force to segment it anyway")

#: Width of the in-plane frame at the edge of the field of view, as a share of each in-plane size.
FRAME_SHARE = 0.03


@dataclass(frozen=True)
class Measurements:
    """What `measure` finds in one volume.

    nonzero_share: share of all voxels that are non-zero (skull-stripped BraTS volumes: the brain only).
    frame_nonzero: share of non-zero voxels in the in-plane frame at the edge of the field of view (every
    slice), where a skull-stripped volume is background (0) and a native head scan has noise or scalp.
    frame_level: median |intensity| in that frame over the median of the non-zero voxels ("intensity outside
    the head").
    nonzero_ml: volume of the non-zero voxels in millilitres (a brain is 1-2 L; a head or field of view more);
    NaN for a single slice.
    q05 ... q95: quantiles of the non-zero voxels after the engine's percentile normalisation (1st-99th
    percentile to [0, 1]).
    dark_share: share of non-zero voxels below `DARK` after normalisation (CSF, in T1 and FLAIR).
    """

    nonzero_share: float
    frame_nonzero: float
    frame_level: float
    nonzero_ml: float
    q05: float
    q25: float
    q50: float
    q75: float
    q95: float
    dark_share: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in asdict(self).items()}


DARK = 0.2
_NORMALISE = Preprocessing(intensity="percentile", percentile_low=1.0, percentile_high=99.0)


def measure(volume: np.ndarray, affine: np.ndarray, zooms: Sequence[float]) -> Measurements:
    """`Measurements` of one 3D volume (a 2D slice as [X, Y] or [X, Y, 1]); `zooms`: voxel sizes in mm."""
    vol = np.asarray(volume, dtype=np.float32)
    vol = vol[:, :, None] if vol.ndim == 2 else vol
    ax = to_axial(vol, slice_axis(affine, vol.shape))
    nz = ax != 0
    n_nonzero = int(nz.sum())
    fx = max(1, int(round(FRAME_SHARE * ax.shape[1])))
    fy = max(1, int(round(FRAME_SHARE * ax.shape[2])))
    frame = np.ones(ax.shape[1:], dtype=bool)
    frame[fx:-fx, fy:-fy] = False
    frame_vals = ax[:, frame]
    brain_vals = ax[nz]
    ref = float(np.median(np.abs(brain_vals))) if brain_vals.size else 0.0
    frame_level = float(np.median(np.abs(frame_vals))) / ref if ref > 0 else 0.0
    z = [float(v) for v in zooms[:3]] + [1.0] * (3 - len(zooms[:3]))
    ml = n_nonzero * z[0] * z[1] * z[2] / 1000.0 if vol.shape[2] > 1 else float("nan")
    if brain_vals.size and float(brain_vals.max()) > float(brain_vals.min()):
        norm = normalise_intensity(brain_vals, _NORMALISE)
        q = np.quantile(norm, [0.05, 0.25, 0.5, 0.75, 0.95])
        dark = float(np.mean(norm < DARK))
    else:
        q, dark = [float("nan")] * 5, float("nan")
    return Measurements(nonzero_share=n_nonzero / max(ax.size, 1), frame_nonzero=float(np.mean(frame_vals != 0)),
                        frame_level=frame_level, nonzero_ml=ml, q05=float(q[0]), q25=float(q[1]),
                        q50=float(q[2]), q75=float(q[3]), q95=float(q[4]), dark_share=dark)


# ---- thresholds -------------------------------------------------------------------------------------------
# Thresholds, from every volume under ../shared/data (benchmarks/results/input_sanity-measurements.md,
# `benchmarks/input_sanity_measure.py`; the table there lists which volumes were measured):
#
# * skull-stripped. BraTS-preprocessed volumes (2012, 2013, 2018, 2020, 2023, AURORA, all modalities): 17-27 %
#   of voxels non-zero (2D reference slices: 29-30 %), 0 % of the field-of-view frame non-zero, 1.4-1.6 L of
#   non-zero voxels. The native TCGA-FG-6692 scans (not skull-stripped): 90-97 % non-zero, 77-93 % of the frame
#   non-zero, 5.9-6.4 L. Refused above 60 % non-zero, 50 % of the frame or 3000 mL; warned above 35 %, 2 % or
#   2200 mL (a head with its background zeroed, a crop around the head).
# * modality: the learned classifier of `modality.py` (a small CNN on 16 axial slices of the brain, trained on
#   every BraTS-preprocessed volume under ../shared/data: 7 cohorts, 52 volumes). Its leave-one-cohort-out table
#   (benchmarks/results/modality_classifier-cpu.md, `benchmarks/modality_classifier.py`) sets `PAIR_LOGODDS`:
#   the log-odds log p(T1) - log p(FLAIR) of held-out real FLAIRs reach -0.84 at most and of held-out T1s +0.83
#   at least, so a volume given as FLAIR that the classifier finds more T1 than FLAIR (log-odds >= 0) is refused,
#   and so is a FLAIR given as T1; T1 against T2 and T1ce against T2 separate as well and are refused alike.
#   FLAIR against T2 overlaps (a held-out FLAIR at +1.81, a T2 at +0.28): warned about only, above every held-out
#   FLAIR. T1ce against FLAIR or T1 overlaps both ways: not judged.
#: Not skull-stripped: refuse above the first value, warn above the second.
FRAME_NONZERO = (0.5, 0.02)
NONZERO_SHARE = (0.6, 0.35)
NONZERO_ML = (3000.0, 2200.0)
#: The modality classifier (`modality.py`). For a volume given as modality g, the log-odds of another class o,
#: log p(o) - log p(g), of the classifier's volume probabilities: refused at the first value or more, warned
#: about at the second (None: never). Pairs not listed say nothing (T1ce against FLAIR or T1: the held-out
#: cohorts overlap both ways). Chosen from the leave-one-cohort-out table (above).
PAIR_LOGODDS: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("flair", "t1"): (0.0, -0.5), ("t1", "flair"): (0.0, -0.5),
    ("flair", "t2"): (None, 2.0), ("t2", "flair"): (None, 0.5),
    ("t1", "t2"): (0.0, -2.0), ("t2", "t1"): (0.0, -2.0),
    ("t1ce", "t2"): (0.0, -1.5), ("t2", "t1ce"): (1.5, 0.5),
}
NAMES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce (contrast-enhanced T1)", "t2": "T2"}


def guess_modality(volume: np.ndarray, affine: np.ndarray) -> ModalityGuess | None:
    """The shipped classifier's guess for one volume (None when the volume has no brain voxels)."""
    guess = default_classifier().predict(volume, affine)
    return guess if guess.probs else None


def _skull_findings(m: Measurements) -> tuple[list[str], list[str]]:
    refuse, warn = [], []
    for value, (hard, soft), what in (
            (m.frame_nonzero, FRAME_NONZERO, "{:.0%} of the voxels at the edge of the field of view are non-zero"),
            (m.nonzero_share, NONZERO_SHARE, "{:.0%} of all voxels are non-zero"),
            (m.nonzero_ml, NONZERO_ML, "its non-zero voxels fill {:.0f} mL (a brain: 1000-1800 mL)")):
        if value != value:  # NaN: not measurable (a single slice)
            continue
        if value > hard:
            refuse.append(what.format(value))
        elif value > soft:
            warn.append(what.format(value))
    return refuse, warn


def pair_logodds(probs: dict[str, float], other: str, given: str) -> float:
    """log p(other) - log p(given) of a classifier guess (probabilities floored at 1e-12)."""
    return float(np.log(max(probs[other], 1e-12)) - np.log(max(probs[given], 1e-12)))


def _modality_findings(guess: ModalityGuess | None, modality: str) -> tuple[list[str], list[str]]:
    """(refusals, warnings) from `PAIR_LOGODDS`: at most one finding, the other class with the largest log-odds
    among those that reach a threshold."""
    if guess is None or modality not in guess.probs:
        return [], []
    p = guess.probs
    hits = []
    for (given, other), (refuse_at, warn_at) in PAIR_LOGODDS.items():
        if given != modality:
            continue
        lo = pair_logodds(p, other, modality)
        if refuse_at is not None and lo >= refuse_at:
            hits.append((1, lo, other))
        elif warn_at is not None and lo >= warn_at:
            hits.append((0, lo, other))
    if not hits:
        return [], []
    refuse, lo, other = max(hits)
    seen = f"(modality classifier on {guess.n_slices} slice{'s' if guess.n_slices != 1 else ''}: {guess.describe()})"
    if refuse:  # log p(other) >= log p(given): another class is the likeliest; name that one
        return [f"it looks like {NAMES[guess.best]} rather than {NAMES[modality]} {seen}"], []
    return [], [f"it may be {NAMES[other]} rather than {NAMES[modality]} {seen}"]


def judge(m: Measurements, modality: str,
          guess: ModalityGuess | None = None) -> tuple[list[str], list[str], str]:
    """(reasons to refuse, reasons to warn, the fix) for a volume with measurements `m` and the classifier's
    `guess`, given as `modality`."""
    s_refuse, s_warn = _skull_findings(m)
    if s_refuse:  # a head scan: the classifier was trained on skull-stripped brains and says nothing here
        return [f"does not look skull-stripped ({'; '.join(s_refuse)})"], [], PREPROCESS_FIX
    m_refuse, m_warn = _modality_findings(guess, modality)
    refuse = [f"is given as {modality} but {r}" for r in m_refuse]
    warn = ([f"may not be skull-stripped ({'; '.join(s_warn)})"] if s_warn else []) + \
           [f"is given as {modality} but {w}" for w in m_warn]
    fix = (f"give the case's {NAMES.get(modality, modality)} volume (check the file and its name), or pass "
           "--force to segment it anyway"
           if m_refuse else PREPROCESS_FIX)
    return refuse, warn, fix


def verdict(m: Measurements, modality: str, guess: ModalityGuess | None = None) -> str:
    """``"ok"``, ``"warn: ..."`` or ``"refuse: ..."`` (what `check_volume` does with these findings)."""
    refuse, warn, _ = judge(m, modality, guess)
    return "refuse: " + "; ".join(refuse) if refuse else ("warn: " + "; ".join(warn) if warn else "ok")


def check_volume(volume: np.ndarray, affine: np.ndarray, zooms: Sequence[float], modality: str, *,
                 source: object | None = None, force: bool = False, log_warnings: bool = True) -> str:
    """Judge one volume given as `modality`: returns `verdict`. Without `force` a refusal raises
    `InputImageError` naming `source`, the reason and the fix; warnings (and forced refusals) are logged, one
    line each."""
    m = measure(volume, affine, zooms)
    guess = guess_modality(volume, affine) if modality in CLASSES and not _skull_findings(m)[0] else None
    refuse, warn, fix = judge(m, modality, guess)
    if refuse and not force:
        raise InputImageError("; ".join(refuse), path=source, fix=fix)
    label = f"{source}: " if source else ""
    if log_warnings:
        for msg in [f"{label}{r} (--force: segmenting anyway)" for r in refuse] + [f"{label}{w}" for w in warn]:
            log.warning(msg)
    return "refuse: " + "; ".join(refuse) if refuse else ("warn: " + "; ".join(warn) if warn else "ok")


def check_case(volumes: Sequence[np.ndarray], affine: np.ndarray, zooms: Sequence[float],
               modalities: Sequence[str], prep: Preprocessing, *, names: Sequence[object] | None = None,
               force: bool = False) -> list[str]:
    """`check_volume` for each modality of a case (one grid: `affine`, `zooms`); one verdict per volume.

    Models fed already normalised images (``prep.intensity == "none"``: the paper's reference 2D slices) are
    not checked: their inputs are not BraTS volumes and their intensities are scaled before they come here.
    """
    if prep.intensity == "none":
        return []
    names = list(names) if names is not None else [None] * len(volumes)
    return [check_volume(v, affine, zooms, m, source=n, force=force) for v, m, n in zip(volumes, modalities, names)]
