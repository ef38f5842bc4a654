"""A run's parameters, checked in one place for the CLI, the Python API, `segment` and cohorts.

Owns: `RunSettings` (the parameters of a run, validated once when made), `check_sampling_options` (a
`UsageError` naming the option for a value that cannot work, raised before any file is opened or model
loaded), `ensemble_size` (``--n`` N or ``auto`` -> N or `AutoN`) and `OUTPUT_FORMATS`. Range checks that need
the model (``--steps`` against the card's T) stay with `sampling.sampler.plan_sampling`.
Imports: `backends`, `core.ensemble`, `core.errors`, `maps.lesions`, `sampling.sampler`. Never torch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..backends import BACKENDS, DEVICE_PATTERN
from ..core.ensemble import (AUTO_N_MAX, AUTO_N_MIN, AUTO_N_STEP, AUTO_N_TOL, AutoN, EnsembleSize,
                             ensemble_identity)
from ..core.errors import UsageError
from ..maps.lesions import DEFAULT_MIN_COMPONENT
from ..sampling.sampler import SAMPLERS, SamplingPlan

AUTO_OPTIONS = ("--n-max", "--n-min", "--n-step", "--n-tol")
#: `--format`: nifti (`outputs.RUN_KEYS`) or qubrats (also `<ID>.nii.gz` and `<ID>_unc_whole.nii.gz`, see `qubrats`).
OUTPUT_FORMATS = ("nifti", "qubrats")


def _whole(value: object) -> bool:
    try:
        return not isinstance(value, bool) and int(value) == value  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False


def ensemble_size(n: int | str | AutoN = 5, *, n_max: int | None = None, n_min: int | None = None,
                  n_step: int | None = None, n_tol: float | None = None) -> EnsembleSize:
    """``--n`` as `segment` and the sampler take it: N (a whole number >= 1) or, for ``auto``, an
    `ensemble.AutoN` of the other four (None: the defaults, `AutoN`'s). `UsageError`, naming the option and the
    fix, for a value that cannot work: an --n-* option without ``--n auto``, n-max < n-min, a tolerance that
    is negative or not finite, a count below 1."""
    given = {k: v for k, v in zip(AUTO_OPTIONS, (n_max, n_min, n_step, n_tol)) if v is not None}
    if isinstance(n, AutoN):
        if given:
            raise UsageError(f"{', '.join(given)} given twice (also in the AutoN passed as n)",
                             fix="set them in one place")
        return n
    if isinstance(n, str) and n.strip().lower() == "auto":
        for name in ("--n-max", "--n-min", "--n-step"):
            v = given.get(name)
            if v is not None and (not _whole(v) or v < 1):
                raise UsageError(f"{name} must be a whole number of at least 1, got {v}")
        tol = given.get("--n-tol", AUTO_N_TOL)
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or tol < 0:
            raise UsageError(f"--n-tol must be a number >= 0, got {tol}",
                             fix="give e.g. --n-tol 0.01 (0: never stop early, the same maps as --n N-MAX)")
        lo, top = int(given.get("--n-min", AUTO_N_MIN)), int(given.get("--n-max", AUTO_N_MAX))
        if top < lo:
            raise UsageError(f"--n-max {top} is below --n-min {lo}",
                             fix=f"give --n-max of at least {lo}, or a smaller --n-min")
        return AutoN(n_max=top, n_min=lo, n_step=int(given.get("--n-step", AUTO_N_STEP)), tol=float(tol))
    if isinstance(n, str):
        try:
            n = int(n.strip())
        except ValueError:
            raise UsageError(f"--n must be a whole number of at least 1 or auto, got {n!r}") from None
    if not _whole(n) or n < 1:
        raise UsageError(f"--n must be at least 1, got {n}", fix="give a whole number of members, or --n auto")
    if given:
        raise UsageError(f"{', '.join(given)} only apply to --n auto, but --n is {int(n)}",
                         fix=f"give --n auto, or drop {', '.join(given)}")
    return int(n)


def check_sampling_options(*, n: int | str | AutoN = 1, steps: int | None = None, seed: int = 0,
                           batch_size: int = 0, sampler: str | None = None, eta: float | None = None,
                           backend: str = "onnxruntime", device: str = "auto", n_max: int | None = None,
                           n_min: int | None = None, n_step: int | None = None, n_tol: float | None = None,
                           save_samples: bool = False, min_component: float = 0.0) -> EnsembleSize:
    """`UsageError` for option values that cannot work (n: `ensemble_size`, steps >= 1, seed in [0, 2**63),
    batch size >= 0 (0: automatic), a known sampler, eta in [0, 1], a known backend and device, no
    --save-samples with --n auto, a mask clean-up share in [0, 1)); returns the ensemble size (N or `AutoN`)."""
    if not 0.0 <= min_component < 1.0:  # also refuses NaN
        raise UsageError(f"--min-component must lie in [0, 1), got {min_component}",
                         fix="give a share of the largest lesion component, e.g. 0.02; 0 keeps every component")
    size = ensemble_size(n, n_max=n_max, n_min=n_min, n_step=n_step, n_tol=n_tol)
    if save_samples and isinstance(size, AutoN):
        raise UsageError("--save-samples needs a fixed --n (with --n auto slices get different numbers of members)",
                         fix="give --n N, or drop --save-samples")
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
    return size


@dataclass(frozen=True)
class RunSettings:
    """The parameters of a run: of one case (`segment.segment_case`), of every case of a cohort, of the
    Python API's calls. With the model and a case's inputs they decide `segment.run_identity`, "the same run".
    Validated once, here, when made (`check_sampling_options`, the output format); `n` is then N or `AutoN`.
    force: segment inputs that fail the input checks (`sanity`)."""

    n: EnsembleSize  # N, or `ensemble.AutoN` for --n auto
    plan: SamplingPlan
    seed: int = 0
    batch_size: int = 0
    save_samples: bool = False
    overview: bool = True
    overwrite: bool = False
    output_format: str = "nifti"  # `OUTPUT_FORMATS`
    force: bool = False  # segment inputs that fail the input checks (recorded in each provenance)
    min_component: float = DEFAULT_MIN_COMPONENT  # mask clean-up (`lesions.lesion_mask`)

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise UsageError(f"unknown --format {self.output_format!r}",
                             fix=f"choose one of {', '.join(OUTPUT_FORMATS)}")
        size = check_sampling_options(n=self.n, seed=self.seed, batch_size=self.batch_size,
                                      save_samples=self.save_samples, min_component=self.min_component)
        object.__setattr__(self, "n", size)

    def describe(self) -> dict:
        return {**self.plan.describe(), **ensemble_identity(self.n), "seed": self.seed,
                "batch_size": self.batch_size, "save_samples": self.save_samples,
                "min_component": self.min_component}
