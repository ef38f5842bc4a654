"""Checkpoints written by the paper's own code (`savedmodel*.pt`, `emasavedmodel_0.9999_*.pt`) -> safetensors.

Owns: `convert_checkpoint` — read a torch checkpoint of the paper's ``guided_diffusion`` U-Net safely (tensor
data only, never arbitrary unpickling unless the user says they trust the file), read the architecture back
from the weights, load them strictly, and write float32 safetensors with a model card describing the
paper's pipeline: the four BraTS modalities t1, t1ce, t2, flair (the reference loader's channel order) in
[0, 1] as the reference 2D slices come, cropped 240 -> 224 (``[8:-8, 8:-8]``), a mask x_0 in {0, 1}, the
linear 1000-step schedule, learned variance when the network has two output channels and x_0 clipped to
[-1, 1].
Imports: numpy, torch; `artifacts.card`, `artifacts.weights`, `core.errors`, `inputs.cases`, `train.unet`.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from diffseg_engine.artifacts.card import Architecture, DiffusionSpec, ModelCard, Preprocessing
from diffseg_engine.inputs.cases import canonical_modality
from diffseg_engine.core.errors import DiffsegError, ModelFileError
from diffseg_engine.artifacts.weights import save_weights

from ..train.unet import UNetModel, infer_architecture, load_state_dict_strict, unwrap_state_dict
from diffseg_engine.artifacts.weights import file_sha256 as _sha256

__all__ = ["convert_checkpoint", "load_checkpoint", "PAPER_MODALITIES"]

#: The reference loader's channel order (``bratsloader.py``: t1, t1ce, t2, flair; the mask is appended last).
PAPER_MODALITIES = ("t1", "t1ce", "t2", "flair")

# weights_only refusals that mean "this file is a pickle of objects other than tensors and containers":
# loading it would need the full unpickler, which can run code from the file.
_NEEDS_PICKLE = re.compile(
    r"was not an allowed global|is blocked|Can only create new object|call reduce for unrecognized function"
    r"|Can only build|must be imported to load|Can only (append to|extend) lists|Can only set"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """A short, single-line description of `exc` (torch's messages span many lines)."""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    # torch wraps weights_only refusals in paragraphs of advice; keep the unpickler's own reason
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
        text = text.split(" Check the documentation of torch.load", 1)[0].strip()
    if len(text) > limit and ". " in text:  # torch appends paragraphs of advice after the first sentence
        text = text.split(". ", 1)[0]
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _corrupt(path: Path, exc: BaseException) -> ModelFileError:
    return ModelFileError(f"is not a readable PyTorch checkpoint (truncated, corrupt or another format: "
                          f"{_one_line(exc)})", path=path,
                          fix="give a file written by torch.save, e.g. the paper code's emasavedmodel_*.pt, "
                              "and check it was copied completely")


def load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[Any, str]:
    """The object stored in torch checkpoint `path`, and how it was read ("weights_only" or "full_unpickle").

    Tries ``torch.load(weights_only=True)`` first (tensors and plain containers only, no code runs). A file
    that needs the full unpickler raises `ModelFileError` unless `trust_pickle`; corrupt, truncated and
    non-torch files raise `ModelFileError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError("checkpoint not found", path=path, fix="check the path")
    if not path.is_file():
        raise ModelFileError("is not a file", path=path, fix="give the .pt checkpoint file itself")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": our error says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True), "weights_only"
    except pickle.UnpicklingError as exc:
        if not _NEEDS_PICKLE.search(str(exc)) and not trust_pickle:
            raise _corrupt(path, exc) from None  # bad opcodes: damaged, or not a torch file at all
        reason = _one_line(exc, 120)
    except MemoryError:
        raise
    except OSError as exc:
        raise ModelFileError(f"cannot be read ({exc.strerror or exc})", path=path,
                             fix="check the path and its permissions") from None
    except Exception as exc:  # RuntimeError (bad zip), EOFError (empty), KeyError/ValueError (not torch) ...
        raise _corrupt(path, exc) from None
    if not trust_pickle:
        raise ModelFileError(
            f"holds Python objects besides tensors ({reason}); loading it needs full unpickling, which can run "
            f"code from the file, so it was not loaded",
            path=path, fix="pass --trust-pickle (trust_pickle=True) only if you trust the file's source, or "
                           "re-save just the weights with torch.save(model.state_dict(), path)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False), "full_unpickle"
    except MemoryError:
        raise
    except DiffsegError:
        raise
    except Exception as exc:  # the file's own code may raise anything
        raise _corrupt(path, exc) from None


def convert_checkpoint(pt_path: str | os.PathLike, out_path: str | os.PathLike, *, trust_pickle: bool = False,
                       num_heads: int = 1, modalities: Sequence[str] = PAPER_MODALITIES) -> Path:
    """Convert a checkpoint of the paper's code to float32 safetensors with a model card; returns `out_path`.

    pt_path: a state dict of guided-diffusion's `UNetModel` saved with torch.save (also wrapped as
    {"state_dict": ...} or with DataParallel "module." prefixes). num_heads: attention heads, which the
    weights do not show (the paper: 1). modalities: the image channels in training order (the paper's loader:
    t1, t1ce, t2, flair); the network's in_channels must be len(modalities) + 1 (the noisy mask is last).
    Raises `ModelFileError` (one line, naming the file) for unreadable, untrusted or non-fitting checkpoints.
    """
    pt_path, out_path = Path(pt_path), Path(out_path)
    if num_heads < 1:
        raise ModelFileError(f"num_heads must be at least 1, got {num_heads}")
    mods = tuple(canonical_modality(m) for m in modalities)
    if not mods or len(set(mods)) != len(mods):
        raise ModelFileError(f"modalities {list(modalities)} must name each channel once")
    if out_path.suffix != ".safetensors":
        raise ModelFileError("output name must end in .safetensors", path=out_path)
    if out_path.resolve() == pt_path.resolve():
        raise ModelFileError("output would overwrite the checkpoint", path=out_path, fix="choose another name")

    obj, how = load_checkpoint(pt_path, trust_pickle=trust_pickle)
    try:
        state = unwrap_state_dict(obj)
    except ModelFileError as exc:
        raise ModelFileError(f"{exc}".rstrip("."), path=pt_path) from None
    arch: Architecture = infer_architecture(state, num_heads=num_heads, path=pt_path)
    if arch.in_channels != len(mods) + 1:
        raise ModelFileError(
            f"the U-Net takes {arch.in_channels} input channels, but {len(mods)} modalities {list(mods)} plus the "
            f"noisy mask make {len(mods) + 1}", path=pt_path,
            fix=f"give the {arch.in_channels - 1} modalities the model was trained on, in its channel order "
                f"(the paper's BraTS models: t1, t1ce, t2, flair)")
    if arch.out_channels not in (1, 2):
        raise ModelFileError(f"the U-Net has {arch.out_channels} output channels; a segmentation DDPM has 1 "
                             f"(noise) or 2 (noise and learned variance)", path=pt_path)
    with torch.device("meta"):  # every parameter is overwritten: skip the random initialisation
        net = UNetModel(arch)
    net = net.to_empty(device="cpu")
    load_state_dict_strict(net, state, path=pt_path)
    del obj, state

    card = ModelCard(
        name="paper-" + pt_path.stem,
        preset="paper-import",
        modalities=mods,
        architecture=arch,
        # orientation "": the arrays as stored, as the paper's loader read them (its reference 2D slices carry
        # an identity affine that does not describe their content)
        preprocessing=Preprocessing(intensity="none", crop_size=224, downsample=1, orientation=""),
        # the paper's own sampler is the default: DDPM over all 1000 steps
        diffusion=DiffusionSpec(schedule="linear", timesteps=1000, learn_sigma=arch.out_channels == 2,
                                mask_low=0.0, mask_high=1.0, clip_denoised=True, clip_low=-1.0, clip_high=1.0,
                                sampler="ddpm", sampling_steps=1000),
        training={"source": str(pt_path), "source_sha256": _sha256(pt_path),
                  "converted_by": "diffseg-engine export", "loaded_with": how},
    )
    tensors = {k: np.ascontiguousarray(v.detach().to(torch.float32).cpu().numpy())
               for k, v in net.state_dict().items()}
    save_weights(out_path, tensors, card)
    return out_path
