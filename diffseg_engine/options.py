"""The checks on sampling and runtime options, in one place for the CLI, the Python API and cohorts.

Owns: `check_sampling_options` -- a `UsageError` naming the option for a value that cannot work, raised before
any file is opened or model loaded. Range checks that need the model (``--steps`` against the card's T) stay
with `sampler.plan_sampling`.
Imports: `errors`, `sampler` (its sampler names), `backends.base` (names and the device pattern). Never torch.
"""
from __future__ import annotations

import re

from .backends.base import BACKENDS, DEVICE_PATTERN
from .errors import UsageError
from .sampler import SAMPLERS


def check_sampling_options(*, n: int = 1, steps: int | None = None, seed: int = 0, batch_size: int = 0,
                           sampler: str | None = None, eta: float | None = None, backend: str = "onnxruntime",
                           device: str = "auto", min_component: float = 0.0) -> None:
    """`UsageError` for option values that cannot work (n >= 1, steps >= 1, seed in [0, 2**63), batch size
    >= 0 (0: automatic), a known sampler, eta in [0, 1], a known backend and device, a mask clean-up share
    in [0, 1))."""
    if not 0.0 <= min_component < 1.0:  # also refuses NaN
        raise UsageError(f"--min-component must lie in [0, 1), got {min_component}",
                         fix="give a share of the largest lesion component, e.g. 0.02; 0 keeps every component")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if batch_size < 0:
        raise UsageError(f"--batch-size must be at least 1 (or 0 for automatic), got {batch_size}")
    if not 0 <= seed < 2**63:
        raise UsageError(f"--seed must lie in [0, 2**63), got {seed}")
    if sampler is not None and sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}", fix=f"choose one of {', '.join(SAMPLERS)}")
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise UsageError(f"--eta must lie in [0, 1], got {eta}")
    if backend not in (*BACKENDS, "tensorrt"):
        raise UsageError(f"unknown backend {backend!r}", fix=f"choose one of {', '.join(BACKENDS)}")
    if not re.fullmatch(DEVICE_PATTERN, str(device)):
        raise UsageError(f"unknown --device {device!r}", fix="use auto, cpu, cuda or cuda:N")
