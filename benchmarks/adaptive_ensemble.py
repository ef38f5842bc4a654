"""Adaptive ensemble size (`segment --n auto --n-max M`) against a fixed N = M, on real labelled cases.

For each case the shipped default model (or --model) segments the whole volume twice through `segment_case`
(the `segment` command's library path: preprocessing, sampler, maps restored to the input grid and written;
no overview picture), once with N = M members per slice and once with ``--n auto`` (n_max M and the given
n_min, n_step, tolerance), same seed, sampler and batch size. The order of the two runs alternates between
cases, so that a slow phase of the shared machine does not always hit the same one. Reported per case and
in total: members drawn, sampling and total wall time, their ratios, the 3D Dice of each mask (mean > 0.5)
against the ground truth (whole tumour = every label > 0), the largest and the mean absolute difference of
the mean and variance maps (over the brain voxels of the processed slices), and how many slices stopped
before M, with and without ground-truth tumour. Writes benchmarks/results/adaptive_ensemble-<tag>.md and .json.

    .venv/bin/python benchmarks/adaptive_ensemble.py --n-max 30
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import cpu_busy_s, host_info, own_cpu_s  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_case(case_dir: Path, backend, plan, size, batch_size: int, seed: int) -> dict:
    """One `segment_case` run into a temporary folder: maps, provenance, wall and CPU times, and how busy the
    whole machine was meanwhile (other processes share these cores)."""
    from diffseg_engine.pipeline.options import RunSettings
    from diffseg_engine.pipeline.segment import resolve_case, segment_case
    t0, cpu0, busy0 = time.perf_counter(), own_cpu_s(), cpu_busy_s()
    case = resolve_case([case_dir], [], backend.card)
    with tempfile.TemporaryDirectory(prefix="adaptive-") as tmp:
        res = segment_case(case, backend, Path(tmp), RunSettings(n=size, plan=plan, seed=seed, batch_size=batch_size,
                                                                 overview=False),
                           quiet=True, command="benchmarks/adaptive_ensemble.py")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "sampling_s": res.provenance["timings"]["sampling_s"],
            "cpu_s": own_cpu_s() - cpu0, "others_busy_cores": max(0.0, (cpu_busy_s() - busy0 - (own_cpu_s() - cpu0))
                                                                   / max(wall, 1e-9)),
            "mean": res.mean, "variance": res.variance, "mask": res.mask, "prov": res.provenance,
            "members": int(res.provenance["sampling"]["work_items"])}


def warm_up(backend, plan) -> None:
    """A few untimed engine calls at the CPU default batch size (32) before anything is measured."""
    from diffseg_engine.core.noise import NoiseStreams
    from diffseg_engine.sampling.sampler import sample_ensemble
    card = backend.card
    images = np.zeros((32, len(card.modalities), card.image_size, card.image_size), np.float32)
    backend.allocate(32)
    sample_ensemble(backend.run_chunk, images, members=1, plan=plan, streams=NoiseStreams(0, "warm-up"),
                    slice_ids=np.arange(32), card=card, batch_size=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "train"))
    ap.add_argument("--cases", default="BRATS2013_pat0002,BraTS18_CBICA_ASK",
                    help="comma-separated case folders under --data (default: the default model's validation "
                         "patients, never trained on)")
    ap.add_argument("--model", default=None, help=".onnx model (default: the shipped default)")
    ap.add_argument("--n-max", type=int, default=30, help="M: the fixed run's N and the auto run's cap")
    ap.add_argument("--n-min", type=int, default=None)
    ap.add_argument("--n-step", type=int, default=None)
    ap.add_argument("--n-tol", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=0, help="0: segment's default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    from diffseg_engine.evaluation.metrics import dice
    from diffseg_engine.io.nifti_io import load_image
    from diffseg_engine.pipeline.options import ensemble_size
    from diffseg_engine.sampling.sampler import chosen_plan
    from diffseg_engine.pipeline.models import default_model, open_model

    M = args.n_max
    auto = ensemble_size("auto", n_max=M, n_min=args.n_min, n_step=args.n_step, n_tol=args.n_tol)
    model = Path(args.model) if args.model else default_model()
    backend = open_model(model, "onnxruntime", "cpu", threads=args.threads)
    plan = chosen_plan(backend.card)
    warm_up(backend, plan)  # the first engine calls of a session are slow: not in the first timed run
    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    rows, busy0, t_all = [], cpu_busy_s(), time.perf_counter()
    for i, cid in enumerate(c.strip() for c in args.cases.split(",") if c.strip()):
        case_dir = Path(args.data) / cid
        gt_img = load_image(case_dir / f"{cid}_seg.nii.gz")
        gt = np.asarray(gt_img.data) > 0
        order = ("fixed", "auto") if i % 2 == 0 else ("auto", "fixed")
        runs = {}
        for kind in order:
            runs[kind] = run_case(case_dir, backend, plan, M if kind == "fixed" else auto, args.batch_size,
                                  args.seed)
            print(f"{cid} {kind}: {runs[kind]['members']} members, sampling {runs[kind]['sampling_s']:.1f} s, "
                  f"CPU {runs[kind]['cpu_s']:.1f} s, other processes {runs[kind]['others_busy_cores']:.2f} cores",
                  flush=True)
        f, a = runs["fixed"], runs["auto"]
        members = a["prov"]["sampling"]["members"]
        axis = members["slice_axis"]
        counts = np.array(members["per_slice"])
        gt_slices = np.moveaxis(gt, axis, 0)[np.array(members["slice_index"])].any(axis=(1, 2))
        brain = np.asarray(load_image(case_dir / f"{cid}_flair.nii.gz").data) != 0
        sel = np.zeros(gt.shape, bool)
        np.moveaxis(sel, axis, 0)[np.array(members["slice_index"])] = True
        where = brain & sel
        dmean = np.abs(a["mean"].astype(np.float64) - f["mean"])[where]
        dvar = np.abs(a["variance"].astype(np.float64) - f["variance"])[where]
        rows.append({
            "case": cid, "order": list(order), "slices": int(len(counts)),
            "slices_with_tumour": int(gt_slices.sum()),
            "members_fixed": f["members"], "members_auto": a["members"],
            "member_ratio": round(f["members"] / a["members"], 3),
            "sampling_s_fixed": round(f["sampling_s"], 1), "sampling_s_auto": round(a["sampling_s"], 1),
            "sampling_speedup": round(f["sampling_s"] / a["sampling_s"], 2),
            "wall_s_fixed": round(f["wall_s"], 1), "wall_s_auto": round(a["wall_s"], 1),
            "wall_speedup": round(f["wall_s"] / a["wall_s"], 2),
            "cpu_s_fixed": round(f["cpu_s"], 1), "cpu_s_auto": round(a["cpu_s"], 1),
            "cpu_speedup": round(f["cpu_s"] / a["cpu_s"], 2),
            "others_busy_cores_fixed": round(f["others_busy_cores"], 2),
            "others_busy_cores_auto": round(a["others_busy_cores"], 2),
            "dice3d_fixed": round(dice(f["mask"], gt), 4), "dice3d_auto": round(dice(a["mask"], gt), 4),
            "mask_voxels_differing": int((a["mask"] != f["mask"]).sum()),
            "mean_absdiff_max": float(dmean.max()), "mean_absdiff_mean": float(dmean.mean()),
            "variance_absdiff_max": float(dvar.max()), "variance_absdiff_mean": float(dvar.mean()),
            "stopped_early": int((counts < M).sum()),
            "stopped_early_tumour_slices": int((counts[gt_slices] < M).sum()),
            "stopped_early_tumour_free_slices": int((counts[~gt_slices] < M).sum()),
            "members_tumour_slices_mean": round(float(counts[gt_slices].mean()), 2) if gt_slices.any() else None,
            "members_tumour_free_slices_mean": round(float(counts[~gt_slices].mean()), 2)
            if (~gt_slices).any() else None,
            "counts_histogram": {str(int(k)): int(v) for k, v in zip(*np.unique(counts, return_counts=True))},
        })
    elapsed = time.perf_counter() - t_all
    busy = (cpu_busy_s() - busy0) / max(elapsed, 1e-9)
    tot = {k: sum(r[k] for r in rows) for k in ("members_fixed", "members_auto", "sampling_s_fixed",
                                                 "sampling_s_auto", "wall_s_fixed", "wall_s_auto", "cpu_s_fixed",
                                                 "cpu_s_auto")}
    info = host_info()
    result = {"command": command, "model": str(model.relative_to(REPO) if model.is_relative_to(REPO) else model),
              "plan": plan.describe(), "fixed_n": M, "auto": auto.describe(), "batch_size": args.batch_size,
              "seed": args.seed, "threads": args.threads or os.cpu_count(), "host": info,
              "machine_busy_cores_mean": round(busy, 2), "cases": rows, "total": tot}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"adaptive_ensemble-{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"adaptive_ensemble-{args.tag}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    a, M, t = r["auto"], r["fixed_n"], r["total"]
    L = [f"# Adaptive ensemble size: `--n auto --n-max {M}` against `--n {M}` ({r['host']['cpu']}, "
         f"{r['host']['logical_cpus']} logical CPUs)", "",
         f"Command: `{r['command']}`", "",
         f"Model `{r['model']}`, sampler {r['plan']['sampler']} {r['plan']['steps']} steps, eta {r['plan']['eta']}, "
         f"seed {r['seed']}, onnxruntime on the CPU, batch size {r['batch_size'] or 'default'}. Auto: first round "
         f"{a['n_min']} members, then rounds of {a['n_step']}; a slice stops after a round that changed its mean "
         f"and its variance by less than {a['n_tol']} at every pixel (checked from the second round on), at "
         f"most {a['n_max']}. Whole volumes through `segment_case` (maps restored to the input grid and written, "
         f"no overview picture); the two runs of a case alternate in order. One run each on the shared machine "
         f"(mean busy cores over the whole benchmark, this process included: {r['machine_busy_cores_mean']}); "
         f"\"others\" is how many cores other processes kept busy during a run. Wall times carry that noise; "
         f"this process's CPU seconds (all its threads) much less so.",
         "",
         "| case | slices (with tumour) | members fixed / auto | ratio | sampling s fixed / auto | speed-up | "
         "CPU s fixed / auto | CPU ratio | others (cores) fixed / auto | 3D Dice fixed / auto | "
         "mask voxels differing | mean: max / mean abs diff | variance: max / mean abs diff | "
         "slices stopped early (tumour / tumour-free) | mean members tumour / tumour-free slices |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        L.append(f"| {c['case']} | {c['slices']} ({c['slices_with_tumour']}) | {c['members_fixed']} / "
                 f"{c['members_auto']} | {c['member_ratio']}× | {c['sampling_s_fixed']} / {c['sampling_s_auto']} | "
                 f"{c['sampling_speedup']}× | {c['cpu_s_fixed']} / {c['cpu_s_auto']} | {c['cpu_speedup']}× | "
                 f"{c['others_busy_cores_fixed']} / {c['others_busy_cores_auto']} | {c['dice3d_fixed']} / "
                 f"{c['dice3d_auto']} | {c['mask_voxels_differing']} | {c['mean_absdiff_max']:.3g} / "
                 f"{c['mean_absdiff_mean']:.2g} | {c['variance_absdiff_max']:.3g} / {c['variance_absdiff_mean']:.2g} "
                 f"| {c['stopped_early']} ({c['stopped_early_tumour_slices']} / "
                 f"{c['stopped_early_tumour_free_slices']}) | {c['members_tumour_slices_mean']} / "
                 f"{c['members_tumour_free_slices_mean']} |")
    L += ["", f"Total: {t['members_fixed']} members fixed, {t['members_auto']} auto "
              f"({t['members_fixed'] / t['members_auto']:.2f}× fewer, {100 * (1 - t['members_auto'] / t['members_fixed']):.0f} % "
              f"saved); sampling {t['sampling_s_fixed']:.1f} s fixed, {t['sampling_s_auto']:.1f} s auto "
              f"({t['sampling_s_fixed'] / t['sampling_s_auto']:.2f}×); wall (with preprocessing and writing) "
              f"{t['wall_s_fixed']:.1f} s fixed, {t['wall_s_auto']:.1f} s auto "
              f"({t['wall_s_fixed'] / t['wall_s_auto']:.2f}×); CPU {t['cpu_s_fixed']:.1f} s fixed, "
              f"{t['cpu_s_auto']:.1f} s auto ({t['cpu_s_fixed'] / t['cpu_s_auto']:.2f}×).", "",
          "Where the slices stopped (members: slices):", ""]
    for c in r["cases"]:
        L.append(f"- {c['case']}: " + ", ".join(f"{k}: {v}" for k, v in c["counts_histogram"].items()))
    L += ["", "Differences are over the brain voxels of the processed slices, on the input grid. A slice that "
              "stopped at k members has exactly the maps of a fixed N = k run (tested in tests/test_adaptive_n.py), "
              "so the differences above are those between k and M members of the same noise streams.", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
