"""Compare training recipes and samplers on whole validation volumes, through the engine's own entry points.

For each diffusion model (ONNX step graph, onnxruntime on the CPU) and sampler setting, every brain slice of
each validation case is sampled N times (`segment`'s path: `prepare_case` -> `sample_ensemble` -> `restore`);
the ensembles of the first k members (k in --sizes) are scored on the input grid:

* per slice, the paper's protocol (`evaluation.protocol.slice_scores`: slices whose ground truth holds tumour; Dice,
  HD95 by medpy's definition), pooled over the cases;
* per volume, 3D Dice and HD95 (mm);
* masks as `segment` writes them: mean > 0.5 without components under --min-component of the largest
  (`lesions.lesion_mask`, the engine's default), for the baseline as for the diffusion models; the 3D numbers
  of the plain mean > 0.5 are kept beside them (`*_raw`);
* uncertainty: voxel AUROC of the ensemble variance for wrong voxels (mask != ground truth) among the brain
  voxels of the slices whose ground truth holds tumour (`variance_auroc`), and the same for the binary entropy
  of the ensemble mean (`entropy_auroc`).

A deterministic U-Net baseline (`--baseline NAME=model.safetensors`, trained with `--objective segmentation`)
is run through torch on the same prepared slices; its uncertainty is the binary entropy of its sigmoid.

    python benchmarks/recipe_comparison.py --data ../shared/data/train \
        --cases BRATS2013_pat0002,BraTS18_CBICA_ASK --n 10 --sizes 1,5,10 \
        --model x0rec=runs/x0rec/model.onnx@ddim:5:1.0 --model x0rec=runs/x0rec/model.onnx@ddpm:10 \
        --baseline unet=runs/seg/model.safetensors --out benchmarks/results/recipe_comparison-cpu

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

from diffseg_engine.evaluation import metrics as M  # noqa: E402
from diffseg_engine.inputs.cases import discover_cases  # noqa: E402
from diffseg_engine.evaluation.calibration import auroc, binary_entropy  # noqa: E402
from diffseg_engine.evaluation.protocol import slice_scores  # noqa: E402
from diffseg_engine.maps.lesions import DEFAULT_MIN_COMPONENT, lesion_mask  # noqa: E402
from diffseg_engine.io.nifti_io import load_image  # noqa: E402
from diffseg_engine.core.noise import NoiseStreams  # noqa: E402
from diffseg_engine.inputs.preprocess import prepare_case, restore, slice_axis  # noqa: E402
from diffseg_engine.sampling.sampler import chosen_plan, sample_ensemble  # noqa: E402
from diffseg_engine.pipeline.models import open_model  # noqa: E402


def load_case(case, modalities):
    images = [load_image(p) for p in case.require(modalities)]
    gt = np.asarray(load_image(case.label).data) > 0
    return images, gt


def score(mean: np.ndarray, gt: np.ndarray, unc: dict[str, np.ndarray], affine, zooms, brain,
          min_component: float) -> dict:
    """3D and per-slice scores of one case's mask (from the mean map, as `segment` makes it), 3D scores of the
    plain mean > 0.5, and AUROC of each uncertainty map for the wrong voxels."""
    raw = mean > 0.5
    mask = lesion_mask(mean, zooms, min_component=min_component).mask.astype(bool)
    axis = slice_axis(affine, gt.shape)
    sl = slice_scores(mask, gt, axis, zooms)
    sp = np.asarray(zooms[:3], np.float64)
    out = {"dice_3d": M.dice(mask, gt), "hd95_3d_mm": M.hd95(mask, gt, sp),
           "dice_3d_raw": M.dice(raw, gt), "hd95_3d_raw_mm": M.hd95(raw, gt, sp),
           "pred_ml": float(mask.sum() * np.prod(sp) / 1000), "gt_ml": float(gt.sum() * np.prod(sp) / 1000),
           "slice_dice": sl.dice.tolist(), "slice_hd95": sl.hd95.tolist(), "slice_empty": sl.pred_empty.tolist(),
           "slice_gt_voxels": np.moveaxis(gt, axis, 0).sum(axis=(1, 2))[sl.index].tolist()}
    tumour_slices = np.moveaxis(gt, axis, 0).any(axis=(1, 2))
    region = np.moveaxis(np.moveaxis(brain, axis, 0) & tumour_slices[:, None, None], 0, axis)
    wrong = (mask != gt)[region]
    out["wrong_voxels"] = int(wrong.sum())
    out["region_voxels"] = int(region.sum())
    for name, u in unc.items():
        out[f"{name}_auroc"] = auroc(u[region], wrong)
    return out


def plan_from_spec(card, sampler_spec: str | None):
    """`sampler:steps[:eta[:mirror|plain]]` (missing parts: the card's) -> the engine's sampling plan."""
    if not sampler_spec:
        return chosen_plan(card)
    parts = sampler_spec.split(":")
    return chosen_plan(card, parts[0], int(parts[1]) if len(parts) > 1 else None,
                       float(parts[2]) if len(parts) > 2 else None,
                       {"mirror": True, "plain": False}[parts[3]] if len(parts) > 3 else None)


def run_diffusion(path: str, sampler_spec: str | None, cases, n: int, sizes: list[int], seed: int,
                  min_component: float) -> dict:
    eng = open_model(Path(path), "onnxruntime", "cpu")
    card = eng.card
    plan = plan_from_spec(card, sampler_spec)
    res = {"model": path, "card_name": card.name, "training": card.training, "plan": plan.describe(),
           "n": n, "seed": seed, "cases": {}, "sampling_s": 0.0}
    for case in cases:
        images, gt = load_case(case, card.modalities)
        ref = images[0]
        prepared = prepare_case([im.data for im in images], ref.affine, card.preprocessing)
        S = len(prepared.inputs)
        probs = np.zeros((S, n) + prepared.inputs.shape[-2:], np.float32)

        def keep(s, m, p):
            probs[s, m] = p
        t0 = time.perf_counter()
        sample_ensemble(eng.run_chunk, prepared.inputs, members=n, plan=plan, streams=NoiseStreams(seed, case.case_id),
                        slice_ids=prepared.slice_index, card=card, batch_size=64, on_member=keep)
        dt = time.perf_counter() - t0
        res["sampling_s"] += dt
        brain = np.zeros(gt.shape, bool)
        for im in images:
            brain |= np.asarray(im.data) != 0
        per_k = {}
        for k in sizes:
            mean = restore(prepared, probs[:, :k].mean(1))
            var = restore(prepared, probs[:, :k].var(1))
            per_k[str(k)] = score(mean, gt, {"variance": var, "entropy": binary_entropy(mean)},
                                  ref.affine, ref.image.header.get_zooms()[:3], brain, min_component)
        res["cases"][case.case_id] = {"sampling_s": dt, "slices": S, "by_k": per_k}
    return res


def run_baseline(path: str, cases, sizes: list[int], min_component: float) -> dict:
    import torch

    from diffseg_engine.train.losses import segmentation_input
    from diffseg_engine.train.unet import UNetModel, load_state_dict_strict
    from diffseg_engine.artifacts.weights import load_weights
    tensors, card = load_weights(path)
    net = UNetModel(card.architecture)
    load_state_dict_strict(net, {k: torch.as_tensor(v) for k, v in tensors.items()})
    net.eval()
    res = {"model": path, "card_name": card.name, "training": card.training, "plan": {"sampler": "deterministic"},
           "n": 1, "cases": {}, "sampling_s": 0.0}
    for case in cases:
        images, gt = load_case(case, card.modalities)
        ref = images[0]
        prepared = prepare_case([im.data for im in images], ref.affine, card.preprocessing)
        t0 = time.perf_counter()
        with torch.inference_mode():
            outs = []
            for lo in range(0, len(prepared.inputs), 64):
                x, t = segmentation_input(torch.from_numpy(prepared.inputs[lo:lo + 64]))
                outs.append(torch.sigmoid(net(x, t)[:, 0]).numpy())
        p = np.concatenate(outs)
        dt = time.perf_counter() - t0
        res["sampling_s"] += dt
        brain = np.zeros(gt.shape, bool)
        for im in images:
            brain |= np.asarray(im.data) != 0
        mean = restore(prepared, p)
        sc = score(mean, gt, {"entropy": binary_entropy(mean)}, ref.affine, ref.image.header.get_zooms()[:3], brain,
                   min_component)
        res["cases"][case.case_id] = {"sampling_s": dt, "slices": len(p), "by_k": {"1": sc}}
    return res


def summarise(res: dict) -> dict[str, dict]:
    """Per k: pooled per-slice means, per-case 3D numbers, AUROCs (mean over cases and per case)."""
    out = {}
    ks = next(iter(res["cases"].values()))["by_k"].keys()
    for k in ks:
        rows = [c["by_k"][k] for c in res["cases"].values()]
        d = np.concatenate([r["slice_dice"] for r in rows])
        h = np.concatenate([r["slice_hd95"] for r in rows])
        e = np.concatenate([r["slice_empty"] for r in rows]).astype(bool)
        s = {"slice_dice": float(d.mean()), "slice_dice_nonempty": float(d[~e].mean()) if (~e).any() else math.nan,
             "slice_hd95_nonempty_mm": float(np.nanmean(h[~e])) if (~e).any() else math.nan,
             "n_slices": int(len(d)), "n_empty": int(e.sum()),
             "dice_3d": [r["dice_3d"] for r in rows], "hd95_3d_mm": [r["hd95_3d_mm"] for r in rows],
             "dice_3d_raw": [r["dice_3d_raw"] for r in rows], "hd95_3d_raw_mm": [r["hd95_3d_raw_mm"] for r in rows],
             "pred_ml": [r["pred_ml"] for r in rows], "gt_ml": [r["gt_ml"] for r in rows]}
        for u in ("variance", "entropy"):
            if f"{u}_auroc" in rows[0]:
                s[f"{u}_auroc"] = [r[f"{u}_auroc"] for r in rows]
        out[k] = s
    return out


def _f(v, nd=3):
    if isinstance(v, list):
        return " / ".join(_f(x, nd) for x in v)
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def markdown(results: list[dict], meta: dict) -> str:
    cases = meta["cases"]
    lines = [f"# Recipe comparison ({meta['machine']})", "", f"Command: `{meta['command']}`", "",
             f"Validation cases (never trained on): {', '.join(cases)}. Per-slice: the paper's protocol over the "
             "slices whose ground truth holds tumour, pooled over both cases. 3D numbers and AUROCs are per case "
             f"({' / '.join(cases)}). AUROC: wrong voxels among the brain voxels of tumour slices. Masks as "
             f"`segment` writes them (components under {meta['min_component']:g} of the largest dropped); the last "
             "3D HD95 column: the plain mean > 0.5.", "",
             "| model | recipe | steps trained | sampler | k | slice Dice | (non-empty) | empty | slice HD95 mm | "
             "3D Dice | 3D HD95 mm | pred ml (gt ml) | variance AUROC | entropy AUROC | s/case | 3D HD95 mm, no clean-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tr = r["training"]
        recipe = tr.get("objective", "diffusion")
        if recipe == "diffusion":
            recipe = f"{tr.get('prediction', 'eps')}" + (" + recycling" if tr.get("recycling") else "") + \
                (f", b={tr.get('mask_scale')}" if tr.get("mask_scale") not in (None, 1.0) else "")
        else:
            recipe = "deterministic U-Net (BCE + Dice)"
        pl = r["plan"]
        samp = pl["sampler"] if pl["sampler"] == "deterministic" else \
            f"{pl['sampler']} {pl['steps']}" + (f" η={pl['eta']:g}" if pl["sampler"] == "ddim" else "") + \
            (", mirrored" if pl.get("mirror") else "")
        per_case_s = r["sampling_s"] / max(len(r["cases"]), 1)
        for k, s in r["summary"].items():
            ml = " / ".join(f"{p:.0f} ({g:.0f})" for p, g in zip(s["pred_ml"], s["gt_ml"]))
            lines.append(f"| {r['name']} | {recipe} | {tr.get('steps', '?')} | {samp} | {k} | {_f(s['slice_dice'])} | "
                         f"{_f(s['slice_dice_nonempty'])} | {s['n_empty']}/{s['n_slices']} | "
                         f"{_f(s['slice_hd95_nonempty_mm'], 1)} | {_f(s['dice_3d'])} | {_f(s['hd95_3d_mm'], 1)} | {ml} | "
                         f"{_f(s.get('variance_auroc')) if k != '1' else '—'} | {_f(s.get('entropy_auroc'))} | "
                         f"{per_case_s:.0f} | {_f(s['hd95_3d_raw_mm'], 1)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--cases", required=True, help="comma-separated case ids")
    ap.add_argument("--model", action="append", default=[],
                    help="NAME=PATH.onnx[@sampler:steps[:eta[:mirror|plain]]] (default: the card's sampler)")
    ap.add_argument("--baseline", action="append", default=[], help="NAME=PATH.safetensors")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--sizes", default="1,5,10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-component", type=float, default=DEFAULT_MIN_COMPONENT,
                    help="mask clean-up share, as `segment --min-component` (0: plain mean > 0.5)")
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--validation-record", help="also write this JSON: the shipped model's validation record "
                                                "(every diffusion row's summary, the protocol, the command)")
    a = ap.parse_args(argv)
    want = a.cases.split(",")
    by_id = {c.case_id: c for c in discover_cases(a.data)}
    cases = [by_id[i] for i in want]
    sizes = [int(k) for k in a.sizes.split(",")]
    results = []
    for spec in a.baseline:
        name, path = spec.split("=", 1)
        r = run_baseline(path, cases, sizes, a.min_component)
        r["name"], r["summary"] = name, summarise(r)
        results.append(r)
        print(f"{name}: {json.dumps(r['summary'])}", flush=True)
    for spec in a.model:
        name, rest = spec.split("=", 1)
        path, _, samp = rest.partition("@")
        r = run_diffusion(path, samp or None, cases, a.n, [k for k in sizes if k <= a.n], a.seed, a.min_component)
        r["name"], r["summary"] = name, summarise(r)
        results.append(r)
        print(f"{name} {r['plan']}: {json.dumps(r['summary'])}", flush=True)
    meta = {"command": "python " + " ".join([sys.argv[0].split("/work/main/")[-1], *sys.argv[1:]]),
            "machine": f"{host_info()['cpu']}, {host_info()['logical_cpus']} cores", "cases": want,
            "min_component": a.min_component}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    if a.validation_record:
        record = {"protocol": "whole validation volumes through the engine (onnxruntime, CPU): per-slice scores "
                              "of the paper's protocol (slices whose ground truth holds tumour, pooled), 3D Dice "
                              "and HD95 (medpy definition, mm) per case, voxel AUROC of the ensemble variance for "
                              "wrong voxels among the brain voxels of tumour slices; ensemble of k = mean of the "
                              "first k members' maps > 0.5, without components under min_component of the "
                              "largest (as segment writes the mask; *_raw: without that clean-up)",
                  "min_component": a.min_component,
                  "validation_cases": want, "measured_on": meta["machine"], "command": meta["command"],
                  "results": [{"name": r["name"], "model": r["model"], "plan": r["plan"], "n": r["n"],
                               "summary": r["summary"]} for r in results]}
        Path(a.validation_record).write_text(json.dumps(record, indent=1, default=float))


if __name__ == "__main__":
    main()
