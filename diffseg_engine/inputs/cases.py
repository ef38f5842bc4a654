"""Finding cases and their modality files.

Owns: the modality and label file-name aliases, `Case`, `find_case` and `discover_cases`. A file's role is
read from its name only: the last token of the stem split on ``_`` or ``-`` (case-insensitive), or, in the
reference 2D naming ``brats_train_006_flair_080_w``, the token before the slice number. Only files directly
inside a case folder count (so ``algorithm-segmentations/`` and other subfolders are never labels).
Imports: `artifacts.card`, `core.errors`. Never torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..artifacts.card import MODALITIES
from ..core.errors import DatasetError, MissingModalityError, UsageError

#: File-name token -> canonical modality ("t1w" is T1, not T2: only "t2w" is T2).
MODALITY_ALIASES: dict[str, str] = {
    "flair": "flair", "t2f": "flair", "t2flair": "flair", "fla": "flair",
    "t1": "t1", "t1n": "t1", "t1w": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1post": "t1ce",
    "t2": "t2", "t2w": "t2",
}
#: File-name tokens of a label (ground-truth segmentation) file.
LABEL_ALIASES = frozenset({"seg", "label", "labels", "mask", "gt", "segmentation"})
_BRATS2023_TOKENS = frozenset({"t1n", "t1c", "t2w", "t2f"})
_SLICE2D = re.compile(r"^(?P<stem>.+)[_-](?P<mod>[a-z0-9]+)[_-](?P<slice>\d+)[_-]w$")
_SPLIT = re.compile(r"[_-]")


@dataclass
class Case:
    """One patient's images: canonical modality name -> file, the optional label, and the naming layout.

    layout: "brats" (``<ID>_flair.nii.gz``), "brats2023" (``<ID>-t2f.nii.gz``) or "slices2d" (reference
    2D slices ``brats_train_<case>_<modality>_<slice>_w.nii.gz``).
    """

    case_id: str
    folder: Path
    modalities: dict[str, Path] = field(default_factory=dict)
    label: Path | None = None
    layout: str = "brats"

    def require(self, modalities: Sequence[str]) -> list[Path]:
        """The files of `modalities` (canonical names or aliases), in the requested order.

        Raises `MissingModalityError` naming the case folder, the missing modality and those present.
        """
        paths = []
        for name in modalities:
            canon = canonical_modality(name)
            if canon not in self.modalities:
                present = ", ".join(sorted(self.modalities)) or "none"
                aliases = "/".join(a for a, c in MODALITY_ALIASES.items() if c == canon)
                raise MissingModalityError(
                    f"case {self.case_id} has no {canon} image (present: {present})", path=self.folder,
                    fix=f"add a file named <case>_{canon}.nii.gz (name ending in one of {aliases}) "
                        f"or use a model trained on the modalities present")
            paths.append(self.modalities[canon])
        return paths


def canonical_modality(name: str) -> str:
    """Canonical modality for a name or alias ("T2F" -> "flair"); `UsageError` if unknown."""
    canon = MODALITY_ALIASES.get(name.strip().lower())
    if canon is None:
        raise UsageError(f"unknown modality {name!r}",
                         fix=f"use one of {list(MODALITIES)} (or an alias: {sorted(MODALITY_ALIASES)})")
    return canon


def _nifti_stem(path: Path) -> str | None:
    name = path.name
    low = name.lower()
    if name.startswith(".") or not path.is_file():
        return None
    for ext in (".nii.gz", ".nii"):
        if low.endswith(ext):
            return low[: -len(ext)]
    return None


def classify_file(path: Path) -> tuple[str, str] | None:
    """("modality", canonical name) or ("label", "label") from a NIfTI file's name; None for other files."""
    stem = _nifti_stem(path)
    if stem is None:
        return None
    m = _SLICE2D.match(stem)
    token = m.group("mod") if m else _SPLIT.split(stem)[-1]
    if token in MODALITY_ALIASES:
        return "modality", MODALITY_ALIASES[token]
    if token in LABEL_ALIASES:
        return "label", "label"
    return None


def _layout(files: Sequence[Path]) -> str:
    stems = [_nifti_stem(p) or "" for p in files]
    if stems and all(_SLICE2D.match(s) for s in stems):
        return "slices2d"
    if any(_SPLIT.split(s)[-1] in _BRATS2023_TOKENS for s in stems):
        return "brats2023"
    return "brats"


def find_case(folder: str | Path) -> Case:
    """The case in `folder` (files directly inside it). A folder with no modality file gives an empty Case.

    Raises `DatasetError` if `folder` is not a directory, `MissingModalityError` if two files claim the same
    modality (or two label files exist), naming both files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError("is not a folder", path=folder, fix="give a case folder or a folder of case folders")
    case = Case(case_id=folder.resolve().name, folder=folder)
    found = []
    for path in sorted(folder.iterdir()):
        role = classify_file(path)
        if role is None:
            continue
        kind, name = role
        previous = case.label if kind == "label" else case.modalities.get(name)
        if previous is not None:
            what = "label files" if kind == "label" else f"files for modality {name}"
            raise MissingModalityError(f"case {case.case_id} has two {what}: {previous.name} and {path.name}",
                                       path=folder, fix="keep exactly one file per modality (move the other away)")
        if kind == "label":
            case.label = path
        else:
            case.modalities[name] = path
            found.append(path)
    case.layout = _layout(found)
    return case


def discover_cases(root: str | Path) -> list[Case]:
    """Cases under `root`: `root` itself if it holds modality files, else each sub-folder that does.

    Sorted by case id; sub-folders without any modality file are skipped; may be empty. Raises
    `DatasetError` if `root` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("is not a folder", path=root, fix="give a case folder or a folder of case folders")
    own = find_case(root)
    if own.modalities:
        return [own]
    cases = [find_case(sub) for sub in sorted(root.iterdir()) if sub.is_dir() and not sub.name.startswith(".")]
    return sorted((c for c in cases if c.modalities), key=lambda c: c.case_id)
