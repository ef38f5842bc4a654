"""P1, P6 and the scaling tables on CPU: one real case end to end, engine vs the reference algorithm.

    python benchmarks/end_to_end.py [--case VOLUME.nii.gz] [--slices K] [--n 5] [--steps 250 --also-steps 25]

(a) P1. The engine (`segment_case`: onnxruntime step graph, every (slice, member) of a chunk in one call per
    timestep, streamed statistics, NIfTI maps written) on the case's brain slices (or the K central ones,
    --slices) with N members, run for two small step counts (--measure-steps) of the fast sampler's plan, every
    step call timed on its own, so the per-step cost (the same whatever the step count) and the fixed cost
    (everything outside the step calls) are both measured; the run at --steps (default DDPM respaced to 250
    steps, the setting within 0.01 Dice of DDPM-1000) and --also-steps (25, the CLI default) is extrapolated
    linearly in steps and work items. The reference is `train.reference.reference_sample` (torch eager, one
    member at a time, DDPM over all 1000 steps, as the paper's code runs), stopped after --ref-steps of its
    1000 steps with every step timed, extrapolated to 1000 steps x N members x slices. Both get the same load +
    preprocessing + writing cost. Engine and reference alternate in --rounds rounds (the machine is shared);
    the estimates use the fastest and the median step of each side.
(b) P6. Peak resident memory (VmHWM of a fresh subprocess per measurement) of `segment_case(...,
    overview=False)` at N = 1, 10, 100 on the same slices at a fixed batch size, one sampling step (memory
    does not depend on the number of steps), and on the whole volume at the N and batch sizes listed.
(c) Scaling: time per step call against batch size, and work-item steps per second against N and steps.

Writes benchmarks/results/end_to_end-<preset>.md and .json with machine details and the exact command.
All numbers come from one run on a shared machine; nothing here is asserted by tests.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _host import cpu_busy_s, host_info, own_cpu_s  # noqa: E402 (benchmarks/ is on sys.path when run as a script)
from diffseg_engine.core.noise import NoiseStreams
from diffseg_engine.inputs.preprocess import PreparedCase
from diffseg_engine.sampling.sampler import SamplingPlan, plan_sampling, sample_ensemble
from diffseg_engine.pipeline.options import RunSettings
from diffseg_engine.pipeline.segment import resolve_case, segment_case
from diffseg_engine.pipeline.core import default_batch_size
from diffseg_engine.pipeline.models import DEMO_INPUT, DEFAULT_MODEL_DIR, open_model
from diffseg_engine.artifacts.weights import file_sha256


# ---- helpers ----------------------------------------------------------------------------------------------

def snapshot() -> tuple[float, float, float]:
    return time.perf_counter(), cpu_busy_s(), own_cpu_s()


def others_cores(since: tuple[float, float, float]) -> float:
    """Mean number of cores kept busy by other processes since `since` (a `snapshot()`)."""
    t, busy, own = snapshot()
    return max(0.0, ((busy - since[1]) - (own - since[2])) / max(t - since[0], 1e-9))


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def first_steps(plan: SamplingPlan, k: int) -> SamplingPlan:
    """The first k steps (highest t first) of `plan`: same per-step work, k calls instead of len(plan)."""
    return dataclasses.replace(plan, coefs=plan.coefs[-k:], timesteps=plan.timesteps[-k:])


def central(prepared: PreparedCase, k: int) -> PreparedCase:
    """The k central brain slices of a prepared case (all of them for k <= 0 or k >= S)."""
    S = len(prepared.inputs)
    if k <= 0 or k >= S:
        return prepared
    lo = (S - k) // 2
    sel = slice(lo, lo + k)
    idx = prepared.slice_index[sel]
    return PreparedCase(inputs=prepared.inputs[sel], slice_index=idx,
                        geometry=dataclasses.replace(prepared.geometry, slice_index=idx))


class TimedInfer:
    """Wraps backend.infer: records (batch, seconds) of every step call."""

    def __init__(self, backend):
        self.backend, self.inner, self.calls = backend, backend.infer, []

    def __enter__(self):
        def infer(*a):
            t0 = time.perf_counter()
            out = self.inner(*a)
            self.calls.append((len(a[1]), time.perf_counter() - t0))
            return out
        self.backend.infer = infer
        return self

    def __exit__(self, *exc):
        del self.backend.infer  # back to the class method
        return False


def warm(backend, card, batches) -> None:
    h = card.image_size
    for B in sorted(set(int(b) for b in batches if b > 0)):
        z = np.zeros((B, 1, h, h), np.float32)
        backend.infer(np.zeros((B, len(card.modalities), h, h), np.float32), z, np.full(B, 500, np.float32),
                      np.zeros((B, 8), np.float32), z)


def chunk_sizes(items: int, bs: int) -> list[int]:
    return [min(bs, items - i) for i in range(0, items, bs)]


# ---- P6 child ---------------------------------------------------------------------------------------------

def p6_child(spec: dict) -> None:
    """One fresh process: open the model, prepare the case, segment it (n = 0: stop after preparing)."""
    t0 = time.perf_counter()
    backend = open_model(spec["model"], "onnxruntime", "cpu")
    card = backend.card
    case = resolve_case([Path(spec["case"])], [], card)
    case.prepared = central(case.prepared, spec["slices"])
    S = len(case.prepared.inputs)
    with open("/proc/meminfo") as f:  # what default_batch_size sees
        avail = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable:")) / 2**20
    bs = spec["batch"] or default_batch_size(card, S * max(spec["n"], 1))
    out = {"slices": S, "n": spec["n"], "batch": bs, "batch_default": not spec["batch"], "mem_available_gib": avail}
    if spec["n"] > 0:
        plan = first_steps(plan_sampling(card, "ddpm", spec["steps"]), 1)
        with tempfile.TemporaryDirectory() as tmp:
            segment_case(case, backend, Path(tmp), RunSettings(n=spec["n"], plan=plan, seed=0, batch_size=bs,
                                                               overwrite=True, overview=False), quiet=True)
    out["wall_s"] = time.perf_counter() - t0
    out["vmhwm_kib"] = vm_hwm_kib()
    out["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("P6RESULT " + json.dumps(out), flush=True)


def run_child(spec: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, __file__, "--p6-child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"P6 child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("P6RESULT "))
    res = json.loads(line.split(" ", 1)[1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res["children_maxrss_kib"] = after if after > before else None  # only meaningful when it grew
    return res


# ---- main -------------------------------------------------------------------------------------------------

def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", type=Path, default=DEMO_INPUT, help="one 3D volume of the model's modality")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR / "default.onnx")
    ap.add_argument("--weights", type=Path, default=DEFAULT_MODEL_DIR / "default.safetensors",
                    help="the same model as safetensors, for the torch reference")
    ap.add_argument("--slices", type=int, default=0, help="K central brain slices for P1 (0: all)")
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--steps", type=int, default=250, help="the fast sampler's steps (extrapolated)")
    ap.add_argument("--also-steps", type=int, default=25, help="a second step count to extrapolate to (0: none)")
    ap.add_argument("--measure-steps", type=ints, default=[1, 3], help="two step counts actually run")
    ap.add_argument("--batch-size", type=int, default=0, help="P1 engine batch size (0: the engine's default)")
    ap.add_argument("--ref-steps", type=int, default=10, help="reference steps (of 1000) run per member")
    ap.add_argument("--ref-members", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="P1: engine and reference alternate; best of each kept")
    ap.add_argument("--ref-threads", type=ints, default=[0, 1],
                    help="torch thread counts tried for the reference (0: torch's default); the fastest is used")
    ap.add_argument("--p6-n", type=ints, default=[1, 10, 100])
    ap.add_argument("--p6-slices", type=int, default=8, help="slices for the N sweep of P6 (0: all)")
    ap.add_argument("--p6-batch", type=int, default=8)
    ap.add_argument("--p6-full-n", type=ints, default=[1], help="N values run on the whole volume too")
    ap.add_argument("--p6-full-batches", type=ints, default=[32, 0],
                    help="batch sizes of extra whole-volume N=1 rows (0: the engine's default)")
    ap.add_argument("--scale-batches", type=ints, default=[1, 4, 16, 64])
    ap.add_argument("--scale-n", type=ints, default=[1, 4, 16])
    ap.add_argument("--scale-steps", type=ints, default=[1, 2, 4])
    ap.add_argument("--scale-slices", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of p1,p6,scale to skip")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--p6-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.p6_child:
        return p6_child(json.loads(args.p6_child))
    skip = set(args.skip.split(","))
    cmd = "python " + " ".join(sys.argv)
    t_start = time.perf_counter()
    snap0 = snapshot()
    others: dict[str, float] = {}
    res: dict = {"command": cmd, "machine": host_info(), "load_avg_start": os.getloadavg(),
                 "model": str(args.model), "model_sha256": file_sha256(args.model), "case": str(args.case)}

    t0 = time.perf_counter()
    backend = open_model(args.model, "onnxruntime", "cpu")
    open_s = time.perf_counter() - t0
    card = backend.card
    t0 = time.perf_counter()
    case_all = resolve_case([args.case], [], card)  # load + validate + preprocess
    prep_s = time.perf_counter() - t0
    S_all = len(case_all.prepared.inputs)
    res.update(model_card=card.name, image_size=card.image_size, slices_all=S_all, open_model_s=open_s,
               load_prepare_s=prep_s)
    print(f"model {card.name}; case {case_all.case_id}: {S_all} brain slices; load+prepare {prep_s:.2f} s",
          flush=True)
    full_plan = plan_sampling(card, args.sampler, args.steps)
    N = args.n

    # ---- (a) P1 ------------------------------------------------------------------------------------------
    if "p1" not in skip:
        import dataclasses as dc
        case = dc.replace(case_all, prepared=central(case_all.prepared, args.slices))
        S = len(case.prepared.inputs)
        items = S * N
        bs = args.batch_size or default_batch_size(card, items)
        bs_whole = args.batch_size or default_batch_size(card, S_all * N)
        warm(backend, card, chunk_sizes(items, bs))

        # reference: torch eager, one member at a time, DDPM over all 1000 steps, stopped early
        import torch
        default_threads = torch.get_num_threads()
        from diffseg_engine.train.reference import reference_sample
        from diffseg_engine.train.step import build_step
        from diffseg_engine.artifacts.weights import load_weights
        tensors, wcard = load_weights(args.weights)
        if wcard.weights_sha256 != card.weights_sha256:
            sys.exit(f"error: {args.weights} and {args.model} are not the same weights")
        net_t = build_step(wcard, tensors).net

        class _Stop(Exception):
            pass

        def ref_run(pos: int, member: int, steps: int) -> list[float]:
            """Run `steps` of the 1000 for one member; the time of each step (the first includes the setup)."""
            stamps = [time.perf_counter()]

            def on_step():
                stamps.append(time.perf_counter())
                if len(stamps) > steps:
                    raise _Stop

            gen = NoiseStreams(0, case.case_id).generator(int(case.prepared.slice_index[pos]), member)
            stamps[0] = time.perf_counter()
            try:
                reference_sample(net_t, wcard, case.prepared.inputs[pos], gen, sampler="ddpm", steps=None,
                                 on_step=on_step)
            except _Stop:
                pass
            return list(np.diff(stamps))

        def engine_run(rnd: int, k: int) -> dict:
            with tempfile.TemporaryDirectory() as tmp, TimedInfer(backend) as ti:
                t0 = time.perf_counter()
                segment_case(case, backend, Path(tmp), RunSettings(n=N, plan=first_steps(full_plan, k), seed=0,
                                                                   batch_size=bs, overwrite=True, overview=False),
                             quiet=True)
                total = time.perf_counter() - t0
            net = sum(t for _, t in ti.calls)
            print(f"P1 engine: {S} slices x N={N}, {k} steps, batch {bs}: {total:.2f} s "
                  f"({net / k:.2f} s per step, {total - net:.2f} s outside the step calls)", flush=True)
            return {"round": rnd, "steps": k, "total_s": total, "calls": ti.calls, "step_calls_s": net,
                    "outside_steps_s": total - net}

        # Engine and reference alternate in rounds: the machine is shared, and another process on one of the
        # two cores slows 2-thread runs a lot (torch's far more than onnxruntime's). Every engine step call and
        # every reference step is timed on its own; the estimates use the fastest and the median of each. The
        # reference runs with torch's default thread count and the others listed; the fastest is used.
        threads = list(dict.fromkeys(t or default_threads for t in args.ref_threads))
        eng_runs: list[dict] = []
        ref_steps_t: dict[int, list[float]] = {th: [] for th in threads}
        ref_first_t: dict[int, list[float]] = {th: [] for th in threads}
        o_eng, o_ref = [], []
        for rnd in range(args.rounds):
            snap = snapshot()
            for k in args.measure_steps:
                eng_runs.append(engine_run(rnd, k))
            o_eng.append(others_cores(snap))
            snap = snapshot()
            for th in threads:
                torch.set_num_threads(th)
                ref_run(S // 2, 0, 1)  # warm-up
                for j in range(args.ref_members):
                    d = ref_run((S // 2 + j) % S, j + rnd * args.ref_members, args.ref_steps)
                    ref_first_t[th].append(d[0])
                    ref_steps_t[th] += d[1:]
                    print(f"P1 reference ({th} threads): {len(d)} of 1000 steps in {sum(d):.3f} s (steps 2..: "
                          f"min {1e3 * min(d[1:]):.1f} ms, median {1e3 * float(np.median(d[1:])):.1f} ms)", flush=True)
            torch.set_num_threads(default_threads)
            o_ref.append(others_cores(snap))
        others["p1_engine"] = float(np.mean(o_eng))
        others["p1_reference"] = float(np.mean(o_ref))

        full = [t / B for r in eng_runs for B, t in r["calls"] if B == bs]  # per item-step, full chunks
        by_k = {k: [t / B for r in eng_runs if r["steps"] == k for B, t in r["calls"] if B == bs]
                for k in args.measure_steps}
        eng = {"best": min(full), "median": float(np.median(full))}
        outside = [r["outside_steps_s"] for r in eng_runs]
        fixed = {"best": min(outside), "median": float(np.median(outside))}
        ref_stats = []
        for th in threads:
            st, first = ref_steps_t[th], ref_first_t[th]
            ref_stats.append({"threads": th, "steps_timed": len(st), "min_s": min(st), "median_s": float(np.median(st)),
                              "setup_s": max(float(np.median(first)) - float(np.median(st)), 0.0)})
        ref = {"best": min(r["min_s"] for r in ref_stats), "median": min(r["median_s"] for r in ref_stats)}
        ref_used = {"best": min(ref_stats, key=lambda r: r["min_s"]), "median": min(ref_stats, key=lambda r: r["median_s"])}
        T = card.diffusion.timesteps

        # load/preprocess and the work outside the step calls (mostly restoring and writing the whole-volume
        # maps) are counted once per case, on both sides; step work scales with the work items
        targets = [args.steps] + ([args.also_steps] if args.also_steps else [])
        p1_rows = []
        scopes = [("whole case", S_all)] if S == S_all else [("measured slices", S), ("whole case", S_all)]
        for K in targets:
            for label, slices in scopes:
                for est in ("best", "median"):
                    e = prep_s + fixed[est] + K * slices * N * eng[est]
                    r = prep_s + fixed[est] + slices * N * (ref_used[est]["setup_s"] + T * ref[est])
                    p1_rows.append({"sampler": f"{args.sampler} {K}", "scope": f"{label} ({slices} slices)",
                                    "slices": slices, "estimate": est, "engine_s": e, "reference_s": r, "ratio": r / e})
        res["p1"] = {"slices": S, "n": N, "work_items": items, "batch": bs, "batch_whole_case": bs_whole,
                     "rounds": args.rounds, "engine_runs": [{**r, "calls": [[int(B), t] for B, t in r["calls"]]}
                                                            for r in eng_runs],
                     "engine_item_step_s": eng, "engine_item_step_by_steps": {str(k): {"min": min(v), "median":
                                                                                        float(np.median(v))}
                                                                              for k, v in by_k.items()},
                     "outside_steps_s": fixed, "reference_steps_per_member": args.ref_steps,
                     "reference_members_per_round": args.ref_members, "reference": ref_stats,
                     "reference_step_s": ref, "torch_default_threads": default_threads, "rows": p1_rows}
        for r in p1_rows:
            print(f"P1 {r['sampler']} {r['scope']} [{r['estimate']}]: engine {r['engine_s']:.0f} s, reference "
                  f"{r['reference_s']:.0f} s -> {r['ratio']:.1f}x", flush=True)

    # ---- (c) scaling -------------------------------------------------------------------------------------
    if "scale" not in skip:
        snap = snapshot()
        h = card.image_size
        rng = np.random.default_rng(0)
        brows = []
        for B in args.scale_batches:
            img = case_all.prepared.inputs[np.arange(B) % S_all]
            x = rng.standard_normal((B, 1, h, h), dtype=np.float32)
            coef = np.broadcast_to(full_plan.coefs[-1], (B, 8))
            t = np.full(B, full_plan.timesteps[-1], np.float32)
            backend.infer(img, x, t, coef, x)  # warm-up at this shape
            ts = []
            for _ in range(2):
                t0 = time.perf_counter()
                backend.infer(img, x, t, coef, x)
                ts.append(time.perf_counter() - t0)
            best = min(ts)
            brows.append({"batch": B, "call_ms": 1e3 * best, "per_item_ms": 1e3 * best / B, "item_steps_per_s": B / best})
            print(f"scale batch {B}: {1e3 * best:.0f} ms per call, {1e3 * best / B:.1f} ms per item", flush=True)
        sub = central(case_all.prepared, args.scale_slices)
        Ss = len(sub.inputs)
        streams = NoiseStreams(0, case_all.case_id)

        def run_sampler(n: int, k: int) -> float:
            bs_ = Ss * n  # one chunk: the batch is every work item
            warm(backend, card, [bs_])
            t0 = time.perf_counter()
            sample_ensemble(backend.run_chunk, sub.inputs, members=n, plan=first_steps(full_plan, k), streams=streams,
                            slice_ids=sub.slice_index, card=card, batch_size=bs_)
            return time.perf_counter() - t0

        nrows, krows = [], []
        k_n = 2
        for n in args.scale_n:
            s = run_sampler(n, k_n)
            nrows.append({"n": n, "items": Ss * n, "steps": k_n, "s": s, "item_steps_per_s": Ss * n * k_n / s})
            print(f"scale N={n}: {Ss * n} items x {k_n} steps in {s:.2f} s", flush=True)
        n_k = 4
        for k in args.scale_steps:
            s = run_sampler(n_k, k)
            krows.append({"steps": k, "items": Ss * n_k, "s": s, "item_steps_per_s": Ss * n_k * k / s})
            print(f"scale steps={k}: {Ss * n_k} items in {s:.2f} s", flush=True)
        others["scaling"] = others_cores(snap)
        res["scaling"] = {"batch": brows, "n": nrows, "steps": krows, "slices": Ss, "n_for_steps": n_k,
                          "steps_for_n": k_n}

    # ---- (b) P6 ------------------------------------------------------------------------------------------
    if "p6" not in skip:
        snap = snapshot()
        base = {"model": str(args.model), "case": str(args.case), "steps": args.steps}
        specs = [dict(base, slices=args.p6_slices, n=0, batch=args.p6_batch)]
        specs += [dict(base, slices=args.p6_slices, n=n, batch=args.p6_batch) for n in args.p6_n]
        specs += [dict(base, slices=0, n=n, batch=args.p6_batch) for n in args.p6_full_n]
        specs += [dict(base, slices=0, n=1, batch=b) for b in args.p6_full_batches]
        prow = []
        for spec in specs:
            r = run_child(spec)
            prow.append(r)
            print(f"P6 slices {r['slices']} N={r['n']} batch {r['batch']}: peak RSS {r['vmhwm_kib'] / 1024:.0f} MiB "
                  f"({r['wall_s']:.1f} s)", flush=True)
        res["p6"] = prow
        others["p6"] = others_cores(snap)

    res["total_s"] = time.perf_counter() - t_start
    res["load_avg_end"] = os.getloadavg()
    others["whole run"] = others_cores(snap0)
    res["others_cores"] = others
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"end_to_end-{card.preset}" + (f"-{args.tag}" if args.tag else ""))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float))
    md = render(res)
    stem.with_suffix(".md").write_text(md)
    print(md)


def render(res: dict) -> str:
    m = res["machine"]
    L = [f"# End to end on CPU: P1, P6 and scaling ({res['model_card']}, {res['image_size']}x{res['image_size']})", "",
         f"Machine: {m['host']} — {m['cpu']}, {m['logical_cpus']} logical CPUs, {m.get('mem_total_gib', '?')} GiB, "
         f"Python {m['python']}, numpy {m['numpy']}, onnxruntime {m['onnxruntime']}, torch {m['torch']} "
         f"({m.get('torch_threads', '?')} threads). "
         f"Load average at start {res['load_avg_start'][0]:.2f}, at end {res['load_avg_end'][0]:.2f} (this "
         f"benchmark's own threads included). Total run {res['total_s']:.0f} s. The machine is shared.", "",
         "Other processes kept on average " + ", ".join(f"{v:.2f} cores busy during {k}" for k, v in
                                                          res["others_cores"].items())
         + " (/proc/stat busy time minus this benchmark's own CPU time).", "",
         f"Command: `{res['command']}`", "",
         f"Model `{res['model']}` (sha256 {res['model_sha256'][:16]}…), onnxruntime CPU backend. Case "
         f"`{res['case']}`: {res['slices_all']} brain slices; opening the model {res['open_model_s']:.2f} s, "
         f"loading + preprocessing the case {res['load_prepare_s']:.2f} s.", ""]
    if "p1" in res:
        p = res["p1"]
        e, f = p["engine_item_step_s"], p["outside_steps_s"]
        L += ["## P1: engine vs the reference algorithm", "",
              f"Measured on {p['slices']} central brain slices x N={p['n']} = {p['work_items']} work items, engine "
              f"batch size {p['batch']} (the engine's default at that moment; {p['batch_whole_case']} for the whole "
              "case). Engine = `segment_case` (onnxruntime step graph, one call per timestep per chunk, maps written, "
              f"no overview picture), run for the first steps of the plan only, in {p['rounds']} rounds that "
              "alternate with the reference:", "",
              "| round | steps run | wall | step calls (s each) | outside the step calls |", "|---|---|---|---|---|"]
        for r in p["engine_runs"]:
            L.append(f"| {r['round'] + 1} | {r['steps']} | {r['total_s']:.2f} s | "
                     + ", ".join(f"{t:.2f}" for _, t in r["calls"]) + f" | {r['outside_steps_s']:.2f} s |")
        L += ["", "Per item-step, full chunks: " + "; ".join(
                  f"{k} step(s) run: min {1e3 * v['min']:.1f} ms, median {1e3 * v['median']:.1f} ms"
                  for k, v in p["engine_item_step_by_steps"].items())
              + f" (all: min {1e3 * e['best']:.1f} ms, median {1e3 * e['median']:.1f} ms). The per-step cost does not "
              "depend on how many steps run, so the engine's time is extrapolated as load/preprocess + outside "
              f"(min {f['best']:.2f} s, median {f['median']:.2f} s) + steps x work items x per item-step.", "",
              f"Reference = `train.reference.reference_sample` (torch eager, one member at a time, DDPM over all 1000 "
              f"steps), stopped after {p['reference_steps_per_member']} of the 1000 steps, "
              f"{p['reference_members_per_round']} members per round and thread count (torch's default is "
              f"{p['torch_default_threads']}; the fastest count is used, which favours the reference):", "",
              "| torch threads | steps timed (2nd on) | min per member-step | median | setup per member |",
              "|---|---|---|---|---|"]
        for r in p["reference"]:
            L.append(f"| {r['threads']} | {r['steps_timed']} | {1e3 * r['min_s']:.1f} ms | {1e3 * r['median_s']:.1f} ms | "
                     f"{1e3 * r['setup_s']:.1f} ms |")
        L += ["", "Reference total = the same load/preprocess/write cost + slices x N x (setup + 1000 x per "
              "member-step). \"best\" uses the fastest step of each side, \"median\" the median (the machine was "
              "shared; see the load line above).", "",
              "| sampler (engine) | scope | estimate | engine (extrapolated) | reference DDPM-1000 (extrapolated) | "
              "**P1 ratio** |", "|---|---|---|---|---|---|"]
        for r in p["rows"]:
            L.append(f"| {r['sampler']} | {r['scope']}, N={p['n']} | {r['estimate']} | {r['engine_s']:.0f} s "
                     f"({r['engine_s'] / 60:.1f} min) | {r['reference_s']:.0f} s ({r['reference_s'] / 3600:.2f} h) | "
                     f"**{r['ratio']:.1f}x** |")
        rs = p["reference_step_s"]
        L += ["", f"Per member-step, reference / engine: {rs['best'] / e['best']:.2f}x (best), "
              f"{rs['median'] / e['median']:.2f}x (median); the rest of each ratio is the step count (1000 / K)."]
        L += ["", "What was extrapolated: both sides. The engine ran "
              f"{' and '.join(str(k) for k in p['engine_item_step_by_steps'])} steps of the plan, not all of them; "
              f"the reference ran {p['reference_steps_per_member']} of its 1000 steps for a few members only. "
              "Whole-case rows also scale linearly in work items from the measured slices. Goal: >= 100x on CPU at "
              "Dice within 0.01. Dice was not measured here (the demo case has no label, and DDPM-1000 on CPU is out "
              "of reach); the quality side comes from benchmarks/results/sampler_comparison-h200-session*.md "
              "(DDPM-1000 0.621, DDPM-250 0.613 at N=5: within 0.01; DDPM-25: 0.599 at N=5).", ""]
    if "scaling" in res:
        s = res["scaling"]
        L += ["## Scaling", "", "Time per step call (onnxruntime step graph, best of 2 after a warm-up) against batch size:", "",
              "| batch | per call | per item-step | item-steps/s |", "|---|---|---|---|"]
        for r in s["batch"]:
            L.append(f"| {r['batch']} | {r['call_ms']:.0f} ms | {r['per_item_ms']:.1f} ms | {r['item_steps_per_s']:.2f} |")
        L += ["", f"`sample_ensemble` on {s['slices']} slices, all work items in one chunk, against N "
              f"({s['steps_for_n']} steps):", "", "| N | work items | wall | item-steps/s |", "|---|---|---|---|"]
        for r in s["n"]:
            L.append(f"| {r['n']} | {r['items']} | {r['s']:.2f} s | {r['item_steps_per_s']:.2f} |")
        L += ["", f"Against steps ({s['slices']} slices x N={s['n_for_steps']}):", "",
              "| steps | work items | wall | item-steps/s |", "|---|---|---|---|"]
        for r in s["steps"]:
            L.append(f"| {r['steps']} | {r['items']} | {r['s']:.2f} s | {r['item_steps_per_s']:.2f} |")
        L.append("")
    if "p6" in res:
        L += ["## P6: peak memory against N", "",
              "Each row is a fresh process (VmHWM from /proc/self/status): open the ONNX model, load and preprocess "
              "the case, `segment_case(..., overview=False)` with one sampling step (memory does not depend on the "
              "number of steps), maps restored to the input grid and written. N=0: stop after preparing the case. "
              "\"default\" = `pipeline.core.default_batch_size`, which depends on MemAvailable at the start of the process.",
              "", "| slices | N | batch | work items | chunks | peak RSS | wall |", "|---|---|---|---|---|---|---|"]
        for r in res["p6"]:
            items = r["slices"] * r["n"]
            chunks = -(-items // r["batch"]) if items else 0
            dflt = f" (default; MemAvailable {r['mem_available_gib']:.1f} GiB)" if r.get("batch_default") else ""
            L.append(f"| {r['slices']} | {r['n']} | {r['batch']}{dflt} | {items} | {chunks} | "
                     f"{r['vmhwm_kib'] / 1024:.0f} MiB | {r['wall_s']:.1f} s |")
        first = res["p6"][0]["slices"]
        swept = [r for r in res["p6"] if r["n"] > 0 and r["slices"] == first]
        whole = [r for r in res["p6"] if r["n"] > 0 and r["slices"] == res["slices_all"]
                 and r["batch"] == res["p6"][0]["batch"]]
        if swept:
            L += ["", f"N sweep on {first} slices at batch {swept[0]['batch']}: "
                  + ", ".join(f"N={r['n']} {r['vmhwm_kib'] / 1024:.0f} MiB" for r in swept) + "."]
        if whole:
            w = max(whole, key=lambda r: r["n"])
            L += [f"Whole volume at batch {w['batch']}: " + ", ".join(f"N={r['n']} {r['vmhwm_kib'] / 1024:.0f} MiB"
                                                                      for r in whole)
                  + f". The whole volume at N=100 ({res['slices_all'] * 100} work items) was not run: at the rate of "
                  f"the N={w['n']} row it would take about {w['wall_s'] * 100 / w['n'] / 60:.0f} min even at one step. "
                  "Goal: flat in N, <= 2 GB for a whole volume at N=100."]
        L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
