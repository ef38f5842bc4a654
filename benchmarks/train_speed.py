"""Training steps per second of presets on this machine: a few x0 + recycling steps of each, one thread.

    python benchmarks/train_speed.py --presets cpu-small,cpu-fast --steps 12 --out benchmarks/results/train_speed-cpu.md

Each preset trains `--steps` steps (batch = the preset's) on ../shared/data/train with the shipped recipe
(x0 prediction, recycling, 40 % tumour-free slices) into a temporary folder; the rate is the training log's
`steps_per_s` at the last logged step (the first steps, warm-up included, are averaged in).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import cpu_info  # noqa: E402

from diffseg_engine.train.loop import TrainConfig, train  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/train")
    ap.add_argument("--presets", default="cpu-small,cpu-fast")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    rows = []
    for name in a.presets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(data=a.data, out=tmp, preset=name, steps=a.steps, checkpoint_every=10**6,
                              log_every=max(1, a.steps // 3), val_cases=("BRATS2013_pat0002", "BraTS18_CBICA_ASK"),
                              threads=1, device="cpu", precision="fp32", prediction="x0", recycling=True,
                              empty_share=0.4)
            train(cfg, quiet=True)
            log = [json.loads(line) for line in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
        rate = [r["steps_per_s"] for r in log if r.get("event") == "train"][-1]
        rows.append((name, rate))
        print(name, f"{rate:.2f} steps/s", flush=True)
    lines = [f"# Training speed ({cpu_info()['cpu']}, one thread)", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "| preset | steps/s (batch 16, x0 + recycling) |", "|---|---|"]
    lines += [f"| {n} | {r:.2f} |" for n, r in rows]
    if len(rows) == 2:
        lines += ["", f"Ratio {rows[0][0]} / {rows[1][0]}: {rows[0][1] / rows[1][1]:.2f}x"]
    Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
