"""The U-Net: reference (guided-diffusion / Wolleb et al.) parameter layout, architecture inference,
strict loading with one-line errors, batch independence and ONNX export."""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from diffseg_engine.artifacts.card import Architecture  # noqa: E402
from diffseg_engine.core.errors import ModelFileError  # noqa: E402
from diffseg_engine.train.perturb import perturbed  # noqa: E402
from diffseg_engine.train.unet import (  # noqa: E402
    AttentionBlock,
    UNetModel,
    infer_architecture,
    load_state_dict_strict,
    timestep_embedding,
    unwrap_state_dict,
)

SMALL = Architecture(in_channels=2, model_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=1,
                     attention_ds=(4,))
PAPER = Architecture(in_channels=5, model_channels=128, out_channels=2, num_res_blocks=2, attention_ds=(16,),
                     channel_mult=(1, 1, 2, 2, 4, 4))


def reference_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the paper code's UNetModel state dict, enumerated the way its constructor
    builds the modules (guided_diffusion/unet.py + nn.py), independently of our implementation."""
    out: dict[str, tuple[int, ...]] = {}
    mc, emb = arch.model_channels, 4 * arch.model_channels

    def lin(p, i, o):
        out[p + ".weight"], out[p + ".bias"] = (o, i), (o,)

    def conv(p, i, o, k):
        out[p + ".weight"], out[p + ".bias"] = (o, i, k, k), (o,)

    def norm(p, c):
        out[p + ".weight"], out[p + ".bias"] = (c,), (c,)

    def res(p, i, o):
        norm(p + ".in_layers.0", i)
        conv(p + ".in_layers.2", i, o, 3)
        lin(p + ".emb_layers.1", emb, 2 * o if arch.use_scale_shift_norm else o)
        norm(p + ".out_layers.0", o)
        conv(p + ".out_layers.3", o, o, 3)
        if i != o:
            conv(p + ".skip_connection", i, o, 1)

    def attn(p, c):
        norm(p + ".norm", c)
        out[p + ".qkv.weight"], out[p + ".qkv.bias"] = (3 * c, c, 1), (3 * c,)
        out[p + ".proj_out.weight"], out[p + ".proj_out.bias"] = (c, c, 1), (c,)

    lin("time_embed.0", mc, emb)
    lin("time_embed.2", emb, emb)
    conv("input_blocks.0.0", arch.in_channels, mc, 3)
    chans, ch, ds, n = [mc], mc, 1, 1
    for level, mult in enumerate(arch.channel_mult):
        for _ in range(arch.num_res_blocks):
            res(f"input_blocks.{n}.0", ch, mult * mc)
            ch = mult * mc
            if ds in arch.attention_ds:
                attn(f"input_blocks.{n}.1", ch)
            chans.append(ch)
            n += 1
        if level < len(arch.channel_mult) - 1:
            if arch.resblock_updown:
                res(f"input_blocks.{n}.0", ch, ch)
            else:
                conv(f"input_blocks.{n}.0.op", ch, ch, 3)
            chans.append(ch)
            n += 1
            ds *= 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    n = 0
    for level in reversed(range(len(arch.channel_mult))):
        mult = arch.channel_mult[level]
        for i in range(arch.num_res_blocks + 1):
            res(f"output_blocks.{n}.0", ch + chans.pop(), mult * mc)
            ch, j = mult * mc, 1
            if ds in arch.attention_ds:
                attn(f"output_blocks.{n}.1", ch)
                j = 2
            if level and i == arch.num_res_blocks:
                if arch.resblock_updown:
                    res(f"output_blocks.{n}.{j}", ch, ch)
                else:
                    conv(f"output_blocks.{n}.{j}.conv", ch, ch, 3)
                ds //= 2
            n += 1
    norm("out.0", ch)
    conv("out.2", mc, arch.out_channels, 3)
    return out


@pytest.fixture(scope="module")
def small_model() -> UNetModel:
    torch.manual_seed(0)
    return perturbed(UNetModel(SMALL))


@pytest.fixture(scope="module")
def paper_meta_state() -> dict:
    """The paper-sized (113.7 M parameters) state dict, shapes only: built on the meta device."""
    with torch.device("meta"):
        model = UNetModel(PAPER)
    return model.state_dict()


# ---- forward ------------------------------------------------------------------------------------------
def test_output_shape_and_batch_independence(small_model):
    x = torch.randn(3, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 437, 999])
    with torch.no_grad():
        batch = small_model(x, t)
        singles = [small_model(x[i:i + 1], t[i:i + 1]) for i in range(3)]
        floats = small_model(x, t.float())
        reordered = small_model(x[[2, 0, 1]], t[[2, 0, 1]])
    assert batch.shape == (3, 2, 32, 32)
    assert singles[0].shape == (1, 2, 32, 32)
    assert batch.abs().max() > 1e-3  # not the trivial all-zero output of a fresh model
    for i in range(3):
        torch.testing.assert_close(batch[i:i + 1], singles[i], atol=1e-5, rtol=0)
    torch.testing.assert_close(floats, batch, atol=1e-6, rtol=0)
    torch.testing.assert_close(reordered, batch[[2, 0, 1]], atol=1e-5, rtol=0)
    assert not torch.allclose(batch[0], batch[1])


def test_fresh_model_outputs_zero_like_reference():
    # zero_module on out.2, out_layers.3 and proj_out, as the reference initialises them
    model = UNetModel(SMALL).eval()
    for name, p in model.named_parameters():
        if name == "out.2.weight" or name.endswith("out_layers.3.weight") or name.endswith("proj_out.weight"):
            assert not p.any(), name
    with torch.no_grad():
        assert not model(torch.randn(1, 2, 32, 32), torch.tensor([5])).any()


@pytest.mark.parametrize("flags", [dict(use_scale_shift_norm=True), dict(resblock_updown=True),
                                   dict(use_scale_shift_norm=True, resblock_updown=True, num_head_channels=32)])
def test_variants_run(flags):
    arch = Architecture(in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_ds=(1, 2), out_channels=1, **flags)
    model = perturbed(UNetModel(arch))
    with torch.no_grad():
        y = model(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]))
    assert y.shape == (2, 1, 16, 16) and torch.isfinite(y).all()


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 10.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([math.exp(-math.log(10000) * i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(torch.tensor([3]), 7).shape == (1, 7)


def test_attention_uses_legacy_head_order():
    block = perturbed(AttentionBlock(64, num_heads=2))
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        got = block(x)
        # the reference QKVAttentionLegacy, written out: heads outer, then q/k/v, then channels
        b, c = 2, 64
        flat = x.reshape(b, c, -1)
        qkv = block.qkv(block.norm(flat)).reshape(b * 2, 3 * 32, -1)
        q, k, v = qkv.split(32, dim=1)
        s = 1 / math.sqrt(math.sqrt(32))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        expected = (flat + block.proj_out(a)).reshape(x.shape)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---- reference layout ------------------------------------------------------------------------------------
def test_paper_keys_match_reference_layout(paper_meta_state):
    ours = {k: tuple(v.shape) for k, v in paper_meta_state.items()}
    assert ours == reference_shapes(PAPER)
    assert sum(math.prod(s) for s in ours.values()) == 113_674_370
    for key, shape in {
        "input_blocks.0.0.weight": (128, 5, 3, 3),
        "time_embed.0.weight": (512, 128),
        "time_embed.2.weight": (512, 512),
        "middle_block.1.qkv.weight": (1536, 512, 1),
        "middle_block.1.proj_out.weight": (512, 512, 1),
        "out.2.weight": (2, 128, 3, 3),
        "out.0.weight": (128,),
        "input_blocks.1.0.in_layers.2.weight": (128, 128, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (128, 512),
        "input_blocks.1.0.out_layers.3.weight": (128, 128, 3, 3),
        "input_blocks.3.0.op.weight": (128, 128, 3, 3),
        "input_blocks.13.1.qkv.weight": (1536, 512, 1),  # attention at downsampling 16 (level 4)
        "output_blocks.0.0.skip_connection.weight": (512, 1024, 1, 1),
        "output_blocks.2.1.conv.weight": (512, 512, 3, 3),
        "output_blocks.5.2.conv.weight": (512, 512, 3, 3),
        "output_blocks.17.0.skip_connection.weight": (128, 256, 1, 1),
    }.items():
        assert ours[key] == shape, key
    assert "input_blocks.1.0.skip_connection.weight" not in ours  # same width: identity skip


@pytest.mark.parametrize("flags", [dict(), dict(use_scale_shift_norm=True, resblock_updown=True)])
def test_small_keys_match_reference_layout(flags):
    arch = dataclasses.replace(SMALL, **flags)
    with torch.device("meta"):
        model = UNetModel(arch)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference_shapes(arch)


def test_reference_layout_state_dict_loads_strictly(small_model):
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in reference_shapes(SMALL).items()}
    model = UNetModel(SMALL).eval()
    load_state_dict_strict(model, sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    # numpy arrays (as read from safetensors) load as well, and give the same network
    other = load_state_dict_strict(UNetModel(SMALL).eval(), {k: v.numpy() for k, v in sd.items()})
    x, t = torch.randn(1, 2, 32, 32), torch.tensor([100])
    with torch.no_grad():
        torch.testing.assert_close(other(x, t), model(x, t), atol=0, rtol=0)


# ---- strict loading errors ---------------------------------------------------------------------------------
def _one_line_error(model, sd) -> str:
    with pytest.raises(ModelFileError) as info:
        load_state_dict_strict(model, sd)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_corrupted_state_dicts_raise_model_file_error(small_model):
    good = small_model.state_dict()
    target = UNetModel(SMALL)

    missing = dict(good)
    del missing["middle_block.1.qkv.weight"]
    msg = _one_line_error(target, missing)
    assert "1 missing key" in msg and "middle_block.1.qkv.weight" in msg

    extra = dict(good, **{"label_emb.weight": torch.zeros(2, 128)})
    msg = _one_line_error(target, extra)
    assert "1 unexpected key" in msg and "label_emb.weight" in msg

    wrong = dict(good, **{"input_blocks.0.0.weight": torch.zeros(32, 5, 3, 3)})
    msg = _one_line_error(target, wrong)
    assert "shape mismatch" in msg and "input_blocks.0.0.weight" in msg and "[32, 5, 3, 3]" in msg

    many = {k: v for k, v in good.items() if not k.startswith("output_blocks")}
    msg = _one_line_error(target, many)
    assert "more)" in msg  # first few keys and a count, not all of them
    assert len(msg) < 600


def test_unwrap_state_dict_wrappers(small_model):
    sd = small_model.state_dict()
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}, "step": 5}
    unwrapped = unwrap_state_dict(wrapped)
    assert list(unwrapped) == list(sd)
    load_state_dict_strict(UNetModel(SMALL), wrapped)
    assert infer_architecture(wrapped) == SMALL
    with pytest.raises(ModelFileError):
        unwrap_state_dict([1, 2, 3])


# ---- architecture inference --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", [
    SMALL,
    Architecture(in_channels=5, model_channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                 attention_ds=(2, 4), use_scale_shift_norm=True),
    Architecture(in_channels=2, model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=3,
                 attention_ds=(), resblock_updown=True, out_channels=1),
    Architecture(in_channels=4, model_channels=32, channel_mult=(2,), num_res_blocks=1, attention_ds=(1,)),
    Architecture(in_channels=2, model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_ds=(1, 2),
                 resblock_updown=True, use_scale_shift_norm=True),
])
def test_infer_architecture_round_trips(arch):
    with torch.device("meta"):
        sd = UNetModel(arch).state_dict()
    assert infer_architecture(sd) == arch
    shapes_only = {k: _Shape(tuple(v.shape)) for k, v in sd.items()}
    assert infer_architecture(shapes_only) == arch


class _Shape:
    """Anything with a .shape will do for inference (numpy arrays, torch tensors, safetensors views)."""

    def __init__(self, shape):
        self.shape = shape


def test_infer_architecture_paper(paper_meta_state):
    assert infer_architecture(paper_meta_state) == PAPER
    assert infer_architecture(paper_meta_state, num_heads=4).num_heads == 4


def test_infer_architecture_rejects_other_networks():
    with pytest.raises(ModelFileError, match="input_blocks.0.0.weight"):
        infer_architecture({"conv.weight": torch.zeros(3, 3, 3, 3)})


def test_onnx_export_matches_torch(small_model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "unet.onnx"
    x, t = torch.randn(2, 2, 32, 32), torch.tensor([3.0, 700.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and group_norm's internal TracerWarning
        # dynamo=False: the default (dynamo) exporter of torch >= 2.9 needs onnxscript; the TorchScript one does not
        torch.onnx.export(small_model, (x, t), str(path), input_names=["x", "t"], output_names=["out"],
                          opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "out": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(7)
    for batch in (1, 4):
        xb = torch.randn(batch, 2, 32, 32, generator=g)
        tb = torch.randint(0, 1000, (batch,), generator=g).float()
        with torch.no_grad():
            expected = small_model(xb, tb).numpy()
        got = session.run(["out"], {"x": xb.numpy(), "t": tb.numpy()})[0]
        assert got.shape == (batch, 2, 32, 32)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
