"""The training run: config, loop, checkpoints and resume.

Owns: `TrainConfig`, `train()`, and the run folder layout:
  RUN_DIR/model.safetensors   EMA weights + model card (the deliverable; `segment --model` takes it)
  RUN_DIR/state.safetensors   raw weights, EMA, Adam moments, RNG states (for --resume; no pickle)
  RUN_DIR/config.json         the configuration and the patient-level split
  RUN_DIR/train_log.jsonl     one JSON line per logged step / validation
Imports: numpy, torch; `artifacts`, `core`, `data`, `losses`, `presets`, `sampling`, `unet`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from diffseg_engine.artifacts.card import ModelCard
from diffseg_engine.core.errors import DatasetError, UsageError
from diffseg_engine.core.progress import ProgressBar
from diffseg_engine.sampling.schedule import tables_for
from diffseg_engine.artifacts.weights import load_weights, read_metadata, save_weights

from .data import BatchSampler, SliceSet, flip_axis, labelled_cases, load_slices, split_cases
from .losses import TorchTables, hybrid_loss, segmentation_loss, x0_loss
from .presets import build_card, get_preset
from .unet import UNetModel

STATE_KEY = "diffseg_train_state"
OBJECTIVES = ("diffusion", "segmentation")
PREDICTIONS = ("eps", "x0")
TARGETS = ("binary", "soft")
AUGMENTATIONS = ("flip_lr",)  # what `flip` does: mirror left-right (the L axis of the canonical orientation)


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "cpu"
    modalities: tuple[str, ...] = ()
    steps: int = 0  # 0: the preset's (`Preset.train_steps`: 60 000 for the paper's, as the paper)
    batch_size: int = 0  # 0: the preset's
    lr: float = 0.0  # 0: the preset's
    ema_rate: float = 0.0  # 0: the preset's
    checkpoint_every: int = 500
    log_every: int = 25
    val_cases: tuple[str, ...] = ()
    val_count: int = -1  # -1: about 1/6 of the patients
    seed: int = 0
    precision: str = "auto"  # "auto" | "bf16" | "fp32"; auto measures which matmul is faster here
    flip: bool | None = None  # None: the preset's (`Preset.flip`; the paper used no augmentation)
    max_slices_per_case: int = 0  # 0: all brain slices
    threads: int = 0  # 0: all cores
    device: str = "auto"  # "auto" (CUDA when available) | "cpu" | "cuda" | "cuda:N"
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much training time; 0: no limit
    objective: str = "diffusion"  # "diffusion" (the DDPM) | "segmentation" (deterministic U-Net baseline)
    prediction: str = "eps"  # diffusion: "eps" (the paper) | "x0" (mask logit; MSE + BCE + Dice)
    recycling: bool = False  # x0: noise the model's own no-grad guess from pure noise instead of the truth
    mask_scale: float = 0.0  # masks at ±b (0: the preset's mask values)
    empty_share: float = -1.0  # share of tumour-free slices in a batch (< 0: the preset's tumour weighting)
    targets: str = "binary"  # "binary" (blocks with >= half tumour) | "soft" (each pixel's tumour area fraction)
    recycle_share: float = 1.0  # with recycling: the share of each batch that is recycled (the rest sees the truth)
    dice_weight: float = 1.0  # x0: weight of the soft-Dice term (0: MSE + BCE only)
    channels_last: bool = False  # NHWC activations (speed only)
    compile: bool = False  # torch.compile the training forward (speed only)
    split: dict = field(default_factory=dict)  # filled in: {"train": [...], "val": [...]}

    # what may differ between the first run and a --resume
    RESUMABLE = ("data", "out", "steps", "checkpoint_every", "log_every", "threads", "device", "max_minutes",
                 "channels_last", "compile")

    def resolved(self) -> "TrainConfig":
        p = get_preset(self.preset)
        return dataclasses.replace(
            self, modalities=tuple(self.modalities or p.default_modalities), steps=self.steps or p.train_steps,
            flip=p.flip if self.flip is None else bool(self.flip),
            batch_size=self.batch_size or p.batch_size, lr=self.lr or p.lr, ema_rate=self.ema_rate or p.ema_rate)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def bf16_is_faster(n: int = 256) -> bool:
    """Measure: is a bf16 matmul faster than fp32 on this CPU? (On CPUs without bf16 units it is ~100x slower.)"""
    a = torch.randn(n, n)
    timings = {}
    for dt in (torch.float32, torch.bfloat16):
        x = a.to(dt)
        x @ x
        t0 = time.perf_counter()
        for _ in range(5):
            x @ x
        timings[dt] = time.perf_counter() - t0
    return timings[torch.bfloat16] < 0.8 * timings[torch.float32]


def _check(cfg: TrainConfig) -> None:
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise UsageError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    if cfg.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if not 0.0 < cfg.ema_rate < 1.0:
        raise UsageError(f"--ema-rate must lie in (0, 1), got {cfg.ema_rate}")
    if cfg.checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every must be at least 1, got {cfg.checkpoint_every}")
    if cfg.objective not in OBJECTIVES:
        raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.prediction not in PREDICTIONS:
        raise UsageError(f"--prediction must be one of {', '.join(PREDICTIONS)}, got {cfg.prediction!r}")
    if cfg.recycling and cfg.prediction != "x0":
        raise UsageError("--recycling needs --prediction x0", fix="add --prediction x0, or drop --recycling")
    if not 0.0 <= cfg.mask_scale <= 1.0:
        raise UsageError(f"--mask-scale must lie in (0, 1] (0: the preset's masks), got {cfg.mask_scale}")
    if cfg.empty_share >= 1.0:
        raise UsageError(f"--empty-share must be below 1 (negative: the preset's weighting), got {cfg.empty_share}")
    if cfg.targets not in TARGETS:
        raise UsageError(f"--targets must be one of {', '.join(TARGETS)}, got {cfg.targets!r}")
    if not 0.0 < cfg.recycle_share <= 1.0:
        raise UsageError(f"--recycle-share must lie in (0, 1], got {cfg.recycle_share}")
    if cfg.recycle_share < 1.0 and not cfg.recycling:
        raise UsageError("--recycle-share needs --recycling", fix="add --recycling, or drop --recycle-share")
    if cfg.dice_weight < 0:
        raise UsageError(f"--dice-weight must not be negative, got {cfg.dice_weight}")
    if cfg.max_minutes < 0:
        raise UsageError(f"--max-minutes must not be negative, got {cfg.max_minutes}")
    resolve_device(cfg.device)


def resolve_device(name: str) -> torch.device:
    """'auto' -> the first CUDA device when PyTorch sees one, else the CPU; 'cuda' without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: PyTorch sees no CUDA device here",
                             fix="install a CUDA build of torch, or pass --device cpu")
        return torch.device(name)
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: on request; for 'auto', on GPUs that support it and on CPUs where it measures faster."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bf16_is_faster()


def _to_numpy(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, np.ndarray]:
    """State dict -> float32 / integer numpy arrays on the CPU."""
    return {prefix + k: v.detach().cpu().float().contiguous().numpy() if v.is_floating_point()
            else v.detach().cpu().contiguous().numpy() for k, v in sd.items()}


def _validation_batch(val: SliceSet, n: int, seed: int, num_steps: int):
    """A fixed validation batch: up to n slices (tumour slices first), spread timesteps, fixed noise."""
    rng = np.random.default_rng(seed + 1)
    order = np.concatenate([rng.permutation(np.flatnonzero(val.has_tumour)),
                            rng.permutation(np.flatnonzero(~val.has_tumour))])[:n]
    t = np.linspace(0, num_steps - 1, len(order)).round().astype(np.int64)
    noise = rng.standard_normal(val.masks[order].shape).astype(np.float32)
    return (torch.from_numpy(val.images[order]), torch.from_numpy(val.masks[order]), torch.from_numpy(t),
            torch.from_numpy(noise))


def train(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False,
          on_log: Callable[[dict], None] | None = None) -> Path:
    """Train (or resume) a run in `cfg.out`; returns the path of model.safetensors."""
    out = Path(cfg.out)
    if resume:
        prev = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                              for k, v in json.loads((out / "config.json").read_text()).items()}) \
            if (out / "config.json").exists() else None
        if prev is None or not (out / "state.safetensors").exists():
            raise UsageError(f"nothing to resume in {out}", fix="run without --resume to start a new run")
        changes = {k: getattr(cfg, k) for k in TrainConfig.RESUMABLE}
        changes["steps"] = cfg.steps or prev.steps  # 0: the total the run was started with
        cfg = dataclasses.replace(prev, **changes)
    else:
        cfg = cfg.resolved()
        if (out / "state.safetensors").exists():
            raise UsageError(f"{out} already holds a training run", fix="pass --resume to continue it, or another --out")
    _check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preset = get_preset(cfg.preset)
    card = build_card(preset, cfg.modalities,
                      prediction=cfg.prediction if cfg.objective == "diffusion" else "eps",
                      mask_scale=cfg.mask_scale)

    cases, skipped = labelled_cases(cfg.data, cfg.modalities)
    if not cfg.split:
        tr_ids, val_ids = split_cases([c.case_id for c in cases], val_cases=cfg.val_cases or None,
                                      val_count=None if cfg.val_count < 0 else cfg.val_count, seed=cfg.seed)
        cfg = dataclasses.replace(cfg, split={"train": tr_ids, "val": val_ids})
    by_id = {c.case_id: c for c in cases}
    missing = [i for i in cfg.split["train"] + cfg.split["val"] if i not in by_id]
    if missing:
        raise DatasetError(f"cases {missing} of this run's split are not in --data", path=cfg.data)
    limit = cfg.max_slices_per_case or None
    soft = cfg.targets == "soft"
    train_set = load_slices([by_id[i] for i in cfg.split["train"]], card, max_slices_per_case=limit,
                            soft_targets=soft)
    val_set = load_slices([by_id[i] for i in cfg.split["val"]], card, max_slices_per_case=limit,
                          soft_targets=soft) if cfg.split["val"] else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json())

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = UNetModel(card.architecture).to(device, memory_format=fmt)
    ema = UNetModel(card.architecture).to(device, memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # Timesteps and noise come from a generator on the training device (a CPU generator would make the GPU
    # wait for the host every step); its state is saved with the run.
    gen = torch.Generator(device).manual_seed(cfg.seed)
    sampler = BatchSampler(train_set, cfg.batch_size, tumour_weight=preset.tumour_weight, flip=cfg.flip,
                           seed=cfg.seed, empty_share=cfg.empty_share if cfg.empty_share >= 0 else None,
                           flip_axis=flip_axis(card))
    step = 0
    if resume:
        step = _load_state(out / "state.safetensors", model, ema, opt, gen, sampler, device)
    else:
        ema.load_state_dict(model.state_dict())
    ema.eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    ema_params, model_params = list(ema.parameters()), list(model.parameters())

    bf16 = use_bf16(cfg.precision, device)
    tables = TorchTables(tables_for(card.diffusion.schedule, card.diffusion.timesteps)).to(device)
    val_batch = tuple(a.to(device) for a in _validation_batch(val_set, 48, cfg.seed, tables.num_steps)) \
        if val_set is not None else None
    log_f = open(out / "train_log.jsonl", "a")

    def log(rec: dict) -> None:
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
        if on_log:
            on_log(rec)

    if step == 0:
        log({"event": "start", "train_slices": len(train_set), "val_slices": len(val_set) if val_set else 0,
             "train_cases": cfg.split["train"], "val_cases": cfg.split["val"], "skipped": skipped,
             "params": sum(p.numel() for p in model.parameters()), "bf16": bf16})
    log({"event": "session", "step": step, "device": _device_name(device), "bf16": bf16,
         "torch": torch.__version__, "max_minutes": cfg.max_minutes})

    low, high = card.diffusion.mask_low, card.diffusion.mask_high
    recycle_noise = recycled = None
    # the network as the training forward sees it: channels-last input, compiled (same parameters either way)
    train_net = torch.compile(model, dynamic=False) if cfg.compile else model

    def as_fmt(net):
        return net if not cfg.channels_last else (lambda x, t: net(x.contiguous(memory_format=fmt), t))

    def loss_terms(net, img, msk, t, noise):
        net = as_fmt(net)
        if cfg.objective == "segmentation":
            return segmentation_loss(net, img, msk, low, high)
        if cfg.prediction == "x0":
            return x0_loss(net, tables, img, msk, t, noise, low, high, recycle_noise=recycle_noise,
                           recycled=recycled, dice_weight=cfg.dice_weight)
        return hybrid_loss(net, tables, img, msk, t, noise)

    recipe = {"objective": cfg.objective, "augmentations": list(AUGMENTATIONS) if cfg.flip else [],
              "empty_share": round(sampler.empty_share, 4), "targets": cfg.targets}
    if cfg.objective == "diffusion":
        recipe.update(prediction=cfg.prediction, recycling=cfg.recycling, mask_scale=high)
        if cfg.recycling and cfg.recycle_share < 1.0:
            recipe.update(recycle_share=cfg.recycle_share)
        if cfg.prediction == "x0":
            recipe.update(dice_weight=cfg.dice_weight)

    def checkpoint() -> dict:
        nonlocal recycle_noise, recycled
        recycle_noise = recycled = None  # validation: x_t from the truth, the same for every recipe
        val = _validate(ema, loss_terms, val_batch, bf16, device) if val_batch is not None else {}
        info = {**recipe, "steps": step, "preset": cfg.preset, "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "ema_rate": cfg.ema_rate, "bf16": bf16, "seed": cfg.seed, "train_cases": cfg.split["train"],
                "val_cases": cfg.split["val"],
                **{f"val_{k}": v for k, v in val.items()}}
        save_weights(out / "model.safetensors", _to_numpy(ema.state_dict()), card.replace(training=info))
        _save_state(out / "state.safetensors", model, ema, opt, gen, sampler, step, card)
        log({"event": "checkpoint", "step": step, **{f"val_{k}": v for k, v in val.items()}})
        return val

    model.train()
    t_start = time.monotonic()
    t_last, n_acc = t_start, 0
    acc: dict[str, torch.Tensor] = {}
    with ProgressBar(cfg.steps, f"training {cfg.preset}", unit="step", quiet=quiet, initial=step) as bar:
        while step < cfg.steps:
            img, msk = (torch.from_numpy(a).to(device, non_blocking=True) for a in sampler.next())
            t = torch.randint(0, tables.num_steps, (cfg.batch_size,), generator=gen, device=device)
            noise = torch.randn(msk.shape, generator=gen, device=device)
            recycle_noise = torch.randn(msk.shape, generator=gen, device=device) if cfg.recycling else None
            # drawn only for partial recycling, so the full-recycling recipe keeps its random stream
            recycled = torch.rand(cfg.batch_size, generator=gen, device=device) < cfg.recycle_share \
                if cfg.recycling and cfg.recycle_share < 1.0 else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                terms = loss_terms(train_net, img, msk, t, noise)
            loss = terms.loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                torch._foreach_mul_(ema_params, cfg.ema_rate)
                torch._foreach_add_(ema_params, model_params, alpha=1 - cfg.ema_rate)
                for k, v in terms.parts().items():
                    acc[k] = acc[k] + v.detach().mean() if k in acc else v.detach().mean()
            step += 1
            n_acc += 1
            bar.advance(1)
            out_of_time = cfg.max_minutes > 0 and time.monotonic() - t_start >= cfg.max_minutes * 60
            if step % cfg.log_every == 0 or step == cfg.steps or out_of_time:
                means = {k: v.item() / n_acc for k, v in acc.items()}  # one host sync per log line
                if not all(np.isfinite(v) for v in means.values()):
                    raise RuntimeError(f"training diverged before step {step} ({means})")
                now = time.monotonic()
                log({"event": "train", "step": step, **means, "steps_per_s": n_acc / max(now - t_last, 1e-9)})
                bar.advance(0, loss=round(sum(means.values()), 5))
                t_last, n_acc, acc = now, 0, {}
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                checkpoint()
            if out_of_time and step < cfg.steps:
                log({"event": "stopped", "step": step, "reason": f"--max-minutes {cfg.max_minutes} reached",
                     "resume": "run again with --resume to continue"})
                break
    log_f.close()
    return out / "model.safetensors"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@torch.no_grad()
def _validate(model, loss_terms, batch, bf16: bool, device: torch.device) -> dict:
    img, msk, t, noise = batch
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        terms = loss_terms(model, img, msk, t, noise)
    return {k: float(v.mean()) for k, v in terms.parts().items()}


def _save_state(path: Path, model, ema, opt, gen, sampler, step: int, card: ModelCard) -> None:
    tensors = {**_to_numpy(model.state_dict(), "model."), **_to_numpy(ema.state_dict(), "ema.")}
    for i, st in opt.state_dict()["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            tensors[f"opt.{i}.{k}"] = st[k].detach().float().cpu().contiguous().numpy()
        tensors[f"opt.{i}.step"] = np.asarray([float(st["step"])], np.float64)
    tensors["rng.torch"] = gen.get_state().numpy()
    meta = {STATE_KEY: json.dumps({"step": step, "sampler": sampler.state(), "rng_device": gen.device.type})}
    save_weights(path, tensors, card, extra_metadata=meta)


def _load_state(path: Path, model, ema, opt, gen, sampler, device: torch.device) -> int:
    tensors, _ = load_weights(path)
    meta = json.loads(read_metadata(path)[STATE_KEY])
    def sub(prefix):
        return {k[len(prefix):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(prefix)}
    model.load_state_dict(sub("model."), strict=True)
    ema.load_state_dict(sub("ema."), strict=True)
    osd = opt.state_dict()
    osd["state"] = {int(i): {"step": torch.tensor(float(tensors[f"opt.{i}.step"][0])),
                             "exp_avg": torch.from_numpy(tensors[f"opt.{i}.exp_avg"]).to(device),
                             "exp_avg_sq": torch.from_numpy(tensors[f"opt.{i}.exp_avg_sq"]).to(device)}
                    for i in osd["param_groups"][0]["params"] if f"opt.{i}.step" in tensors}
    opt.load_state_dict(osd)
    if meta.get("rng_device", "cpu") == gen.device.type:
        gen.set_state(torch.from_numpy(tensors["rng.torch"]))
    else:  # resumed on another kind of device: its generator state does not transfer; reseed deterministically
        gen.manual_seed(int(np.random.SeedSequence([int(meta["step"]), 0xD1FF]).generate_state(1)[0]))
    sampler.set_state(meta["sampler"])
    return int(meta["step"])
