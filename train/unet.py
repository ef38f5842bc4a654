"""The improved-DDPM / guided-diffusion U-Net that Wolleb et al. (2022) train, in the paper code's layout.

Owns: `UNetModel` (built from a `card.Architecture`), `infer_architecture` (reads the hyper-parameters back
from a state dict's names and shapes), `unwrap_state_dict` and `load_state_dict_strict` (one-line
`ModelFileError` instead of torch's multi-line RuntimeError).
Imports: torch; `artifacts.card`, `core.errors`.
Definitions and conventions: the comment below the imports.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from diffseg_engine.artifacts.card import Architecture
from diffseg_engine.core.errors import ModelFileError

# Parameter names and shapes are those of ``guided_diffusion/unet.py`` of the paper's code (openai
# guided-diffusion, unchanged by Wolleb), so a ``savedmodel*.pt`` / ``emasavedmodel_0.9999_*.pt`` written by
# ``scripts/segmentation_train.py`` loads with ``load_state_dict(strict=True)`` and no renaming:
#
#     time_embed.{0,2}                       Linear(C, 4C), SiLU, Linear(4C, 4C)
#     input_blocks.0.0                       Conv2d(in, C, 3)
#     input_blocks.i.0                       ResBlock     (in_layers.{0,2}, emb_layers.1, out_layers.{0,3},
#                                                          skip_connection when channels change)
#     input_blocks.i.1                       AttentionBlock (norm, qkv, proj_out; 1-D convs)
#     input_blocks.i.0.op                    Downsample conv, stride 2 (or a ResBlock with down=True)
#     middle_block.{0,1,2}                   ResBlock, AttentionBlock, ResBlock
#     output_blocks.j.{0,1,2}                ResBlock, [AttentionBlock], [Upsample (.conv) or up-ResBlock]
#     out.{0,2}                              GroupNorm, SiLU, Conv2d(C, out, 3)
#
# The forward pass is the reference's (legacy QKV attention order, GroupNorm with 32 groups computed in
# float32, sinusoidal timestep embedding with cos before sin), written to trace cleanly for ONNX export with
# a dynamic batch axis: no Python arithmetic on tensor sizes except through reshape/flatten.

__all__ = [
    "UNetModel",
    "GroupNorm32",
    "ResBlock",
    "AttentionBlock",
    "Downsample",
    "Upsample",
    "TimestepEmbedSequential",
    "timestep_embedding",
    "infer_architecture",
    "unwrap_state_dict",
    "load_state_dict_strict",
    "check_state_dict",
]


# ---- building blocks ---------------------------------------------------------------------------------
def _num_groups(channels: int) -> int:
    """32 groups as the reference. Narrower test-sized models (channels not a multiple of 32, which the
    reference cannot build at all) fall back to the largest divisor of 32 that divides `channels`."""
    return 32 if channels % 32 == 0 else math.gcd(32, channels)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always computes in float32 and returns the input dtype (the reference's)."""

    def __init__(self, channels: int):
        super().__init__(_num_groups(channels), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _zeroed(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B]: cos half, then sin half."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period) / half)
    freqs = torch.exp(exponent)
    args = timesteps.reshape(-1, 1).float() * freqs.reshape(1, -1)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands `emb` to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (use_conv) a 3x3 conv named `conv`."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv named `op` (use_conv) or a 2x2 average pool (also named `op`, no parameters)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling (resblock_updown)."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zeroed(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with the reference's legacy head layout (qkv laid out heads-outer:
    [B, H*3*ch, T] -> per head [q; k; v]). `qkv` and `proj_out` are 1x1 Conv1d as in the reference."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1):
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        else:
            if channels % num_head_channels:
                raise ModelFileError(f"attention width {channels} is not divisible by "
                                     f"num_head_channels={num_head_channels}")
            heads = channels // num_head_channels
        if heads < 1 or channels % heads:
            raise ModelFileError(f"attention width {channels} is not divisible by num_heads={heads}")
        self.channels = channels
        self.num_heads = heads
        self.head_channels = channels // heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)  # [B, C, T]
        qkv = self.qkv(self.norm(flat))  # [B, H*3*ch, T]
        ch = self.head_channels
        qkv = qkv.reshape(-1, 3 * ch, qkv.shape[-1])  # [B*H, 3*ch, T]
        q, k, v = qkv.split(ch, dim=1)
        scale = 1.0 / math.sqrt(math.sqrt(ch))  # scaling q and k separately is steadier in float16
        weight = torch.bmm((q * scale).transpose(1, 2), k * scale)  # [B*H, T(query), S(key)]
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        a = torch.bmm(v, weight.transpose(1, 2))  # [B*H, ch, T]
        h = self.proj_out(a.reshape(-1, self.channels, a.shape[-1]))  # [B, C, T]
        return (flat + h).reshape_as(x)


# ---- the network -------------------------------------------------------------------------------------
class UNetModel(nn.Module):
    """The paper's U-Net. forward(x [B, in_channels, H, W], timesteps [B]) -> [B, out_channels, H, W].

    For the segmentation model x is the image modalities followed by the noisy mask x_t as last channel,
    and output channel 0 is the predicted noise, channel 1 the learned-variance interpolation value.
    H and W must be multiples of `arch.size_divisor`. Timesteps are the raw integer step indices
    0..T-1 (the paper uses rescale_timesteps=False), as int or float.
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        mc = arch.model_channels
        if mc < 1 or arch.in_channels < 1 or arch.out_channels < 1 or arch.num_res_blocks < 1:
            raise ModelFileError(f"invalid U-Net architecture {arch}")
        if not arch.channel_mult or min(arch.channel_mult) < 1:
            raise ModelFileError(f"invalid channel_mult {arch.channel_mult}")
        self.in_channels = arch.in_channels
        self.model_channels = mc
        self.out_channels = arch.out_channels
        emb_dim = 4 * mc
        attn = set(arch.attention_ds)

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, emb_dim, arch.dropout, out_channels=cout,
                            use_scale_shift_norm=arch.use_scale_shift_norm, **kw)

        def att(c: int) -> AttentionBlock:
            return AttentionBlock(c, num_heads=arch.num_heads, num_head_channels=arch.num_head_channels)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(arch.in_channels, mc, 3, padding=1))])
        skip_chans = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(arch.channel_mult):
            for _ in range(arch.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in attn:
                    layers.append(att(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(arch.channel_mult) - 1:
                down = res(ch, ch, down=True) if arch.resblock_updown else Downsample(ch, True, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), att(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(arch.channel_mult))[::-1]:
            for i in range(arch.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in attn:
                    layers.append(att(ch))
                if level and i == arch.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if arch.resblock_updown else Upsample(ch, True, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch),
            nn.SiLU(),
            _zeroed(nn.Conv2d(ch, arch.out_channels, 3, padding=1)),
        )

    def convert_to_fp16(self) -> "UNetModel":
        """As the reference's use_fp16: the convolutions of the torso in float16; linears, norms, the
        timestep MLP and the output head stay float32 (GroupNorm computes in float32 regardless)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.half()
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(timesteps):
            timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = x.to(self.input_blocks[0][0].weight.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


# ---- state dicts ---------------------------------------------------------------------------------------
def unwrap_state_dict(obj: Any) -> dict[str, Any]:
    """The tensors of a checkpoint: unwraps {"state_dict": ...} (and similar single-purpose wrappers) and
    strips a DataParallel/DDP "module." prefix when every key carries it."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = None
        for key in ("state_dict", "model_state_dict", "model", "ema"):
            if key in obj and isinstance(obj[key], Mapping) and not hasattr(obj[key], "shape"):
                inner = obj[key]
                break
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ModelFileError(f"checkpoint holds a {type(obj).__name__}, not a state dict of tensors",
                             fix="pass the model's state_dict (torch.save(model.state_dict(), path))")
    sd = dict(obj)
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not hasattr(v, "shape")]
    if bad:
        raise ModelFileError(f"checkpoint entries are not tensors: {_few(bad)}",
                             fix="pass the model's state_dict, not a training checkpoint")
    return sd


def _few(keys: list[str], n: int = 3) -> str:
    keys = sorted(keys, key=_natural)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _natural(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in v.shape)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> str | None:
    """None if `state_dict` fits `model` exactly (names and shapes), else a one-line description."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and _shape(state_dict[k]) != expected[k]]
    if not (missing or unexpected or mismatched):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) != 1)} ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)} ({_few(unexpected)})")
    if mismatched:
        shown = sorted(mismatched, key=_natural)
        desc = ", ".join(f"{k}: file {list(_shape(state_dict[k]))} vs model {list(expected[k])}"
                         for k in shown[:3])
        if len(shown) > 3:
            desc += f", ... ({len(shown) - 3} more)"
        parts.append(f"{len(mismatched)} shape mismatch{'es' * (len(mismatched) != 1)} ({desc})")
    return "; ".join(parts)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Any], *, path: object | None = None) -> nn.Module:
    """Load exactly (every name, every shape), or raise one-line `ModelFileError` naming the offending keys.
    Accepts torch tensors or numpy arrays; wrappers and "module." prefixes are removed first."""
    sd = unwrap_state_dict(state_dict)
    problem = check_state_dict(model, sd)
    if problem:
        raise ModelFileError(f"weights do not fit the U-Net: {problem}", path=path,
                             fix="use the architecture the weights were trained with "
                                 "(infer_architecture reads it from the weights)")
    tensors = {k: v if torch.is_tensor(v) else torch.as_tensor(v) for k, v in sd.items()}
    model.load_state_dict(tensors, strict=True)
    return model


# ---- architecture from weights --------------------------------------------------------------------------
def infer_architecture(state_dict: Mapping[str, Any], *, num_heads: int = 1, num_head_channels: int = -1,
                       path: object | None = None) -> Architecture:
    """Read the `Architecture` back from a state dict's names and shapes (torch tensors or numpy arrays).

    num_heads / num_head_channels do not show in the weights and are taken as given (the paper: 1, -1).
    Attention factors are those where attention blocks exist (a factor deeper than the network is lost).
    """
    sd = unwrap_state_dict(state_dict)

    def fail(msg: str) -> ModelFileError:
        return ModelFileError(f"not a U-Net state dict of the paper's layout: {msg}", path=path,
                              fix="pass a savedmodel*.pt / emasavedmodel*.pt of guided-diffusion's UNetModel")

    def need(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise fail(f"no {key}")
        return _shape(sd[key])

    first = need("input_blocks.0.0.weight")
    if len(first) != 4:
        raise fail(f"input_blocks.0.0.weight has shape {list(first)}")
    mc, in_ch = first[0], first[1]
    out_ch = need("out.2.weight")[0]

    blocks: dict[str, dict[int, set[str]]] = {"input_blocks": {}, "output_blocks": {}}
    pat = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
    for key in sd:
        m = pat.match(key)
        if m:
            subs = blocks[m.group(1)].setdefault(int(m.group(2)), set())
            subs.add(f"{m.group(3)}.{m.group(4)}")
    n_out = len(blocks["output_blocks"])
    if not n_out or sorted(blocks["output_blocks"]) != list(range(n_out)):
        raise fail("output_blocks missing or not numbered 0..n-1")

    def kind(group: str, i: int, j: int) -> str | None:
        names = {s.split(".", 1)[1] for s in blocks[group].get(i, ()) if s.split(".", 1)[0] == str(j)}
        if not names:
            return None
        if "in_layers.2.weight" in names:
            return "res"
        if "qkv.weight" in names:
            return "attn"
        if "op.weight" in names:
            return "down"
        if "conv.weight" in names:
            return "up"
        return "other"

    # The first output block that ends in an upsampler sits at index num_res_blocks.
    def has_upsampler(j: int) -> tuple[bool, bool]:
        kinds = [kind("output_blocks", j, s) for s in range(4)]
        if "up" in kinds:
            return True, False
        if any(k == "res" for k in kinds[1:]):  # a second ResBlock: the up=True one
            return True, True
        return False, False

    first_up = next((j for j in range(n_out) if has_upsampler(j)[0]), None)
    nrb = (n_out - 1) if first_up is None else first_up
    if nrb < 1 or n_out % (nrb + 1):
        raise fail(f"{n_out} output blocks do not split into levels of num_res_blocks + 1")
    levels = n_out // (nrb + 1)
    resblock_updown = bool(first_up is not None and has_upsampler(first_up)[1])

    n_in = len(blocks["input_blocks"])
    if n_in != levels * (nrb + 1) or sorted(blocks["input_blocks"]) != list(range(n_in)):
        raise fail(f"{n_in} input blocks, expected {levels * (nrb + 1)} for {levels} levels of "
                   f"{nrb} res blocks")

    mults: list[int] = []
    attention_ds: list[int] = []
    for level in range(levels):
        base = 1 + level * (nrb + 1)
        width = need(f"input_blocks.{base}.0.out_layers.3.weight")[0]
        if width % mc:
            raise fail(f"level {level} has {width} channels, not a multiple of model_channels={mc}")
        mults.append(width // mc)
        if kind("input_blocks", base, 1) == "attn":
            attention_ds.append(2 ** level)
        if level != levels - 1:
            down = kind("input_blocks", base + nrb, 0)
            if down != ("res" if resblock_updown else "down"):
                raise fail(f"input_blocks.{base + nrb} is not the downsampler expected "
                           f"(resblock_updown={resblock_updown})")

    emb_rows = need("input_blocks.1.0.emb_layers.1.weight")[0]
    width0 = need("input_blocks.1.0.out_layers.3.weight")[0]
    if emb_rows not in (width0, 2 * width0):
        raise fail(f"emb_layers of {emb_rows} rows for a {width0}-channel block")
    if need("time_embed.0.weight") != (4 * mc, mc):
        raise fail(f"time_embed.0.weight has shape {list(_shape(sd['time_embed.0.weight']))}")

    return Architecture(
        in_channels=in_ch,
        model_channels=mc,
        out_channels=out_ch,
        num_res_blocks=nrb,
        attention_ds=tuple(attention_ds),
        channel_mult=tuple(mults),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        use_scale_shift_norm=emb_rows == 2 * width0,
        resblock_updown=resblock_updown,
        dropout=0.0,
    )
