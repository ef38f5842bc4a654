"""A folder of predictions scored against labelled cases (what `evaluate --predictions` scores).

Owns: finding each labelled case's prediction files (`find_prediction`: the engine's outputs, named by
`outputs`, or a plain ``<case>.nii.gz`` label map, with a QU-BraTS ``<case>_unc_whole``), the predictions that
match no case, loading what scoring needs (the brain mask from the case's images, the member masks) and scoring
every labelled case (`labelled_cases`, `score_folder` / `FolderScores`).
Imports: nibabel (lazily), numpy; `core`, `inputs`, `io`, `maps`, `metrics`, `protocol`. Never torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from . import metrics as M
from ..maps import qubrats as QB
from ..inputs.cases import Case, discover_cases
from ..core.errors import DatasetError, DiffsegError, InputImageError
from ..io.nifti_io import load_image
from ..maps.outputs import NIFTI_EXTENSIONS, SUFFIXES, stem_suffix
from ..core.progress import ProgressBar
from .protocol import CaseScores, score_case

#: The endings of the engine's NIfTI outputs after the case id ("_mask", "_variance", ...): a file named so is
#: no case of its own.
_ENGINE_STEMS = tuple(stem_suffix(k) for k, suffix in SUFFIXES.items()
                      if suffix.endswith(NIFTI_EXTENSIONS[0]) and stem_suffix(k))


def _strip_ext(name: str) -> str | None:
    low = name.lower()
    for ext in NIFTI_EXTENSIONS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return None


def _first_existing(folder: Path, stem: str) -> Path | None:
    for ext in NIFTI_EXTENSIONS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def find_prediction(pred_dir: Path, case_id: str) -> dict[str, Path]:
    """Files of `case_id` in `pred_dir`: {"mask", and where present "variance", "samples", "mean", "unc_whole"};
    {} if there is no mask.

    Looked for, in order: ``<case>_mask.nii[.gz]`` (engine output, also in ``<case>/``), then a plain label
    map ``<case>.nii[.gz]``."""
    pred_dir = Path(pred_dir)
    for folder in (pred_dir, pred_dir / case_id):
        mask = _first_existing(folder, case_id + stem_suffix("mask"))
        if mask is not None:
            found = {"mask": mask}
            for key in ("variance", "samples", "mean", "unc_whole"):
                p = _first_existing(folder, case_id + stem_suffix(key))
                if p is not None:
                    found[key] = p
            return found
    plain = _first_existing(pred_dir, case_id + stem_suffix("label"))
    if plain is None:
        return {}
    unc = _first_existing(pred_dir, case_id + stem_suffix("unc_whole"))  # a QU-BraTS submission
    return {"mask": plain, **({"unc_whole": unc} if unc is not None else {})}


def _prediction_ids(pred_dir: Path) -> set[str]:
    ids = set()
    for p in pred_dir.iterdir():
        stem = _strip_ext(p.name)
        if stem is None or p.name.startswith(".") or not p.is_file():
            continue
        for suf in _ENGINE_STEMS:
            if stem.endswith(suf):
                if suf == stem_suffix("mask"):
                    ids.add(stem[: -len(suf)])
                break
        else:
            ids.add(stem)
    return ids


def _brain_mask(case: Case, shape: tuple[int, ...]) -> np.ndarray | None:
    brain = None
    for path in dict.fromkeys(case.modalities.values()):
        try:
            im = load_image(path)
        except InputImageError:
            continue
        d = im.data
        if d.ndim == 4:
            d = (d != 0).any(axis=-1)
        if d.shape != shape:
            continue
        brain = (d != 0) if brain is None else (brain | (d != 0))
    return brain


def _load_members(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The samples file [X, Y, Z, N] as uint8 (read with nibabel directly: float32 would be 4x the memory)."""
    import nibabel as nib
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputImageError(f"cannot be read as NIfTI ({exc})", path=path,
                              fix="re-run segmentation with --save-samples") from None
    if arr.ndim == 3 and len(shape) == 3 and shape[2] == 1 and arr.shape[:2] == shape[:2]:
        arr = arr[:, :, None, :]
    if arr.ndim != 4 or arr.shape[:3] != tuple(shape):
        raise InputImageError(f"has shape {arr.shape}; expected {tuple(shape)} + [members]", path=path,
                              fix="use the samples file written with this case's mask")
    if arr.dtype != np.uint8:
        arr = (arr > 0.5).astype(np.uint8)
    return arr


def _score_one(case: Case, files: dict[str, Path], *, policy: M.EmptyPolicy, ensemble_sizes: Sequence[int] | None,
               top_percent: float, variance_threshold: float, n_levels: int, uncertainty: bool,
               curves: bool) -> CaseScores:
    gt_img = load_image(case.label)
    pred_img = load_image(files["mask"])
    gt, pred = gt_img.data, pred_img.data
    if gt.ndim != 3 or pred.shape != gt.shape:
        raise InputImageError(f"prediction has shape {pred.shape}, ground truth {case.label.name} has {gt.shape}",
                              path=files["mask"], fix="score predictions made on the ground truth's grid")
    if not np.allclose(pred_img.affine, gt_img.affine, atol=1e-3, rtol=0):
        raise InputImageError(f"prediction's affine differs from that of {case.label.name}", path=files["mask"],
                              fix="score predictions made on the ground truth's grid")
    zooms = tuple(float(v) for v in gt_img.image.header.get_zooms()[:3])
    variance = brain = members = None
    if uncertainty and "variance" in files:
        v = load_image(files["variance"])
        if v.data.shape != gt.shape:
            raise InputImageError(f"variance has shape {v.data.shape}, expected {gt.shape}", path=files["variance"],
                                  fix="use the variance map written with this case's mask")
        variance = v.data
    u100 = mean = None
    for key in ("mean", "unc_whole"):
        if uncertainty and key in files:
            m = load_image(files[key])
            if m.data.shape != gt.shape:
                raise InputImageError(f"has shape {m.data.shape}, expected {gt.shape}", path=files[key],
                                      fix="use the maps written with this case's mask")
            if key == "mean":
                mean = m.data
                u100 = QB.uncertainty_map(mean)
            else:
                u100 = m.data  # the submission's own map takes precedence over the one from the mean
    if variance is not None or u100 is not None:
        brain = _brain_mask(case, gt.shape)
    if curves and "samples" in files:
        members = _load_members(files["samples"], gt.shape)
    return score_case(pred > 0.5, gt > 0, gt_img.affine, zooms, policy=policy, case_id=case.case_id,
                      variance=variance, brain=brain, members=members, ensemble_sizes=ensemble_sizes,
                      top_percent=top_percent, variance_threshold=variance_threshold, n_levels=n_levels,
                      prediction=str(files["mask"]), qubrats_uncertainty=u100, mean=mean)


class FolderScores(list):
    """A list of `CaseScores` that also remembers predictions that matched no case."""

    def __init__(self, items: Sequence[CaseScores] = (), unmatched_predictions: Sequence[str] = ()):
        super().__init__(items)
        self.unmatched_predictions = list(unmatched_predictions)


def labelled_cases(gt_root: str | Path) -> list[Case]:
    """The cases under `gt_root` that have a label file; `DatasetError` if none has."""
    cases = discover_cases(gt_root)
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise DatasetError(f"no case with a label file found ({len(cases)} case(s) without one)", path=gt_root,
                           fix="give the folder of labelled cases (files named <case>_seg.nii.gz)")
    return labelled


def score_folder(pred_dir: str | Path, gt_root: str | Path, *, policy: str | M.EmptyPolicy = M.BRATS,
                 ensemble_sizes: Sequence[int] | None = None, top_percent: float = 5.0,
                 variance_threshold: float = 0.05, n_levels: int = 100, uncertainty: bool = True,
                 curves: bool = True, quiet: bool = True,
                 failures: dict[str, str] | None = None) -> FolderScores:
    """Score every labelled case under `gt_root` (any layout, `discover_cases`) against its prediction in
    `pred_dir` (`find_prediction`). Every labelled case gets a row: the reason in `failures` (case id ->
    status, e.g. "segmentation failed: ...") for the cases listed there, "missing prediction" when there is
    none, "error: ..." when its files cannot be scored. The returned list also holds `unmatched_predictions`
    (prediction ids without a labelled case). `DatasetError` when `pred_dir` is not a folder or holds no
    prediction for any case."""
    policy = M.get_policy(policy)
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DatasetError("prediction folder not found", path=pred_dir,
                           fix="give the folder holding <case>_mask.nii.gz files")
    cases = labelled_cases(gt_root)
    failures = failures or {}
    found = {c.case_id: find_prediction(pred_dir, c.case_id) for c in cases}
    if not any(found.values()):
        raise DatasetError(f"holds no prediction for any of the {len(cases)} labelled case(s) under {gt_root} "
                           f"(e.g. {cases[0].case_id}_mask.nii.gz)", path=pred_dir,
                           fix="check the folder, or that the predictions are named <case>_mask.nii.gz or <case>.nii.gz")
    results = []
    with ProgressBar(len(cases), "evaluate", unit="case", quiet=quiet) as bar:
        for case in cases:
            files = found[case.case_id]
            if case.case_id in failures:  # an older prediction left in the folder must not stand in for it
                results.append(CaseScores(case.case_id, status=failures[case.case_id]))
            elif not files:
                results.append(CaseScores(case.case_id, status="missing prediction"))
            else:
                try:
                    results.append(_score_one(case, files, policy=policy, ensemble_sizes=ensemble_sizes,
                                              top_percent=top_percent, variance_threshold=variance_threshold,
                                              n_levels=n_levels, uncertainty=uncertainty, curves=curves))
                except DiffsegError as exc:
                    results.append(CaseScores(case.case_id, status=f"error: {exc}", prediction=str(files["mask"])))
            bar.advance(1)
    unmatched = sorted(_prediction_ids(pred_dir) - {c.case_id for c in cases})
    return FolderScores(results, unmatched)
