"""Leave-one-cohort-out evaluation of the modality classifier, as a Markdown results file (issue 13).

For each cohort under the data folder, the classifier is trained on every other cohort (same recipe and steps
as the shipped one) and classifies the held-out cohort's volumes through the runtime's numpy path. The table
shows the probabilities, what `sanity` would do with each volume given as FLAIR (the default model's
modality) and as its own modality, and the log-odds the refusal threshold is chosen from.

    R=benchmarks/results/modality_classifier
    python -m diffseg_engine.train.modality heldout ../shared/data $R-heldout.json --steps 3000 --threads 2
    python benchmarks/modality_classifier.py ../shared/data $R-heldout.json > $R-cpu.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from diffseg_engine.inputs.modality import CLASSES, ModalityGuess
from diffseg_engine.inputs.sanity import PAIR_LOGODDS, _modality_findings, pair_logodds as _logodds


def _verdict(guess: ModalityGuess, given: str) -> str:
    refuse, warn = _modality_findings(guess, given)
    return "refuse" if refuse else ("warn" if warn else "ok")


def main(root: Path, rows_file: Path) -> None:
    rows = json.loads(rows_file.read_text())
    print("# Modality classifier, one cohort held out at a time\n")
    print("Each cohort's volumes are classified by a classifier trained on the other cohorts only (same recipe "
          "and 3000 steps as the shipped `diffseg_engine/models/modality.safetensors`; 2 CPU threads, about 4 min "
          "a cohort). Probabilities: the mean over the volume's 16 classifier slices. `as FLAIR` / `as itself`: "
          "what `diffseg_engine.inputs.sanity` does when the volume is given to a model as FLAIR / as its own modality "
          "(its `PAIR_LOGODDS` thresholds, listed with the ranges they were chosen from at the end).\n")
    print("Commands (the rows: `benchmarks/results/modality_classifier-heldout.json`):\n\n"
          "    python -m diffseg_engine.train.modality heldout ../shared/data "
          "benchmarks/results/modality_classifier-heldout.json --steps 3000 --threads 2\n"
          "    python benchmarks/modality_classifier.py ../shared/data benchmarks/results/modality_classifier-heldout.json"
          "\n")
    print("| file | held-out cohort | modality | predicted | " + " | ".join(f"p({c})" for c in CLASSES)
          + " | log p(t1)/p(flair) | as FLAIR | as itself |")
    print("|---|---|---|---|" + "---|" * len(CLASSES) + "---|---|---|")
    conf = {(a, b): 0 for a in CLASSES for b in CLASSES}
    for r in rows:
        p = r["probs"]
        g = ModalityGuess(p, 16)
        conf[(r["modality"], g.best)] += 1
        f = Path(r["file"])
        rel = f.relative_to(root) if f.is_relative_to(root) else f
        mark = "" if g.best == r["modality"] else " (wrong)"
        print(f"| {rel} | {r['cohort']} | {r['modality']} | {g.best}{mark} | "
              + " | ".join(f"{p[c]:.3f}" for c in CLASSES)
              + f" | {_logodds(p, 't1', 'flair'):+.2f} | {_verdict(g, 'flair')} | {_verdict(g, r['modality'])} |")
    n = len(rows)
    right = sum(conf[(c, c)] for c in CLASSES)
    print(f"\n**Held-out accuracy: {right}/{n}.** Confusion (rows: true modality, columns: predicted):\n")
    print("| true \\ predicted | " + " | ".join(CLASSES) + " |\n|---|" + "---|" * len(CLASSES))
    for a in CLASSES:
        print(f"| {a} | " + " | ".join(str(conf[(a, b)]) for b in CLASSES) + " |")
    print("\nWhat the input check does with each held-out volume given as FLAIR:\n")
    print("| true modality | volumes | refused | warned | passed |\n|---|---|---|---|---|")
    for a in CLASSES:
        sel = [ModalityGuess(r["probs"], 16) for r in rows if r["modality"] == a]
        v = [_verdict(g, "flair") for g in sel]
        print(f"| {a} | {len(sel)} | {v.count('refuse')} | {v.count('warn')} | {v.count('ok')} |")
    print("\nAnd given as what it is (a right input; anything but `passed` is a false alarm):\n")
    print("| modality | volumes | refused | warned | passed |\n|---|---|---|---|---|")
    for a in CLASSES:
        v = [_verdict(ModalityGuess(r["probs"], 16), a) for r in rows if r["modality"] == a]
        print(f"| {a} | {len(v)} | {v.count('refuse')} | {v.count('warn')} | {v.count('ok')} |")
    print("\nThe thresholds of `sanity.PAIR_LOGODDS` and the held-out log-odds log p(other) - log p(given) they "
          "were chosen from: the largest among real volumes of the given modality (a refusal or warning there "
          "would hit a right input) and the smallest among real volumes of the other modality.\n")
    print("| given | other | real given: max | real other: min | separated | refuse at | warn at |")
    print("|---|---|---|---|---|---|---|")
    for g in CLASSES:
        for o in CLASSES:
            if g == o:
                continue
            real_g = max(_logodds(r["probs"], o, g) for r in rows if r["modality"] == g)
            real_o = min(_logodds(r["probs"], o, g) for r in rows if r["modality"] == o)
            ref, warn = PAIR_LOGODDS.get((g, o), (None, None))
            fmt = lambda t: "-" if t is None else f"{t:+.1f}"  # noqa: E731
            print(f"| {g} | {o} | {real_g:+.2f} | {real_o:+.2f} | {'yes' if real_g < real_o else 'no'} | "
                  f"{fmt(ref)} | {fmt(warn)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
