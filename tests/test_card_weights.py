"""Model card JSON and the safetensors container: round trips, and refusal of damaged files."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from diffseg_engine.artifacts.card import Architecture, ModelCard, Preprocessing
from diffseg_engine.core.errors import ModelFileError
from diffseg_engine.artifacts.weights import load_weights, read_metadata, save_weights, weights_digest


def _card(**kw) -> ModelCard:
    arch = Architecture(in_channels=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,))
    return ModelCard(name="t", preset="tiny", modalities=("flair",), architecture=arch,
                     preprocessing=Preprocessing(crop_size=224, downsample=4), **kw)


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.standard_normal((3, 4)).astype(np.float32),
            "b.bias": rng.standard_normal(5).astype(np.float32), "c.idx": np.arange(4, dtype=np.int64)}


def test_card_json_round_trip_is_exact():
    card = _card(training={"steps": 12, "val_cases": ["x"]})
    back = ModelCard.from_json(card.to_json())
    assert back == card and back.training == card.training
    assert back.architecture.channel_mult == (1, 2) and back.image_size == 56


def test_card_rejects_inconsistent_channels_and_future_versions():
    with pytest.raises(ModelFileError, match="in_channels"):
        ModelCard(name="t", preset="x", modalities=("flair", "t1"),
                  architecture=Architecture(in_channels=2, model_channels=8))
    data = json.loads(_card().to_json())
    data["format_version"] = 99
    with pytest.raises(ModelFileError, match="format version 99"):
        ModelCard.from_dict(data)
    with pytest.raises(ModelFileError, match="malformed"):
        ModelCard.from_dict({"format_version": 1, "name": "x"})


def test_card_whose_learn_sigma_disagrees_with_the_network_is_refused_on_load(tmp_path):
    """diffusion.learn_sigma must say what the network's output channels say (2: learned variance, 1: none);
    a file whose card disagrees is refused when loaded, naming the file."""
    assert _card().diffusion.learn_sigma and _card().architecture.out_channels == 2  # consistent defaults
    path = tmp_path / "m.safetensors"
    save_weights(path, _tensors(), _card())
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + header_len])
    card = json.loads(header["__metadata__"]["diffseg_card"])
    card["diffusion"]["learn_sigma"] = False
    header["__metadata__"]["diffseg_card"] = json.dumps(card)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + header_len:])
    with pytest.raises(ModelFileError, match=r"m\.safetensors: model card is inconsistent: diffusion\.learn_sigma is "
                                             r"False but the network has 2 output channels"):
        load_weights(path)
    with pytest.raises(ModelFileError, match="learn_sigma"):
        ModelCard(name="t", preset="x", modalities=("flair",),
                  architecture=Architecture(in_channels=2, model_channels=8, out_channels=1))


def test_weights_round_trip_and_digest(tmp_path):
    t = _tensors()
    card = save_weights(tmp_path / "m.safetensors", t, _card())
    assert card.weights_sha256 == weights_digest(t)
    back, card2 = load_weights(tmp_path / "m.safetensors")
    assert card2 == card
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
        assert back[k].dtype == t[k].dtype


def test_weights_readable_by_reference_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    t = _tensors()
    save_weights(tmp_path / "m.safetensors", t, _card())
    back = st.load_file(str(tmp_path / "m.safetensors"))
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
    # and files written by the reference library (with our card added) read back
    st.save_file(t, str(tmp_path / "ref.safetensors"),
                 metadata={"diffseg_card": _card().replace(weights_sha256=weights_digest(t)).to_json()})
    back2, _ = load_weights(tmp_path / "ref.safetensors")
    np.testing.assert_array_equal(back2["a.weight"], t["a.weight"])


def test_tampered_weights_are_refused(tmp_path):
    p = tmp_path / "m.safetensors"
    save_weights(p, _tensors(), _card())
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0x40  # flip a bit inside the last tensor
    (tmp_path / "flip.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="sha256"):
        load_weights(tmp_path / "flip.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match="truncated|outside"):
        load_weights(tmp_path / "trunc.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ModelFileError, match="too short"):
        load_weights(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelFileError, match="header length"):
        load_weights(tmp_path / "huge.safetensors")
    (tmp_path / "tail.safetensors").write_bytes(p.read_bytes() + b"xx")
    with pytest.raises(ModelFileError, match="trailing"):
        load_weights(tmp_path / "tail.safetensors")


def test_file_without_card_is_refused_with_fix(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    st.save_file(_tensors(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelFileError, match="no diffseg model card") as exc:
        load_weights(tmp_path / "plain.safetensors")
    assert "plain.safetensors" in str(exc.value) and "\n" not in str(exc.value)
    assert read_metadata(tmp_path / "plain.safetensors") == {}


def test_half_precision_tensors_round_trip(tmp_path):
    """The shipped model is fp16; bf16 (numpy via ml_dtypes, when installed) round-trips too, digest intact."""
    t = {"h": np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4), "f": np.arange(3, dtype=np.float32)}
    try:
        import ml_dtypes
        t["b"] = np.linspace(-1, 1, 6, dtype=np.float32).astype(ml_dtypes.bfloat16)
    except ImportError:
        pass
    card = save_weights(tmp_path / "h.safetensors", t, _card())
    back, card2 = load_weights(tmp_path / "h.safetensors")
    assert card2.weights_sha256 == card.weights_sha256 == weights_digest(back)
    for k in t:
        assert back[k].dtype == t[k].dtype
        np.testing.assert_array_equal(back[k].astype(np.float32), t[k].astype(np.float32))
