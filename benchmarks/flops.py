"""P3: achieved FLOP/s of the batched onnxruntime forward against this machine's measured fp32 matmul peak.

    python benchmarks/flops.py [--model default.onnx --weights default.safetensors] [--batches 16,64]

- Peak: fp32 square matmul (numpy/OpenBLAS sgemm and torch.mm, --gemm-n, best of --gemm-reps), measured
  before and after the model timings (the machine is shared); the best of all is the peak.
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` on the torch DenoisingStep (network + fused update) built
  from the same weights, per sample (it counts convolutions and matrix products as 2 x multiply-adds; the
  elementwise work of norms, activations and the update is not counted).
- Achieved: FLOPs per sample x batch / the best time of one onnxruntime call of the shipped step graph, with
  the engine's session options (backends/ort.py: ORT_ENABLE_ALL, intra_op_num_threads = os.cpu_count()) and
  with other session options (not used by the engine; backends/ is not changed here). Also torch eager.
- Where the time goes: one onnxruntime profile of the engine's session, summed by operator type.

Writes benchmarks/results/flops-<preset>.md and .json with machine details and the exact command.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from _host import cpu_busy_s, host_info, own_cpu_s  # noqa: E402 (benchmarks/ is on sys.path when run as a script)
from diffseg_engine.backends.ort import OnnxRuntimeBackend
from diffseg_engine.pipeline.models import DEFAULT_MODEL_DIR
from diffseg_engine.train.step import build_step
from diffseg_engine.artifacts.weights import file_sha256, load_weights


def best_of(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def gemm_peak(n: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)
    t_np = best_of(lambda: np.matmul(a, b, out=c), reps)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    tc = torch.empty(n, n)
    torch.mm(ta, tb, out=tc)
    t_t = best_of(lambda: torch.mm(ta, tb, out=tc), reps)
    f = 2.0 * n ** 3
    return {"n": n, "reps": reps, "numpy_s": t_np, "numpy_gflops": f / t_np / 1e9, "torch_s": t_t,
            "torch_gflops": f / t_t / 1e9}


def count_flops(step, card, batch: int) -> tuple[float, dict]:
    h = card.image_size
    g = torch.Generator().manual_seed(0)
    inp = (torch.rand(batch, len(card.modalities), h, h, generator=g), torch.randn(batch, 1, h, h, generator=g),
           torch.full((batch,), 500.0), torch.zeros(batch, 8), torch.randn(batch, 1, h, h, generator=g))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        step(*inp)
    by_op = defaultdict(float)  # the "Global" entry of the per-module counts holds every op once
    for op, v in fc.get_flop_counts().get("Global", {}).items():
        by_op[str(op)] += float(v)
    return float(fc.get_total_flops()), dict(by_op)


def feeds(card, batch: int) -> dict:
    h = card.image_size
    rng = np.random.default_rng(0)
    return {"image": rng.random((batch, len(card.modalities), h, h), dtype=np.float32),
            "x_t": rng.standard_normal((batch, 1, h, h), dtype=np.float32),
            "timestep": np.full(batch, 500, np.float32),
            "coef": np.tile(np.array([1, 0.1, 0.5, 0.5, -5, -4, 1, 0], np.float32), (batch, 1)),
            "noise": rng.standard_normal((batch, 1, h, h), dtype=np.float32)}


def variant_options(name: str) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.intra_op_num_threads = os.cpu_count() or 1
    if name == "intra_op_num_threads=1":
        o.intra_op_num_threads = 1
    elif name == "ORT_ENABLE_EXTENDED (no NCHWc layout pass)":
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    elif name == "ORT_ENABLE_BASIC":
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    elif name == "intra_op.allow_spinning=0":
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif name == "ORT_PARALLEL, inter_op_num_threads=2":
        o.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        o.inter_op_num_threads = 2
    elif name == "dynamic_block_base=4":
        o.add_session_config_entry("session.dynamic_block_base", "4")
    elif name != "as the engine (ORT_ENABLE_ALL, intra_op_num_threads=cpu_count)":
        raise ValueError(name)
    return o


VARIANTS = ["as the engine (ORT_ENABLE_ALL, intra_op_num_threads=cpu_count)", "intra_op_num_threads=1",
            "ORT_ENABLE_EXTENDED (no NCHWc layout pass)", "ORT_ENABLE_BASIC", "intra_op.allow_spinning=0",
            "ORT_PARALLEL, inter_op_num_threads=2", "dynamic_block_base=4"]


def profile_ops(model: Path, card, batch: int) -> dict:
    o = variant_options(VARIANTS[0])
    tmp = tempfile.mkdtemp()
    o.enable_profiling = True
    o.profile_file_prefix = os.path.join(tmp, "prof")
    sess = ort.InferenceSession(str(model), o, providers=["CPUExecutionProvider"])
    f = feeds(card, batch)
    sess.run(None, f)
    sess.run(None, f)
    path = sess.end_profiling()
    events = json.load(open(path))
    runs = [e for e in events if e.get("name") == "model_run"]
    last_run = runs[-1]
    lo, hi = last_run["ts"], last_run["ts"] + last_run["dur"]
    by = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and lo <= e["ts"] <= hi:
            by[e.get("args", {}).get("op_name", "?")] += e["dur"] / 1e6
    for p in glob.glob(os.path.join(tmp, "*")):
        os.unlink(p)
    return {"run_s": last_run["dur"] / 1e6, "by_op_s": dict(sorted(by.items(), key=lambda kv: -kv[1]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR / "default.onnx")
    ap.add_argument("--weights", type=Path, default=DEFAULT_MODEL_DIR / "default.safetensors")
    ap.add_argument("--batches", default="16,64", help="batch sizes timed with the engine's session")
    ap.add_argument("--variant-batch", type=int, default=16, help="batch size for the session-option variants")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per setting (after one warm-up), best kept")
    ap.add_argument("--gemm-n", type=int, default=2048)
    ap.add_argument("--gemm-reps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    t_start = time.perf_counter()
    snap0 = (t_start, cpu_busy_s(), own_cpu_s())
    res = {"command": "python " + " ".join(sys.argv), "machine": host_info(), "load_avg_start": os.getloadavg(),
           "model": str(args.model), "model_sha256": file_sha256(args.model)}

    peaks = [gemm_peak(args.gemm_n, args.gemm_reps)]
    print(f"gemm {args.gemm_n}: numpy {peaks[0]['numpy_gflops']:.1f}, torch {peaks[0]['torch_gflops']:.1f} GFLOP/s",
          flush=True)

    tensors, card = load_weights(args.weights)
    step = build_step(card, tensors)
    f1, by_op = count_flops(step, card, 1)
    f4, _ = count_flops(step, card, 4)
    per_sample = f4 / 4
    res.update(flops_per_sample=per_sample, flops_batch1=f1, flops_by_op_batch1=by_op,
               params=sum(p.numel() for p in step.parameters()))
    print(f"FLOPs per sample {per_sample / 1e9:.3f} G (batch 1: {f1 / 1e9:.3f} G)", flush=True)

    backend = OnnxRuntimeBackend.load(args.model, device="cpu")
    if backend.card.weights_sha256 != card.weights_sha256:
        sys.exit(f"error: {args.model} and {args.weights} hold different weights")
    rows = []

    def timed(label: str, fn, batch: int, **extra) -> None:
        fn()  # warm-up (allocations for this shape)
        t = best_of(fn, args.reps)
        rows.append({"setting": label, "batch": batch, "call_s": t, "per_item_ms": 1e3 * t / batch,
                     "gflops": per_sample * batch / t / 1e9, **extra})
        print(f"{label}, batch {batch}: {t:.3f} s per call, {per_sample * batch / t / 1e9:.1f} GFLOP/s", flush=True)

    for B in [int(b) for b in args.batches.split(",")]:
        f = feeds(card, B)
        timed("engine backend (OnnxRuntimeBackend.infer)", lambda: backend.infer(*f.values()), B)
    B = args.variant_batch
    f = feeds(card, B)
    for name in VARIANTS:
        sess = ort.InferenceSession(str(args.model), variant_options(name), providers=["CPUExecutionProvider"])
        timed(f"onnxruntime: {name}", lambda s=sess: s.run(None, f), B, variant=True)
        del sess
    tf = [torch.from_numpy(v) for v in f.values()]
    with torch.no_grad():
        timed(f"torch eager ({torch.get_num_threads()} threads)", lambda: step(*tf), B)
        timed(f"torch eager, batch 1 ({torch.get_num_threads()} threads)", lambda: step(*[t[:1] for t in tf]), 1)
    prof = profile_ops(args.model, card, B)
    peaks.append(gemm_peak(args.gemm_n, args.gemm_reps))
    print(f"gemm {args.gemm_n} again: numpy {peaks[1]['numpy_gflops']:.1f}, torch {peaks[1]['torch_gflops']:.1f}",
          flush=True)
    peak = max(max(p["numpy_gflops"], p["torch_gflops"]) for p in peaks)
    for r in rows:
        r["share_of_peak"] = r["gflops"] / peak
    res.update(gemm=peaks, peak_gflops=peak, rows=rows, profile=prof, profile_batch=B,
               total_s=time.perf_counter() - t_start, load_avg_end=os.getloadavg())
    wall = time.perf_counter() - snap0[0]
    res["others_cores"] = max(0.0, ((cpu_busy_s() - snap0[1]) - (own_cpu_s() - snap0[2])) / wall)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"flops-{card.preset}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float))
    md = render(res, card)
    stem.with_suffix(".md").write_text(md)
    print(md)


def render(res: dict, card) -> str:
    m = res["machine"]
    eng = [r for r in res["rows"] if r["setting"].startswith("engine backend")]
    best_eng = max(eng, key=lambda r: r["gflops"])
    L = [f"# P3: achieved FLOP/s of the batched forward vs the matmul peak ({card.name}, "
         f"{card.image_size}x{card.image_size})", "",
         f"Machine: {m['host']} — {m['cpu']} ({m['simd']}), {m['logical_cpus']} logical CPUs, Python {m['python']}, "
         f"numpy {m['numpy']} ({m['numpy_blas']}), torch {m['torch']} ({m['torch_threads']} threads), onnxruntime "
         f"{m['onnxruntime']}. Load average at start {res['load_avg_start'][0]:.2f}, at end "
         f"{res['load_avg_end'][0]:.2f} (this benchmark's own threads included). Total run {res['total_s']:.0f} s.",
         "", f"Other processes kept {res['others_cores']:.2f} cores busy on average during the run (/proc/stat busy time"
         " minus this benchmark's own CPU time).", "", f"Command: `{res['command']}`", "",
         f"Model `{res['model']}` (sha256 {res['model_sha256'][:16]}…), {res['params'] / 1e6:.2f} M parameters.", "",
         "## Peak: fp32 square matmul", "", "| when | n | numpy (OpenBLAS) | torch.mm |", "|---|---|---|---|"]
    for when, p in zip(("before", "after"), res["gemm"]):
        L.append(f"| {when} | {p['n']} | {p['numpy_gflops']:.1f} GFLOP/s | {p['torch_gflops']:.1f} GFLOP/s |")
    L += ["", f"Peak used below: **{res['peak_gflops']:.1f} GFLOP/s** (best of all; 2n³ FLOPs per product).", "",
          "## FLOPs of one step",  "",
          f"`FlopCounterMode` on the torch `DenoisingStep` (same weights): **{res['flops_per_sample'] / 1e9:.3f} GFLOP "
          f"per sample** (batch 4 / 4; batch 1: {res['flops_batch1'] / 1e9:.3f} G). By op (batch 1): "
          + ", ".join(f"{k} {v / 1e9:.3f} G" for k, v in sorted(res["flops_by_op_batch1"].items(), key=lambda kv: -kv[1]))
          + ". Norms, activations, the timestep embedding's elementwise work and the update are not counted.", "",
          "## Achieved", "", "Best of the timed calls after one warm-up call per setting; GFLOP/s = FLOPs per sample x "
          "batch / time.", "",
          "| setting | batch | per call | per item | GFLOP/s | share of peak |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        L.append(f"| {r['setting']} | {r['batch']} | {1e3 * r['call_s']:.0f} ms | {r['per_item_ms']:.1f} ms | "
                 f"{r['gflops']:.1f} | {100 * r['share_of_peak']:.0f} % |")
    L += ["", f"**P3: {100 * best_eng['share_of_peak']:.0f} % of the measured matmul peak** (engine backend, batch "
          f"{best_eng['batch']}; goal >= 50 %).", "",
          f"## Where the time goes (onnxruntime profile, engine options, batch {res['profile_batch']})", "",
          f"One call: {1e3 * res['profile']['run_s']:.0f} ms (profiling on).", "",
          "| operator | time | share |", "|---|---|---|"]
    tot = sum(res["profile"]["by_op_s"].values()) or 1.0
    for op, s in list(res["profile"]["by_op_s"].items())[:12]:
        L.append(f"| {op} | {1e3 * s:.0f} ms | {100 * s / tot:.0f} % |")
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
