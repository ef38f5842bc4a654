"""The ensemble core that `segment`, cohorts (through `segment`) and the Python API share: sample a prepared
case on a backend and turn the statistics into maps.

Owns: `default_batch_size` (and `CPU_BATCH_CAP`), `sample_case` (the sampler on `StepBackend.run_chunk`, so a
backend with a device loop uses it wherever the engine runs) and `case_maps`. Imports: numpy; `artifacts`, `backends`, `core`, `inputs`, `maps`, `options`, `sampling`. Never torch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..artifacts.card import ModelCard
from ..backends import StepBackend
from ..core.ensemble import EnsembleStats, is_auto
from ..core.errors import BatchMemoryError
from ..core.noise import NoiseStreams
from ..inputs.preprocess import PreparedCase
from ..maps.ensemble_maps import CaseMaps, ensemble_maps
from ..sampling.rounds import Rounds
from ..sampling.sampler import sample_ensemble
from .options import RunSettings

#: On a CPU, batches past ~16 items buy no speed (benchmarks/results/flops-cpu.md: 72.5 ms per item at both 16
#: and 64) but cost ~30 MiB each (end_to_end-cpu.md: 715 MiB peak at batch 8, 2161 MiB at 57, a whole
#: volume); 32 keeps a whole volume well under 2 GB at any N. GPUs want large batches.
CPU_BATCH_CAP = 32


def default_batch_size(card: ModelCard, work_items: int, device: str = "cpu") -> int:
    """Largest batch whose activations fit comfortably in a quarter of the available memory (cap 256; on a
    CPU `CPU_BATCH_CAP`)."""
    avail = 4 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    a = card.architecture
    # activations kept alive by the U-Net's skips, ~ model_channels * H * W floats * (levels, blocks) factor
    per_item = 4 * a.model_channels * card.image_size ** 2 * (4 * a.num_res_blocks + 6) * max(a.channel_mult)
    cap = 256 if str(device).startswith("cuda") else CPU_BATCH_CAP
    return int(max(1, min(cap, work_items, (avail // 4) // max(per_item, 1))))


def sample_case(backend: StepBackend, prepared: PreparedCase, settings: RunSettings, case_id: str, batch_size: int, *,
                stats: EnsembleStats | None = None, start_item: int = 0, rounds: Rounds | None = None,
                on_progress: Callable[[int], None] | None = None,
                on_member: Callable[[int, int, np.ndarray], None] | None = None,
                on_chunk: Callable[[int, EnsembleStats], None] | None = None,
                on_batch_size: Callable[[int, BatchMemoryError], None] | None = None) -> EnsembleStats:
    """The ensemble of `settings.n` members for every slice of `prepared`, on `backend.run_chunk`, with the
    noise streams of (settings.seed, case_id): the same maps wherever it is called from."""
    return sample_ensemble(backend.run_chunk, prepared.inputs, members=settings.n, plan=settings.plan,
                           streams=NoiseStreams(settings.seed, case_id), slice_ids=prepared.slice_index,
                           card=backend.card, batch_size=batch_size, stats=stats, start_item=start_item,
                           rounds=rounds, on_progress=on_progress, on_member=on_member, on_chunk=on_chunk,
                           on_batch_size=on_batch_size)


def case_maps(prepared: PreparedCase, stats: EnsembleStats, zooms: Sequence[float], settings: RunSettings) -> CaseMaps:
    """The maps of a sampled case on the input grid (`maps.ensemble_maps`), with the run's mask clean-up."""
    return ensemble_maps(prepared, stats, zooms, min_component=settings.min_component, members=is_auto(settings.n))
