"""The engine's promises: ONNX export parity, engine == reference sampler, batch invariance, streamed
statistics, noise streams, and `segment` end to end on real cases of every layout (CLI, no torch).

Models are tiny and random (the output convolution of an untrained U-Net is zero, so every parameter is
perturbed: parity on an all-zero network would prove nothing). The sampler and segment tests use the tiny
architecture on a 16x16 grid (224 crop, area downsampling 14) so that sampling a whole real case costs about
a second on 2 busy cores (reading and writing the NIfTI files costs more); the export test uses the `tiny`
preset card as is (56x56).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from typer.testing import CliRunner  # noqa: E402

from diffseg_engine.backends import open_backend  # noqa: E402
from diffseg_engine.backends.ort import OnnxRuntimeBackend, read_onnx_card  # noqa: E402
from diffseg_engine.backends.torch_ref import TorchBackend  # noqa: E402
from diffseg_engine.artifacts.card import Preprocessing  # noqa: E402
from diffseg_engine.cli import app  # noqa: E402
from diffseg_engine.core.ensemble import EnsembleStats, member_probability  # noqa: E402
from diffseg_engine.maps.lesions import lesion_mask  # noqa: E402
from diffseg_engine.core.errors import BackendError, InputImageError, ModelFileError, OutputError, UsageError  # noqa: E402
from diffseg_engine.export.onnx_export import check_parity, example_inputs, export_onnx  # noqa: E402
from diffseg_engine.core.noise import BatchNoise, NoiseStreams  # noqa: E402
from diffseg_engine.sampling.sampler import chosen_plan, plan_sampling, sample_ensemble  # noqa: E402
from diffseg_engine.core.steps import host_runner
from diffseg_engine.pipeline.options import RunSettings
from diffseg_engine.pipeline.segment import resolve_case, segment_case
from diffseg_engine.pipeline.models import open_model  # noqa: E402
from diffseg_engine.train.presets import build_card, get_preset  # noqa: E402
from diffseg_engine.train.reference import reference_sample  # noqa: E402
from diffseg_engine.train.step import build_step  # noqa: E402
from diffseg_engine.train.unet import UNetModel  # noqa: E402
from diffseg_engine.artifacts.weights import load_weights, save_weights  # noqa: E402

SMALL_PREP = Preprocessing(crop_size=224, downsample=14)  # 16x16 network grid


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_model(tmp: Path, name: str, modalities: tuple[str, ...], prep: Preprocessing | None = None,
                  seed: int = 0) -> tuple[Path, Path]:
    """A random tiny model (every parameter perturbed) as safetensors + its ONNX export."""
    card = build_card(get_preset("tiny"), modalities, name=f"test-{name}")
    if prep is not None:
        card = card.replace(preprocessing=prep)
    torch.manual_seed(seed)
    net = UNetModel(card.architecture)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    weights = tmp / f"{name}.safetensors"
    save_weights(weights, {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}, card)
    onnx_path = export_onnx(weights, tmp / f"{name}.onnx")
    return weights, onnx_path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("models")
    return {
        "tiny": _random_model(tmp, "tiny", ("flair",)),  # the preset as is: 56x56
        "flair": _random_model(tmp, "flair", ("flair",), SMALL_PREP, seed=1),  # 16x16
        "t1_flair": _random_model(tmp, "t1_flair", ("t1", "flair"), SMALL_PREP, seed=2),
    }


@pytest.fixture(scope="module")
def small(models):
    """(card, torch U-Net, onnxruntime backend, torch backend) of the 16x16 flair model."""
    weights, onnx_path = models["flair"]
    tensors, card = load_weights(weights)
    net = build_step(card, tensors).net
    return card, net, OnnxRuntimeBackend.load(onnx_path, device="cpu", threads=1), \
        TorchBackend.load(weights, device="cpu")


# ------------------------------------------------------------------------------------ 1. ONNX vs torch
def test_onnx_export_parity_card_checker_and_dynamic_batch(models):
    weights, onnx_path = models["tiny"]
    tensors, card = load_weights(weights)
    assert card.image_size == 56 and card.preset == "tiny"
    # the network is really random: its output is far from zero, so parity below means something
    step = build_step(card, tensors)
    ex = example_inputs(card, 2)
    with torch.no_grad():
        out = step.net(torch.cat([torch.from_numpy(ex["image"]), torch.from_numpy(ex["x_t"])], 1),
                       torch.from_numpy(ex["timestep"]))
    assert float(out.abs().mean()) > 1e-2
    for batch in (1, 5):
        assert check_parity(weights, onnx_path, batch=batch, seed=batch) <= 1e-4
    back = read_onnx_card(onnx_path)
    assert back == card and back.weights_sha256 == card.weights_sha256 and back.weights_sha256
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    assert json.loads({p.key: p.value for p in model.metadata_props}["diffseg_card"]) == json.loads(card.to_json())
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}
    assert list(dims) == ["image", "x_t", "timestep", "coef", "noise", "x_prev"]
    assert all(isinstance(d[0], str) and d[0] for d in dims.values()), dims  # symbolic batch axis
    assert dims["image"][1:] == [1, 56, 56] and dims["x_prev"][1:] == [1, 56, 56] and dims["coef"][1:] == [8]
    # and the session really runs other batch sizes, each item as alone
    be = OnnxRuntimeBackend.load(onnx_path, device="cpu", threads=1)
    ex7 = example_inputs(card, 7, seed=3)
    full = be.infer(**ex7)
    one = be.infer(**{k: v[4:5] for k, v in ex7.items()})
    assert full.shape == (7, 1, 56, 56)
    np.testing.assert_allclose(one[0], full[4], atol=1e-5)


# ------------------------------------------------------------------------ 2. engine vs reference sampler
def _engine_members(backend, card, image, plan, streams, slice_id, members, batch_size):
    """Run the engine; return ({m: x0}, {m: probability}, stats) captured per member."""
    last, pos, x0s, probs = {}, [0], {}, {}

    def step(*args):
        last["x"] = backend.infer(*args)
        return last["x"]

    def on_member(s, m, p):
        x0s[m] = last["x"][pos[0], 0].copy()
        probs[m] = p.copy()
        pos[0] += 1

    def on_chunk(_next, _stats):
        pos[0] = 0

    stats = sample_ensemble(host_runner(step), image[None], members=members, plan=plan, streams=streams,
                            slice_ids=np.array([slice_id]), card=card, batch_size=batch_size,
                            on_member=on_member, on_chunk=on_chunk)
    return x0s, probs, stats


def test_full_ddpm_plan_is_the_papers_1000_steps(small):
    card = small[0]
    plan = plan_sampling(card, "ddpm")
    assert plan.coefs.shape == (1000, 8) and plan.steps == 1000
    np.testing.assert_array_equal(plan.timesteps, np.arange(1000, dtype=np.float32))  # sampled 999 -> 0
    assert plan.coefs[0, 6] == 0 and np.all(plan.coefs[1:, 6] == 1)  # learned variance; last step no noise
    # the engine really walks all 1000 steps, 999 down to 0, each with its own coefficient row
    seen = []

    def fake_step(image, x_t, timestep, coef, noise):
        seen.append((timestep.copy(), coef.copy()))
        return x_t * 0.5
    img = np.zeros((2, 1, card.image_size, card.image_size), np.float32)
    sample_ensemble(host_runner(fake_step), img, members=1, plan=plan, streams=NoiseStreams(0, "c"), slice_ids=np.arange(2),
                    card=card, batch_size=2)
    assert len(seen) == 1000
    np.testing.assert_array_equal([t[0] for t, _ in seen], np.arange(999, -1, -1))
    assert all(t.shape == (2,) and t[0] == t[1] for t, _ in seen)
    np.testing.assert_array_equal(np.stack([c[1] for _, c in seen]), plan.coefs[::-1])
    spaced = plan_sampling(card, "ddpm", 20)
    assert spaced.timesteps[-1] == 999 and spaced.timesteps[0] == 0 and len(spaced.timesteps) == 20
    ddim = plan_sampling(card, "ddim", 20)
    np.testing.assert_array_equal(ddim.timesteps, np.arange(0, 1000, 50, dtype=np.float32))
    for bad in (dict(sampler="ddpm", steps=0), dict(sampler="ddpm", steps=1001), dict(sampler="x"),
                dict(sampler="ddim", eta=1.5)):
        with pytest.raises(UsageError):
            plan_sampling(card, **bad)


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 20, 0.0), ("ddim", 20, 0.0), ("ddim", 20, 0.5)])
def test_engine_matches_reference_sampler(small, sampler, steps, eta):
    card, net, ort_backend, torch_backend = small
    rng = np.random.default_rng(11)
    image = rng.random((1, card.image_size, card.image_size), dtype=np.float32)
    seed, case_id, slice_id, members = 5, "BraTS18_CBICA_AOO", 77, 3
    streams = NoiseStreams(seed, case_id)
    ref_x0 = [reference_sample(net, card, image, streams.generator(slice_id, m), sampler=sampler, steps=steps,
                               eta=eta)[0] for m in range(members)]
    low, high = card.diffusion.mask_low, card.diffusion.mask_high
    ref_p = [member_probability(x.astype(np.float64), low, high) for x in ref_x0]
    assert np.std(ref_p) > 0.1  # the members are not trivial (all 0 or all 1)
    assert np.abs(ref_p[0] - ref_p[1]).max() > 0.1  # and differ from one another
    plan = plan_sampling(card, sampler, steps, eta)
    for backend in (ort_backend, torch_backend):
        x0s, probs, stats = _engine_members(backend, card, image, plan, streams, slice_id, members, batch_size=2)
        assert sorted(probs) == list(range(members))
        for m in range(members):
            np.testing.assert_allclose(x0s[m], ref_x0[m], atol=1e-4, err_msg=f"{backend.name} x0 member {m}")
            np.testing.assert_allclose(probs[m], ref_p[m], atol=1e-4, err_msg=f"{backend.name} p member {m}")
        np.testing.assert_allclose(stats.mean[0], np.mean(ref_p, axis=0), atol=1e-4)
        np.testing.assert_allclose(stats.variance[0], np.var(ref_p, axis=0), atol=1e-4)
        assert stats.count.tolist() == [members]


# --------------------------------------------------------------------------------- 3. batch invariance
def test_batch_size_does_not_change_results_but_seed_does(small):
    card, _, ort_backend, _ = small
    rng = np.random.default_rng(3)
    images = rng.random((3, 1, card.image_size, card.image_size), dtype=np.float32)
    slice_ids = np.array([40, 41, 60])
    plan = plan_sampling(card, "ddpm", 5)

    def run(seed, bs, **kw):
        return sample_ensemble(ort_backend.run_chunk, images, members=3, plan=plan, streams=NoiseStreams(seed, "c"),
                               slice_ids=slice_ids, card=card, batch_size=bs, **kw)

    runs = {bs: run(0, bs) for bs in (1, 3, 7)}  # 9 work items: 7 leaves a chunk of 2
    ref = runs[1]
    assert ref.count.tolist() == [3, 3, 3]
    assert float(ref.variance.max()) > 0.01
    for bs, st in runs.items():
        np.testing.assert_allclose(st.mean, ref.mean, atol=1e-6, rtol=0, err_msg=f"batch {bs}")
        np.testing.assert_allclose(st.variance, ref.variance, atol=1e-6, rtol=0, err_msg=f"batch {bs}")
        np.testing.assert_array_equal(st.mean > 0.5, ref.mean > 0.5)
    other = run(1, 3)
    assert np.abs(other.mean - ref.mean).max() > 0.1
    # resuming after the first chunk (from its saved state) gives the same result as one run
    saved = {}
    run(0, 4, on_chunk=lambda nxt, st: saved.setdefault("s", (nxt, st.state())))
    nxt, state = saved["s"]
    assert nxt == 4
    resumed = run(0, 4, stats=EnsembleStats.from_state(state), start_item=nxt)
    np.testing.assert_allclose(resumed.mean, ref.mean, atol=1e-6, rtol=0)
    np.testing.assert_allclose(resumed.variance, ref.variance, atol=1e-6, rtol=0)


def test_mirrored_members_see_the_mirror_image_and_are_mirrored_back(small):
    """With plan.mirror, member m odd is exactly the plain sampler's member m on the left-right mirrored slice
    (same noise stream), mirrored back; even members are untouched; batch size still changes nothing."""
    card, _, ort_backend, _ = small
    rng = np.random.default_rng(5)
    images = rng.random((2, 1, card.image_size, card.image_size), dtype=np.float32)
    slice_ids = np.array([30, 31])
    lr = -2  # the canonical LPS slice [h = left-right, w = anterior-posterior]

    def members(imgs, mirror, bs):
        got = {}
        sample_ensemble(ort_backend.run_chunk, imgs, members=4, plan=plan_sampling(card, "ddim", 3, 1.0, mirror=mirror),
                        streams=NoiseStreams(0, "c"), slice_ids=slice_ids, card=card, batch_size=bs,
                        on_member=lambda s, m, p: got.__setitem__((s, m), p.copy()))
        return got
    plain = members(images, False, 8)
    flipped = members(np.ascontiguousarray(np.flip(images, axis=lr)), False, 8)
    mirrored = {bs: members(images, True, bs) for bs in (8, 3)}
    for (s, m), p in mirrored[8].items():
        want = np.flip(flipped[(s, m)], axis=lr) if m % 2 else plain[(s, m)]
        np.testing.assert_array_equal(p, want, err_msg=f"slice {s} member {m}")
        np.testing.assert_allclose(mirrored[3][(s, m)], p, atol=1e-6, rtol=0)
    assert any(np.abs(mirrored[8][(s, 1)] - plain[(s, 1)]).max() > 1e-3 for s in range(2))
    assert plan_sampling(card, "ddim", 3, 1.0, mirror=True).describe()["mirror"] is True
    assert chosen_plan(card.replace(diffusion=dataclasses.replace(card.diffusion, mirror=True))).mirror is True
    assert chosen_plan(card.replace(diffusion=dataclasses.replace(card.diffusion, mirror=True)), mirror=False).mirror \
        is False


def test_sampler_rejects_bad_arguments(small):
    card, _, ort_backend, _ = small
    img = np.zeros((1, 1, card.image_size, card.image_size), np.float32)
    plan = plan_sampling(card, "ddim", 2)
    for kw in (dict(members=0, batch_size=1), dict(members=1, batch_size=0)):
        with pytest.raises(UsageError):
            sample_ensemble(ort_backend.run_chunk, img, plan=plan, streams=NoiseStreams(0, "c"),
                            slice_ids=np.array([0]), card=card, **kw)


# ------------------------------------------------------------------------------- 4. streamed statistics
def test_ensemble_stats_equal_numpy_and_memory_does_not_grow():
    rng = np.random.default_rng(0)
    members = rng.random((50, 2, 5, 6))  # [N, S, h, w]
    members[:, 1] = np.round(members[:, 1])  # binary members too
    st = EnsembleStats(2, (5, 6))
    size0 = sum(a.nbytes for a in st.state().values())
    for m in range(members.shape[0]):
        for s in range(2):
            st.add(s, members[m, s])
    assert st.count.tolist() == [50, 50]
    np.testing.assert_allclose(st._mean, members.mean(axis=0), atol=1e-12, rtol=0)
    np.testing.assert_allclose(st._m2 / 50, members.var(axis=0), atol=1e-12, rtol=0)
    np.testing.assert_allclose(st.mean, members.mean(axis=0).astype(np.float32), atol=1e-7, rtol=0)
    np.testing.assert_allclose(st.variance, members.var(axis=0).astype(np.float32), atol=1e-7, rtol=0)
    assert st.mean.dtype == np.float32 and st.variance.dtype == np.float32
    assert sum(a.nbytes for a in st.state().values()) == size0  # independent of N
    back = EnsembleStats.from_state(st.state())
    np.testing.assert_array_equal(back.mean, st.mean)
    np.testing.assert_array_equal(back.variance, st.variance)
    empty = EnsembleStats(1, (2, 2))
    assert np.all(empty.variance == 0) and np.all(empty.mean == 0)
    p = member_probability(np.array([-2.0, -1.0, 0.0, 1.0, 3.0]), -1.0, 1.0)
    np.testing.assert_array_equal(p, [0.0, 0.0, 0.5, 1.0, 1.0])


# ------------------------------------------------------------------------------------- 5. noise streams
def test_noise_streams_are_order_independent_and_distinct():
    def first(streams, s, m, n=64):
        return streams.generator(s, m).standard_normal(n, dtype=np.float32)

    a = NoiseStreams(3, "case-A")
    order1 = {(s, m): first(a, s, m) for s in range(3) for m in range(3)}
    b = NoiseStreams(3, "case-A")
    order2 = {(s, m): first(b, s, m) for s in reversed(range(3)) for m in reversed(range(3))}
    for k in order1:
        np.testing.assert_array_equal(order1[k], order2[k])
    draws = [*order1.values(), first(NoiseStreams(3, "case-B"), 0, 0), first(NoiseStreams(4, "case-A"), 0, 0),
             first(NoiseStreams(2**40, "case-A"), 0, 0), first(NoiseStreams(0, "case-A"), 0, 0)]
    for i in range(len(draws)):
        for j in range(i):
            assert not np.allclose(draws[i], draws[j]), (i, j)
    # a chunk draws each member's stream in step order, whatever else is in the chunk
    chunk = BatchNoise(a, [(2, 1), (0, 0), (1, 2)], (4, 4))
    x_t, z1 = chunk.draw().copy(), chunk.draw().copy()
    g = a.generator(0, 0)
    np.testing.assert_array_equal(x_t[1, 0], g.standard_normal((4, 4), dtype=np.float32))
    np.testing.assert_array_equal(z1[1, 0], g.standard_normal((4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        NoiseStreams(-1, "x")


# ------------------------------------------------------------------------------ 6. segment end to end
runner = CliRunner()


def _cli(args: list) -> tuple[int, str]:
    """Run `diffseg-engine segment ARGS` in process: (exit code, what it printed on stderr)."""
    res = runner.invoke(app, ["segment", *[str(a) for a in args]])
    try:
        err = res.stderr
    except ValueError:  # older click: stderr mixed into output
        err = res.output
    return res.exit_code, (err or res.output).strip()


def _lib(inputs: list, model: Path, out: Path, *, modality: tuple[str, ...] = (), n: int = 2, steps: int = 2,
         seed: int = 0, sampler: str = "ddpm", batch_size: int = 0, backend: str = "onnxruntime",
         save_samples: bool = False):
    """The library path of `segment` (no overview picture: matplotlib drawing would dominate the test time)."""
    eng = open_model(model, backend, "cpu")
    case = resolve_case([Path(p) for p in inputs], list(modality), eng.card)
    settings = RunSettings(n=n, plan=plan_sampling(eng.card, sampler, steps), seed=seed, batch_size=batch_size,
                           overview=False, save_samples=save_samples)
    return segment_case(case, eng, out, settings, quiet=True)


def _check_outputs(out: Path, case_id: str, inputs: list[Path], card, *, n: int, steps: int, sampler="ddpm",
                   backend="onnxruntime", shape=None, seed=0):
    """The promises on the files of one segmented case; returns (maps, provenance)."""
    ref = nib.load(str(inputs[0]))
    vols = [np.asarray(nib.load(str(p)).dataobj) for p in inputs]
    if vols[0].ndim == 4:  # one 4D file: modalities on the last axis
        vols = [vols[0][..., c] for c in range(vols[0].shape[-1])]
    brain = np.zeros(vols[0].shape, bool)
    for v in vols:
        brain |= v != 0
    shape = shape or ref.shape
    maps = {}
    for kind in ("mean", "variance", "mask"):
        p = out / f"{case_id}_{kind}.nii.gz"
        assert p.is_file(), p
        im = nib.load(str(p))
        assert im.shape == shape, (kind, im.shape)
        np.testing.assert_array_equal(im.affine, ref.affine)
        for form in ("get_sform", "get_qform"):
            m_out, c_out = getattr(im.header, form)(coded=True)
            m_in, c_in = getattr(ref.header, form)(coded=True)
            assert int(c_out) == int(c_in), (kind, form, c_out, c_in)
            if m_in is None:
                assert m_out is None
            else:
                np.testing.assert_array_equal(m_out, m_in)
        np.testing.assert_array_equal(im.header.get_zooms()[:3], ref.header.get_zooms()[:3])
        assert im.header.get_xyzt_units() == ref.header.get_xyzt_units()
        data = np.asarray(im.dataobj)
        maps[kind] = data
        assert not np.any(data[~brain]), f"{kind} is non-zero outside the brain"
    assert maps["mask"].dtype == np.uint8 and maps["mask"].max() <= 1  # {0, 1}
    assert maps["mean"].dtype == np.float32 and maps["variance"].dtype == np.float32
    assert maps["mean"].min() >= 0 and maps["mean"].max() <= 1 and maps["mean"].max() > 0
    assert maps["variance"].min() >= 0 and maps["variance"].max() <= 0.25 + 1e-6
    if n > 1:
        assert maps["variance"].max() > 0
    prov = json.loads((out / f"{case_id}_provenance.json").read_text())
    # the mask is the mean > 0.5 without the components the clean-up drops, as the provenance records it
    cleaned = lesion_mask(maps["mean"], ref.header.get_zooms()[:3], min_component=prov["run"]["min_component"])
    np.testing.assert_array_equal(maps["mask"], cleaned.mask)
    assert prov["mask_cleanup"] == {"min_component": prov["run"]["min_component"], **cleaned.describe()}
    assert prov["case_id"] == case_id and prov["complete"] is True
    assert prov["model_card"] == json.loads(card.to_json())
    s = prov["sampling"]
    assert (s["sampler"], s["steps"], s["n"], s["seed"]) == (sampler, steps, n, seed)
    assert s["slices"] == int(np.moveaxis(brain, 2, 0).any(axis=(1, 2)).sum())  # every brain slice, no other
    assert prov["backend"]["backend"] == backend and prov["backend"]["device"] == "cpu"
    assert {"diffseg_engine", "numpy", "nibabel", "python"} <= set(prov["versions"])
    assert {"preprocess_s", "sampling_s", "write_s"} <= set(prov["timings"])
    assert all(v >= 0 for v in prov["timings"].values())
    return maps, prov


def test_segment_brats18_folder_rerun_refused_overwrite_and_samples(shared_data, models, tmp_path, monkeypatch):
    import diffseg_engine.maps.overview
    # the overview picture is not under test here, and drawing it would double this test's time
    monkeypatch.setattr(diffseg_engine.maps.overview, "write_overview", lambda path, *a, **k: Path(path))
    weights, onnx_path = models["flair"]
    card = load_weights(weights)[1]
    case = shared_data / "train" / "BraTS18_CBICA_AOO"
    flair = case / "BraTS18_CBICA_AOO_flair.nii.gz"
    out = tmp_path / "out"
    first = _lib([case], onnx_path, out, n=2, steps=3, seed=4)
    maps, prov = _check_outputs(out, "BraTS18_CBICA_AOO", [flair], card, n=2, steps=3, seed=4)
    assert prov["inputs"] == {"flair": str(flair)}
    np.testing.assert_array_equal(first.mean, maps["mean"])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # the CLI, again into the same --out: refused with one line, nothing touched
    args = [case, "--model", onnx_path, "--out", out, "--steps", 3, "--n", 2, "--seed", 4, "--quiet"]
    code, err = _cli(args)
    assert code != 0 and "--overwrite" in err and len(err.splitlines()) == 1, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # an --overwrite that dies while writing the maps leaves the earlier complete set (and its provenance) as
    # it was: the new maps are all written to temporary files before any replaces an old one
    import diffseg_engine.pipeline.segment
    real_encode = diffseg_engine.pipeline.segment.encode_like

    def failing_encode(ref, arr, path, dtype=np.float32):
        if "variance" in Path(path).name:
            raise OutputError("cannot be written (disk full)", path=path)
        return real_encode(ref, arr, path, dtype)
    monkeypatch.setattr(diffseg_engine.pipeline.segment, "encode_like", failing_encode)
    eng = open_model(onnx_path, "onnxruntime", "cpu")
    with pytest.raises(OutputError, match="disk full"):
        segment_case(resolve_case([case], [], card), eng, out,
                     RunSettings(n=1, plan=plan_sampling(card, "ddim", 1), overwrite=True, overview=False), quiet=True)
    visible = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}
    assert visible == before  # only the hidden unfinished-work folder (for a resume) was added
    monkeypatch.setattr(diffseg_engine.pipeline.segment, "encode_like", real_encode)
    # --overwrite replaces them (same seed: same maps); --save-samples adds every member's mask
    code, err = _cli([*args, "--overwrite", "--save-samples"])
    assert code == 0, err
    maps2, _ = _check_outputs(out, "BraTS18_CBICA_AOO", [flair], card, n=2, steps=3, seed=4)
    for kind in maps:
        np.testing.assert_allclose(maps2[kind], maps[kind], atol=1e-6)
    samples = nib.load(str(out / "BraTS18_CBICA_AOO_samples.nii.gz"))
    data = np.asarray(samples.dataobj)
    assert data.shape == (240, 240, 155, 2) and data.dtype == np.uint8
    assert data.max() == 1  # values {0, 1}, some tumour
    np.testing.assert_array_equal(samples.affine, nib.load(str(flair)).affine)
    brain = np.asarray(nib.load(str(flair)).dataobj) != 0
    assert not data[~brain].any()
    # the mean map is the mean of the members' maps: where all members say tumour it is > 0.5, where none
    # does it is <= 0.5
    assert np.all(maps2["mean"][data.all(axis=-1)] > 0.5 - 1e-6)
    assert np.all(maps2["mean"][(data == 0).all(axis=-1)] <= 0.5 + 1e-6)


def test_segment_brats2023_folder_picks_t2f(shared_data, models, tmp_path):
    weights, onnx_path = models["flair"]
    case = shared_data / "unlabelled" / "BraTS-GLI-00001-000"
    res = _lib([case], onnx_path, tmp_path, n=2, steps=2, sampler="ddpm", batch_size=64)
    assert res.case_id == "BraTS-GLI-00001-000"
    flair = case / "BraTS-GLI-00001-000-t2f.nii.gz"
    _, prov = _check_outputs(tmp_path, "BraTS-GLI-00001-000", [flair], load_weights(weights)[1], n=2, steps=2,
                             sampler="ddpm")
    assert prov["inputs"] == {"flair": str(flair)}
    assert prov["sampling"]["batch_size"] == 64


def test_segment_brats2012_grid_and_torch_backend_agrees(shared_data, models, tmp_path):
    weights, onnx_path = models["flair"]
    card = load_weights(weights)[1]
    case = shared_data / "train" / "BRATS2012_HG0001"
    flair = case / "BRATS2012_HG0001_flair.nii.gz"
    assert nib.load(str(flair)).shape == (160, 216, 176)
    _lib([case], onnx_path, tmp_path / "ort", seed=9)
    maps, _ = _check_outputs(tmp_path / "ort", "BRATS2012_HG0001", [flair], card, n=2, steps=2, seed=9)
    res_t = _lib([case], weights, tmp_path / "torch", seed=9, backend="torch")
    assert res_t.provenance["backend"]["backend"] == "torch"
    np.testing.assert_allclose(res_t.mean, maps["mean"], atol=1e-4)
    np.testing.assert_allclose(res_t.variance, maps["variance"], atol=1e-4)


def test_segment_single_3d_file_and_modality_option(shared_data, models, tmp_path):
    weights, onnx_path = models["flair"]
    card = load_weights(weights)[1]
    flair = shared_data / "unlabelled" / "TCGA-DU-7294" / "TCGA-DU-7294_flair.nii.gz"
    _lib([flair], onnx_path, tmp_path / "a", n=1)
    _check_outputs(tmp_path / "a", "TCGA-DU-7294", [flair], card, n=1, steps=2)
    flair13 = shared_data / "train" / "BRATS2013_pat0002" / "BRATS2013_pat0002_flair.nii.gz"
    _lib([], onnx_path, tmp_path / "b", modality=(f"flair={flair13}",), n=1)
    _check_outputs(tmp_path / "b", "BRATS2013_pat0002", [flair13], card, n=1, steps=2)
    # a 3D file whose name says another modality is refused, naming both, and nothing is written
    t1 = shared_data / "unlabelled" / "TCGA-DU-7294" / "TCGA-DU-7294_t1.nii.gz"
    code, err = _cli([t1, "--model", onnx_path, "--out", tmp_path / "c", "--quiet"])
    assert code == 11 and "t1" in err and "flair" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


def test_segment_4d_file_with_two_modality_model(shared_data, models, tmp_path):
    weights, onnx_path = models["t1_flair"]
    card = load_weights(weights)[1]
    assert card.modalities == ("t1", "flair")
    case = shared_data / "train" / "BRATS2012_HG0015"
    ims = [nib.load(str(case / f"BRATS2012_HG0015_{m}.nii.gz")) for m in ("t1", "flair")]
    stacked = np.stack([np.asarray(im.dataobj, dtype=np.float32) for im in ims], axis=-1)
    hdr = ims[0].header.copy()
    hdr.set_data_shape(stacked.shape)
    hdr.set_data_dtype(np.float32)
    four_d = tmp_path / "hg15_4d.nii.gz"
    nib.save(nib.Nifti1Image(stacked, ims[0].affine, hdr), str(four_d))
    res = _lib([four_d], onnx_path, tmp_path / "o")
    maps, prov = _check_outputs(tmp_path / "o", "hg15_4d", [four_d], card, n=2, steps=2, shape=ims[0].shape)
    assert prov["inputs"] == {"t1": str(four_d), "flair": str(four_d)}
    # the 4D file feeds the network exactly what the two files of the case folder feed it
    from diffseg_engine.inputs.preprocess import prepare_case
    folder = resolve_case([case], [], card)
    a = prepare_case([im.data for im in folder.images], folder.reference.affine, card.preprocessing)
    b = prepare_case([im.data for im in resolve_case([four_d], [], card).images], folder.reference.affine,
                     card.preprocessing)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert res.mean.shape == ims[0].shape


def test_segment_missing_modality_fails_and_writes_nothing(shared_data, models, tmp_path):
    _, onnx_path = models["t1_flair"]
    out = tmp_path / "out"
    code, err = _cli([shared_data / "train" / "BRATS2013_pat0003", "--model", onnx_path, "--out", out,
                      "--steps", 2, "--n", 1, "--quiet"])
    assert code == 11
    assert "no t1 image" in err and "BRATS2013_pat0003" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_segment_errors_name_the_file(models, tmp_path):
    """A usable-looking file whose content cannot be segmented (constant) is named in the error."""
    _, onnx_path = models["flair"]
    bad = tmp_path / "case9_flair.nii.gz"
    # a head-sized field of view (the geometry checks, which come first, pass)
    nib.save(nib.Nifti1Image(np.full((200, 208, 8), 7, np.float32), np.eye(4)), str(bad))
    with pytest.raises(InputImageError, match="case9_flair.nii.gz.*constant"):
        _lib([bad], onnx_path, tmp_path / "o", n=1)


def test_safetensors_on_onnxruntime_uses_the_matching_export_only(models, tmp_path, monkeypatch):
    weights, onnx_path = models["flair"]
    assert open_model(weights, "onnxruntime", device="cpu").path == onnx_path  # the sibling export
    # a sibling .onnx of other weights is not used: a fresh export goes to the cache
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.safetensors").write_bytes(weights.read_bytes())
    (tmp_path / "m.onnx").write_bytes(models["t1_flair"][1].read_bytes())
    be = open_model(tmp_path / "m.safetensors", "onnxruntime", device="cpu")
    assert be.path.parent == tmp_path / "cache"
    assert be.card.weights_sha256 == load_weights(weights)[1].weights_sha256
    assert open_model(tmp_path / "m.safetensors", "onnxruntime", device="cpu").path == be.path  # reused
    with pytest.raises(ModelFileError, match="onnx"):  # the backend itself runs step graphs only
        OnnxRuntimeBackend.load(weights, device="cpu")


def test_backend_devices(models):
    weights, onnx_path = models["flair"]
    with pytest.raises(UsageError, match="--device"):
        open_backend("onnxruntime", onnx_path, device="gpu")  # would have run on the CPU silently
    with pytest.raises(UsageError, match="backend"):
        open_backend("magic", onnx_path, device="cpu")
    if not torch.cuda.is_available():  # an explicit CUDA request without CUDA: a BackendError, not a traceback
        with pytest.raises(BackendError, match="cuda"):
            open_backend("torch", weights, device="cuda:0")
    with pytest.raises(ModelFileError):
        open_backend("torch", onnx_path, device="cpu")


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_onnxruntime_auto_device_falls_back_to_cpu_but_explicit_cuda_does_not(models, monkeypatch):
    """onnxruntime-gpu lists the CUDA provider where CUDA cannot start: `auto` must then run on the CPU;
    `--device cuda` must refuse rather than run on the CPU silently."""
    import onnxruntime as ort
    _, onnx_path = models["flair"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a real CUDA provider is present")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert OnnxRuntimeBackend.load(onnx_path, device="auto").device == "cpu"
    with pytest.raises(BackendError, match="CUDA"):
        OnnxRuntimeBackend.load(onnx_path, device="cuda")


# --------------------------------------------------------------------------- 7. no torch on that path
def test_segment_cli_runs_without_torch(shared_data, models, tmp_path):
    _, onnx_path = models["flair"]
    out = tmp_path / "out"
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from diffseg_engine.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported'\n"
        "    raise\n")
    case = shared_data / "train" / "BraTS18_CBICA_ATV"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "segment", str(case), "--model", str(onnx_path),
                           "--out", str(out), "--steps", "2", "--n", "1", "--backend", "onnxruntime", "--quiet"],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for kind in ("mean", "variance", "mask"):
        assert (out / f"BraTS18_CBICA_ATV_{kind}.nii.gz").is_file()
    assert json.loads((out / "BraTS18_CBICA_ATV_provenance.json").read_text())["backend"]["backend"] == "onnxruntime"


def test_fp16_rounded_weights_are_stored_half_size_in_the_onnx_and_compute_bit_identically(tiny_model, tmp_path):
    """The shipped default's weights are fp16 values: its ONNX stores them as float16 behind Cast nodes
    (half the file), losslessly; weights that are not fp16 values (an fp32 training run) stay float32."""
    weights, fp32_onnx = tiny_model
    tensors, card = load_weights(weights)
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}
    save_weights(tmp_path / "half.safetensors", half, card)
    as_fp32 = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in half.items()}
    save_weights(tmp_path / "rounded32.safetensors", as_fp32, card)
    compact = export_onnx(tmp_path / "half.safetensors", tmp_path / "half.onnx")
    model = onnx.load(str(compact))
    fp16_inits = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert fp16_inits and all(i.name.endswith(".fp16") for i in fp16_inits)
    assert sum(n.op_type == "Cast" and n.input[0].endswith(".fp16") for n in model.graph.node) == len(fp16_inits)
    # the fp32 training run's weights (random, not fp16 values): nothing converted
    assert not [i for i in onnx.load(str(fp32_onnx)).graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    # the same fp16-rounded values stored as float32 in safetensors export to the same compact graph
    same = export_onnx(tmp_path / "rounded32.safetensors", tmp_path / "rounded32.onnx")
    assert same.stat().st_size == compact.stat().st_size
    ex = example_inputs(card, 3, seed=4)
    got = OnnxRuntimeBackend.load(compact, device="cpu").infer(**ex)
    with torch.no_grad():
        ref = build_step(card, as_fp32)(*(torch.from_numpy(ex[k]) for k in ("image", "x_t", "timestep", "coef",
                                                                            "noise"))).numpy()
    assert np.abs(got - ref).max() < 1e-5
    # and bit-identical to an export that kept every initializer float32
    import diffseg_engine.export.onnx_export as ox
    keep = ox._MIN_FP16_ELEMENTS
    try:
        ox._MIN_FP16_ELEMENTS = 1 << 62
        plain = export_onnx(tmp_path / "half.safetensors", tmp_path / "plain.onnx")
    finally:
        ox._MIN_FP16_ELEMENTS = keep
    halved = sum(2 * int(np.prod(i.dims)) for i in fp16_inits)  # bytes the float16 storage saves
    assert plain.stat().st_size - compact.stat().st_size > 0.9 * halved
    np.testing.assert_array_equal(OnnxRuntimeBackend.load(plain, device="cpu").infer(**ex), got)


def test_segment_mirror_option_overrides_the_card_and_is_recorded(shared_data, tiny_model, tmp_path):
    flair = shared_data / "train/BraTS18_CBICA_ASK/BraTS18_CBICA_ASK_flair.nii.gz"
    args = ["segment", str(flair), "--model", str(tiny_model[1]), "-q", "--sampler", "ddim", "--steps", "2",
            "--eta", "1", "--n", "2"]
    provs, means = {}, {}
    for flag in ("--no-mirror", "--mirror"):
        out = tmp_path / flag.strip("-")
        res = runner.invoke(app, [*args, flag, "--out", str(out)])
        assert res.exit_code == 0, res.output
        provs[flag] = json.loads(next(out.glob("*_provenance.json")).read_text())
        means[flag] = np.asarray(nib.load(str(next(out.glob("*_mean.nii.gz")))).dataobj)
    assert provs["--no-mirror"]["sampling"]["mirror"] is False and provs["--mirror"]["sampling"]["mirror"] is True
    assert provs["--mirror"]["run"]["mirror"] is True  # part of "the same run"
    assert np.abs(means["--mirror"] - means["--no-mirror"]).max() > 1e-3
