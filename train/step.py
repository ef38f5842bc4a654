"""One whole denoising step as a torch module: the network call and the fused update, for export.

Owns: `DenoisingStep` — (image [B,C,H,W], x_t [B,1,H,W], timestep [B], coef [B,8], noise [B,1,H,W]) -> x_prev
[B,1,H,W]. x0 comes from the network: from its eps (`a·x_t − b·eps`, the paper) or, for an x0-prediction
model, directly (`low + (high − low)·sigmoid(logit)`; then columns a and b are unused). The update is the generic form of `diffseg_engine.sampling.schedule` (same coefficient columns,
`COEF_NAMES`), so one graph serves DDPM with learned variance, respaced DDPM and DDIM(η); exported to ONNX it
runs the per-step update in compiled code with the network.
Also `half_precision_step` (convolutions and matmuls in fp16/bf16; the torch backend and export use it).
Imports: torch; `artifacts.card`, `artifacts.step_graph`, `core.errors`, `sampling.schedule`, `unet`.
"""
from __future__ import annotations

import torch
from torch import nn

from diffseg_engine.artifacts.card import ModelCard
from diffseg_engine.artifacts.step_graph import PRECISIONS
from diffseg_engine.core.errors import UsageError
from diffseg_engine.sampling.schedule import COEF_NAMES

from .unet import UNetModel

assert COEF_NAMES == ("a", "b", "c_x0", "c_x", "min_log", "max_log", "g_learned", "g_fixed"), COEF_NAMES


class DenoisingStep(nn.Module):
    def __init__(self, net: UNetModel, card: ModelCard):
        super().__init__()
        self.net = net
        d = card.diffusion
        self.clip = (float(d.clip_low), float(d.clip_high)) if d.clip_denoised else None
        self.learn_sigma = card.architecture.learn_sigma
        self.predict_x0 = d.prediction == "x0"
        self.mask_range = (float(d.mask_low), float(d.mask_high))

    def forward(self, image: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor, coef: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        out = self.net(torch.cat([image, x_t], dim=1), timestep)          # network call
        c = coef.reshape(coef.shape[0], coef.shape[1], 1, 1)              # [B, 8, 1, 1]
        if self.predict_x0:                                                # update step, fused
            lo, hi = self.mask_range
            x0 = lo + (hi - lo) * torch.sigmoid(out[:, 0:1])               # channel 0: tumour logit
        else:
            x0 = c[:, 0:1] * x_t - c[:, 1:2] * out[:, 0:1]                 # channel 0: eps
        if self.clip is not None:
            x0 = torch.clamp(x0, self.clip[0], self.clip[1])
        if self.learn_sigma:
            frac = (out[:, 1:2] + 1.0) * 0.5
            log_var = frac * c[:, 5:6] + (1.0 - frac) * c[:, 4:5]
            std = c[:, 6:7] * torch.exp(0.5 * log_var) + c[:, 7:8]
        else:
            std = c[:, 7:8]
        return c[:, 2:3] * x0 + c[:, 3:4] * x_t + std * noise


def build_step(card: ModelCard, tensors: dict) -> DenoisingStep:
    """A DenoisingStep in eval mode with weights `tensors` (numpy or torch) loaded strictly."""
    from .unet import load_state_dict_strict
    card.require_diffusion(card.name)
    net = UNetModel(card.architecture)
    load_state_dict_strict(net, {k: torch.as_tensor(v) for k, v in tensors.items()})
    return DenoisingStep(net, card).eval()


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def half_precision_step(step: DenoisingStep, precision: str) -> DenoisingStep:
    """`step` with the U-Net torso's convolutions (2D, and the attention's 1x1 Conv1d) in fp16 or bf16, in place.

    The torso then carries its activations in that type, so the attention matmuls run in it too; GroupNorm and
    the softmax compute in float32 (`train.unet`), the timestep embedding and its MLP, the output head and the
    fused update stay float32, and so do the graph's inputs and output. "fp32" returns `step` unchanged."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {precision!r}", fix=f"choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return step
    for part in (step.net.input_blocks, step.net.middle_block, step.net.output_blocks):
        for m in part.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
                m.to(_DTYPES[precision])
    return step
