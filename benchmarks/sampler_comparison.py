"""Sampler and ensemble-size comparison on labelled validation patients (the README's quality table).

What it measures, on the axial slices whose ground truth holds tumour (the paper's Table 1 protocol):
  - the diffusion model with each sampler setting (DDPM over all 1000 steps, respaced DDPM, DDIM), ensembles
    of the first 1, 5 and N members; Dice, Jaccard, HD95 (medpy definition: 95th percentile of the pooled
    surface distances of both directions, in mm) and the number of empty predictions;
  - optionally a deterministic U-Net of the same backbone (`train --objective segmentation`), on the same
    slices and, because it is cheap, on whole volumes too (3D Dice / HD95, BraTS empty-mask policy).

Sampling goes through the engine: `sample_ensemble` on the torch backend's `run_chunk` (its device loop on
CUDA, the host loop on the CPU), chunks of up to --batch (slice, member) items, the engine's per-member Philox
noise streams (seed --seed, case key "sampler-comparison"). Configurations run in the
order given; with --deadline-s, one that would not finish in time (estimated from the measured rate) is
skipped (or, for DDPM over all steps, run with fewer members) and the report says so.

Usage (what produced benchmarks/results/sampler_comparison-*.md):
  python benchmarks/sampler_comparison.py --model RUN/model.safetensors --baseline BASE/model.safetensors \
      --data ../shared/data/train --cases BRATS2013_pat0002,BraTS18_CBICA_ASK --n 10 --device cuda \
      --configs ddim:10,ddim:25,ddim:50,ddpm:1000,ddpm:100,ddpm:250,ddim:100 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from _host import host_line  # noqa: E402 (benchmarks/ is on sys.path when run as a script)
from diffseg_engine.evaluation import metrics as M
from diffseg_engine.inputs.cases import discover_cases
from diffseg_engine.backends import open_backend
from diffseg_engine.core.noise import NoiseStreams
from diffseg_engine.evaluation.protocol import slice_scores
from diffseg_engine.io.nifti_io import load_image
from diffseg_engine.inputs.preprocess import prepare_case, restore
from diffseg_engine.sampling.sampler import plan_sampling, sample_ensemble
from diffseg_engine.train.losses import segmentation_input
from diffseg_engine.train.unet import UNetModel, load_state_dict_strict
from diffseg_engine.artifacts.weights import load_weights


@dataclass
class ValCase:
    case_id: str
    inputs: np.ndarray  # [S_sel, C, h, w] network input of every brain slice
    prepared: object  # PreparedCase (geometry for restore)
    gt: np.ndarray  # [X, Y, Z] bool, whole tumour
    affine: np.ndarray
    zooms: tuple[float, ...]
    tumour_pos: np.ndarray  # positions in inputs whose ground-truth slice holds tumour


def load_cases(root: str, ids: list[str], card) -> list[ValCase]:
    by_id = {c.case_id: c for c in discover_cases(root)}
    out = []
    for cid in ids:
        if cid not in by_id:
            sys.exit(f"error: case {cid} not found under {root}")
        c = by_id[cid]
        paths = c.require(card.modalities)
        imgs = [load_image(p) for p in paths]
        lab = load_image(c.label)
        prep = prepare_case([i.data for i in imgs], imgs[0].affine, card.preprocessing, names=paths)
        gt = lab.data > 0
        g = prep.geometry
        gt_axial = np.moveaxis(gt, g.axis, 0)
        has = gt_axial.any(axis=(1, 2))
        pos = np.flatnonzero(has[g.slice_index])
        out.append(ValCase(cid, prep.inputs, prep, gt, imgs[0].affine,
                           tuple(float(z) for z in imgs[0].image.header.get_zooms()[:3]), pos))
    return out


def _sync(backend) -> None:
    if backend.device.startswith("cuda"):
        torch.cuda.synchronize(backend.device)


def sample_members(backend, images: np.ndarray, members: int, plan, seed: int,
                   batch: int) -> tuple[np.ndarray, float]:
    """images [S, C, h, w] -> member probabilities [S, members, h, w] float32, and the seconds it took: the
    engine's sampler (`sample_ensemble` on the backend's `run_chunk`, the engine's Philox noise streams)."""
    S, _, h, w = images.shape
    out = np.empty((S, members, h, w), np.float32)
    _sync(backend)
    t0 = time.perf_counter()
    sample_ensemble(backend.run_chunk, images, members=members, plan=plan,
                    streams=NoiseStreams(seed, "sampler-comparison"), slice_ids=np.arange(S), card=backend.card,
                    batch_size=batch, on_member=lambda s, m, p: out.__setitem__((s, m), p))
    _sync(backend)
    return out, time.perf_counter() - t0


def score_members(cases: list[ValCase], probs: list[np.ndarray], sizes: list[int]) -> dict:
    """Pool the tumour slices of all cases; ensemble of k = mean of the first k member maps > 0.5."""
    res = {}
    for k in sizes:
        d, j, h, e = [], [], [], []
        for vc, p in zip(cases, probs):
            mean = p[:, :k].mean(axis=1)  # [S_t, h, w]
            full = np.zeros((vc.inputs.shape[0],) + mean.shape[1:], np.float32)
            full[vc.tumour_pos] = mean
            pred = restore(vc.prepared, full) > 0.5
            ss = slice_scores(pred, vc.gt, vc.prepared.geometry.axis, vc.zooms)
            d.append(ss.dice), j.append(ss.jaccard), h.append(ss.hd95), e.append(ss.pred_empty)
        d, j, h, e = (np.concatenate(a) for a in (d, j, h, e))
        ne = ~e
        res[str(k)] = {
            "slices": int(d.size), "empty_predictions": int(e.sum()),
            "dice": float(d.mean()), "jaccard": float(j.mean()), "hd95_mm": float(np.nanmean(h)) if ne.any() else None,
            "dice_nonempty": float(d[ne].mean()) if ne.any() else None,
            "jaccard_nonempty": float(j[ne].mean()) if ne.any() else None,
            "hd95_mm_nonempty": float(np.nanmean(h[ne])) if ne.any() else None,
        }
    return res


@torch.inference_mode()
def baseline_scores(path: str, cases: list[ValCase], device: torch.device) -> dict:
    """The deterministic U-Net: per-slice protocol on the tumour slices and whole-volume 3D scores."""
    tensors, card = load_weights(path)
    if card.training.get("objective") != "segmentation":
        sys.exit(f"error: {path} is not a deterministic baseline (train --objective segmentation)")
    net = UNetModel(card.architecture)
    load_state_dict_strict(net, {k: torch.from_numpy(v) for k, v in tensors.items()})
    net = net.to(device).eval()
    d, j, h, e, vol = [], [], [], [], []
    for vc in cases:
        probs = []
        for lo in range(0, len(vc.inputs), 256):
            x, t = segmentation_input(torch.from_numpy(vc.inputs[lo:lo + 256]).to(device))
            probs.append(torch.sigmoid(net(x, t)[:, 0].float()).cpu().numpy())
        pred = restore(vc.prepared, np.concatenate(probs)) > 0.5
        ss = slice_scores(pred, vc.gt, vc.prepared.geometry.axis, vc.zooms)
        d.append(ss.dice), j.append(ss.jaccard), h.append(ss.hd95), e.append(ss.pred_empty)
        vol.append({"case": vc.case_id, "dice_3d": M.dice(pred, vc.gt),
                    "hd95_3d_mm": M.hd95(pred, vc.gt, vc.zooms)})
    d, j, h, e = (np.concatenate(a) for a in (d, j, h, e))
    ne = ~e
    return {"steps": card.training.get("steps"), "per_slice": {
        "slices": int(d.size), "empty_predictions": int(e.sum()), "dice": float(d.mean()), "jaccard": float(j.mean()),
        "hd95_mm": float(np.nanmean(h)) if ne.any() else None,
        "dice_nonempty": float(d[ne].mean()) if ne.any() else None}, "volumes": vol}


def single_member_rate(backend, images: np.ndarray, plan) -> float:
    """The reference algorithm's shape of work: one member per call. Seconds per step."""
    one = np.zeros(1, np.int64)
    backend.run_chunk(images[:1], one, one, plan.coefs[:3], plan.timesteps[:3], (0, 0))  # warm-up
    _sync(backend)
    t0 = time.perf_counter()
    backend.run_chunk(images[:1], one, one, plan.coefs, plan.timesteps, (0, 0))
    _sync(backend)
    return (time.perf_counter() - t0) / len(plan.coefs)


def write_markdown(result: dict, path: Path) -> None:
    L = [f"# Sampler and ensemble comparison — {result['machine']}", "",
         f"Model: `{result['model']}` ({result['model_steps']} training steps). Validation patients: "
         f"{', '.join(result['cases'])}; {result['tumour_slices']} axial slices with tumour in the ground truth "
         "(the paper's per-slice protocol). HD95: medpy definition (95th percentile of the pooled surface "
         "distances of both directions), mm; mean over slices with a non-empty prediction. Dice of an empty "
         "prediction is 0.", "",
         f"Command: `{result['command']}`", "",
         "| sampler | steps | N | Dice | Dice (non-empty) | Jaccard | HD95 mm | empty | sampling s |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if r.get("skipped"):
            L.append(f"| {r['sampler']} | {r['steps']} | – | skipped: {r['skipped']} | | | | | |")
            continue
        for k, s in r["scores"].items():
            f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
            L.append(f"| {r['sampler']} | {r['steps']} | {k} | {f(s['dice'])} | {f(s['dice_nonempty'])} | "
                     f"{f(s['jaccard'])} | {f(s['hd95_mm_nonempty'])} | {s['empty_predictions']}/{s['slices']} | "
                     f"{r['seconds']:.1f} |")
    b = result.get("baseline")
    if b:
        s = b["per_slice"]
        L += ["", f"Deterministic U-Net, same backbone ({b['steps']} steps): per-slice Dice {s['dice']:.3f}, "
              f"non-empty {s['dice_nonempty'] if s['dice_nonempty'] is None else round(s['dice_nonempty'], 3)}, "
              f"Jaccard {s['jaccard']:.3f}, HD95 {s['hd95_mm'] if s['hd95_mm'] is None else round(s['hd95_mm'], 2)}"
              f" mm, empty {s['empty_predictions']}/{s['slices']}; whole volumes: "
              + ", ".join(f"{v['case']} Dice {v['dice_3d']:.3f} HD95 {v['hd95_3d_mm']:.1f} mm" for v in b["volumes"])]
    t = result.get("throughput")
    if t:
        L += ["", f"Throughput on this device: batched {t['batched_item_steps_per_s']:.0f} slice-steps/s "
              f"(batch {t['batch']}); one member per call {1 / t['single_member_s_per_step']:.0f} slice-steps/s "
              f"→ batching {t['batched_item_steps_per_s'] * t['single_member_s_per_step']:.0f}×."]
    path.write_text("\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cases", required=True, help="comma-separated validation case IDs")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--configs", default="ddim:10,ddim:25,ddim:50,ddpm:1000,ddpm:100,ddpm:250,ddim:100")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=4096, help="(slice, member) items per step call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline-s", type=float, default=0.0, help="wall-clock budget for this script (0: none)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--save-members", action="store_true", help="also write member maps (uint8 npz) per config")
    a = ap.parse_args(argv)
    t_begin = time.monotonic()
    backend = open_backend("torch", a.model, device=a.device)
    card = backend.card
    device = torch.device(backend.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cases = load_cases(a.data, [c.strip() for c in a.cases.split(",") if c.strip()], card)
    tumour_images = np.concatenate([vc.inputs[vc.tumour_pos] for vc in cases])
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = a.tag or ("gpu" if device.type == "cuda" else "cpu")
    result = {"machine": host_line(), "model": str(a.model), "model_steps": card.training.get("steps"),
              "model_training": card.training, "cases": [vc.case_id for vc in cases],
              "tumour_slices": int(len(tumour_images)), "n": a.n, "seed": a.seed,
              "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
              "runs": []}
    json_path, md_path = out_dir / f"sampler_comparison-{tag}.json", out_dir / f"sampler_comparison-{tag}.md"

    def flush() -> None:
        json_path.write_text(json.dumps(result, indent=1))
        write_markdown(result, md_path)

    if a.baseline:
        result["baseline"] = baseline_scores(a.baseline, cases, device)
        flush()
    S = len(tumour_images)
    sizes = sorted({1, 5, a.n} & set(range(1, a.n + 1)))
    # a short probe at the full batch (it also absorbs the first calls' autotuning) gives the first estimate
    probe = plan_sampling(card, "ddim", 3, 0.0)
    sample_members(backend, tumour_images[:max(1, min(S, a.batch // a.n))], a.n, probe, a.seed, a.batch)
    _, secs = sample_members(backend, tumour_images[:max(1, min(S, a.batch // a.n))], a.n, probe, a.seed, a.batch)
    rate = max(1, min(S, a.batch // a.n)) * a.n * 3 / secs  # measured item-steps per second
    for spec in a.configs.split(","):
        sampler, steps, *rest = spec.split(":")  # sampler:steps[:eta]
        steps, eta = int(steps), float(rest[0]) if rest else 0.0
        plan = plan_sampling(card, sampler, steps, eta)
        n = a.n
        run = {"sampler": sampler if sampler == "ddpm" else f"ddim η={eta:g}", "steps": steps, "eta": eta}
        if a.deadline_s:
            left = a.deadline_s - (time.monotonic() - t_begin) - 15.0
            est = S * n * steps / rate
            if est > left and sampler == "ddpm" and steps == card.diffusion.timesteps and S * 5 * steps / rate < left:
                n = 5
                run["note"] = f"N reduced from {a.n} to 5 to fit the time budget"
            elif est > left:
                run["skipped"] = f"estimated {est:.0f} s > {max(left, 0):.0f} s left"
                result["runs"].append(run)
                flush()
                continue
        probs_all, secs = sample_members(backend, tumour_images, n, plan, a.seed, a.batch)
        rate = S * n * steps / secs
        probs, off = [], 0
        for vc in cases:
            probs.append(probs_all[off:off + len(vc.tumour_pos)])
            off += len(vc.tumour_pos)
        run.update(n=n, seconds=secs, item_steps_per_s=rate,
                   scores=score_members(cases, probs, [k for k in sizes if k <= n]))
        if a.save_members:
            np.savez_compressed(out_dir / f"members-{tag}-{sampler}{steps}.npz",
                                **{vc.case_id: np.round(p * 255).astype(np.uint8) for vc, p in zip(cases, probs)})
        result["runs"].append(run)
        print(f"{sampler}:{steps} N={n}: {secs:.1f} s, " + ", ".join(
            f"N={k} Dice {s['dice']:.3f}" for k, s in run["scores"].items()), flush=True)
        flush()
    result["throughput"] = {"batch": min(a.batch, S * a.n), "batched_item_steps_per_s": rate,
                            "single_member_s_per_step": single_member_rate(backend, tumour_images, plan)}
    flush()
    return result


if __name__ == "__main__":
    main()
