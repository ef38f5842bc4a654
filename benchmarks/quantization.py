"""P2 follow-up: int8 static quantization (and bf16) of the ONNX step graph on CPU, speed and Dice.

    python benchmarks/quantization.py [--model diffseg_engine/models/default.onnx] [--rounds 3]
        [--parts speed,profile,options,bf16,quality] [--merge] [--variants "int8 S8S8,int8 U8S8,..."]

`--parts` with `--merge` runs some parts and updates them in an existing results .json (the machine is shared:
this keeps each invocation under ~10 minutes). Every invocation recalibrates and requantizes (deterministic).

1. Calibration: the FLAIR slices of a labelled *training* case (default BraTS18_CBICA_AOO, preprocessed
   with the model card's pipeline) are sampled with the fp32 step graph along a real DDPM trajectory
   (`plan_sampling(card, "ddpm", 25)`, timesteps spread over 0..999); every step's inputs (image, x_t,
   timestep, coef, noise) are recorded and are the calibration data.
2. `onnxruntime.quantization.quantize_static`: QDQ format, per-channel int8 weights, MinMax calibration,
   variants in `VARIANTS` (int8 or uint8 activations, reduce_range), only Conv and MatMul quantized
   (InstanceNorm, SiLU, the attention softmax and the fused DDPM update stay fp32). The quantized file is opened with a plain `onnxruntime.InferenceSession` (the
   engine's backend checks the exporter's content digest and would refuse a rewritten graph), with the same
   session options as `OnnxRuntimeBackend.load` (`backends.ort.session_options`), fed as the backend feeds
   (`backends.ort.step_feeds`).
3. Speed: ms per member-step at each batch size, fp32 vs int8 vs torch eager one member at a time (the
   reference code's way, DDPM), interleaved rounds, best of `--rounds`; then fp32 with other session options.
   bf16: a torch conv of the network's commonest shape in fp32 and bf16.
4. Quality: `sample_ensemble`, DDPM `--steps` steps, `--members` members, on `--slices` tumour slices of a
   validation case (default BraTS18_CBICA_ASK), the same NoiseStreams for fp32 and int8; Dice of
   (mean > 0.5) vs the whole-tumour label on the network grid, and the difference of the mean maps; plus fp32
   with the next seed, to show how far Dice moves from the noise alone.

Writes benchmarks/results/quantization-cpu.md and .json (machine, command, every number, the decision).
Numbers are ratios measured in one run on a shared machine, never asserted by tests.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _host import host_info  # noqa: E402 (benchmarks/ is on sys.path when run as a script)
from diffseg_engine.inputs import preprocess
from diffseg_engine.io import nifti_io
from diffseg_engine.artifacts.step_graph import STEP_INPUTS, STEP_OUTPUT
from diffseg_engine.backends.ort import OnnxRuntimeBackend, session_options, step_feeds
from diffseg_engine.inputs.cases import find_case
from diffseg_engine.evaluation.metrics import dice
from diffseg_engine.core.noise import NoiseStreams
from diffseg_engine.artifacts.onnx_file import DIGEST_KEY
from diffseg_engine.sampling.sampler import plan_sampling, sample_ensemble
from diffseg_engine.core.steps import host_runner

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DIFFSEG_DATA", ROOT.parent / "shared" / "data"))


# ---- data ----------------------------------------------------------------------------------------------

def load_case(folder: Path, card):
    """(network input [S, C, h, w], whole-tumour label [S, h, w]) with the card's preprocessing."""
    case = find_case(folder)
    paths = case.require(card.modalities)
    imgs = [nifti_io.load_image(p) for p in paths]
    prep = preprocess.prepare_case([i.data for i in imgs], imgs[0].affine, card.preprocessing, names=paths)
    lab = nifti_io.load_image(case.label)
    label = preprocess.prepare_label(lab.data, prep, lab.affine, source=case.label)
    return prep.inputs, label


def tumour_slices(label: np.ndarray, n: int) -> np.ndarray:
    """n positions evenly spread over the slices whose label has tumour."""
    tum = np.flatnonzero(label.reshape(len(label), -1).any(1))
    return tum[np.unique(np.round(np.linspace(0, len(tum) - 1, min(n, len(tum)))).astype(int))]


def session_step(sess):
    def step(image, x_t, timestep, coef, noise):
        return sess.run([STEP_OUTPUT], step_feeds(image, x_t, timestep, coef, noise))[0]
    return step


def record_trajectory(step, images, card, steps: int, seed: int, case_id: str) -> list[dict]:
    """Run one DDPM member per slice with `step`; the inputs of every step call, in call order."""
    rec: list[dict] = []

    def recording(image, x_t, timestep, coef, noise):
        rec.append({k: v.copy() for k, v in step_feeds(image, x_t, timestep, coef, noise).items()})
        return step(image, x_t, timestep, coef, noise)

    sample_ensemble(host_runner(recording), images, members=1, plan=plan_sampling(card, "ddpm", steps),
                    streams=NoiseStreams(seed, case_id), slice_ids=np.arange(len(images)), card=card,
                    batch_size=len(images))
    return rec


# ---- quantization --------------------------------------------------------------------------------------

#: The int8 variants tried. "S8S8" is onnxruntime's default QDQ recipe (int8 activations and weights); "U8S8"
#: (uint8 activations, int8 weights, one Q/DQ pair per consumer) is MLAS's native x86 path without VNNI, whose
#: u8 x s8 multiply-adds (vpmaddubsw) can saturate; "reduce_range" (7-bit weights) is onnxruntime's remedy.
VARIANTS = {
    "int8 S8S8": {"activation_type": "QInt8", "dedicated_qdq_pair": False, "reduce_range": False},
    "int8 U8S8": {"activation_type": "QUInt8", "dedicated_qdq_pair": True, "reduce_range": False},
    "int8 U8S8 reduce_range": {"activation_type": "QUInt8", "dedicated_qdq_pair": True, "reduce_range": True},
}
PARTS = ("speed", "profile", "options", "bf16", "quality")


def preprocess_for_quantization(model: Path, out: Path) -> tuple[Path, str]:
    """onnxruntime's quant_pre_process (ONNX shape inference + basic graph optimisation). Its symbolic shape
    inference gives up on this graph ("Incomplete symbolic shape inference"), so that part is skipped."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    try:
        quant_pre_process(str(model), str(out), skip_symbolic_shape=True)
        return out, "quant_pre_process(skip_symbolic_shape=True)"
    except Exception as exc:  # noqa: BLE001 - fall back to the exported graph as is
        return model, f"none (quant_pre_process failed: {type(exc).__name__}: {str(exc)[:120]})"


def quantize(src: Path, out: Path, calib: list[dict], cache: Path, *, activation_type: str,
             dedicated_qdq_pair: bool, reduce_range: bool) -> dict:
    """Static QDQ quantization of Conv and MatMul, per-channel int8 weights, MinMax ranges from `calib`
    (computed once, then read from `cache` by later variants: the ranges do not depend on the variant)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        """The recorded step inputs; `set_range` lets onnxruntime calibrate a few batches at a time."""

        def __init__(self):
            self.set_range(0, len(calib))

        def __len__(self):
            return len(calib)

        def set_range(self, start_index: int, end_index: int):
            self.it = iter(calib[start_index:end_index])

        def get_next(self):
            return next(self.it, None)

        def rewind(self):
            self.set_range(0, len(calib))

    # min/max over `stride` batches at a time, merged exactly (all intermediate outputs at once would not fit
    # in memory; onnxruntime's CalibMaxIntermediateOutputs drops the collected outputs instead of reducing them)
    stride = max(d for d in range(1, 6) if len(calib) % d == 0)
    cached = cache.is_file()
    t0 = time.perf_counter()
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, activation_type=getattr(QuantType, activation_type), weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul"], calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"CalibStridedMinMax": stride, "DedicatedQDQPair": dedicated_qdq_pair},
                    calibration_cache_path=str(cache))
    seconds = time.perf_counter() - t0
    m = onnx.load(str(out))
    # not the exporter's file any more: drop its content digest (the card stays, for reference)
    kept = [p for p in m.metadata_props if p.key != DIGEST_KEY]
    del m.metadata_props[:]
    m.metadata_props.extend(kept)
    onnx.save(m, str(out))
    return {"format": "QDQ", "per_channel": True, "activation_type": activation_type, "weight_type": "QInt8",
            "dedicated_qdq_pair": dedicated_qdq_pair, "reduce_range": reduce_range, "op_types_to_quantize": ["Conv", "MatMul"],
            "calibrate_method": "MinMax", "calibration_stride": stride, "ranges_from_cache": cached,
            "quantize_seconds": round(seconds, 1), "size_bytes": out.stat().st_size}


def optimized_ops(path: Path, tmp: Path) -> dict:
    """Op counts of the graph onnxruntime really runs (after its optimisations and QDQ fusion)."""
    import onnx
    opts = session_options()
    opts.optimized_model_filepath = str(tmp / (path.stem + "-ort-optimized.onnx"))
    make_session(path, opts)
    ops: dict[str, int] = {}
    for n in onnx.load(opts.optimized_model_filepath).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    keys = ("Conv", "QLinearConv", "QuantizeLinear", "DequantizeLinear", "Transpose", "ReorderInput",
            "ReorderOutput", "InstanceNormalization", "FusedMatMul", "QLinearMatMul")
    return {k: ops[k] for k in keys if k in ops}


def profile(path: Path, feeds: dict, tmp: Path, runs: int = 2) -> dict:
    """Per-op-type kernel time (ms per run) from onnxruntime's profiler, after one warm-up run."""
    opts = session_options()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / ("prof-" + path.stem))
    sess = make_session(path, opts)
    for _ in range(runs + 1):
        sess.run([STEP_OUTPUT], feeds)
    events = json.load(open(sess.end_profiling()))
    model_runs = sorted((e["ts"], e["dur"]) for e in events if e.get("name") == "model_run")
    warm_end = model_runs[0][0] + model_runs[0][1]  # the warm-up run's node events end before this
    kept = model_runs[1:]
    per: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > warm_end:
            per[e["args"]["op_name"]] = per.get(e["args"]["op_name"], 0.0) + e["dur"]
    top = sorted(per.items(), key=lambda kv: -kv[1])[:10]
    return {"model_run_ms": [round(d / 1e3, 1) for _, d in kept],
            "kernel_ms_per_run_by_op": {k: round(v / 1e3 / len(kept), 1) for k, v in top},
            "kernel_ms_per_run_total": round(sum(per.values()) / 1e3 / len(kept), 1)}


# ---- sessions ------------------------------------------------------------------------------------------

def make_session(path: Path, opts):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def option_variants() -> dict:
    import onnxruntime as ort

    def v(mutate=None, **config):
        opts = session_options(**config)
        if mutate:
            mutate(opts)
        return opts

    def level(lv):
        return lambda o: setattr(o, "graph_optimization_level", lv)

    def parallel(o):
        o.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        o.inter_op_num_threads = os.cpu_count() or 1

    return {
        "backend (ORT_ENABLE_ALL, sequential, spinning on)": v(),
        "ORT_ENABLE_EXTENDED (no NCHWc layout transform)": v(level(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)),
        "ORT_ENABLE_BASIC": v(level(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)),
        "intra_op.allow_spinning=0": v(**{"session.intra_op.allow_spinning": "0"}),
        "set_denormal_as_zero=1": v(**{"session.set_denormal_as_zero": "1"}),
        "intra_op_num_threads=1": v(lambda o: setattr(o, "intra_op_num_threads", 1)),
        "execution_mode=ORT_PARALLEL": v(parallel),
        "cpu mem arena + mem pattern off": v(lambda o: (setattr(o, "enable_cpu_mem_arena", False),
                                                         setattr(o, "enable_mem_pattern", False))),
    }


# ---- timing --------------------------------------------------------------------------------------------

def timing_batch(rows: list[dict], B: int) -> dict:
    """B recorded step inputs (mixed timesteps) stacked into one batch."""
    pick = [rows[i % len(rows)] for i in np.linspace(0, len(rows) - 1, B).round().astype(int)]
    # each recorded entry is a batch of slices: take one row of each, cycling through the rows
    out = {k: np.concatenate([p[k][j % len(p[k]):j % len(p[k]) + 1] for j, p in enumerate(pick)]) for k in STEP_INPUTS}
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def best_interleaved(fns: dict, rounds: int) -> dict:
    """{name: best seconds per call}, calling each fn once per round in turn (after one warm-up each)."""
    for f in fns.values():
        f()
    runs = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            runs[k].append(time.perf_counter() - t0)
    return {k: {"best_s": min(v), "runs_s": [round(x, 4) for x in v]} for k, v in runs.items()}


def torch_reference(card, weights: Path):
    import torch
    from diffseg_engine.train.reference import reference_sample
    from diffseg_engine.train.step import build_step
    from diffseg_engine.artifacts.weights import load_weights
    tensors, wcard = load_weights(weights)
    if wcard.weights_sha256 and card.weights_sha256 and wcard.weights_sha256 != card.weights_sha256:
        raise SystemExit(f"{weights} is not the weights of the ONNX model")
    net = build_step(wcard, tensors).net
    torch.set_grad_enabled(False)
    return net, reference_sample


def bf16_conv(rounds: int) -> dict:
    """A 3x3 conv of the network's commonest shape (32 -> 32 channels, 112x112, batch 4), fp32 vs bf16."""
    import torch
    import torch.nn.functional as F
    x = torch.randn(4, 32, 112, 112)
    w = torch.randn(32, 32, 3, 3) * 0.05
    xb, wb = x.bfloat16(), w.bfloat16()
    with torch.no_grad():
        res = best_interleaved({"fp32": lambda: F.conv2d(x, w, padding=1),
                                "bf16": lambda: F.conv2d(xb, wb, padding=1)}, rounds)
    return {"shape": "conv2d 32->32 3x3, input [4,32,112,112], torch eager",
            "fp32_ms": res["fp32"]["best_s"] * 1e3, "bf16_ms": res["bf16"]["best_s"] * 1e3,
            "bf16_over_fp32": res["bf16"]["best_s"] / res["fp32"]["best_s"]}


# ---- main ----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "diffseg_engine" / "models" / "default.onnx")
    ap.add_argument("--weights", type=Path, default=None, help="safetensors for the torch reference "
                    "(default: the .safetensors next to --model)")
    ap.add_argument("--calib-case", type=Path, default=DATA / "train" / "BraTS18_CBICA_AOO")
    ap.add_argument("--calib-slices", type=int, default=8)
    ap.add_argument("--calib-steps", type=int, default=25)
    ap.add_argument("--eval-case", type=Path, default=DATA / "train" / "BraTS18_CBICA_ASK")
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ref-members", type=int, default=2, help="torch eager members per round (4 DDPM steps each)")
    ap.add_argument("--min-speedup", type=float, default=1.05, help="int8 counts as faster above this ratio")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"which of {','.join(PARTS)} to run")
    ap.add_argument("--render-only", action="store_true", help="only rewrite <name>.md from <name>.json")
    ap.add_argument("--merge", action="store_true", help="update the parts run here in an existing <name>.json "
                    "(and regenerate the .md from it); each part records its own command and machine load")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="quantization-cpu")
    args = ap.parse_args()
    t_start = time.perf_counter()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    json_path, md_path = args.out / f"{args.name}.json", args.out / f"{args.name}.md"
    if args.render_only:
        md_path.write_text(markdown(json.loads(json_path.read_text()), "torch eager, one member at a time"))
        return
    res: dict = json.loads(json_path.read_text()) if args.merge and json_path.is_file() else {}
    machine = host_info()
    cmd = (f"nice -n {os.nice(0)} " if os.nice(0) else "") + "python " + " ".join(sys.argv)
    res["machine"] = {k: v for k, v in machine.items() if k != "load_avg_at_start"}
    res.setdefault("runs", {})
    keys = {"speed": ("speed", "speed_setup"), "profile": ("profile",), "options": ("session_option_variants_fp32",),
            "bf16": ("bf16",), "quality": ("quality",)}
    for p in parts:  # a part run again: its previous result moves to `earlier_runs` (the machine is noisy)
        if p in res["runs"] and all(k in res for k in keys[p]):
            res.setdefault("earlier_runs", []).append({"part": p, "run": res["runs"][p],
                                                       "result": {k: res.pop(k) for k in keys[p]}})
    for p in parts:
        res["runs"][p] = {"command": cmd, "load_avg_at_start": machine["load_avg_at_start"],
                          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(machine, flush=True)

    fp32 = OnnxRuntimeBackend.load(args.model, device="cpu")
    card = fp32.card
    opts = session_options()
    res["session_options"] = {"graph_optimization_level": "ORT_ENABLE_ALL",
                              "intra_op_num_threads": opts.intra_op_num_threads, "providers": ["CPUExecutionProvider"]}

    # 1. calibration data along a real trajectory
    cid = find_case(args.calib_case).case_id
    cimg, clab = load_case(args.calib_case, card)
    cpos = tumour_slices(clab, args.calib_slices)
    t0 = time.perf_counter()
    calib = record_trajectory(fp32.infer, cimg[cpos], card, args.calib_steps, args.seed, cid)
    ts = sorted({float(r["timestep"][0]) for r in calib})
    res["calibration"] = {"case": cid, "slices": cpos.tolist(), "trajectory": f"ddpm {args.calib_steps} steps, fp32",
                          "batches": len(calib), "samples": sum(len(r["x_t"]) for r in calib),
                          "timesteps_min_max_count": [min(ts), max(ts), len(ts)],
                          "record_seconds": round(time.perf_counter() - t0, 1)}
    print("calibration", res["calibration"], flush=True)

    # 2. quantize
    tmp = Path(tempfile.mkdtemp(prefix="diffseg-quant-"))
    src, pre = preprocess_for_quantization(args.model, tmp / "pre.onnx")
    res["quantization"] = {"preprocess": pre, "fp32_size_bytes": args.model.stat().st_size, "variants": {}}
    res["ort_optimized_ops"] = {"fp32": optimized_ops(args.model, tmp)}
    sessions, paths = {}, {}
    for i, name in enumerate(variants):
        paths[name] = tmp / f"int8-{i}.onnx"
        res["quantization"]["variants"][name] = quantize(src, paths[name], calib, tmp / "ranges.json", **VARIANTS[name])
        res["ort_optimized_ops"][name] = optimized_ops(paths[name], tmp)
        sessions[name] = make_session(paths[name], opts)
        print("quantized", name, res["quantization"]["variants"][name], res["ort_optimized_ops"][name], flush=True)

    # per-step output difference on recorded inputs (same input, fp32 vs int8 step graph)
    res["step_difference"] = {name: [] for name in variants}
    for r in calib[:: max(1, len(calib) // 6)]:
        a = fp32.session.run([STEP_OUTPUT], r)[0]
        for name in variants:
            b = sessions[name].run([STEP_OUTPUT], r)[0]
            res["step_difference"][name].append({"timestep": float(r["timestep"][0]),
                                                 "max_abs": float(np.abs(a - b).max()),
                                                 "mean_abs": float(np.abs(a - b).mean())})

    # 3. speed, interleaved
    ref_key = "torch eager, one member at a time"
    if "speed" in parts:
        res["speed"] = measure_speed(args, card, fp32, sessions, variants, batches, calib, cimg[cpos], ref_key)
        res["speed_setup"] = {"variants": variants, "batches": batches, "rounds": args.rounds,
                              "ref_members": args.ref_members}
    if "profile" in parts:
        f = timing_batch(calib, batches[0])
        res["profile"] = {"batch": batches[0], "fp32": profile(args.model, f, tmp)}
        for n in variants:
            res["profile"][n] = profile(paths[n], f, tmp)
        print("profile", res["profile"], flush=True)
    if "options" in parts:
        f = timing_batch(calib, batches[0])
        osess = {k: make_session(args.model, o) for k, o in option_variants().items()}
        t = best_interleaved({k: (lambda s=s: s.run([STEP_OUTPUT], f)) for k, s in osess.items()}, args.rounds)
        base = t[next(iter(t))]["best_s"]
        res["session_option_variants_fp32"] = {
            "batch": batches[0], "rounds": args.rounds,
            "variants": {k: {"ms_per_member_step": v["best_s"] / batches[0] * 1e3,
                             "speedup_over_backend": base / v["best_s"], "runs_s": v["runs_s"]} for k, v in t.items()}}
        print("options", res["session_option_variants_fp32"], flush=True)
        del osess
    if "bf16" in parts:
        res["bf16"] = bf16_conv(args.rounds)
        print("bf16", res["bf16"], flush=True)

    # 4. quality at equal noise
    if "quality" in parts:
        res["quality"] = measure_quality(args, card, fp32, sessions, variants)

    # 5. decision
    for p in parts:
        res["runs"][p]["seconds_whole_invocation"] = round(time.perf_counter() - t_start, 1)
    if "speed" in res and "quality" in res:
        res["decision"] = decide(res, args.min_speedup)
        print(json.dumps(res["decision"], indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1, default=float) + "\n")
    md_path.write_text(markdown(res, ref_key))


def measure_speed(args, card, fp32, sessions, variants, batches, calib, ref_img, ref_key) -> dict:
    """ms per member-step: fp32, each int8 variant and (at the first batch size) torch eager one member at a
    time, all interleaved round by round; best of args.rounds."""
    net, reference_sample = torch_reference(card, args.weights or args.model.with_suffix(".safetensors"))
    ref_streams = NoiseStreams(args.seed, "reference")
    speed = {}
    for B in batches:
        f = timing_batch(calib, B)
        fns = {"onnxruntime fp32": lambda f=f: fp32.session.run([STEP_OUTPUT], f)}
        fns.update({f"onnxruntime {n}": (lambda f=f, s=sessions[n]: s.run([STEP_OUTPUT], f)) for n in variants})
        if B == batches[0]:
            fns[ref_key] = lambda: [reference_sample(net, card, ref_img[i % len(ref_img)], ref_streams.generator(i, 0),
                                                     sampler="ddpm", steps=4) for i in range(args.ref_members)]
        t = best_interleaved(fns, args.rounds)
        per = {k: v["best_s"] / (args.ref_members * 4 if k == ref_key else B) * 1e3 for k, v in t.items()}
        speed[B] = {"ms_per_member_step": per, "runs_s": {k: v["runs_s"] for k, v in t.items()},
                    "int8_speedup_over_fp32": {n: per["onnxruntime fp32"] / per[f"onnxruntime {n}"] for n in variants}}
        print("speed", B, speed[B], flush=True)
    ref = speed[batches[0]]["ms_per_member_step"][ref_key]
    for B in batches:
        speed[B]["p2_torch_eager_over_onnxruntime"] = {k: ref / v for k, v in speed[B]["ms_per_member_step"].items()
                                                       if k.startswith("onnxruntime")}
    return {str(B): v for B, v in speed.items()}


def measure_quality(args, card, fp32, sessions, variants) -> dict:
    """Dice of (mean > 0.5) vs the label for fp32 and each int8 variant at the same noise, plus fp32 with the
    next seed: how much Dice moves when only the noise changes (the yardstick for a 0.01 tolerance)."""
    eid = find_case(args.eval_case).case_id
    eimg, elab = load_case(args.eval_case, card)
    epos = tumour_slices(elab, args.slices)
    gt = elab[epos] > 0
    plan = plan_sampling(card, "ddpm", args.steps)
    q = {"case": eid, "slices": epos.tolist(), "members": args.members, "sampler": f"ddpm {args.steps} steps",
         "seed": args.seed, "runs": {}}
    means = {}
    control = f"fp32, seed {args.seed + 1} (noise control)"
    runs = [("fp32", fp32.infer, args.seed)] + [(n, session_step(sessions[n]), args.seed) for n in variants] \
        + [(control, fp32.infer, args.seed + 1)]
    for name, step, seed in runs:
        t0 = time.perf_counter()
        stats = sample_ensemble(host_runner(step), eimg[epos], members=args.members, plan=plan, streams=NoiseStreams(seed, eid),
                                slice_ids=epos, card=card, batch_size=len(epos) * args.members)
        secs = time.perf_counter() - t0
        means[name] = stats.mean
        pred = means[name] > 0.5
        r = {"seed": seed, "dice_pooled": dice(pred, gt),
             "dice_per_slice": [dice(pred[i], gt[i]) for i in range(len(epos))],
             "predicted_voxels": int(pred.sum()), "label_voxels": int(gt.sum()),
             "seconds": round(secs, 1), "ms_per_member_step": secs / (len(epos) * args.members * args.steps) * 1e3}
        r["dice_per_slice_mean"] = float(np.mean(r["dice_per_slice"]))
        if name != "fp32":
            d = np.abs(means["fp32"] - means[name])
            r.update({"dice_change_pooled": r["dice_pooled"] - q["runs"]["fp32"]["dice_pooled"],
                      "dice_change_per_slice_mean": r["dice_per_slice_mean"] - q["runs"]["fp32"]["dice_per_slice_mean"],
                      "mean_map_max_abs_diff": float(d.max()), "mean_map_mean_abs_diff": float(d.mean()),
                      "dice_of_mask_vs_fp32_mask": dice(pred, means["fp32"] > 0.5)})
        q["runs"][name] = r
        print("quality", name, {k: v for k, v in r.items() if k != "dice_per_slice"}, flush=True)
    q["control"] = control
    return q


def decide(res: dict, min_speedup: float) -> dict:
    speed, q = res["speed"], res["quality"]
    dec = {"rule": f"keep int8 only if it is faster than fp32 (speed-up >= {min_speedup} at every batch size) "
                   "and |Dice change| <= 0.01 (pooled and per-slice mean)", "variants": {}}
    ctrl = q["runs"].get(q.get("control", ""), {})
    if ctrl:
        dec["noise_control_dice_change"] = {"pooled": ctrl["dice_change_pooled"],
                                            "per_slice_mean": ctrl["dice_change_per_slice_mean"]}
    for n in res["speed_setup"]["variants"]:
        if n not in q["runs"]:
            continue
        r = q["runs"][n]
        faster = all(s["int8_speedup_over_fp32"][n] >= min_speedup for s in speed.values())
        within = abs(r["dice_change_pooled"]) <= 0.01 and abs(r["dice_change_per_slice_mean"]) <= 0.01
        dec["variants"][n] = {"faster": faster, "dice_within_0.01": within, "keep": faster and within}
    dec["keep_any"] = any(v["keep"] for v in dec["variants"].values())
    return dec


def markdown(res: dict, ref_key: str) -> str:
    m = res["machine"]
    L = ["# int8 static quantization of the step graph on CPU (P2)", "",
         f"Machine: {m['host']} — {m['cpu']} (family {m['cpu_family']}, i.e. Zen 3; SIMD: {', '.join(m['simd_flags'])}; "
         f"no VNNI, no AVX-512, no bf16 instructions), {m['logical_cpus']} logical CPUs shared with other jobs, "
         f"Python {m['python']}, onnxruntime {m['onnxruntime']}, torch {m['torch']} ({m['torch_threads']} threads).", "",
         "Commands (each part records the load average at its start: the 2 cores are shared, so every speed "
         "number below is compared only with numbers from the same interleaved rounds):", ""]
    for p, r in res["runs"].items():
        L.append(f"- {p}: `{r['command']}` (started {r['started']}, load average {r['load_avg_at_start']:.1f}, "
                 f"whole invocation {r.get('seconds_whole_invocation', float('nan')):.0f} s)")
    c = res["calibration"]
    L += ["", "## Setup", "",
          f"- Session options (as `OnnxRuntimeBackend.load(..., device='cpu')`): ORT_ENABLE_ALL, "
          f"intra_op_num_threads={res['session_options']['intra_op_num_threads']}, CPUExecutionProvider; int8 files "
          "opened with a plain `InferenceSession` with the same options (the backend checks the exporter's content "
          "digest and would refuse a rewritten graph), fed exactly as `OnnxRuntimeBackend.infer` feeds.",
          f"- Calibration: {c['samples']} real step inputs = {len(c['slices'])} tumour slices of training case "
          f"{c['case']} (card preprocessing, FLAIR) x every step of a {c['trajectory']} trajectory (timesteps "
          f"{c['timesteps_min_max_count'][0]:.0f}..{c['timesteps_min_max_count'][1]:.0f}, "
          f"{c['timesteps_min_max_count'][2]} levels, with each step's real x_t, coef row and noise).",
          "- Quantization: `quantize_static`, QDQ, per-channel int8 weights, MinMax ranges (computed once, shared "
          "by the variants), op_types_to_quantize=[Conv, MatMul]: InstanceNorm, SiLU, softmax, the time embedding "
          f"and the fused DDPM update stay fp32; preprocessing: {res['quantization']['preprocess']}.", "",
          "| variant | activations | reduce_range | dedicated Q/DQ pairs | Conv / QLinearConv after ORT fusion | "
          "Q / DQ nodes | file |", "|---|---|---|---|---|---|---|"]
    ops = res["ort_optimized_ops"]
    L.append(f"| fp32 | fp32 | - | - | {ops['fp32'].get('Conv', 0)} / 0 | 0 / 0 | "
             f"{res['quantization']['fp32_size_bytes'] / 1e6:.1f} MB |")
    for n, v in res["quantization"]["variants"].items():
        o = ops[n]
        L.append(f"| {n} | {v['activation_type']} | {v['reduce_range']} | {v['dedicated_qdq_pair']} | "
                 f"{o.get('Conv', 0)} / {o.get('QLinearConv', 0)} | {o.get('QuantizeLinear', 0)} / "
                 f"{o.get('DequantizeLinear', 0)} | {v['size_bytes'] / 1e6:.1f} MB |")
    if "speed" in res:
        sp, variants = res["speed"], res["speed_setup"]["variants"]
        batches = list(sp)
        L += ["", f"## Speed (interleaved rounds, best of {res['speed_setup']['rounds']}; ms per member-step)", "",
              "| batch | " + " | ".join(["fp32"] + variants) + " | " + " | ".join(f"{n} speed-up" for n in variants)
              + " |", "|---" * (2 + 2 * len(variants)) + "|"]
        for B in batches:
            per = sp[B]["ms_per_member_step"]
            L.append(f"| {B} | " + " | ".join(f"{per['onnxruntime ' + k]:.1f}" for k in ["fp32"] + variants)
                     + " | " + " | ".join(f"**{sp[B]['int8_speedup_over_fp32'][n]:.2f}x**" for n in variants) + " |")
        ref = sp[batches[0]]["ms_per_member_step"][ref_key]
        L += ["", f"Torch eager, one member at a time (DDPM, the reference code's way; {res['speed_setup']['ref_members']}"
                  f" members x 4 steps per round), interleaved with the batch-{batches[0]} rounds: **{ref:.1f} ms per "
                  "member-step**. P2 ratio (torch eager / batched onnxruntime, goal >= 2x):", "",
              "| batch | " + " | ".join(["fp32"] + variants) + " |", "|---" * (2 + len(variants)) + "|"]
        for B in batches:
            p2 = sp[B]["p2_torch_eager_over_onnxruntime"]
            L.append(f"| {B} | " + " | ".join(f"{p2['onnxruntime ' + k]:.2f}x" for k in ["fp32"] + variants) + " |")
        L += ["", "Every round's time (s per call) is in the .json (`speed.<batch>.runs_s`)."]
    if "profile" in res:
        pr = res["profile"]
        L += ["", f"## Where the time goes (onnxruntime profiler, batch {pr['batch']}, kernel ms per run, top 10)", ""]
        for k, v in pr.items():
            if k == "batch":
                continue
            top = ", ".join(f"{op} {ms:.0f}" for op, ms in v["kernel_ms_per_run_by_op"].items())
            L.append(f"- {k}: all kernels {v['kernel_ms_per_run_total']:.0f} ms (model_run "
                     f"{' / '.join(f'{x:.0f}' for x in v['model_run_ms'])} ms): {top}")
    if "session_option_variants_fp32" in res:
        so = res["session_option_variants_fp32"]
        L += ["", f"## fp32 session options (batch {so['batch']}, interleaved, best of {so.get('rounds', '?')})", "",
              "| options | ms per member-step (best) | speed-up over the backend's options (best) | median of the "
              "rounds, ms per member-step |", "|---|---|---|---|"]
        for k, v in so["variants"].items():
            L.append(f"| {k} | {v['ms_per_member_step']:.1f} | {v['speedup_over_backend']:.2f}x | "
                     f"{float(np.median(v['runs_s'])) / so['batch'] * 1e3:.1f} |")
    if "bf16" in res:
        b = res["bf16"]
        L += ["", "## bf16", "", f"{b['shape']}: fp32 {b['fp32_ms']:.1f} ms, bf16 {b['bf16_ms']:.1f} ms "
              f"(**{b['bf16_over_fp32']:.0f}x slower**; best of interleaved rounds): this CPU has no bf16 "
              "instructions (no avx512_bf16 / AMX), so bf16 is emulated. bf16 is not pursued on CPU."]
    if "quality" in res:
        q = res["quality"]
        L += ["", f"## Quality at equal noise ({q['case']}, validation patient, {len(q['slices'])} tumour slices, "
              f"{q['sampler']}, N={q['members']}, seed {q['seed']})", "",
              "Dice of (ensemble mean > 0.5) vs the whole-tumour label on the network grid (112x112). Per-slice "
              "mean = the project's protocol (mean of the slices' Dice); pooled = all slices' voxels together "
              "(dominated by the slices with large false-positive areas). The last row is fp32 with the next seed: "
              "how far Dice moves when only the noise changes.", "",
              "| run | Dice per-slice mean | Dice pooled | change vs fp32 (per-slice / pooled) | mean maps: max / "
              "mean abs diff | Dice(mask, fp32 mask) | predicted / label voxels | wall s |",
              "|---|---|---|---|---|---|---|---|"]
        for k, r in q["runs"].items():
            if k == "fp32":
                L.append(f"| fp32 | {r['dice_per_slice_mean']:.4f} | {r['dice_pooled']:.4f} | - | - | - | "
                         f"{r['predicted_voxels']} / {r['label_voxels']} | {r['seconds']:.0f} |")
            else:
                L.append(f"| {k} | {r['dice_per_slice_mean']:.4f} | {r['dice_pooled']:.4f} | "
                         f"{r['dice_change_per_slice_mean']:+.4f} / {r['dice_change_pooled']:+.4f} | "
                         f"{r['mean_map_max_abs_diff']:.3f} / {r['mean_map_mean_abs_diff']:.4f} | "
                         f"{r['dice_of_mask_vs_fp32_mask']:.4f} | {r['predicted_voxels']} / {r['label_voxels']} | "
                         f"{r['seconds']:.0f} |")
        L += ["", "The wall times above are sequential runs on the shared machine, not interleaved; use the speed "
                  "table for ratios.", "",
              "One step, same input (recorded calibration inputs), |x_prev(int8) - x_prev(fp32)| max / mean:", ""]
        for n, ds in res["step_difference"].items():
            L.append(f"- {n}: " + "; ".join(f"t={d['timestep']:.0f}: {d['max_abs']:.3f} / {d['mean_abs']:.4f}"
                                             for d in ds))
    earlier = res.get("earlier_runs", [])
    if earlier:
        L += ["", "## Earlier runs of the same parts (same script; superseded above, kept because the machine is "
                  "shared and noisy)", ""]
        for e in earlier:
            head = f"- {e['part']} (started {e['run']['started']}, load average {e['run']['load_avg_at_start']:.1f})"
            r = e["result"]
            if e["part"] == "speed":
                for B, v in r["speed"].items():
                    per = v["ms_per_member_step"]
                    L.append(f"{head}, batch {B}, best of {r['speed_setup']['rounds']}, ms per member-step: "
                             + ", ".join(f"{k.replace('onnxruntime ', '')} {x:.1f}" for k, x in per.items()))
            elif e["part"] == "options":
                v = r["session_option_variants_fp32"]["variants"]
                L.append(f"{head}, fp32 speed-up over the backend's options: "
                         + ", ".join(f"{k} {x['speedup_over_backend']:.2f}x" for k, x in v.items()))
            else:
                L.append(f"{head}: see the .json")
    if "decision" in res:
        d = res["decision"]
        L += ["", "## Decision", "", f"Rule (the issue's): {d['rule']}.", ""]
        if "noise_control_dice_change" in d:
            nc = d["noise_control_dice_change"]
            L.append(f"Noise control: fp32 with another seed moves Dice by {nc['per_slice_mean']:+.4f} (per-slice) "
                     f"/ {nc['pooled']:+.4f} (pooled), so at this sample size ({len(res['quality']['slices'])} slices, "
                     f"N={res['quality']['members']}) a 0.01 tolerance is below the resolution of the test in both "
                     "directions. At the same seed the int8 masks agree with the fp32 mask at Dice "
                     + ", ".join(f"{res['quality']['runs'][n]['dice_of_mask_vs_fp32_mask']:.2f} ({n})"
                                 for n in d["variants"])
                     + f"; the re-seeded fp32 mask agrees at "
                     f"{res['quality']['runs'][res['quality']['control']]['dice_of_mask_vs_fp32_mask']:.2f}.")
            L.append("")
        for n, v in d["variants"].items():
            L.append(f"- {n}: faster: {v['faster']}, Dice within 0.01: {v['dice_within_0.01']} -> "
                     f"**{'keep' if v['keep'] else 'not kept'}**")
        nc = d.get("noise_control_dice_change")
        if not d["keep_any"] and nc and max(abs(nc["pooled"]), abs(nc["per_slice_mean"])) > 0.01:
            fast = [n for n, v in d["variants"].items() if v["faster"]]
            L += ["", "No variant meets the rule as measured. The faster ones (" + ", ".join(fast) + ") change Dice "
                  "by less than changing the seed does, so whether they stay within 0.01 is not settled by this "
                  "sample; settling it needs a much larger evaluation (e.g. the validation protocol: 137 slices, "
                  "N=10, several seeds), beyond a 10-minute run on this CPU."]
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
