"""Training on real BraTS slices: the loss falls, checkpoints round-trip, resume continues exactly."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from diffseg_engine.backends import read_card
from diffseg_engine.core.errors import ModelFileError, UsageError
from diffseg_engine.sampling.schedule import tables_for
from diffseg_engine.train.data import BatchSampler, labelled_cases, load_slices, split_cases
from diffseg_engine.train.losses import TorchTables, hybrid_loss, segmentation_loss
from diffseg_engine.train.loop import TrainConfig, train
from diffseg_engine.train.presets import build_card, get_preset
from diffseg_engine.train.step import build_step
from diffseg_engine.train.unet import UNetModel, load_state_dict_strict
from diffseg_engine.artifacts.weights import load_weights


def _few_slices(shared_data, n_cases=2, per_case=6):
    card = build_card(get_preset("tiny"), ("flair",))
    cases, _ = labelled_cases(shared_data / "train", ("flair",))
    data = load_slices(cases[:n_cases], card, max_slices_per_case=per_case)
    return card, data


def test_loss_falls_on_real_slices(shared_data):
    """A few dozen Adam steps of the tiny preset on 12 real FLAIR slices cut the hybrid loss clearly."""
    card, data = _few_slices(shared_data)
    assert data.has_tumour.any(), "the chosen slices should include tumour"
    torch.manual_seed(0)
    model = UNetModel(card.architecture)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    tt = TorchTables(tables_for("linear", 1000))
    gen = torch.Generator().manual_seed(0)
    img, msk = torch.from_numpy(data.images), torch.from_numpy(data.masks)
    # a fixed evaluation set of timesteps and noise, so the comparison is not luck of the draw
    t_eval = torch.arange(0, 1000, 1000 // len(img))[: len(img)]
    n_eval = torch.randn(msk.shape, generator=gen)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(hybrid_loss(model, tt, img, msk, t_eval, n_eval).loss.mean())

    before = eval_loss()
    for _ in range(40):
        t = torch.randint(0, 1000, (len(img),), generator=gen)
        loss = hybrid_loss(model, tt, img, msk, t, torch.randn(msk.shape, generator=gen)).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_patient_level_split_is_deterministic_and_disjoint():
    ids = [f"p{i}" for i in range(12)]
    tr, va = split_cases(ids, seed=3)
    assert len(va) == 2 and not set(tr) & set(va) and sorted(tr + va) == sorted(ids)
    assert split_cases(ids, seed=3) == (tr, va)
    assert split_cases(ids, val_cases=["p5"]) == (sorted(i for i in ids if i != "p5"), ["p5"])


def test_batch_sampler_prefers_tumour_slices(shared_data):
    card, data = _few_slices(shared_data, per_case=20)
    frac = data.has_tumour.mean()
    sampler = BatchSampler(data, 64, tumour_weight=5.0, seed=0)
    drawn = np.concatenate([sampler.rng.choice(len(data), 64, p=sampler.p) for _ in range(20)])
    assert data.has_tumour[drawn].mean() > frac + 0.1
    img, msk = sampler.next()
    assert img.shape == (64, 1, 56, 56) and set(np.unique(msk)) <= {-1.0, 1.0}


def _cfg(shared_data, out, steps):
    return TrainConfig(data=str(shared_data / "train"), out=str(out), preset="tiny", steps=steps,
                       checkpoint_every=3, log_every=1, max_slices_per_case=4, batch_size=4, precision="fp32",
                       threads=1)


@pytest.mark.slow
def test_checkpoint_round_trip_and_exact_resume(shared_data, tmp_path):
    """6 steps in one go == 3 steps, stop, --resume to 6; the saved model loads strictly into the U-Net."""
    straight = train(_cfg(shared_data, tmp_path / "a", 6), quiet=True)
    train(_cfg(shared_data, tmp_path / "b", 3), quiet=True)
    resumed = train(_cfg(shared_data, tmp_path / "b", 6), resume=True, quiet=True)
    wa, card_a = load_weights(straight)
    wb, card_b = load_weights(resumed)
    assert card_a.training["steps"] == card_b.training["steps"] == 6
    assert card_a.weights_sha256 == card_b.weights_sha256
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    # card says what the file is; weights load strictly into the architecture it names
    assert card_a.modalities == ("flair",) and card_a.preset == "tiny"
    assert card_a.training["augmentations"] == ["flip_lr"]  # the card says how it was trained (FLIP_AUGMENTATION)
    assert card_a.training["val_cases"] and not set(card_a.training["val_cases"]) & set(card_a.training["train_cases"])
    load_state_dict_strict(UNetModel(card_a.architecture), {k: torch.from_numpy(v) for k, v in wa.items()})
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "checkpoint"] == [3, 6]
    assert all(np.isfinite(r["val_mse"]) for r in log if r["event"] == "checkpoint")


@pytest.mark.slow
def test_max_minutes_stops_with_a_checkpoint_and_resume_continues_exactly(shared_data, tmp_path):
    """A time budget stops after the step in progress, checkpoints and says so; --resume then ends exactly
    where an uninterrupted run ends."""
    straight = train(_cfg(shared_data, tmp_path / "a", 4), quiet=True)
    cfg = dataclasses.replace(_cfg(shared_data, tmp_path / "b", 4), max_minutes=1e-6)
    train(cfg, quiet=True)
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    stopped = [r for r in log if r["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] == 1 and "--max-minutes" in stopped[0]["reason"]
    assert [r["step"] for r in log if r["event"] == "checkpoint"] == [1]
    assert load_weights(tmp_path / "b" / "model.safetensors")[1].training["steps"] == 1
    resumed = train(_cfg(shared_data, tmp_path / "b", 4), resume=True, quiet=True)
    wa, ca = load_weights(straight)
    wb, cb = load_weights(resumed)
    assert ca.training["steps"] == cb.training["steps"] == 4 and ca.weights_sha256 == cb.weights_sha256


def test_segmentation_objective_learns_and_is_refused_where_a_diffusion_model_is_needed(shared_data, tmp_path):
    """The deterministic baseline (same U-Net, image + zero channel, t = 0) fits real slices; its file says
    what it is, and segment/export refuse it instead of sampling noise from it."""
    card, data = _few_slices(shared_data)
    torch.manual_seed(0)
    model = UNetModel(card.architecture)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    img, msk = torch.from_numpy(data.images), torch.from_numpy(data.masks)
    low, high = card.diffusion.mask_low, card.diffusion.mask_high
    with torch.no_grad():
        before = float(segmentation_loss(model, img, msk, low, high).loss.mean())
    for _ in range(40):
        loss = segmentation_loss(model, img, msk, low, high).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(segmentation_loss(model, img, msk, low, high).loss.mean()) < 0.7 * before

    cfg = dataclasses.replace(_cfg(shared_data, tmp_path / "seg", 2), objective="segmentation")
    path = train(cfg, quiet=True)
    tensors, saved = load_weights(path)
    assert saved.objective == "segmentation"
    log = [json.loads(line) for line in (tmp_path / "seg" / "train_log.jsonl").read_text().splitlines()]
    assert {"bce", "dice_loss"} <= set(next(r for r in log if r["event"] == "train"))
    with pytest.raises(ModelFileError, match="deterministic U-Net baseline"):
        read_card(path)
    with pytest.raises(ModelFileError, match="deterministic U-Net baseline"):
        build_step(saved, tensors)


def test_training_options_are_checked(shared_data, tmp_path):
    for change, needle in [(dict(objective="regression"), "--objective"), (dict(max_minutes=-1.0), "--max-minutes"),
                           (dict(device="tpu"), "--device")]:
        with pytest.raises(UsageError, match=needle):
            train(dataclasses.replace(_cfg(shared_data, tmp_path / "x", 2), **change), quiet=True)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            train(dataclasses.replace(_cfg(shared_data, tmp_path / "y", 2), device="cuda"), quiet=True)
