"""Issue 11's evidence on one NVIDIA GPU, through the engine's own entry points (no copy of the loop here).

    python3 benchmarks/gpu_session_engine.py --out benchmarks/results [--deadline-s 420]

Run by benchmarks/gpu_session_engine.sh (which installs the carried wheels first). Each measurement is written
as soon as it is done, to OUT/gpu_engine-<device>.json and .md, with the device name, so a run cut short keeps
what it measured. Measurements, in order (each skipped, and said so, when the deadline is near):

1. parity: the torch backend's device loop on CUDA (noise drawn there, `noise_device.TorchNoise`) against the
   CPU engine (onnxruntime CPU, numpy noise, host loop) on the same streams: probability maps and masks;
2. `segment` end to end (the CLI, a subprocess) on the shipped demo volume (BraTS, TCGA-DU-7294 FLAIR),
   default model, N = 100, torch backend on CUDA: goal <= 30 s;
3. the engine (device loop, batched) against torch eager one member at a time, same GPU, equal steps: goal >= 50x;
4. the paper preset (4 modalities, 224², random weights: speed does not depend on them), N = 100, one slice,
   50 steps timed and extrapolated to 1000 (stated in the result): goal <= 100 s; fp32 and bf16;
5. achieved FLOP/s of the step (torch FlopCounter) against the measured bf16 GEMM peak: goal >= 30 %;
6. peak GPU memory against N at a fixed batch size (flat: the chunk, not N, sets it).
Not measured here: TensorRT (none on this machine; TensorRT-RTX does not run on Hopper) and onnxruntime's CUDA
provider (onnxruntime-gpu is not installed there and its wheel is over the carry limit).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()


def left(deadline: float) -> float:
    return deadline - (time.perf_counter() - T0)


def sync() -> None:
    torch.cuda.synchronize()


class Results:
    def __init__(self, out: Path, device: str):
        self.device = device
        self.data: dict = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": {}}
        slug = "".join(c if c.isalnum() else "_" for c in device).strip("_")
        self.json, self.md = out / f"gpu_engine-{slug}.json", out / f"gpu_engine-{slug}.md"
        out.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, value: dict) -> None:
        value = {**value, "device": self.device, "at_s": round(time.perf_counter() - T0, 1)}
        self.data["results"][name] = value
        print(f"[{value['at_s']:6.1f} s] {name}: {json.dumps(value)}", flush=True)
        self.json.write_text(json.dumps(self.data, indent=1))
        lines = [f"# GPU engine evidence: {self.device}", "", f"torch {self.data['torch']}, CUDA {self.data['cuda']}, "
                 f"started {self.data['started']}. Written by benchmarks/gpu_session_engine.py.", ""]
        for k, v in self.data["results"].items():
            lines += [f"## {k}", "", "```", json.dumps(v, indent=1), "```", ""]
        self.md.write_text("\n".join(lines))


def demo_slices(card, count: int | None = None):
    from diffseg_engine.io.nifti_io import load_image
    from diffseg_engine.inputs.preprocess import prepare_case
    from diffseg_engine.pipeline.models import DEMO_INPUT
    img = load_image(DEMO_INPUT)
    prep = prepare_case([img.data], img.affine, card.preprocessing)
    x = prep.inputs
    if count is None:
        return x, np.arange(len(x))
    pos = np.sort(np.argsort(x.reshape(len(x), -1).std(1))[-count:])
    return x[pos], pos


def parity(res: Results, weights: Path, onnx: Path) -> None:
    from diffseg_engine.backends.ort import OnnxRuntimeBackend
    from diffseg_engine.backends.torch_ref import TorchBackend
    from diffseg_engine.core.noise import NoiseStreams
    from diffseg_engine.sampling.sampler import plan_sampling, sample_ensemble
    gpu = TorchBackend.load(weights, device="cuda")
    cpu = OnnxRuntimeBackend.load(onnx, device="cpu")
    x, pos = demo_slices(gpu.card, 6)
    plan = plan_sampling(gpu.card, "ddpm", 25)
    kw = dict(members=4, plan=plan, streams=NoiseStreams(0, "parity"), slice_ids=pos, card=gpu.card, batch_size=24)
    t = time.perf_counter()
    a = sample_ensemble(gpu.run_chunk, x, **kw).mean
    t_gpu = time.perf_counter() - t
    t = time.perf_counter()
    b = sample_ensemble(cpu.run_chunk, x, **kw).mean
    t_cpu = time.perf_counter() - t
    ma, mb = a > 0.5, b > 0.5
    dice = 2 * (ma & mb).sum() / max(ma.sum() + mb.sum(), 1)
    res.put("1_parity_device_loop_vs_cpu_engine", {
        "slices": len(pos), "members": 4, "steps": 25, "max_abs_prob_diff": float(np.abs(a - b).max()),
        "mask_dice": float(dice), "mask_pixels_disagree": int((ma != mb).sum()), "mask_pixels": int(mb.sum()),
        "gpu_s": round(t_gpu, 2), "cpu_s": round(t_cpu, 2)})


def segment_end_to_end(res: Results, weights: Path, timeout: float = 150) -> None:
    from diffseg_engine.pipeline.models import DEMO_INPUT
    out = Path(tempfile.mkdtemp())
    cmd = [sys.executable, "-m", "diffseg_engine", "segment", str(DEMO_INPUT), "--model", str(weights),
           "--n", "100", "--backend", "torch", "--device", "cuda", "--out", str(out), "--quiet"]
    t = time.perf_counter()
    try:  # cwd outside the repository: `-m` must import the installed package, not the source folder
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=timeout)
    except subprocess.TimeoutExpired:
        res.put("2_segment_whole_volume_n100", {"command": " ".join(cmd[1:]), "timed_out_after_s": timeout,
                                                "goal_s": 30})
        return
    wall = time.perf_counter() - t
    prov = {}
    for p in out.glob("*.json"):
        try:
            prov = json.loads(p.read_text())
            break
        except ValueError:
            pass
    res.put("2_segment_whole_volume_n100", {
        "command": " ".join(cmd[1:]), "exit_code": proc.returncode, "wall_s": round(wall, 2),
        "timings": prov.get("timings"), "sampling": prov.get("sampling"), "backend": prov.get("backend"),
        "goal_s": 30, "stderr_tail": proc.stderr[-400:]})


def engine_vs_eager(res: Results, weights: Path) -> None:
    from diffseg_engine.backends.torch_ref import TorchBackend
    from diffseg_engine.core.noise import NoiseStreams
    from diffseg_engine.sampling.sampler import plan_sampling
    eng = TorchBackend.load(weights, device="cuda")
    plan = plan_sampling(eng.card, "ddpm", 25)
    x, pos = demo_slices(eng.card, 10)
    members = 100
    img = np.repeat(x, members, axis=0)
    slices, mems = np.repeat(pos, members), np.tile(np.arange(members), len(pos))
    key = NoiseStreams(0, "bench").key
    eng.device_loop(img[:64], slices[:64], mems[:64], plan.coefs, plan.timesteps, key)  # warm-up
    sync()
    t = time.perf_counter()
    eng.device_loop(img, slices, mems, plan.coefs, plan.timesteps, key)
    sync()
    t_engine = time.perf_counter() - t
    # torch eager, one member at a time: host noise, host arrays in and out, as a plain loop would do
    eager = TorchBackend.load(weights, device="cuda", )
    streams = NoiseStreams(0, "bench")
    reps = 5
    t = time.perf_counter()
    for m in range(reps):
        g = streams.generator(int(pos[0]), m)
        xt = g.standard_normal((1, 1, *x.shape[2:]), dtype=np.float32)
        for i in range(len(plan.coefs) - 1, -1, -1):
            xt = eager.infer(x[:1], xt, np.full(1, plan.timesteps[i], np.float32), plan.coefs[i][None],
                             g.standard_normal((1, 1, *x.shape[2:]), dtype=np.float32))
    sync()
    per_member = (time.perf_counter() - t) / reps
    n_items = len(img)
    res.put("3_engine_vs_eager_one_member_at_a_time", {
        "work_items": n_items, "steps": 25, "engine_s": round(t_engine, 3),
        "engine_ms_per_member": round(1e3 * t_engine / n_items, 3),
        "eager_ms_per_member": round(1e3 * per_member, 2), "speedup": round(per_member * n_items / t_engine, 1),
        "goal_speedup": 50})


def paper_preset(res: Results, steps: int = 50) -> dict:
    from diffseg_engine.backends.torch_ref import TorchBackend
    from diffseg_engine.core.noise import NoiseStreams
    from diffseg_engine.sampling.sampler import plan_sampling
    from diffseg_engine.train.presets import build_card, get_preset
    from diffseg_engine.train.unet import UNetModel
    from diffseg_engine.artifacts.weights import save_weights
    card = build_card(get_preset("paper"), ("t1", "t1ce", "t2", "flair"), name="paper-random")
    net = UNetModel(card.architecture)
    path = Path(tempfile.mkdtemp()) / "paper.safetensors"
    save_weights(path, {k: v.numpy() for k, v in net.state_dict().items()}, card)
    out = {"image_size": card.image_size, "members": 100, "steps_timed": steps}
    plan = plan_sampling(card, "ddpm", steps)
    h = card.image_size
    img = np.random.default_rng(0).random((100, 4, h, h), dtype=np.float32)
    key = NoiseStreams(0, "paper").key
    from torch.utils.flop_counter import FlopCounterMode
    for prec in ("fp32", "bf16"):
        eng = TorchBackend.load(path, device="cuda", precision=prec)
        sl, mem = np.zeros(100, np.int64), np.arange(100)
        eng.device_loop(img, sl, mem, plan.coefs[:2], plan.timesteps[:2], key)  # warm-up, graph capture
        sync()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        eng.device_loop(img, sl, mem, plan.coefs, plan.timesteps, key)
        sync()
        dt = time.perf_counter() - t
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            a = [torch.from_numpy(v).cuda() for v in (img, img[:, :1], np.full(100, 500, np.float32),
                                                      np.zeros((100, 8), np.float32), img[:, :1])]
            eng.step(*a)
        flops_step = float(fc.get_total_flops())
        out[prec] = {"seconds_for_timed_steps": round(dt, 3), "extrapolated_1000_steps_s": round(dt * 1000 / steps, 1),
                     "step_flops": flops_step, "achieved_tflops": round(flops_step * steps / dt / 1e12, 1),
                     "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    out["note"] = f"timed over {steps} steps, extrapolated linearly to 1000 (every step costs the same)"
    out["goal_1000_steps_s"] = 100
    return out


def bf16_peak() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 2 * n ** 3 * 10 / (time.perf_counter() - t)


def memory_vs_n(res: Results, weights: Path) -> None:
    from diffseg_engine.backends.torch_ref import TorchBackend
    from diffseg_engine.core.noise import NoiseStreams
    from diffseg_engine.sampling.sampler import plan_sampling, sample_ensemble
    eng = TorchBackend.load(weights, device="cuda")
    x, pos = demo_slices(eng.card, 4)
    plan = plan_sampling(eng.card, "ddpm", 5)
    rows = []
    for n in (10, 50, 100, 200):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        sample_ensemble(eng.run_chunk, x, members=n, plan=plan, streams=NoiseStreams(0, "mem"), slice_ids=pos,
                        card=eng.card, batch_size=128)
        sync()
        rows.append({"n": n, "work_items": n * len(pos), "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
    res.put("6_peak_memory_vs_n", {"batch_size": 128, "steps": 5, "rows": rows})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--deadline-s", type=float, default=420.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this script measures the GPU engine")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    res = Results(args.out, torch.cuda.get_device_name(0))
    from diffseg_engine.pipeline.models import DEFAULT_MODEL_DIR
    weights, onnx = DEFAULT_MODEL_DIR / "default.safetensors", DEFAULT_MODEL_DIR / "default.onnx"
    steps = [("parity", lambda: parity(res, weights, onnx), 60),
             ("segment", lambda: segment_end_to_end(res, weights), 90),
             ("eager", lambda: engine_vs_eager(res, weights), 60),
             ("paper", None, 120),
             ("memory", lambda: memory_vs_n(res, weights), 40)]
    for name, fn, need in steps:
        if left(args.deadline_s) < need:
            res.put(f"skipped_{name}", {"reason": f"{left(args.deadline_s):.0f} s left, needs about {need}"})
            continue
        try:
            if name == "paper":
                out = paper_preset(res)
                peak = bf16_peak()
                out["bf16_gemm_peak_tflops"] = round(peak / 1e12, 1)
                for prec in ("fp32", "bf16"):
                    out[prec]["fraction_of_bf16_peak"] = round(out[prec]["achieved_tflops"] * 1e12 / peak, 3)
                out["goal_fraction_of_bf16_peak"] = 0.30
                res.put("4_5_paper_preset_224_n100_and_flops", out)
            else:
                fn()
        except Exception as exc:  # one failed measurement must not lose the others
            res.put(f"failed_{name}", {"error": f"{type(exc).__name__}: {exc}"[:600]})
        torch.cuda.empty_cache()
    res.put("done", {"total_s": round(time.perf_counter() - T0, 1)})


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
