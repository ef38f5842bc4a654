"""Training steps per second on this machine: presets x precision x memory layout x torch.compile, one run.

    python benchmarks/train_speed.py --presets cpu-small,cpu-small-112 --precisions fp32,bf16 \
        --layouts contiguous,channels_last --compile off,on --out benchmarks/results/train_speed-cpu

Each combination trains `--steps` steps (batch = the preset's) of the given recipe (default: x0 prediction
without recycling, soft targets, 40 % tumour-free slices; `--recycling` adds the recycling pass) on
../shared/data/train into a temporary folder, on `--threads` threads. The rate is taken over the steps after
the first log interval (warm-up and compilation excluded). The combinations run interleaved in `--rounds`
rounds and the best rate of each is kept, so a burst of load from other processes on the shared cores hits
one sample, not one configuration.

`--agreement STEPS` also trains each precision / layout / compile combination of the first preset that many
steps from the same seed and reports the validation loss beside that of fp32 with other seeds: a setting
"changes the result beyond noise" when its difference from fp32 exceeds the spread between seeds.
The CPU's model and bf16 support are detected (`_host.host_info`: avx512_bf16, amx_bf16), never assumed.
Writes OUT.md and OUT.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import host_info  # noqa: E402

from diffseg_engine.train.loop import TrainConfig, train  # noqa: E402

VAL = ("BRATS2013_pat0002", "BraTS18_CBICA_ASK")


def config(a, tmp: str, preset: str, precision: str, layout: str, comp: str, steps: int, seed: int = 0,
           log_every: int | None = None) -> TrainConfig:
    return TrainConfig(data=a.data, out=tmp, preset=preset, steps=steps, checkpoint_every=10**6,
                       log_every=log_every or max(1, steps // 4), val_cases=VAL, threads=a.threads, device="cpu",
                       precision=precision, prediction="x0", recycling=a.recycling, empty_share=0.4,
                       targets=a.targets, channels_last=layout == "channels_last", compile=comp == "on", seed=seed,
                       max_slices_per_case=a.max_slices)


def rate(a, preset, precision, layout, comp) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        train(config(a, tmp, preset, precision, layout, comp, a.steps), quiet=True)
        log = [json.loads(line) for line in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in log if r.get("event") == "train"][1:]  # the first interval: warm-up
    return sum(rates) / len(rates)


def final_val_loss(a, preset, precision, layout, comp, seed: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        train(config(a, tmp, preset, precision, layout, comp, a.agreement, seed=seed, log_every=a.agreement),
              quiet=True)
        log = [json.loads(line) for line in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
    ck = [r for r in log if r.get("event") == "checkpoint"][-1]
    return sum(v for k, v in ck.items() if k.startswith("val_"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/train")
    ap.add_argument("--presets", default="cpu-small,cpu-small-112")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--layouts", default="contiguous,channels_last")
    ap.add_argument("--compile", default="off,on")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recycling", action="store_true")
    ap.add_argument("--targets", default="soft")
    ap.add_argument("--max-slices", type=int, default=40, help="slices per case loaded (speed does not depend on it)")
    ap.add_argument("--train-cases", type=int, default=4,
                    help="training cases loaded besides the two validation cases (speed does not depend on it; "
                         "loading all 40 would dominate the run)")
    ap.add_argument("--agreement", type=int, default=0, help="steps of the result-agreement check (0: skip)")
    ap.add_argument("--out", required=True, help="output path without extension")
    a = ap.parse_args(argv)
    data_dir = tempfile.TemporaryDirectory()
    src = Path(a.data).resolve()
    keep = list(VAL) + [p.name for p in sorted(src.iterdir()) if p.is_dir() and p.name not in VAL][:a.train_cases]
    for name in keep:
        (Path(data_dir.name) / name).symlink_to(src / name, target_is_directory=True)
    a.data = data_dir.name
    combos = list(itertools.product(a.presets.split(","), a.precisions.split(","), a.layouts.split(","),
                                    a.compile.split(",")))
    best: dict[tuple, float] = {}
    for r in range(a.rounds):
        for c in combos:
            t0 = time.perf_counter()
            v = rate(a, *c)
            best[c] = max(best.get(c, 0.0), v)
            print(f"round {r}: {c}: {v:.3f} steps/s ({time.perf_counter() - t0:.0f} s)", flush=True)
    agreement = {}
    if a.agreement:
        p0 = a.presets.split(",")[0]
        for seed in (0, 1, 2):
            agreement[f"fp32 contiguous off seed {seed}"] = final_val_loss(a, p0, "fp32", "contiguous", "off", seed)
        for c in combos:
            if c[0] == p0 and c[1:] != ("fp32", "contiguous", "off"):
                agreement[f"{c[1]} {c[2]} {c[3]} seed 0"] = final_val_loss(a, *c, seed=0)
        print(json.dumps(agreement, indent=1), flush=True)
    host = host_info()
    meta = {"command": "python " + " ".join(["benchmarks/train_speed.py", *sys.argv[1:]]),
            "machine": f"{host['cpu']} ({host['simd']}), {host['logical_cpus']} cores", "threads": a.threads,
            "recipe": {"prediction": "x0", "recycling": a.recycling, "targets": a.targets, "empty_share": 0.4}}
    rows = [{"preset": c[0], "precision": c[1], "layout": c[2], "compile": c[3], "steps_per_s": best[c]}
            for c in combos]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "agreement": agreement}, indent=1))
    lines = [f"# Training speed ({meta['machine']}, {a.threads} thread{'s' if a.threads > 1 else ''})", "",
             f"Command: `{meta['command']}`", "",
             f"Recipe: x0 prediction, {'recycling' if a.recycling else 'no recycling'}, {a.targets} targets, batch = "
             f"the preset's; best of {a.rounds} interleaved rounds of {a.steps} steps, warm-up interval excluded.", "",
             "| preset | precision | layout | torch.compile | steps/s | vs fp32 contiguous |", "|---|---|---|---|---|---|"]
    for row in rows:
        ref = best[(row["preset"], "fp32", "contiguous", "off")] if (row["preset"], "fp32", "contiguous", "off") in best \
            else None
        lines.append(f"| {row['preset']} | {row['precision']} | {row['layout']} | {row['compile']} | "
                     f"{row['steps_per_s']:.3f} | {row['steps_per_s'] / ref:.2f}x |" if ref else
                     f"| {row['preset']} | {row['precision']} | {row['layout']} | {row['compile']} | "
                     f"{row['steps_per_s']:.3f} | — |")
    if agreement:
        lines += ["", f"## Does the setting change the result? ({a.agreement} steps, validation loss of the EMA "
                  "weights, MSE + BCE + Dice on the fixed validation batch)", "", "| run | validation loss |",
                  "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in agreement.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
