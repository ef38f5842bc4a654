"""The model card: what a model file is, stored inside every artifact.

Owns: `ModelCard` and its parts (`Architecture`, `Preprocessing`, `DiffusionSpec`), their JSON form and its
validation. A card travels in safetensors metadata (key ``diffseg_card``), in ONNX ``metadata_props`` (same
key) and as a JSON file beside a TensorRT plan, so any file says what it is.
Imports: `core.errors`. Never torch.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import ModelFileError

FORMAT_VERSION = 1
CARD_KEY = "diffseg_card"

#: What network output channel 0 predicts (`DiffusionSpec.prediction`).
PREDICTIONS = ("eps", "x0")

#: Canonical modality names, in the paper's channel order. Files of other naming conventions map onto these.
MODALITIES = ("t1", "t1ce", "t2", "flair")


@dataclass(frozen=True)
class Architecture:
    """Hyper-parameters of the improved-DDPM U-Net (names as in the paper's code, `UNetModel`).

    `attention_ds` lists the downsampling factors (1, 2, 4, ...) at which attention blocks sit; the paper's
    `--attention_resolutions 16` with `--image_size 256` means attention at factor 16.
    """

    in_channels: int
    model_channels: int
    out_channels: int = 2
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (16,)
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_heads: int = 1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_ds", tuple(int(a) for a in self.attention_ds))
        object.__setattr__(self, "channel_mult", tuple(int(c) for c in self.channel_mult))

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2

    @property
    def size_divisor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class Preprocessing:
    """How a 2D axial slice becomes network input, and (inverted) how output goes back to the input grid.

    intensity: ``"percentile"`` clips each modality of a volume at its `percentile_low`/`percentile_high`
    percentiles over brain (non-zero) voxels and scales to [0, 1] (background stays 0); ``"none"`` expects
    intensities already in [0, 1] (the paper's reference 2D slices).
    crop_size: in-plane centre crop / zero pad to crop_size x crop_size (240 -> 224 is ``[8:-8, 8:-8]``).
    downsample: integer factor applied after cropping (area average); network size = crop_size // downsample.
    orientation: the canonical voxel orientation (nibabel axis codes of the 3D volume, e.g. ``"LPS"`` as BraTS
    stores it: axis 0 to the patient's left, 1 posterior, 2 superior) every input is reoriented to before
    slicing, and its outputs reoriented back from; network slices are [h, w] = the two non-S axes in this
    order (LPS: h = left-right, w = anterior-posterior). ``""`` means the arrays as stored (the voxel axis
    closest to superior-inferior is the slice axis): the cards of models converted from the paper's code, whose
    loader used the arrays as stored; such a card without the field (preset ``paper-import``) reads as ``""``.
    spacing_mm: the in-plane voxel spacing (mm) the network was trained at; an input axis whose spacing differs
    by more than `geometry.SPACING_TOLERANCE` (5 %) is resampled in-plane to it (and outputs back onto the
    input grid). The crop window covers crop_size x spacing_mm mm.
    """

    intensity: str = "percentile"
    percentile_low: float = 1.0
    percentile_high: float = 99.0
    crop_size: int = 224
    downsample: int = 1
    orientation: str = "LPS"
    spacing_mm: float = 1.0

    def __post_init__(self) -> None:
        codes = str(self.orientation).upper()
        pairs = ({"L", "R"}, {"A", "P"}, {"S", "I"})
        if codes and (len(codes) != 3 or sorted(next((k for k, p in enumerate(pairs) if c in p), 9)
                                                  for c in codes) != [0, 1, 2]):
            raise ValueError(f"orientation {self.orientation!r} is not '' or three axis codes naming L/R, A/P and "
                             "S/I once each")
        object.__setattr__(self, "orientation", codes)
        if not float(self.spacing_mm) > 0:
            raise ValueError(f"spacing_mm {self.spacing_mm!r} must be positive")

    @property
    def image_size(self) -> int:
        return self.crop_size // self.downsample


#: Presets whose cards predate `Preprocessing.orientation` and meant the arrays as stored.
AS_STORED_PRESETS = ("paper-import",)


@dataclass(frozen=True)
class DiffusionSpec:
    """The forward process the network was trained for.

    mask_low/mask_high: the values background and tumour take in x_0 (the paper's code uses 0 and 1; a
    "mask scale" b < 1 means masks at ±b, so x_t carries less of the mask at every t).
    clip_denoised: clip the predicted x_0 to [clip_low, clip_high]: the paper's code clips to [-1, 1].
    prediction: what network output channel 0 is. ``"eps"``: the noise (the paper). ``"x0"``: the tumour logit
    ℓ of the clean mask, x_0 = mask_low + (mask_high - mask_low)·sigmoid(ℓ) (trained with BCE + Dice + MSE).
    sampler, sampling_steps, eta: the sampler `segment` uses when none is asked for (what this model was
    evaluated with). mirror: whether that default samples every odd ensemble member on the left-right mirror
    image (and mirrors its mask back), for models trained with left-right flips (`sampler.SamplingPlan`).
    """

    schedule: str = "linear"
    timesteps: int = 1000
    learn_sigma: bool = True
    mask_low: float = 0.0
    mask_high: float = 1.0
    clip_denoised: bool = True
    clip_low: float = -1.0
    clip_high: float = 1.0
    prediction: str = "eps"
    sampler: str = "ddpm"
    sampling_steps: int = 25
    eta: float = 0.0
    mirror: bool = False

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ModelFileError(f"model card names an unknown prediction target {self.prediction!r}",
                                 fix=f"one of {', '.join(PREDICTIONS)}; re-export with this diffseg-engine")


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to run a model file, and where it came from.

    `modalities` is the channel order of the image b the network is conditioned on; the noisy mask x_t is
    the last input channel, so `architecture.in_channels == len(modalities) + 1`.
    """

    name: str
    preset: str
    modalities: tuple[str, ...]
    architecture: Architecture
    preprocessing: Preprocessing = Preprocessing()
    diffusion: DiffusionSpec = DiffusionSpec()
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION
    training: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if self.architecture.in_channels != len(self.modalities) + 1:
            raise ModelFileError(
                f"model card is inconsistent: {len(self.modalities)} modalities {list(self.modalities)} "
                f"need in_channels={len(self.modalities) + 1}, card says {self.architecture.in_channels}",
                fix="re-export the model with the right --modalities",
            )
        if len(set(self.modalities)) != len(self.modalities):
            raise ModelFileError(f"model card lists a modality twice: {list(self.modalities)}")
        if self.diffusion.learn_sigma != self.architecture.learn_sigma:
            raise ModelFileError(
                f"model card is inconsistent: diffusion.learn_sigma is {self.diffusion.learn_sigma} but the network "
                f"has {self.architecture.out_channels} output channel{'s' if self.architecture.out_channels != 1 else ''}"
                f" ({'a learned variance' if self.architecture.learn_sigma else 'no learned variance'})",
                fix="re-export the model with this diffseg-engine, which writes both from the same network",
            )
        if self.preprocessing.image_size % self.architecture.size_divisor:
            raise ModelFileError(
                f"image size {self.preprocessing.image_size} is not a multiple of "
                f"{self.architecture.size_divisor} required by channel_mult {self.architecture.channel_mult}"
            )

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    def replace(self, **changes: Any) -> "ModelCard":
        return dataclasses.replace(self, **changes)

    @property
    def objective(self) -> str:
        """"diffusion" (a mask-generating DDPM) or "segmentation" (the deterministic U-Net baseline)."""
        return str(self.training.get("objective", "diffusion"))

    def require_diffusion(self, source: object = None) -> "ModelCard":
        """Refuse a deterministic baseline where a diffusion model is needed (it would sample noise)."""
        if self.objective != "diffusion":
            raise ModelFileError(f"is a deterministic U-Net baseline (objective {self.objective!r}), not a "
                                 "diffusion model", path=source,
                                 fix="give a model trained with `diffseg-engine train` (--objective diffusion)")
        return self

    # ---- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: object = "model card") -> "ModelCard":
        try:
            version = int(data.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise ModelFileError(
                    f"model card format version {version} is not supported by this engine "
                    f"(supports {FORMAT_VERSION})",
                    path=source,
                    fix="re-export the model with this version of diffseg-engine",
                )
            return cls(
                name=str(data["name"]),
                preset=str(data["preset"]),
                modalities=tuple(str(m) for m in data["modalities"]),
                architecture=Architecture(**data["architecture"]),
                preprocessing=Preprocessing(**_preprocessing_fields(data)),
                diffusion=DiffusionSpec(**data.get("diffusion", {})),
                weights_sha256=str(data.get("weights_sha256", "")),
                format_version=version,
                training=dict(data.get("training", {})),
            )
        except ModelFileError as exc:
            if exc.path is None and source is not None:  # a check of the card itself: name the file it came from
                raise ModelFileError(exc.message, path=source, fix=exc.fix) from None
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"model card is malformed ({exc!r})", path=source,
                                 fix="use a model written by diffseg-engine train/export") from None

    @classmethod
    def from_json(cls, text: str, *, source: object = "model card") -> "ModelCard":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelFileError(f"model card is not valid JSON ({exc})", path=source) from None
        if not isinstance(data, dict):
            raise ModelFileError("model card is not a JSON object", path=source)
        return cls.from_dict(data, source=source)


def _preprocessing_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The card's preprocessing fields; a card of an as-stored preset written before `orientation` existed
    keeps meaning the arrays as stored."""
    fields = dict(data.get("preprocessing", {}))
    if "orientation" not in fields and str(data.get("preset", "")) in AS_STORED_PRESETS:
        fields["orientation"] = ""
    return fields
