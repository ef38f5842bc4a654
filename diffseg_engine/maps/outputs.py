"""The names of the files a run writes for one case: the one definition, for `segment` (which writes them),
`cohort` (which reads a finished run's provenance and maps back) and `evaluation.predictions` (which finds the
files of a folder of predictions).

Owns: `SUFFIXES` (what follows the case id in each file's name, by key), the keys each kind of run writes
(`RUN_KEYS`, `SUBMISSION_KEYS`), `output_paths` and `NIFTI_EXTENSIONS` with `stem_suffix` for readers that also
accept ``.nii``. Imports: the standard library only. Never torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

#: <case id><suffix>, by key. The last two are the names the QU-BraTS challenge expects (see `qubrats`).
SUFFIXES = {
    "mean": "_mean.nii.gz", "variance": "_variance.nii.gz", "entropy": "_entropy.nii.gz", "mask": "_mask.nii.gz",
    "provenance": "_provenance.json", "overview": "_overview.png",
    "samples": "_samples.nii.gz",  # --save-samples: every member's mask
    "members": "_members.nii.gz",  # --n auto: the members each slice got
    "label": ".nii.gz", "unc_whole": "_unc_whole.nii.gz",  # --format qubrats
}
#: What every run writes (the overview where it can be drawn); the provenance JSON, written last, marks it finished.
RUN_KEYS = ("mean", "variance", "entropy", "mask", "provenance", "overview")
#: What `--format qubrats` adds.
SUBMISSION_KEYS = ("label", "unc_whole")
#: The endings of a NIfTI file, as readers accept them (writers use the first).
NIFTI_EXTENSIONS = (".nii.gz", ".nii")


def output_paths(out_dir: str | Path, case_id: str, keys: Sequence[str] = RUN_KEYS) -> dict[str, Path]:
    """{key: out_dir/<case_id><suffix>} for `keys` (default: what every run writes)."""
    return {k: Path(out_dir) / f"{case_id}{SUFFIXES[k]}" for k in keys}


def stem_suffix(key: str) -> str:
    """The suffix of a NIfTI output without its extension ("mask" -> "_mask", "label" -> "")."""
    suffix = SUFFIXES[key]
    if not suffix.endswith(NIFTI_EXTENSIONS[0]):
        raise ValueError(f"{key} is not a NIfTI output")
    return suffix[: -len(NIFTI_EXTENSIONS[0])]
