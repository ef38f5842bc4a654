"""Training recipes beyond the paper's: x0 prediction (with BCE + Dice), recycling, mask scale, the share of
tumour-free slices, left-right flips; and that every backend and the reference sampler run x0 models alike."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from typer.testing import CliRunner  # noqa: E402

from diffseg_engine.backends import read_card  # noqa: E402
from diffseg_engine.backends.ort import OnnxRuntimeBackend  # noqa: E402
from diffseg_engine.backends.torch_ref import TorchBackend  # noqa: E402
from diffseg_engine.artifacts.card import Preprocessing  # noqa: E402
from diffseg_engine.cli import app  # noqa: E402
from diffseg_engine.core.ensemble import member_probability  # noqa: E402
from diffseg_engine.core.errors import ModelFileError  # noqa: E402
from diffseg_engine.export.onnx_export import check_parity, export_onnx  # noqa: E402
from diffseg_engine.core.noise import NoiseStreams  # noqa: E402
from diffseg_engine.sampling.sampler import chosen_plan, plan_sampling, sample_ensemble  # noqa: E402
from diffseg_engine.sampling.schedule import apply_step, q_sample, tables_for  # noqa: E402
from diffseg_engine.train.data import BatchSampler, SliceSet  # noqa: E402
from diffseg_engine.train.losses import TorchTables, x0_loss  # noqa: E402
from diffseg_engine.train.loop import TrainConfig, train  # noqa: E402
from diffseg_engine.train.perturb import perturbed  # noqa: E402
from diffseg_engine.train.presets import build_card, get_preset  # noqa: E402
from diffseg_engine.train.reference import reference_sample  # noqa: E402
from diffseg_engine.train.step import build_step  # noqa: E402
from diffseg_engine.train.unet import UNetModel  # noqa: E402
from diffseg_engine.artifacts.weights import load_weights, save_weights  # noqa: E402

SMALL_PREP = Preprocessing(crop_size=224, downsample=14)  # 16x16 network grid


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def x0_model(tmp_path_factory):
    """A random x0-prediction model (masks at ±0.6, every parameter perturbed) and its ONNX export."""
    tmp = tmp_path_factory.mktemp("x0")
    card = build_card(get_preset("tiny"), ("flair",), name="test-x0", prediction="x0", mask_scale=0.6)
    card = card.replace(preprocessing=SMALL_PREP)
    net = perturbed(UNetModel(card.architecture), seed=4)
    weights = tmp / "x0.safetensors"
    save_weights(weights, {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}, card)
    return weights, export_onnx(weights, tmp / "x0.onnx")


def test_x0_card_and_step_graph(x0_model):
    weights, onnx_path = x0_model
    card = read_card(onnx_path)
    d = card.diffusion
    assert (d.prediction, d.mask_low, d.mask_high, d.clip_low, d.clip_high) == ("x0", -0.6, 0.6, -0.6, 0.6)
    assert card.architecture.out_channels == 1 and not card.architecture.learn_sigma
    assert (d.sampler, d.sampling_steps, d.eta) == ("ddim", 5, 1.0)  # what `segment` runs by default
    assert check_parity(weights, onnx_path, batch=3, seed=1) <= 1e-4
    # the graph's x0 is the network's logit through a sigmoid onto [low, high]: the numpy reference agrees
    tensors, _ = load_weights(weights)
    step = build_step(card, tensors)
    rng = np.random.default_rng(0)
    img = rng.random((4, 1, 16, 16), dtype=np.float32)
    x = rng.standard_normal((4, 1, 16, 16), dtype=np.float32)
    z = rng.standard_normal((4, 1, 16, 16), dtype=np.float32)
    plan = plan_sampling(card, "ddim", 5, 1.0)
    coef = np.repeat(plan.coefs[3:4], 4, axis=0)
    t = np.full(4, plan.timesteps[3], np.float32)
    with torch.no_grad():
        logit = step.net(torch.cat([torch.from_numpy(img), torch.from_numpy(x)], 1), torch.from_numpy(t))
        got = step(*(torch.from_numpy(a) for a in (img, x, t, coef, z))).numpy()
    x0 = -0.6 + 1.2 / (1 + np.exp(-logit.numpy()))
    assert float(np.abs(logit.numpy()).mean()) > 1e-2  # a real, non-trivial network
    np.testing.assert_allclose(got, apply_step(coef, x, None, None, z, (-0.6, 0.6), x0=x0), atol=1e-5)
    # the last step (row 0) returns x0 itself: the member's mask is the model's prediction
    last = step(*(torch.from_numpy(a) for a in (img, x, np.zeros(4, np.float32),
                                                 np.repeat(plan.coefs[:1], 4, 0), z))).detach().numpy()
    with torch.no_grad():
        l0 = step.net(torch.cat([torch.from_numpy(img), torch.from_numpy(x)], 1), torch.zeros(4)).numpy()
    np.testing.assert_allclose(last, -0.6 + 1.2 / (1 + np.exp(-l0)), atol=1e-5)


@pytest.mark.parametrize("sampler,steps,eta", [("ddim", 5, 1.0), ("ddim", 3, 0.0), ("ddpm", 4, 0.0)])
def test_x0_engine_matches_reference_sampler_on_every_backend(x0_model, sampler, steps, eta):
    weights, onnx_path = x0_model
    tensors, card = load_weights(weights)
    net = build_step(card, tensors).net
    rng = np.random.default_rng(5)
    image = rng.random((1, 16, 16), dtype=np.float32)
    streams, slice_id, members = NoiseStreams(3, "case-x0"), 12, 3
    ref = [reference_sample(net, card, image, streams.generator(slice_id, m), sampler=sampler, steps=steps,
                            eta=eta)[0] for m in range(members)]
    ref_p = [member_probability(r.astype(np.float64), -0.6, 0.6) for r in ref]
    assert np.abs(ref_p[0] - ref_p[1]).max() > 0.05  # members differ: the noise reaches the network
    plan = plan_sampling(card, sampler, steps, eta)
    for backend in (OnnxRuntimeBackend.load(onnx_path, device="cpu", threads=1),
                    TorchBackend.load(weights, device="cpu")):
        got = {}
        stats = sample_ensemble(backend.run_chunk, image[None], members=members, plan=plan, streams=streams,
                                slice_ids=np.array([slice_id]), card=card, batch_size=2,
                                on_member=lambda s, m, p: got.__setitem__(m, p))
        for m in range(members):
            np.testing.assert_allclose(got[m], ref_p[m], atol=1e-4, err_msg=f"{backend.name} member {m}")
        np.testing.assert_allclose(stats.mean[0], np.mean(ref_p, 0), atol=1e-4)
        np.testing.assert_allclose(stats.variance[0], np.var(ref_p, 0), atol=1e-4)


def test_recycling_noises_the_models_own_guess_not_the_truth():
    """With recycling the network's second input x_t is q_sample of its own no-grad guess from pure noise."""
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, t):
            seen.append((x[:, -1:].detach().clone(), t.clone()))
            return self.w * x[:, :1] * 4 - 1  # a logit that depends on the image only

    tt = TorchTables(tables_for("linear", 1000))
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 1, 8, 8, generator=gen)
    mask = torch.where(torch.rand(3, 1, 8, 8, generator=gen) > 0.7, 1.0, -1.0)
    t = torch.tensor([5, 400, 999])
    noise, pure = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
    terms = x0_loss(Spy(), tt, image, mask, t, noise, -1.0, 1.0, recycle_noise=pure)
    (first, t_first), (second, t_second) = seen
    assert torch.equal(first, pure) and t_first.tolist() == [999] * 3  # the guess: from pure noise at T-1
    guess = -1 + 2 * torch.sigmoid(0.5 * image * 4 - 1)
    np.testing.assert_allclose(second.numpy(), q_sample(tables_for("linear", 1000), guess.numpy(), t.numpy(),
                                                        noise.numpy()), atol=1e-5)
    assert torch.equal(t_second, t)
    terms.loss.mean().backward()  # only the second call carries gradients; the loss is finite
    assert torch.isfinite(terms.loss).all() and set(terms.parts()) == {"mse", "bce", "dice_loss"}
    seen.clear()
    x0_loss(Spy(), tt, image, mask, t, noise, -1.0, 1.0)  # no recycling: one call, x_t from the truth
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0][0].numpy(), q_sample(tables_for("linear", 1000), mask.numpy(), t.numpy(),
                                                            noise.numpy()), atol=1e-5)


def _slices(n_tumour: int, n_empty: int, size: int = 6) -> SliceSet:
    rng = np.random.default_rng(0)
    masks = -np.ones((n_tumour + n_empty, 1, size, size), np.float32)
    masks[:n_tumour, :, 1:3, 1:4] = 1
    return SliceSet(images=rng.random(masks.shape, dtype=np.float32), masks=masks,
                    case_ids=np.array(["c"] * len(masks)), slice_index=np.arange(len(masks)))


def test_empty_share_sets_the_share_of_tumour_free_slices():
    data = _slices(30, 70)
    for share in (0.1, 0.5):
        s = BatchSampler(data, 50, empty_share=share, seed=1, flip=False)
        assert s.empty_share == pytest.approx(share)
        drawn = np.concatenate([s.rng.choice(len(data), 50, p=s.p) for _ in range(80)])
        assert abs((~data.has_tumour[drawn]).mean() - share) < 0.04
    weighted = BatchSampler(data, 8, tumour_weight=3.0)
    assert weighted.empty_share == pytest.approx(70 / (70 + 90))


def test_flip_mirrors_left_right_axis():
    """Slices are [.., L, P] (LPS volumes, axial axis first): the flip reverses axis -2, never A-P."""
    data = _slices(4, 0)
    s = BatchSampler(data, 64, seed=0, flip=True)
    img, msk = s.next()
    state = BatchSampler(data, 64, seed=0, flip=True)
    idx = state.rng.choice(len(data), size=64, p=state.p)
    flipped = state.rng.random(64) < 0.5
    assert flipped.any() and (~flipped).any()
    np.testing.assert_array_equal(img[flipped], data.images[idx[flipped]][..., ::-1, :])
    np.testing.assert_array_equal(msk[~flipped], data.masks[idx[~flipped]])


def test_recipe_is_trained_recorded_and_sampled_by_default(shared_data, tmp_path):
    cfg = TrainConfig(data=str(shared_data / "train"), out=str(tmp_path / "run"), preset="tiny", steps=2,
                      checkpoint_every=2, log_every=1, max_slices_per_case=3, batch_size=4, precision="fp32",
                      threads=1, prediction="x0", recycling=True, mask_scale=0.5, empty_share=0.25)
    path = train(cfg, quiet=True)
    tensors, card = load_weights(path)
    tr = card.training
    assert (tr["prediction"], tr["recycling"], tr["mask_scale"], tr["augmentations"]) == ("x0", True, 0.5, ["flip_lr"])
    assert tr["empty_share"] == pytest.approx(0.25)
    assert card.diffusion.prediction == "x0" and card.diffusion.mask_high == 0.5
    assert {"val_mse", "val_bce", "val_dice_loss"} <= set(tr)
    # a user who gives no sampler gets the card's; one who names a sampler gets its own defaults
    plan = chosen_plan(card)
    assert (plan.sampler, plan.steps, plan.eta) == ("ddim", 5, 1.0)
    assert (chosen_plan(card, "ddpm").sampler, chosen_plan(card, "ddpm").steps) == ("ddpm", 25)
    assert chosen_plan(card, "ddim", 2).eta == 1.0 and chosen_plan(card, steps=3).steps == 3
    eps_card = build_card(get_preset("tiny"), ("flair",))
    assert (chosen_plan(eps_card).sampler, chosen_plan(eps_card).steps) == ("ddpm", 25)
    # an eps run records its recipe too; the baseline's card has no diffusion recipe
    eps = train(dataclasses.replace(cfg, out=str(tmp_path / "eps"), prediction="eps", recycling=False,
                                    mask_scale=0.0, empty_share=-1.0), quiet=True)
    _, eps_card = load_weights(eps)
    assert eps_card.diffusion.prediction == "eps" and eps_card.architecture.out_channels == 2
    assert (eps_card.training["prediction"], eps_card.training["recycling"]) == ("eps", False)


@pytest.mark.parametrize("flags,needle", [
    (["--prediction", "eps", "--recycling"], "--recycling needs --prediction x0"),
    (["--prediction", "v"], "Invalid value for '--prediction'"),
    (["--prediction", "x0", "--mask-scale", "1.5"], "--mask-scale must lie in"),
    (["--prediction", "x0", "--empty-share", "1"], "--empty-share must be below 1"),
])
def test_recipe_flags_are_checked(shared_data, tmp_path, flags, needle):
    res = CliRunner().invoke(app, ["train", "--data", str(shared_data / "train"), "--out", str(tmp_path / "r"),
                                   "--preset", "tiny", "--steps", "1", "--quiet", *flags])
    assert res.exit_code == 2, res.output
    assert needle in (res.stderr if hasattr(res, "stderr") else res.output)
    assert not (tmp_path / "r" / "state.safetensors").exists()


def test_x0_models_refuse_unknown_prediction_in_card(x0_model):
    _, card = load_weights(x0_model[0])
    data = json.loads(card.to_json())
    data["diffusion"]["prediction"] = "v"
    with pytest.raises(ModelFileError, match="unknown prediction target"):
        type(card).from_dict(data)


def test_partial_recycling_recycles_only_the_chosen_samples():
    """recycled [B]: those samples see x_t from the model's own guess, the others from the truth."""
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, t):
            seen.append(x[:, -1:].detach().clone())
            return self.w * x[:, :1] * 4 - 1

    tables = tables_for("linear", 1000)
    tt = TorchTables(tables)
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(4, 1, 8, 8, generator=gen)
    mask = torch.where(torch.rand(4, 1, 8, 8, generator=gen) > 0.7, 1.0, -1.0)
    t = torch.tensor([10, 300, 600, 900])
    noise, pure = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    recycled = torch.tensor([True, False, True, False])
    x0_loss(Spy(), tt, image, mask, t, noise, -1.0, 1.0, recycle_noise=pure, recycled=recycled)
    guess = -1 + 2 * torch.sigmoid(0.5 * image * 4 - 1)
    want = np.where(recycled.numpy()[:, None, None, None], q_sample(tables, guess.numpy(), t.numpy(), noise.numpy()),
                    q_sample(tables, mask.numpy(), t.numpy(), noise.numpy()))
    np.testing.assert_allclose(seen[1].numpy(), want, atol=1e-5)


def test_soft_targets_and_dice_weight_enter_the_loss_as_fractions():
    """Soft masks (area fractions between low and high) are the BCE target as they are; binary masks give
    exactly the {0, 1} targets of before; dice_weight scales the Dice term only."""
    tables = tables_for("linear", 1000)
    tt = TorchTables(tables)
    net = perturbed(UNetModel(build_card(get_preset("tiny"), ("flair",), prediction="x0").architecture), seed=2)
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(2, 1, 16, 16, generator=gen)
    frac = torch.rand(2, 1, 16, 16, generator=gen)
    t, noise = torch.tensor([100, 700]), torch.randn(2, 1, 16, 16, generator=gen)

    def bce_of(mask, target):
        x_t = torch.from_numpy(q_sample(tables, mask.numpy(), t.numpy(), noise.numpy()))
        logits = net(torch.cat([image, x_t], 1), t)[:, :1]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3))
    with torch.no_grad():
        soft = x0_loss(net, tt, image, -1 + 2 * frac, t, noise, -1.0, 1.0)
        np.testing.assert_allclose(soft.bce.numpy(), bce_of(-1 + 2 * frac, frac).numpy(), rtol=1e-5)
        binary = -1 + 2 * (frac > 0.5).float()
        hard = x0_loss(net, tt, image, binary, t, noise, -1.0, 1.0)
        np.testing.assert_allclose(hard.bce.numpy(), bce_of(binary, (binary > 0).float()).numpy(), rtol=1e-5)
        no_dice = x0_loss(net, tt, image, -1 + 2 * frac, t, noise, -1.0, 1.0, dice_weight=0.0)
        np.testing.assert_allclose(no_dice.loss.numpy(), (soft.mse + soft.bce).numpy(), rtol=1e-6)
        np.testing.assert_allclose(soft.loss.numpy(), (soft.mse + soft.bce + soft.dice_loss).numpy(), rtol=1e-6)


def test_soft_target_slices_carry_the_area_fraction(shared_data):
    """`--targets soft`: each network pixel's mask is low + (high - low) x its tumour area fraction, whose >= 0.5
    blocks are exactly the binary targets; tumour slices are those with any tumour in the target."""
    from diffseg_engine.inputs.cases import find_case
    from diffseg_engine.train.data import load_case_slices
    case = find_case(shared_data / "train" / "BraTS18_CBICA_ASK")
    card = build_card(get_preset("tiny"), ("flair",), prediction="x0")
    soft = load_case_slices(case, card, soft_targets=True)
    hard = load_case_slices(case, card)
    frac = (soft.masks + 1) / 2
    assert soft.masks.min() >= -1 and soft.masks.max() <= 1
    assert ((frac > 0) & (frac < 1)).any()  # partial blocks at the lesion's border
    np.testing.assert_array_equal(hard.masks, np.where(frac >= 0.5, 1.0, -1.0).astype(np.float32))
    assert np.array_equal(soft.has_tumour, (frac > 0).reshape(len(frac), -1).any(1))
    assert soft.has_tumour.sum() >= hard.has_tumour.sum() and np.array_equal(soft.images, hard.images)


def test_channels_last_trains_the_same_model(shared_data, tmp_path):
    """--channels-last changes the memory layout only: the same steps give the same weights, up to float noise
    (which Adam's normalised steps amplify where a gradient is near 0: bounded at a tenth of the three steps'
    largest possible move, 3 x lr = 3e-3)."""
    base = TrainConfig(data=str(shared_data / "train"), out=str(tmp_path / "a"), preset="tiny", steps=3,
                       checkpoint_every=3, log_every=1, max_slices_per_case=2, batch_size=4, precision="fp32",
                       threads=1, prediction="x0", recycling=True, empty_share=0.4, targets="soft",
                       val_cases=("BraTS18_CBICA_ASK",))
    a, _ = load_weights(train(base, quiet=True))
    b, _ = load_weights(train(dataclasses.replace(base, out=str(tmp_path / "b"), channels_last=True), quiet=True))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=3e-4, rtol=0, err_msg=k)
    other, _ = load_weights(train(dataclasses.replace(base, out=str(tmp_path / "c"), seed=1), quiet=True))
    assert max(np.abs(a[k] - other[k]).max() for k in a) > 1e-2  # another seed: far outside that bound


def test_paper_preset_trains_and_samples_as_the_paper():
    """The paper's recipe: no augmentation, 60 000 steps, DDPM over all 1000 steps as its card's sampler."""
    cfg = TrainConfig(data="d", out="o", preset="paper").resolved()
    assert (cfg.flip, cfg.steps, cfg.batch_size, cfg.lr) == (False, 60_000, 10, 1e-4)
    assert TrainConfig(data="d", out="o", preset="paper", flip=True, steps=5).resolved().flip is True
    assert (TrainConfig(data="d", out="o", preset="cpu-small").resolved().flip,
            TrainConfig(data="d", out="o", preset="cpu-small").resolved().steps) == (True, 10_000)
    card = build_card(get_preset("paper"), ("t1", "t1ce", "t2", "flair"))
    plan = chosen_plan(card)
    assert (plan.sampler, plan.steps, len(plan.coefs)) == ("ddpm", 1000, 1000)
