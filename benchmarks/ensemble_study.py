"""Is the ensemble a diffusion ensemble? Whole validation volumes through the engine, per patient and mean.

For each diffusion model and sampler (`NAME=PATH.onnx[@sampler:steps[:eta]]`), every brain slice of each
validation case is sampled twice with the same noise streams, through the engine's own entry points
(`prepare_case` -> `sample_ensemble` -> `restore`, onnxruntime on the CPU, seed 0):

* **mirroring off**, N members: the ensembles of the first k members (k in --sizes) are scored as `segment`
  writes the mask (mean > 0.5 without small components, `lesions.lesion_mask`): per-slice Dice by the paper's
  protocol (slices whose ground truth holds tumour; an empty mask counts 0), 3D Dice and HD95 (mm), empty
  masks on tumour slices by true lesion size, predicted volume; uncertainty: voxel AUROC for wrong voxels
  (mask != truth, brain voxels of tumour slices) of the ensemble variance and of the binary entropy of the
  ensemble mean; for k = 1 that entropy is one member's own;
* **mirroring on**, N members (even members plain, odd mirrored and mirrored back): the variance over the
  members split exactly into its within-view part (the mean of the two views' own variances: what the noise
  draws make) and its between-view part ((plain mean - mirrored mean)² / 4: what the mirror makes), summed
  over the network pixels of the tumour slices; `noise share` = within / total. Also the mean absolute
  difference between two plain members there, and the same scores as above for the mirrored ensemble.

A deterministic U-Net (`--baseline NAME=model.safetensors`, `--objective segmentation`) is scored on the same
slices (torch; its uncertainty is the entropy of its sigmoid).

    python benchmarks/ensemble_study.py --data ../shared/data/train --cases BRATS2013_pat0002,BraTS18_CBICA_ASK \
        --model default=diffseg_engine/models/default.onnx@ddim:2:1.0 --n 10 --sizes 1,2,5,10 \
        --baseline unet=runs/seg/model.safetensors --out benchmarks/results/ensemble_study-cpu

Writes OUT.json (every number, the command, the machine) and OUT.md (the tables).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import host_info  # noqa: E402
from grid_ceiling import empties_by_size, size_bin_labels  # noqa: E402
from recipe_comparison import binary_entropy, load_case, plan_from_spec, run_baseline, score  # noqa: E402

from diffseg_engine.inputs.cases import discover_cases  # noqa: E402
from diffseg_engine.maps.lesions import DEFAULT_MIN_COMPONENT  # noqa: E402
from diffseg_engine.core.noise import NoiseStreams  # noqa: E402
from diffseg_engine.inputs.preprocess import prepare_case, restore, slice_axis  # noqa: E402
from diffseg_engine.sampling.sampler import sample_ensemble  # noqa: E402
from diffseg_engine.pipeline.models import open_model  # noqa: E402


def sample_members(eng, plan, case, prepared, n: int, seed: int, batch_size: int) -> tuple[np.ndarray, float]:
    """Every member's probability map [S, n, h, w] float32 and the sampling seconds."""
    S = len(prepared.inputs)
    probs = np.zeros((S, n) + prepared.inputs.shape[-2:], np.float32)

    def keep(s, m, p):
        probs[s, m] = p
    t0 = time.perf_counter()
    sample_ensemble(eng.run_chunk, prepared.inputs, members=n, plan=plan, streams=NoiseStreams(seed, case.case_id),
                    slice_ids=prepared.slice_index, card=eng.card, batch_size=batch_size, on_member=keep)
    return probs, time.perf_counter() - t0


def variance_split(probs: np.ndarray, tumour: np.ndarray) -> dict:
    """Within-view / between-view split of the member variance of a mirrored ensemble (even members plain, odd
    mirrored), over the network pixels of the slices `tumour` [S] bool. Exact: total = within + between when
    both views have the same number of members."""
    p = probs[tumour].astype(np.float64)
    plain, mirr = p[:, 0::2], p[:, 1::2]
    within = 0.5 * (plain.var(1) + mirr.var(1))
    between = ((plain.mean(1) - mirr.mean(1)) / 2) ** 2
    total = p.var(1)
    out = {"total": float(total.sum()), "within": float(within.sum()), "between": float(between.sum())}
    out["noise_share"] = out["within"] / out["total"] if out["total"] > 0 else math.nan
    out["plain_member_abs_diff"] = float(np.abs(plain[:, 0] - plain[:, 1]).mean()) if plain.shape[1] > 1 else math.nan
    return out


def scores_by_k(prepared, probs: np.ndarray, sizes: list[int], gt, ref, brain, min_component: float) -> dict:
    zooms = ref.image.header.get_zooms()[:3]
    out = {}
    for k in sizes:
        mean = restore(prepared, probs[:, :k].mean(1))
        unc = {"entropy": binary_entropy(mean)}
        if k > 1:
            unc["variance"] = restore(prepared, probs[:, :k].var(1))
        sc = score(mean, gt, unc, ref.affine, zooms, brain, min_component)
        sc["empties_by_size"] = empties_by_size(np.asarray(sc["slice_gt_voxels"]), np.asarray(sc["slice_empty"], bool))
        out[str(k)] = sc
    return out


def run_model(name: str, spec: str, cases, n: int, sizes: list[int], seed: int, batch_size: int,
              min_component: float) -> dict:
    path, _, samp = spec.partition("@")
    eng = open_model(Path(path), "onnxruntime", "cpu")
    plan = plan_from_spec(eng.card, samp or None)
    res = {"name": name, "model": path, "training": eng.card.training, "plan": plan.describe(), "n": n,
           "seed": seed, "cases": {}}
    for case in cases:
        images, gt = load_case(case, eng.card.modalities)
        ref = images[0]
        prepared = prepare_case([im.data for im in images], ref.affine, eng.card.preprocessing)
        brain = np.zeros(gt.shape, bool)
        for im in images:
            brain |= np.asarray(im.data) != 0
        axis = slice_axis(ref.affine, gt.shape)
        tumour_slices = np.moveaxis(gt, axis, 0).any(axis=(1, 2))[prepared.slice_index]
        row = {"slices": len(prepared.inputs)}
        for mirror in (False, True):
            plan_m = plan.__class__(**{**plan.__dict__, "mirror": mirror})
            probs, dt = sample_members(eng, plan_m, case, prepared, n, seed, batch_size)
            key = "mirrored" if mirror else "plain"
            row[key] = {"sampling_s": dt, "by_k": scores_by_k(prepared, probs, sizes, gt, ref, brain, min_component)}
            if mirror:
                row[key]["split"] = variance_split(probs, tumour_slices)
            else:
                row[key]["split_plain"] = {"within": float(probs[tumour_slices].astype(np.float64).var(1).sum())}
        res["cases"][case.case_id] = row
        print(f"{name} {case.case_id}: plain N=1 {np.mean(row['plain']['by_k']['1']['slice_dice']):.3f} "
              f"N={sizes[-1]} {np.mean(row['plain']['by_k'][str(sizes[-1])]['slice_dice']):.3f}; noise share "
              f"{row['mirrored']['split']['noise_share']:.3f}", flush=True)
    return res


def baseline(name: str, path: str, cases, min_component: float) -> dict:
    r = run_baseline(path, cases, [1], min_component)
    out = {"name": name, "model": path, "training": r["training"], "plan": {"sampler": "deterministic"}, "n": 1,
           "cases": {}}
    for cid, c in r["cases"].items():
        sc = c["by_k"]["1"]
        sc["empties_by_size"] = empties_by_size(np.asarray(sc["slice_gt_voxels"]), np.asarray(sc["slice_empty"], bool))
        out["cases"][cid] = {"slices": c["slices"], "plain": {"sampling_s": c["sampling_s"], "by_k": {"1": sc}}}
    return out


def _m(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else math.nan


def summary(res: dict, view: str, k: str) -> dict:
    rows = [c[view]["by_k"][k] for c in res["cases"].values() if view in c and k in c[view]["by_k"]]
    if not rows:
        return {}
    pooled = np.concatenate([r["slice_dice"] for r in rows])
    out = {"slice_dice_pooled": float(pooled.mean()),
           "slice_dice_case_mean": _m([np.mean(r["slice_dice"]) for r in rows]),
           "dice_3d": _m([r["dice_3d"] for r in rows]), "dice_3d_min": float(min(r["dice_3d"] for r in rows)),
           "hd95_3d_mm": _m([r["hd95_3d_mm"] for r in rows]),
           "variance_auroc": _m([r.get("variance_auroc") for r in rows]),
           "entropy_auroc": _m([r.get("entropy_auroc") for r in rows]),
           "pred_ml": _m([r["pred_ml"] for r in rows]), "gt_ml": _m([r["gt_ml"] for r in rows])}
    for label in size_bin_labels():
        e = sum(r["empties_by_size"][label][0] for r in rows)
        t = sum(r["empties_by_size"][label][1] for r in rows)
        out[f"empty_{label}"] = [e, t]
    big = [sum(r["empties_by_size"][lab][i] for r in rows for lab in size_bin_labels()[1:]) for i in (0, 1)]
    out["empty_ge100"] = big
    return out


def _f(v, nd=3):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def markdown(results: list[dict], meta: dict, sizes: list[int]) -> str:
    cases = meta["cases"]
    L = [f"# Ensemble study ({meta['machine']})", "", f"Command: `{meta['command']}`", "",
         f"Validation patients (never trained on): {', '.join(cases)}. Seed {meta['seed']}, whole volumes through "
         "the engine (onnxruntime, CPU). Per-slice Dice: the paper's protocol (slices whose ground truth holds "
         "tumour; an empty mask counts 0), pooled over all patients' tumour slices and as the mean of the "
         "patients' means. 3D numbers: mean over patients. AUROC: wrong voxels among the brain voxels of tumour "
         "slices; for k = 1 the entropy is the member's own. Masks as `segment` writes them.", "",
         "## Ensembles without mirroring", "",
         "| model | sampler | k | slice Dice pooled | slice Dice (patient mean) | 3D Dice mean (min) | 3D HD95 mm | "
         "empty, lesion ≥ 100 vox | empty, lesion < 100 vox | variance AUROC | entropy AUROC | pred ml (gt ml) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def samp(r):
        p = r["plan"]
        if p["sampler"] == "deterministic":
            return "one forward"
        return f"{p['sampler']} {p['steps']}" + (f" η={p['eta']:g}" if p["sampler"] == "ddim" else "")
    for r in results:
        for k in ([1] if r["plan"]["sampler"] == "deterministic" else sizes):
            s = summary(r, "plain", str(k))
            if not s:
                continue
            e, small = s["empty_ge100"], s["empty_1-99"]
            L.append(f"| {r['name']} | {samp(r)} | {k} | {_f(s['slice_dice_pooled'])} | {_f(s['slice_dice_case_mean'])} | "
                     f"{_f(s['dice_3d'])} ({_f(s['dice_3d_min'])}) | {_f(s['hd95_3d_mm'], 1)} | "
                     f"{e[0]}/{e[1]} ({100 * e[0] / max(e[1], 1):.1f} %) | {small[0]}/{small[1]} | "
                     f"{_f(s['variance_auroc']) if k > 1 else '—'} | {_f(s['entropy_auroc'])} | "
                     f"{_f(s['pred_ml'], 0)} ({_f(s['gt_ml'], 0)}) |")
    L += ["", "## Where the variance comes from (mirrored ensembles)", "",
          f"Sum over the network pixels of the tumour slices of the member variance, split into the noise draws' "
          f"part (within a view) and the mirror's (between the plain and the mirrored members); N = {meta['n']}.", "",
          "| model | sampler | patient | noise share | between-view share | mean abs. difference of two plain members | "
          f"mirrored ensemble slice Dice, k = {sizes[-1]} | 3D Dice |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["plan"]["sampler"] == "deterministic":
            continue
        shares = []
        for cid, c in r["cases"].items():
            sp = c["mirrored"]["split"]
            shares.append(sp)
            bk = c["mirrored"]["by_k"][str(sizes[-1])]
            L.append(f"| {r['name']} | {samp(r)} | {cid} | {_f(sp['noise_share'])} | {_f(1 - sp['noise_share'])} | "
                     f"{_f(sp['plain_member_abs_diff'], 4)} | {_f(float(np.mean(bk['slice_dice'])))} | "
                     f"{_f(bk['dice_3d'])} |")
        tot = sum(s["total"] for s in shares)
        wit = sum(s["within"] for s in shares)
        sm = summary(r, "mirrored", str(sizes[-1]))
        L.append(f"| {r['name']} | {samp(r)} | **all (pooled)** | **{_f(wit / tot if tot else math.nan)}** | "
                 f"{_f(1 - wit / tot if tot else math.nan)} | {_f(_m([s['plain_member_abs_diff'] for s in shares]), 4)} | "
                 f"{_f(sm['slice_dice_pooled'])} | {_f(sm['dice_3d'])} |")
    L += ["", "## Per patient (ensembles without mirroring)", "",
          "| model | sampler | patient | k | slice Dice | 3D Dice | 3D HD95 mm | empty ≥ 100 vox | variance AUROC | "
          "entropy AUROC | pred ml (gt ml) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ks = [1] if r["plan"]["sampler"] == "deterministic" else [1, sizes[-1]] if 5 not in sizes else [1, 5]
        for cid, c in r["cases"].items():
            for k in ks:
                b = c["plain"]["by_k"][str(k)]
                e = [sum(b["empties_by_size"][lab][i] for lab in size_bin_labels()[1:]) for i in (0, 1)]
                L.append(f"| {r['name']} | {samp(r)} | {cid} | {k} | {_f(float(np.mean(b['slice_dice'])))} | "
                         f"{_f(b['dice_3d'])} | {_f(b['hd95_3d_mm'], 1)} | {e[0]}/{e[1]} | "
                         f"{_f(b.get('variance_auroc'))} | {_f(b.get('entropy_auroc'))} | "
                         f"{_f(b['pred_ml'], 0)} ({_f(b['gt_ml'], 0)}) |")
    return "\n".join(L) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/train")
    ap.add_argument("--cases", required=True, help="comma-separated case ids (the validation split)")
    ap.add_argument("--model", action="append", default=[], help="NAME=PATH.onnx[@sampler:steps[:eta]]")
    ap.add_argument("--baseline", action="append", default=[], help="NAME=PATH.safetensors")
    ap.add_argument("--n", type=int, default=10, help="members (even: half of them mirrored in the split run)")
    ap.add_argument("--sizes", default="1,2,5,10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--min-component", type=float, default=DEFAULT_MIN_COMPONENT)
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--validation-record", help="also write this JSON: the validation record shipped beside a "
                                                "model (the first --model's rows, the weights' sha256, the protocol, "
                                                "the command)")
    a = ap.parse_args(argv)
    by_id = {c.case_id: c for c in discover_cases(a.data)}
    want = a.cases.split(",")
    cases = [by_id[i] for i in want]
    sizes = [int(k) for k in a.sizes.split(",") if int(k) <= a.n]
    results = [baseline(*spec.split("=", 1), cases, a.min_component) for spec in a.baseline]
    for spec in a.model:
        name, rest = spec.split("=", 1)
        results.append(run_model(name, rest, cases, a.n, sizes, a.seed, a.batch_size, a.min_component))
    host = host_info()
    meta = {"command": "python " + " ".join(["benchmarks/ensemble_study.py", *sys.argv[1:]]),
            "machine": f"{host['cpu']}, {host['logical_cpus']} cores", "cases": want, "n": a.n, "seed": a.seed,
            "sizes": sizes}
    for r in results:
        r["summary"] = {view: {str(k): summary(r, view, str(k)) for k in sizes} for view in ("plain", "mirrored")}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(results, meta, sizes))
    print(markdown(results, meta, sizes))
    if a.validation_record:
        write_record(Path(a.validation_record), a.model[0].split("=", 1)[1].partition("@")[0], results, meta)


def write_record(path: Path, model: str, results: list[dict], meta: dict) -> None:
    """The shipped model's validation record: every row measured on `model`, with its weights' sha256 (the
    card's, which the file's tensors are checked against when loaded), so the record says which weights it
    describes."""
    from diffseg_engine.backends import read_card
    card = read_card(Path(model))
    rows = [r for r in results if r["model"] == model]
    record = {"weights_sha256": card.weights_sha256, "model_name": card.name,
              "protocol": "whole validation volumes through the engine (onnxruntime, CPU): per-slice scores of the "
                          "paper's protocol (slices whose ground truth holds tumour, pooled; empty masks count 0), "
                          "3D Dice and HD95 (medpy definition, mm) per patient, voxel AUROC of the ensemble variance "
                          "and of the entropy for wrong voxels among the brain voxels of tumour slices, empty masks "
                          "by true lesion size; masks as segment writes them; plain: members without mirroring, "
                          "mirrored: odd members mirrored (the variance split)",
              "validation_cases": meta["cases"], "measured_on": meta["machine"], "command": meta["command"],
              "seed": meta["seed"], "n": meta["n"],
              "results": [{"name": r["name"], "model": r["model"], "plan": r["plan"], "summary": r["summary"],
                           "variance_split": {cid: c["mirrored"]["split"] for cid, c in r["cases"].items()},
                           "per_patient": {cid: {view: {k: {m: v[m] for m in ("dice_3d", "hd95_3d_mm", "pred_ml",
                                                                              "gt_ml")}
                                                         | {"slice_dice": float(np.mean(v["slice_dice"]))}
                                                         for k, v in c[view]["by_k"].items()}
                                                  for view in ("plain", "mirrored")}
                                           for cid, c in r["cases"].items()}}
                          for r in rows]}
    path.write_text(json.dumps(record, indent=1, default=float))


if __name__ == "__main__":
    main()
