"""The batched ensemble sampler: the paper's Algorithm 2, N times per slice, all members batched.

Owns: `SamplingPlan` (which steps, their coefficient rows and network timesteps, mirrored members),
`plan_sampling` / `chosen_plan`, and `sample_ensemble`: a loop over rounds (`rounds.Rounds`; ``--n auto`` adds
rounds for the slices whose maps still change) and over chunks of (slice, member) work items, each chunk run
through all timesteps by one `run_chunk` call (`core.steps.ChunkFn`: a backend's); a chunk that does not fit
in memory is halved and retried.
Imports: numpy; `artifacts`, `core`, `inputs`, `rounds`, `schedule`. Never torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..artifacts.card import ModelCard
from ..core.ensemble import AutoN, EnsembleSize, EnsembleStats, member_probability, sampled_size
from ..core.errors import BatchMemoryError, ResourceError, UsageError
from ..inputs.geometry import lr_network_axis
from ..core.noise import NoiseStreams
from ..core.steps import ChunkFn
from .rounds import Rounds
from .schedule import (ddim_coefficients, ddpm_coefficients, model_timesteps, respace, space_timesteps,
                       tables_for)

SAMPLERS = ("ddpm", "ddim")


@dataclass(frozen=True)
class SamplingPlan:
    """sampler, steps, eta: as asked. coefs: [K, 8] float32, row i = step i (sampled from K-1 down to 0).
    timesteps: [K] float32, what the network receives at step i. mirror: every odd member (m = 1, 3, ...) sees
    the slice mirrored left-right and its mask is mirrored back, so the ensemble averages over the two
    views a flip-trained model knows equally well; its noise is the member's own stream, drawn in the
    network's frame as for any member."""

    sampler: str
    steps: int
    eta: float
    coefs: np.ndarray
    timesteps: np.ndarray
    mirror: bool = False

    def describe(self) -> dict:
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta, "mirror": self.mirror}


#: Steps when --steps is not given. DDPM respaced to 25 steps: on the validation patients the shipped model's
#: Dice at N=10 was 0.634 against 0.640 for 250 steps (DDPM over all 1000, the paper's, ran with N=5 only:
#: 0.621, and 250 steps gave 0.613 there); see benchmarks/results/sampler_comparison-*.md. DDIM (η=0) fell to
#: about 0.34 for this model whatever the steps, so it is not the default.
DEFAULT_STEPS = {"ddpm": 25, "ddim": 50}


def default_steps(sampler: str) -> int:
    return DEFAULT_STEPS.get(sampler, 25)


def chosen_plan(card: ModelCard, sampler: str | None = None, steps: int | None = None,
                eta: float | None = None, mirror: bool | None = None) -> SamplingPlan:
    """The plan for what a user asked, the model card's sampler filling what they did not.

    No sampler given: the card's (`diffusion.sampler`, `sampling_steps`, `eta`: what the model was evaluated
    with). A sampler given: its steps and eta default to the card's when it is the card's sampler, else to
    `DEFAULT_STEPS` and eta 0. mirror: None takes the card's (`diffusion.mirror`)."""
    d = card.diffusion
    mirror = d.mirror if mirror is None else bool(mirror)
    sampler = sampler or d.sampler
    same = sampler == d.sampler
    if steps is None:
        steps = d.sampling_steps if same else default_steps(sampler)
    if eta is None:
        eta = d.eta if same else 0.0
    return plan_sampling(card, sampler, steps, eta, mirror=mirror)


def plan_sampling(card: ModelCard, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0, *,
                  mirror: bool = False) -> SamplingPlan:
    """DDPM over all T steps (the paper), DDPM respaced to K steps, or DDIM(η) with K steps."""
    T = card.diffusion.timesteps
    steps = T if steps is None else int(steps)
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}", fix=f"choose one of {', '.join(SAMPLERS)}")
    if not 1 <= steps <= T:
        raise UsageError(f"--steps must lie in 1..{T}, got {steps}")
    if not 0.0 <= eta <= 1.0:
        raise UsageError(f"--eta must lie in [0, 1], got {eta}")
    tables = tables_for(card.diffusion.schedule, T)
    if steps != T:
        tables = respace(tables, kept_timesteps(T, sampler, steps))
    coefs = ddpm_coefficients(tables, learn_sigma=card.architecture.learn_sigma) if sampler == "ddpm" \
        else ddim_coefficients(tables, eta)
    return SamplingPlan(sampler, steps, float(eta), coefs.astype(np.float32), model_timesteps(tables), bool(mirror))


def kept_timesteps(T: int, sampler: str, steps: int) -> set[int]:
    """Which of the T steps run: DDIM uses improved-diffusion's integer stride ("ddimK") where one gives
    exactly K steps, else (as DDPM always) K evenly spaced steps (`space_timesteps(T, [K])`)."""
    if sampler == "ddim":
        try:
            return space_timesteps(T, f"ddim{steps}")
        except UsageError:
            pass
    return space_timesteps(T, [steps])


def sample_ensemble(run_chunk: ChunkFn, images: np.ndarray, *, members: EnsembleSize, plan: SamplingPlan,
                    streams: NoiseStreams | None, slice_ids: np.ndarray, card: ModelCard, batch_size: int,
                    stats: EnsembleStats | None = None, start_item: int = 0, rounds: Rounds | None = None,
                    on_progress: Callable[[int], None] | None = None,
                    on_member: Callable[[int, int, np.ndarray], None] | None = None,
                    on_chunk: Callable[[int, EnsembleStats], None] | None = None,
                    on_batch_size: Callable[[int, BatchMemoryError], None] | None = None) -> EnsembleStats:
    """Sample `members` masks for each slice of `images` [S, C, h, w]; returns their streamed statistics.

    run_chunk: a backend's `StepBackend.run_chunk` (or `core.steps.host_runner(step)` for a bare one-step
    function): runs one chunk through all K timesteps, drawing x_T and every z of member (s, m) from stream
    (slice_ids[s], m) of `streams.key`, so the result does not depend on `batch_size`.
    members: N (every slice gets N) or `ensemble.AutoN` (rounds; a slice stops when a round no longer changes
    its maps, `rounds.Rounds`; with mirrored members in even counts, `AutoN.in_pairs`); `stats.count` then
    says how many members each slice got.
    Work items (slice, member) are processed in chunks of at most `batch_size` (a chunk never spans two
    rounds). `start_item`, `stats` and (auto) `rounds` resume after finished chunks; pass a fresh `Rounds` to
    read the schedule as it goes (what the chunk touched, `Rounds.state`). `on_chunk(next_item, stats)` is
    called after each chunk, `on_progress(n)` after each step of a chunk (negative when a failed chunk's steps
    are taken back).
    If `run_chunk` raises `BatchMemoryError`, that chunk is halved and retried from its start, and the rest of
    the run keeps the smaller size (`on_batch_size(new_size, error)` is told); finished chunks are never redone.
    At batch size 1 the error becomes a `ResourceError` for the user.
    """
    S, _, h, w = images.shape
    if not isinstance(members, AutoN) and members < 1:
        raise UsageError(f"--n must be at least 1, got {members}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    stats = stats if stats is not None else EnsembleStats(S, (h, w))
    members = sampled_size(members, plan.mirror)  # mirrored --n auto: rounds of even counts
    rounds = rounds if rounds is not None else Rounds(S, members)
    key = streams.key if streams is not None else (0, 0)
    lo = start_item
    while not rounds.finished:
        items = rounds.items()
        while lo - rounds.round_lo < len(items):
            pos = lo - rounds.round_lo
            chunk = items[pos:pos + batch_size]
            try:
                prob = _run_chunk(run_chunk, images, chunk, plan, key, slice_ids, card, on_progress)
            except BatchMemoryError as exc:
                if len(chunk) == 1:
                    raise ResourceError(f"out of memory even at batch size 1 ({exc})",
                                        fix="free memory (other processes on this GPU or machine), use --device cpu, "
                                            "or a smaller model; finished chunks are kept, so rerunning the same "
                                            "command resumes") from None
                batch_size = len(chunk) // 2
                if on_batch_size:
                    on_batch_size(batch_size, exc)
                continue
            for j, (s, m) in enumerate(chunk):
                rounds.before_add(s, m, stats)
                stats.add(s, prob[j])
                rounds.after_add(s, m, stats)
                if on_member:
                    on_member(s, m, prob[j])
            lo += len(chunk)
            rounds.last_rows = (chunk[0][0], chunk[-1][0])
            if on_chunk:
                on_chunk(lo, stats)
        rounds.next_round(lo)
    return stats


def _run_chunk(run_chunk: ChunkFn, images: np.ndarray, chunk: list[tuple[int, int]], plan: SamplingPlan,
               key: tuple[int, int], slice_ids: np.ndarray, card: ModelCard,
               on_progress: Callable[[int], None] | None) -> np.ndarray:
    """One chunk through `run_chunk`; returns each member's probability map [B, h, w] float64. The steps of
    a chunk that fails for memory are taken back from `on_progress`."""
    pos = np.fromiter((s for s, _ in chunk), np.int64, len(chunk))
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        if on_progress:
            on_progress(n)
    try:
        x = run_chunk(_member_images(images, chunk, plan, card), np.asarray(slice_ids)[pos].astype(np.int64),
                      np.fromiter((m for _, m in chunk), np.int64, len(chunk)), plan.coefs, plan.timesteps,
                      key, progress)
    except BatchMemoryError:
        if on_progress and done[0]:
            on_progress(-done[0])
        raise
    return _member_maps(x, chunk, plan, card)


def _mirrored(chunk: list[tuple[int, int]], plan: SamplingPlan) -> np.ndarray:
    """bool [B]: which work items of the chunk are mirrored members (odd m, when the plan mirrors)."""
    return np.fromiter((plan.mirror and m % 2 == 1 for _, m in chunk), bool, len(chunk))


def _member_images(images: np.ndarray, chunk: list[tuple[int, int]], plan: SamplingPlan,
                   card: ModelCard) -> np.ndarray:
    """The network's image input [B, C, h, w] float32 of each work item: its slice, mirrored left-right for a
    mirrored member."""
    pos = np.fromiter((s for s, _ in chunk), np.int64, len(chunk))
    img = np.ascontiguousarray(images[pos], np.float32)
    flip = _mirrored(chunk, plan)
    if flip.any():
        img[flip] = np.flip(img[flip], axis=lr_network_axis(card.preprocessing.orientation))
    return img


def _member_maps(x: np.ndarray, chunk: list[tuple[int, int]], plan: SamplingPlan, card: ModelCard) -> np.ndarray:
    """Each member's probability map [B, h, w] float64 from the final x [B, 1, h, w], in the slice's own frame
    (mirrored members mirrored back)."""
    prob = member_probability(x[:, 0].astype(np.float64), card.diffusion.mask_low, card.diffusion.mask_high)
    flip = _mirrored(chunk, plan)
    if flip.any():  # prob is this chunk's own array
        prob[flip] = np.flip(prob[flip], axis=lr_network_axis(card.preprocessing.orientation))
    return prob
