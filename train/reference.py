"""The reference sampler: the paper's loop in plain eager torch, one ensemble member at a time.

Owns: `reference_sample` — improved-diffusion's `p_sample_loop` / `ddim_sample_loop` written out step by
step from the schedule tables (not from the fused coefficient rows), for parity tests and the benchmark
baseline. Given the same noise streams it must reproduce the engine.
Imports: numpy, torch; `artifacts.card`, `sampling.sampler`, `sampling.schedule`, `unet`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from diffseg_engine.artifacts.card import ModelCard
from diffseg_engine.sampling.sampler import kept_timesteps
from diffseg_engine.sampling.schedule import respace, tables_for

from .unet import UNetModel


def reference_tables(card: ModelCard, sampler: str, steps: int):
    T = card.diffusion.timesteps
    tables = tables_for(card.diffusion.schedule, T)
    if steps != T:
        tables = respace(tables, kept_timesteps(T, sampler, steps))
    return tables


@torch.no_grad()
def reference_sample(net: UNetModel, card: ModelCard, image: np.ndarray, gen: np.random.Generator, *,
                     sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
                     on_step: Callable[[], None] | None = None) -> np.ndarray:
    """One sample x_0 [1, h, w] for `image` [C, h, w]; x_T and every z drawn from `gen` in step order."""
    tables = reference_tables(card, sampler, steps or card.diffusion.timesteps)
    d = card.diffusion
    h, w = image.shape[-2:]
    b = torch.from_numpy(np.asarray(image, np.float32))[None]
    x = torch.from_numpy(gen.standard_normal((1, 1, h, w), dtype=np.float32))
    f = lambda table, i: float(table[i])  # noqa: E731 - float64 table entry as a python float
    for i in reversed(range(tables.num_steps)):
        z = torch.from_numpy(gen.standard_normal((1, 1, h, w), dtype=np.float32))
        t = torch.tensor([float(tables.timestep_map[i])])
        out = net(torch.cat([b, x], dim=1), t)
        if d.prediction == "x0":  # channel 0 is the tumour logit of the clean mask
            x0 = d.mask_low + (d.mask_high - d.mask_low) * torch.sigmoid(out[:, :1])
        else:
            x0 = f(tables.sqrt_recip_alphas_cumprod, i) * x - f(tables.sqrt_recipm1_alphas_cumprod, i) * out[:, :1]
        if d.clip_denoised:
            x0 = x0.clamp(d.clip_low, d.clip_high)
        if sampler == "ddpm":
            mean = f(tables.posterior_mean_coef1, i) * x0 + f(tables.posterior_mean_coef2, i) * x
            if card.architecture.learn_sigma:
                frac = (out[:, 1:2] + 1) / 2
                min_log = f(tables.posterior_log_variance_clipped, i)
                max_log = float(np.log(tables.betas[i]))
                std = torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log))
            else:
                std = torch.full_like(x, float(np.sqrt(tables.posterior_variance[i])))
            x = mean + (std * z if i > 0 else 0.0)
        else:
            eps_c = (f(tables.sqrt_recip_alphas_cumprod, i) * x - x0) / f(tables.sqrt_recipm1_alphas_cumprod, i)
            acp, acp_prev = f(tables.alphas_cumprod, i), f(tables.alphas_cumprod_prev, i)
            sigma = eta * np.sqrt((1 - acp_prev) / (1 - acp)) * np.sqrt(1 - acp / acp_prev)
            x = np.sqrt(acp_prev) * x0 + np.sqrt(max(1 - acp_prev - sigma ** 2, 0.0)) * eps_c \
                + (sigma * z if i > 0 else 0.0)
        if on_step:
            on_step()
    return x[0].numpy()
