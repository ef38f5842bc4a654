"""Test helper: a U-Net whose output is not identically zero."""
from __future__ import annotations

import torch


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The zero-initialised output convs make an untrained U-Net output 0: perturb every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()
