"""The diffusion math: noise schedules, their float64 tables, respacing and the per-step sampler update.

Owns: `betas_for`, `DiffusionTables` (the improved-diffusion `GaussianDiffusion` tables, computed once in
float64 and read-only), the forward/posterior formulas (`q_sample`, `q_posterior`, ...), timestep respacing
(`space_timesteps`, `respace`, as improved-diffusion `respace.py`) and the one generic per-step update
that every backend runs: a row of 8 coefficients per step (`COEF_NAMES`) built by `ddpm_coefficients` or
`ddim_coefficients`, applied by `apply_step` (the readable numpy reference).

Formulas follow Nichol & Dhariwal's improved-diffusion (`gaussian_diffusion.py`, `respace.py`), which the
code of Wolleb et al. 2022 builds on, with `rescale_timesteps=False`.
Imports: numpy; `core.errors`. Never torch.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..core.errors import UsageError

SCHEDULES = ("linear", "cosine")

#: Column order of a per-step coefficient row (see `apply_step`).
COEF_NAMES = ("a", "b", "c_x0", "c_x", "min_log", "max_log", "g_learned", "g_fixed")


# ----------------------------------------------------------------------------------------------- schedules
def betas_for(schedule: str, timesteps: int) -> np.ndarray:
    """Betas [T] float64 of a named schedule, exactly as improved-diffusion `get_named_beta_schedule`."""
    if isinstance(timesteps, bool) or not isinstance(timesteps, (int, np.integer)) or timesteps < 1:
        raise UsageError(f"diffusion timesteps must be a positive integer, got {timesteps!r}")
    t = int(timesteps)
    if schedule == "linear":
        scale = 1000 / t
        if scale * 0.02 >= 1.0:
            raise UsageError(f"the linear schedule needs more than 20 timesteps, got {t}",
                             fix="use timesteps > 20 or the cosine schedule")
        return np.linspace(scale * 0.0001, scale * 0.02, t, dtype=np.float64)
    if schedule == "cosine":
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)],
                        dtype=np.float64)
    raise UsageError(f"unknown noise schedule {schedule!r}", fix=f"use one of {', '.join(SCHEDULES)}")


# -------------------------------------------------------------------------------------------------- tables
@dataclass(frozen=True, eq=False, repr=False)
class DiffusionTables:
    """Per-step float64 tables [K] of a (possibly respaced) diffusion process; index i = step i.

    `timestep_map` [K] int64 is the original timestep index of each step (arange(K) when unspaced); it is
    what the network receives as its timestep. All arrays are read-only copies.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timestep_map: np.ndarray

    def __post_init__(self) -> None:
        k = np.shape(self.betas)
        for f in dataclasses.fields(self):
            dtype = np.int64 if f.name == "timestep_map" else np.float64
            arr = np.array(getattr(self, f.name), dtype=dtype, copy=True)
            if arr.ndim != 1 or arr.shape != k or arr.size == 0:
                raise ValueError(f"DiffusionTables.{f.name} must be 1-D of the length of betas {k}, got {arr.shape}")
            arr.setflags(write=False)
            object.__setattr__(self, f.name, arr)
        if np.any(self.timestep_map < 0) or np.any(np.diff(self.timestep_map) <= 0):
            raise ValueError("DiffusionTables.timestep_map must be non-negative and strictly increasing")

    @classmethod
    def from_betas(cls, betas: np.ndarray, timestep_map: np.ndarray | None = None) -> DiffusionTables:
        """Tables of improved-diffusion `GaussianDiffusion.__init__` from betas [K], each in (0, 1).

        With K == 1, posterior_log_variance_clipped[0] (improved-diffusion takes element 1) is log(betas[0]);
        it is never used for noise, since the last step adds none.
        """
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must all lie in (0, 1)")
        alphas = 1.0 - betas
        acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        first = post_var[1] if betas.size > 1 else betas[0]
        return cls(
            betas=betas,
            alphas_cumprod=acp,
            alphas_cumprod_prev=acp_prev,
            alphas_cumprod_next=np.append(acp[1:], 0.0),
            sqrt_alphas_cumprod=np.sqrt(acp),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
            log_one_minus_alphas_cumprod=np.log(1.0 - acp),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(np.append(first, post_var[1:])),
            posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
            timestep_map=np.arange(betas.size) if timestep_map is None else timestep_map,
        )

    @property
    def num_steps(self) -> int:
        """K, the number of steps of this process."""
        return int(self.betas.size)

    def __repr__(self) -> str:
        return f"DiffusionTables(num_steps={self.num_steps}, timesteps {self.timestep_map[0]}..{self.timestep_map[-1]})"


def tables_for(schedule: str, timesteps: int) -> DiffusionTables:
    """Tables of the unspaced process of a named schedule."""
    return DiffusionTables.from_betas(betas_for(schedule, timesteps))


# ------------------------------------------------------------------------------------ forward / posterior
def _at(table: np.ndarray, t: np.ndarray | int, like: np.ndarray) -> np.ndarray:
    """table[t] shaped [B, 1, ..., 1] to broadcast over `like` [B, ...], in like's float dtype (else float64)."""
    like = np.asarray(like)
    t = np.asarray(t)
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"timesteps t must be integers, got dtype {t.dtype}")
    if t.ndim == 0:
        t = np.full(like.shape[0], t)
    if t.shape != like.shape[:1]:
        raise ValueError(f"t must have shape [B] = {like.shape[:1]}, got {t.shape}")
    if np.any(t < 0) or np.any(t >= table.size):
        raise ValueError(f"step indices must lie in [0, {table.size}), got {t.min()}..{t.max()}")
    dtype = like.dtype if np.issubdtype(like.dtype, np.floating) else np.float64
    return table[t].astype(dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def q_sample(tables: DiffusionTables, x0: np.ndarray, t: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """x_t ~ q(x_t | x_0): sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise. x0, noise [B, ...]; t [B] step indices."""
    return _at(tables.sqrt_alphas_cumprod, t, x0) * x0 + _at(tables.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior(tables: DiffusionTables, x0: np.ndarray, xt: np.ndarray,
                t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q(x_{t-1} | x_t, x_0): (mean, variance, log_variance_clipped), each shaped like xt [B, ...]."""
    mean = _at(tables.posterior_mean_coef1, t, xt) * x0 + _at(tables.posterior_mean_coef2, t, xt) * xt
    var = np.broadcast_to(_at(tables.posterior_variance, t, xt), mean.shape).copy()
    log_var = np.broadcast_to(_at(tables.posterior_log_variance_clipped, t, xt), mean.shape).copy()
    return mean, var, log_var


def predict_x0_from_eps(tables: DiffusionTables, xt: np.ndarray, t: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """x0 = sqrt(1/acp[t]) * xt - sqrt(1/acp[t] - 1) * eps. xt, eps [B, ...]."""
    return _at(tables.sqrt_recip_alphas_cumprod, t, xt) * xt - _at(tables.sqrt_recipm1_alphas_cumprod, t, xt) * eps


def predict_eps_from_x0(tables: DiffusionTables, xt: np.ndarray, t: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """eps = (sqrt(1/acp[t]) * xt - x0) / sqrt(1/acp[t] - 1). xt, x0 [B, ...]."""
    return (_at(tables.sqrt_recip_alphas_cumprod, t, xt) * xt - x0) / _at(tables.sqrt_recipm1_alphas_cumprod, t, xt)


def learned_range_log_variance(tables: DiffusionTables, v: np.ndarray, t: np.ndarray) -> np.ndarray:
    """improved-diffusion LEARNED_RANGE: v in [-1, 1] interpolates log variance between the clipped
    posterior log variance (v = -1) and log(beta) (v = +1). v [B, ...] (the network's second channel)."""
    min_log = _at(tables.posterior_log_variance_clipped, t, v)
    max_log = _at(np.log(tables.betas), t, v)
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log


# ------------------------------------------------------------------------------------------------ respacing
def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """Timesteps to keep, exactly as improved-diffusion `space_timesteps`.

    `section_counts` is a list (or comma-separated string) of step counts, one per equal section of the
    original process, e.g. 300 steps with [10, 15, 20] keeps 10 strided steps of the first 100, 15 of the
    next and 20 of the last; or "ddimN" for N steps of one integer stride (as the DDIM paper).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise UsageError(f"bad step spacing {section_counts!r}", fix="write ddimN, e.g. ddim50") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise UsageError(f"cannot create exactly {desired} steps of {num_timesteps} with an integer stride",
                             fix="pick another step count or a plain count instead of ddimN")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise UsageError(f"bad step spacing {section_counts!r}", fix="write counts like 50 or 10,15,20") from None
    if not section_counts or any(c < 0 for c in section_counts):
        raise UsageError(f"bad step counts {section_counts!r}", fix="give one or more non-negative counts")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise UsageError(f"cannot divide a section of {size} steps into {count}",
                             fix=f"use at most {num_timesteps} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def respace(tables: DiffusionTables, use_timesteps: Iterable[int]) -> DiffusionTables:
    """The process that keeps only steps `use_timesteps` (indices into `tables`), as improved-diffusion
    `SpacedDiffusion`: new betas 1 - acp[i] / acp[previous kept], so learned-range variances and posteriors
    use the respaced betas. timestep_map composes (original indices of the kept steps)."""
    keep = sorted({int(i) for i in use_timesteps})
    if not keep or keep[0] < 0 or keep[-1] >= tables.num_steps:
        raise UsageError(f"kept steps must be a non-empty subset of [0, {tables.num_steps})")
    acp = tables.alphas_cumprod[keep]
    betas = 1.0 - acp / np.append(1.0, acp[:-1])
    return DiffusionTables.from_betas(betas, timestep_map=tables.timestep_map[keep])


# ------------------------------------------------------------------------------------------------ sampling
def ddpm_coefficients(tables: DiffusionTables, learn_sigma: bool = True) -> np.ndarray:
    """Rows [K, 8] (`COEF_NAMES`) of improved-diffusion `p_sample` with eps prediction.

    learn_sigma=True: LEARNED_RANGE variance from v. learn_sigma=False: FIXED_SMALL, std sqrt(posterior_variance).
    Row 0 (the last step sampled) adds no noise.
    """
    k = tables.num_steps
    noise = np.ones(k)
    noise[0] = 0.0
    zeros = np.zeros(k)
    if learn_sigma:
        var = (tables.posterior_log_variance_clipped, np.log(tables.betas), noise, zeros)
    else:
        var = (zeros, zeros, zeros, noise * np.sqrt(tables.posterior_variance))
    return np.stack([tables.sqrt_recip_alphas_cumprod, tables.sqrt_recipm1_alphas_cumprod,
                     tables.posterior_mean_coef1, tables.posterior_mean_coef2, *var], axis=1)


def ddim_coefficients(tables: DiffusionTables, eta: float = 0.0) -> np.ndarray:
    """Rows [K, 8] (`COEF_NAMES`) of improved-diffusion `ddim_sample`, eps re-derived from the clipped x0:

    x_prev = sqrt(acp_prev) x0 + k (a x - x0) / b + sigma z, k = sqrt(1 - acp_prev - sigma^2),
    sigma = eta sqrt((1 - acp_prev) / (1 - acp)) sqrt(1 - acp / acp_prev). Row 0 adds no noise.
    """
    if not 0.0 <= eta <= 1.0:
        raise UsageError(f"DDIM eta must lie in [0, 1], got {eta}")
    acp, acp_prev = tables.alphas_cumprod, tables.alphas_cumprod_prev
    a, b = tables.sqrt_recip_alphas_cumprod, tables.sqrt_recipm1_alphas_cumprod
    sigma = eta * np.sqrt((1 - acp_prev) / (1 - acp)) * np.sqrt(1 - acp / acp_prev)
    k = np.sqrt(np.maximum(1 - acp_prev - sigma**2, 0.0))
    sigma[0] = 0.0
    zeros = np.zeros(tables.num_steps)
    return np.stack([a, b, np.sqrt(acp_prev) - k / b, k * a / b, zeros, zeros, zeros, sigma], axis=1)


def model_timesteps(tables: DiffusionTables) -> np.ndarray:
    """[K] float32: the timestep the network receives at step i (timestep_map[i], not rescaled)."""
    return tables.timestep_map.astype(np.float32)


def apply_step(coef: np.ndarray, x: np.ndarray, eps: np.ndarray | None, v: np.ndarray | None, z: np.ndarray,
               clip: tuple[float, float] | None = None, *, x0: np.ndarray | None = None) -> np.ndarray:
    """One sampler step, the reference of what backends compile. Returns x_prev shaped like x.

    coef: [8] (one step for the batch) or [B, 8] (a row per sample), columns `COEF_NAMES`; x, eps, v, z
    [B, 1, H, W] (x_t, predicted noise, variance channel, standard normal noise). Computed in x's dtype:

        x0 = a x - b eps (clipped to `clip` if given);  log_var = (v+1)/2 max_log + (1 - (v+1)/2) min_log
        x_prev = c_x0 x0 + c_x x + (g_learned exp(log_var / 2) + g_fixed) z

    An x0-prediction model passes its x0 [B, 1, H, W] directly (`x0=`; eps unused, a and b ignored). Without
    a learned variance (v None) g_learned must be 0.
    """
    x = np.asarray(x)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
    coef = np.asarray(coef, dtype=dtype)
    if coef.shape == (8,):
        cols = list(coef)
    elif coef.shape == (x.shape[0], 8):
        cols = list(coef.T.reshape((8, -1) + (1,) * (x.ndim - 1)))
    else:
        raise ValueError(f"coef must have shape [8] or [B, 8] with B = {x.shape[0]}, got {coef.shape}")
    a, b, c_x0, c_x, min_log, max_log, g_learned, g_fixed = cols
    x0 = a * x - b * eps if x0 is None else np.asarray(x0, dtype)
    if clip is not None:
        x0 = np.clip(x0, dtype.type(clip[0]), dtype.type(clip[1]))
    if v is None:
        return c_x0 * x0 + c_x * x + g_fixed * z
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    return c_x0 * x0 + c_x * x + (g_learned * np.exp(0.5 * log_var) + g_fixed) * z
