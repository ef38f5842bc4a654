"""The training objectives: improved-DDPM hybrid loss, x0 prediction with recycling, and the U-Net baseline.

Owns: `hybrid_loss` (eps prediction, the paper: MSE on the predicted noise plus the variational-bound term
for the learned variance, with a stop-gradient on the mean, weighted as in improved-diffusion so that
λ = 0.001 of the full bound) and the Gaussian KL / discretised likelihood it needs; `x0_loss` (x0
prediction: MSE + BCE + soft Dice on the predicted mask, optional recycling); `segmentation_loss` (the
deterministic baseline), in torch.
Imports: numpy, torch; `sampling.schedule`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from diffseg_engine.sampling.schedule import DiffusionTables


@dataclass
class LossTerms:
    loss: torch.Tensor  # [B]
    mse: torch.Tensor  # [B]
    vb: torch.Tensor  # [B], bits per dimension (already weighted by T/1000)

    def parts(self) -> dict[str, torch.Tensor]:
        return {"mse": self.mse, "vb": self.vb}


@dataclass
class X0Terms:
    loss: torch.Tensor  # [B]
    mse: torch.Tensor  # [B], on x0 in mask units
    bce: torch.Tensor  # [B]
    dice_loss: torch.Tensor  # [B]

    def parts(self) -> dict[str, torch.Tensor]:
        return {"mse": self.mse, "bce": self.bce, "dice_loss": self.dice_loss}


@dataclass
class SegmentationTerms:
    loss: torch.Tensor  # [B]
    bce: torch.Tensor  # [B]
    dice_loss: torch.Tensor  # [B], 1 - soft Dice per slice

    def parts(self) -> dict[str, torch.Tensor]:
        return {"bce": self.bce, "dice_loss": self.dice_loss}


class TorchTables:
    """Float64 schedule tables moved to torch once, gathered per sample as float32 [B, 1, 1, 1]."""

    def __init__(self, tables: DiffusionTables):
        self.num_steps = tables.num_steps
        names = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
                 "posterior_log_variance_clipped", "betas")
        for n in names:
            setattr(self, n, torch.from_numpy(np.asarray(getattr(tables, n), dtype=np.float64).copy()))
        self.log_betas = torch.log(self.betas)

    def to(self, device: torch.device | str) -> "TorchTables":
        """Move the tables (in place) to the device the timesteps live on; returns self."""
        for n, v in list(vars(self).items()):
            if isinstance(v, torch.Tensor):
                setattr(self, n, v.to(device))
        return self

    def take(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)[t].float().view(-1, 1, 1, 1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (improved-diffusion's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


def q_sample(tt: TorchTables, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, [B, 1, H, W]."""
    return tt.take("sqrt_alphas_cumprod", t) * x0 + tt.take("sqrt_one_minus_alphas_cumprod", t) * noise


def hybrid_loss(model: torch.nn.Module, tt: TorchTables, image: torch.Tensor, mask: torch.Tensor,
                t: torch.Tensor, noise: torch.Tensor) -> LossTerms:
    """Loss per sample for masks x_0 = `mask` [B, 1, H, W] conditioned on `image` [B, C, H, W] at steps t [B].

    The network sees X_t = image ⊕ x_t (the noisy mask as the LAST channel, as the paper's code) and returns
    [ε̂, v]. vb uses the frozen ε̂ (stop-gradient), so it trains only the variance, as improved-diffusion.
    """
    x_t = q_sample(tt, mask, t, noise)
    out = model(torch.cat([image, x_t], dim=1), t)
    eps, v = out[:, :1].float(), out[:, 1:2].float()
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))

    # variational bound term, mean frozen
    eps_d = eps.detach()
    min_log = tt.take("posterior_log_variance_clipped", t)
    max_log = tt.take("log_betas", t)
    frac = (v + 1) / 2
    model_log_var = frac * max_log + (1 - frac) * min_log
    x0_pred = (tt.take("sqrt_recip_alphas_cumprod", t) * x_t
               - tt.take("sqrt_recipm1_alphas_cumprod", t) * eps_d)  # unclipped, as improved-diffusion
    model_mean = tt.take("posterior_mean_coef1", t) * x0_pred + tt.take("posterior_mean_coef2", t) * x_t
    true_mean = tt.take("posterior_mean_coef1", t) * mask + tt.take("posterior_mean_coef2", t) * x_t
    kl = normal_kl(true_mean, min_log, model_mean, model_log_var).mean(dim=(1, 2, 3)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(mask, model_mean, 0.5 * model_log_var)
    nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl) * (tt.num_steps / 1000.0)
    return LossTerms(loss=mse + vb, mse=mse, vb=vb)


def x0_from_logit(logit: torch.Tensor, mask_low: float, mask_high: float) -> torch.Tensor:
    """An x0-prediction network's channel 0 is the tumour logit ℓ: x0 = low + (high - low)·sigmoid(ℓ)."""
    return mask_low + (mask_high - mask_low) * torch.sigmoid(logit)


def _bce_dice(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slice BCE and 1 - soft Dice (+1 smoothing: an empty prediction on an empty slice costs nothing)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(1, 2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    dice_loss = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return bce, dice_loss


def x0_loss(model: torch.nn.Module, tt: TorchTables, image: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
            noise: torch.Tensor, mask_low: float, mask_high: float, *,
            recycle_noise: torch.Tensor | None = None, recycled: torch.Tensor | None = None,
            dice_weight: float = 1.0) -> X0Terms:
    """Loss per sample of an x0-prediction model: MSE on x0 (mask units) + BCE + dice_weight · soft Dice.

    mask [B, 1, H, W] in [mask_low, mask_high] (binary targets: at the two ends; soft targets: the tumour area
    fraction in between, which BCE, Dice and MSE all take as it is). The network sees image ⊕ x_t with
    x_t = q_sample(x0', t, noise). Without recycling x0' is the ground truth. With recycling (Fu et al., MELBA
    2023) x0' is the network's own no-grad prediction from pure noise `recycle_noise` [B, 1, H, W] at the last
    timestep, so x_t carries the model's current guess rather than the answer, as at sampling time; the target
    stays the ground truth. `recycled` [B] bool, if given, recycles only those samples (the others see the
    truth), so the network learns both to segment from the image and to read x_t.
    dice_weight 0 leaves MSE + BCE, whose minimiser is the posterior mean of the mask (a proper score), so that
    at high noise the network predicts the probability of tumour rather than the sharpest guess.
    """
    span = mask_high - mask_low
    x0_src = mask
    if recycle_noise is not None:
        with torch.no_grad():
            t_last = torch.full_like(t, tt.num_steps - 1)
            guess = model(torch.cat([image, recycle_noise], dim=1), t_last)[:, :1].float()
            guess = x0_from_logit(guess, mask_low, mask_high).detach()
            x0_src = guess if recycled is None else torch.where(recycled.view(-1, 1, 1, 1), guess, mask)
    x_t = q_sample(tt, x0_src, t, noise)
    logits = model(torch.cat([image, x_t], dim=1), t)[:, :1].float()
    x0 = x0_from_logit(logits, mask_low, mask_high)
    mse = (((x0 - mask) / span) ** 2).mean(dim=(1, 2, 3))
    target = ((mask - mask_low) / span).clamp(0.0, 1.0)  # {0, 1} for binary targets, the area fraction for soft
    bce, dice_loss = _bce_dice(logits, target)
    return X0Terms(loss=mse + bce + dice_weight * dice_loss, mse=mse, bce=bce, dice_loss=dice_loss)


def segmentation_input(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic baseline's network input: image ⊕ a zero mask channel, and timestep 0 for every slice.

    The same U-Net as the diffusion model (same channels, so same backbone and parameter count) with the
    x_t channel held at zero; output channel 0 is the tumour logit."""
    x = torch.cat([image, torch.zeros_like(image[:, :1])], dim=1)
    return x, torch.zeros(image.shape[0], dtype=torch.long, device=image.device)


def segmentation_loss(model: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor,
                      mask_low: float, mask_high: float) -> SegmentationTerms:
    """Binary cross-entropy + soft Dice per slice, for the deterministic U-Net baseline (nnU-Net's loss pair).

    mask: [B, 1, H, W] in {mask_low, mask_high}; empty slices contribute to the Dice term through the +1
    smoothing (predicting nothing on an empty slice costs nothing)."""
    x, t = segmentation_input(image)
    logits = model(x, t)[:, :1].float()
    target = ((mask - mask_low) / (mask_high - mask_low)).clamp(0.0, 1.0)  # binary or area-fraction targets
    bce, dice_loss = _bce_dice(logits, target)
    return SegmentationTerms(loss=bce + dice_loss, bce=bce, dice_loss=dice_loss)
