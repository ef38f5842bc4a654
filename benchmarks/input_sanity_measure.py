"""Measure every volume under ../shared/data with `diffseg_engine.inputs.sanity.measure` and print a Markdown table.

The thresholds in `diffseg_engine/sanity.py` were chosen from this table (benchmarks/results/
input_sanity-measurements.md). Run from the repository root:

    .venv/bin/python benchmarks/input_sanity_measure.py [DATA_DIR] > benchmarks/results/input_sanity-measurements.md

`--rejudge TABLE` re-computes the verdict column of such a table from its numbers (after a threshold change,
without reading the volumes again).
"""
from __future__ import annotations

import sys
from pathlib import Path


from diffseg_engine.inputs.cases import classify_file
from diffseg_engine.inputs.modality import CLASSES, ModalityGuess
from diffseg_engine.io.nifti_io import load_image
from diffseg_engine.inputs.sanity import Measurements, _skull_findings, guess_modality, measure, verdict

PROBS = [f"p({c})" for c in CLASSES]


def main(data: Path) -> None:
    files = sorted(p for p in data.rglob("*.nii*") if "algorithm-segmentations" not in p.parts)
    cols = list(Measurements.__dataclass_fields__)
    print(f"# Input sanity measurements\n\nEvery image under `{data}` (labels and algorithm outputs left out), "
          f"measured by `diffseg_engine.inputs.sanity.measure` (command: `python benchmarks/input_sanity_measure.py`). "
          "`p(...)`: the shipped modality classifier's probabilities (not computed for a volume the skull "
          "check refuses). `verdict`: what `sanity.check_volume` says when the volume is given as FLAIR (the "
          "default model's modality) - `ok`, `warn: ...` or `refuse: ...`.\n")
    print("| file | modality | shape | " + " | ".join(cols + PROBS) + " | verdict as FLAIR |")
    print("|" + "---|" * (len(cols) + len(PROBS) + 4))
    for p in files:
        role = classify_file(p)
        if role is None or role[0] != "modality":
            continue
        im = load_image(p)
        zooms = im.image.header.get_zooms()[:3]
        m = measure(im.data, im.affine, zooms)
        g = None if _skull_findings(m)[0] else guess_modality(im.data, im.affine)
        v = verdict(m, "flair", g)
        probs = [g.probs[c] if g else float("nan") for c in CLASSES]
        vals = " | ".join([f"{getattr(m, c):.3f}" for c in cols] + [f"{x:.3f}" for x in probs])
        print(f"| {p.relative_to(data)} | {role[1]} | {'x'.join(map(str, im.data.shape))} | {vals} | {v} |")


def rejudge(table: Path) -> None:
    cols = list(Measurements.__dataclass_fields__)
    for line in table.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == len(cols) + len(PROBS) + 4 and cells[0] != "file":
            m = Measurements(**{c: float(v) for c, v in zip(cols, cells[3:3 + len(cols)])})
            probs = [float(v) for v in cells[3 + len(cols):3 + len(cols) + len(PROBS)]]
            g = None if probs[0] != probs[0] else ModalityGuess(dict(zip(CLASSES, probs)), 16)
            cells[-1] = verdict(m, "flair", g)
            line = "| " + " | ".join(cells) + " |"
        print(line)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rejudge":
        rejudge(Path(sys.argv[2]))
        sys.exit(0)
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
