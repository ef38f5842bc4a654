"""A U-Net with random non-zero weights, for the tests and the benchmarks; training never uses it.

Owns: `perturbed`. The output convolutions of an untrained U-Net start at zero, so its output is identically
zero and a parity, a sampling or a throughput check on it would prove nothing. It lives in the package (as
`diffseg_engine.train.perturb`) so that tests/ and benchmarks/ both import it downwards, neither from the
other. Imports: torch.
"""
from __future__ import annotations

import torch


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` with N(0, 0.05^2) noise from a generator seeded with `seed` added to every parameter, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()
