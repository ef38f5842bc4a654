"""Named model configurations: what `--preset NAME` means.

Owns: `PRESETS` (name -> Preset) and `build_card`. A preset fixes the architecture, the preprocessing and
the diffusion process; the modalities are chosen at training time.
Imports: `artifacts.card`, `core.errors` (lazily).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from diffseg_engine.artifacts.card import Architecture, DiffusionSpec, ModelCard, Preprocessing


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_ds: tuple[int, ...]
    num_heads: int
    preprocessing: Preprocessing
    diffusion: DiffusionSpec
    default_modalities: tuple[str, ...]
    batch_size: int
    ema_rate: float
    lr: float = 1e-4
    dropout: float = 0.0
    tumour_weight: float = 1.0  # how much more often slices with tumour are drawn
    flip: bool = True  # random left-right flips (off for the paper's preset: the paper used no augmentation)
    train_steps: int = 10_000  # `train --steps` when not given
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # The paper: 128 channels, multipliers of improved-diffusion's 256 model, one head at downsampling 16,
    # 224x224 crops of four modalities, masks in {0, 1} as the paper's code.
    "paper": Preset(
        name="paper", description="Wolleb et al. 2022: 128 ch, mult 1,1,2,2,4,4, 2 res blocks, attention at 16, 224²",
        model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_ds=(16,), num_heads=1,
        preprocessing=Preprocessing(crop_size=224, downsample=1),
        # the paper's sampler (DDPM over all 1000 steps) is its card's default; no augmentation; 60 000 steps
        diffusion=DiffusionSpec(mask_low=0.0, mask_high=1.0, sampler="ddpm", sampling_steps=1000),
        default_modalities=("t1", "t1ce", "t2", "flair"), batch_size=10, ema_rate=0.9999, flip=False,
        train_steps=60_000,
    ),
    # Sized for 2 CPU cores: 112² (2x area downsampling of the 224² crop), 32 channels, one res block per
    # level, attention at downsampling 8 (14x14, the grid the paper's attention sees), masks in {-1, 1}.
    # Measured here (fp32, batch 16): ~5 s/step for 2 res blocks and mult 1,2,3,4; ~2.5 s/step for this.
    "cpu": Preset(
        name="cpu", description="CPU-sized: 32 ch, mult 1,2,2,4, 1 res block, attention at 8, 112² (224² /2)",
        model_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=1, attention_ds=(8,), num_heads=1,
        preprocessing=Preprocessing(crop_size=224, downsample=2),
        diffusion=DiffusionSpec(mask_low=-1.0, mask_high=1.0),
        default_modalities=("flair",), batch_size=8, ema_rate=0.999, lr=2e-4, tumour_weight=3.0,
    ),
    # The `cpu` network at 56² (4x area downsampling of the 224² crop, 4 mm pixels): a quarter of the compute,
    # so four times the steps in the same CPU minutes. Upsampled back, the ground truth of the two validation
    # patients keeps a 3D Dice of 0.96-0.97 at 56² (0.98 at 112²), far above what the budget lets a model reach.
    "cpu-fast": Preset(
        name="cpu-fast", description="CPU-trainable in an hour: 32 ch, mult 1,2,2,4, 1 res block, attention at 8, "
                                     "56² (224² /4)",
        model_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=1, attention_ds=(8,), num_heads=1,
        preprocessing=Preprocessing(crop_size=224, downsample=4),
        diffusion=DiffusionSpec(mask_low=-1.0, mask_high=1.0),
        default_modalities=("flair",), batch_size=16, ema_rate=0.995, lr=5e-4, tumour_weight=3.0,
    ),
    # For tests: seconds per dozen steps.
    "tiny": Preset(
        name="tiny", description="Test-sized: 8 ch, mult 1,2, 1 res block, attention at 2, 56² (224² /4)",
        model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), num_heads=1,
        preprocessing=Preprocessing(crop_size=224, downsample=4),
        diffusion=DiffusionSpec(mask_low=-1.0, mask_high=1.0),
        default_modalities=("flair",), batch_size=8, ema_rate=0.99, lr=1e-3, tumour_weight=3.0,
    ),
}

# `cpu-fast` at half the width: a quarter of the parameters (0.79 M, 1.6 MB in fp16) and 3.1x the training
# steps per second on one core (2.33 vs 0.76 steps/s, batch 16, x0 + recycling; benchmarks/train_speed.py),
# so the shipped files stay small and the 90-minute CPU budget buys about three times the steps. The default
# model's preset.
PRESETS["cpu-small"] = dataclasses.replace(
    PRESETS["cpu-fast"], name="cpu-small", model_channels=16,
    description="The default model's: 16 ch, mult 1,2,2,4, 1 res block, attention at 8, 56² (224² /4); 0.79 M "
                "parameters")


def get_preset(name: str) -> Preset:
    from diffseg_engine.core.errors import UsageError
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}", fix=f"choose one of {', '.join(PRESETS)}") from None


def build_card(preset: Preset, modalities: tuple[str, ...], *, name: str | None = None,
               training: dict | None = None, prediction: str = "eps", mask_scale: float = 0.0) -> ModelCard:
    """The card of a model trained with `preset` on `modalities`.

    prediction "eps" (the paper: noise + learned variance, 2 output channels) or "x0" (one output channel, the
    tumour logit; fixed variance). mask_scale b > 0: masks at ±b instead of the preset's values (x0 clipped to
    ±b); 0 keeps the preset's."""
    diffusion = preset.diffusion
    if mask_scale:
        diffusion = dataclasses.replace(diffusion, mask_low=-mask_scale, mask_high=mask_scale,
                                        clip_low=-mask_scale, clip_high=mask_scale)
    if prediction == "x0":
        # what the x0 recipe was evaluated with (README "Quality"): few DDIM steps, eta 1
        diffusion = dataclasses.replace(diffusion, prediction="x0", learn_sigma=False, sampler="ddim",
                                        sampling_steps=5, eta=1.0)
    arch = Architecture(in_channels=len(modalities) + 1, model_channels=preset.model_channels,
                        out_channels=1 if prediction == "x0" else 2,
                        num_res_blocks=preset.num_res_blocks, attention_ds=preset.attention_ds,
                        channel_mult=preset.channel_mult, num_heads=preset.num_heads, dropout=preset.dropout)
    return ModelCard(name=name or f"diffseg-{preset.name}-{'-'.join(modalities)}", preset=preset.name,
                     modalities=tuple(modalities), architecture=arch, preprocessing=preset.preprocessing,
                     diffusion=diffusion, training=dict(training or {}))

# `cpu-small` at 112² (224² / 2, 2 mm pixels): a quarter of the network pixels' area each, so small lesions
# survive the grid (benchmarks/results/grid_ceiling-cpu.md: a perfect model of the 56² grid leaves about half
# of the tumour slices with under 100 true voxels empty, of the 112² grid 12-28 %; per-slice Dice ceiling
# 0.85-0.87 at 56², 0.92-0.93 at 112²), at four times the compute per slice.
PRESETS["cpu-small-112"] = dataclasses.replace(
    PRESETS["cpu-small"], name="cpu-small-112", preprocessing=dataclasses.replace(
        PRESETS["cpu-small"].preprocessing, downsample=2),
    description="cpu-small at 112² (224² /2): 16 ch, mult 1,2,2,4, 1 res block, attention at 8; 0.79 M parameters")

