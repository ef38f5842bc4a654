"""`--n auto`: the adaptive ensemble size (issue 12 item 4).

The promises: a slice stops after the first round (from the second on) that changed its mean and its variance
by less than --n-tol at every pixel, or at --n-max (checked against an independent count from a fixed run's
member maps); a slice that stopped at k members has exactly the statistics of a fixed N = k run; with
--n-tol 0 an auto run is a fixed N = n-max run bit for bit; the batch size, the chunking and an interruption
with resume never change the result; the options are checked in one place (one-line errors, usage exit
code); the provenance, the members map, "the same run" and the Python API carry the auto parameters.

The sampler tests use a numpy step function that computes every work item on its own, so bit-for-bit claims
hold whatever the chunk holds; the `segment` tests use a random tiny model on a 16x16 grid through
onnxruntime on twelve slices of a real case.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from typer.testing import CliRunner

from diffseg_engine.artifacts.card import Preprocessing
from diffseg_engine.cli import app
from diffseg_engine.core.ensemble import AutoN, EnsembleStats, ensemble_identity
from diffseg_engine.core.errors import EXIT_CODES, OutputError, UsageError
from diffseg_engine.core.noise import NoiseStreams
from diffseg_engine.pipeline.options import check_sampling_options, ensemble_size
from diffseg_engine.io.partial import PartialRun
from diffseg_engine.sampling.rounds import Rounds
from diffseg_engine.sampling.sampler import plan_sampling, sample_ensemble
from diffseg_engine.core.steps import host_runner
from diffseg_engine.train.presets import build_card, get_preset

CARD = build_card(get_preset("tiny"), ("flair",), name="test-auto").replace(
    preprocessing=Preprocessing(crop_size=224, downsample=14))  # 16x16
H = CARD.image_size
PLAN = plan_sampling(CARD, "ddim", 2, 1.0)


def _toy_step(image, x_t, timestep, coef, noise):
    """Per item and per pixel: background (image 0) goes to -4 (probability 0 in every member), the rest
    follows the noise (members disagree). No item depends on another: bit-exact in any chunk."""
    return np.where(image > 0, 0.6 * x_t + 0.5 * noise + 0.2, -4.0).astype(np.float32)


def _toy_images(num_slices: int = 7) -> np.ndarray:
    """Slices 0 and 4 have no 'lesion' (all 0); the others lesions of growing size."""
    img = np.zeros((num_slices, 1, H, H), np.float32)
    for s in range(num_slices):
        if s not in (0, 4):
            k = 1 + s
            img[s, 0, 4:4 + k, 5:5 + k] = 1.0
    return img


def _run(size, images, bs=5, **kw) -> EnsembleStats:
    return sample_ensemble(host_runner(_toy_step), images, members=size, plan=PLAN, streams=NoiseStreams(7, "case"),
                           slice_ids=np.arange(40, 40 + len(images)), card=CARD, batch_size=bs, **kw)


def _same(a: EnsembleStats, b: EnsembleStats, rows=None) -> None:
    rows = slice(None) if rows is None else rows
    np.testing.assert_array_equal(a.count[rows], b.count[rows])
    np.testing.assert_array_equal(a._mean[rows], b._mean[rows])
    np.testing.assert_array_equal(a._m2[rows], b._m2[rows])


# ------------------------------------------------------------------------------------- the stop rule
def test_slices_stop_where_an_independent_count_says_and_empty_slices_stop_first():
    images = _toy_images()
    auto = AutoN(n_max=30, n_min=4, n_step=3, tol=0.03)
    probs: dict[int, list[np.ndarray]] = {s: [] for s in range(len(images))}
    _run(30, images, bs=9, on_member=lambda s, m, p: probs[s].append(p.copy()))
    expected = []
    for s in range(len(images)):
        p = np.stack(probs[s]).astype(np.float64)  # [30, h, w], member order
        bounds = auto.bounds()
        stop = bounds[-1]
        for before, after in zip(bounds[:-2], bounds[1:-1]):  # checks after the second round .. before the last
            change = max(np.abs(p[:after].mean(0) - p[:before].mean(0)).max(),
                         np.abs(p[:after].var(0) - p[:before].var(0)).max())
            assert abs(change - auto.tol) > 1e-9  # no decision rests on rounding
            if change < auto.tol:
                stop = after
                break
        expected.append(stop)
    stats = _run(auto, images, bs=9)
    assert stats.count.tolist() == expected
    assert expected[0] == expected[4] == auto.n_min + auto.n_step  # no lesion: the earliest stop
    assert len(set(expected)) >= 3 and max(expected) == 30  # lesion slices stop later, some not at all
    assert int(stats.count.sum()) < 30 * len(images)


def test_mirrored_auto_runs_stop_only_with_as_many_plain_as_mirrored_members():
    """With mirrored members (even m plain, odd m mirrored) rounds of odd size would stop slices on the views'
    disagreement and leave the mean leaning to one view: the rounds run in even counts (`AutoN.in_pairs`), so
    every slice ends with its two views balanced, and a slice stopped at k has the maps of a fixed k run."""
    auto = AutoN(n_max=31, n_min=5, n_step=5, tol=0.03)
    assert auto.in_pairs() == AutoN(n_max=30, n_min=6, n_step=6, tol=0.03)
    assert AutoN(n_max=7, n_min=7, n_step=1).in_pairs() == AutoN(n_max=8, n_min=8, n_step=2)
    images = _toy_images()
    mirrored = PLAN.__class__(**{**PLAN.__dict__, "mirror": True})
    run = lambda size, bs: sample_ensemble(host_runner(_toy_step), images, members=size, plan=mirrored,  # noqa: E731
                                           streams=NoiseStreams(7, "case"), slice_ids=np.arange(40, 40 + len(images)),
                                           card=CARD, batch_size=bs)
    stats = run(auto, 7)
    assert all(c % 2 == 0 for c in stats.count) and set(stats.count) <= {12, 18, 24, 30}
    assert len(set(stats.count.tolist())) >= 2
    for s, k in enumerate(stats.count):
        fixed = run(int(k), 5)
        np.testing.assert_array_equal(stats._mean[s], fixed._mean[s])
        np.testing.assert_array_equal(stats._m2[s], fixed._m2[s])


def test_a_slice_stopped_at_k_has_the_fixed_k_maps_whatever_the_batch_size():
    images = _toy_images()
    auto = AutoN(n_max=30, n_min=4, n_step=3, tol=0.03)
    runs = {bs: _run(auto, images, bs=bs) for bs in (1, 2, 9, 1000)}
    for st in runs.values():
        _same(st, runs[1])
    counts = runs[1].count
    for k in sorted(set(counts.tolist())):
        fixed = _run(k, images, bs=4)
        _same(runs[1], fixed, rows=counts == k)


def test_tolerance_zero_is_the_fixed_n_max_run_bit_for_bit():
    images = _toy_images()
    fixed = _run(12, images, bs=5)
    for bs in (1, 4, 13, 500):
        _same(_run(AutoN(n_max=12, n_min=2, n_step=3, tol=0.0), images, bs=bs), fixed)
    _same(_run(AutoN(n_max=12, n_min=12, n_step=1, tol=0.5), images, bs=7), fixed)  # one round: fixed N
    assert AutoN(n_max=12, n_min=2, n_step=3).bounds() == [2, 5, 8, 11, 12]


def test_rounds_never_mix_and_report_what_they_touched():
    images = _toy_images()
    rounds = Rounds(len(images), AutoN(n_max=10, n_min=2, n_step=2, tol=0.08))
    seen: list[tuple[int, int, int]] = []

    def step(image, x_t, t, coef, noise):
        seen.append((rounds.round, len(x_t), int(t[0])))
        return _toy_step(image, x_t, t, coef, noise)
    touched = []
    sample_ensemble(host_runner(step), images, members=rounds.size, plan=PLAN, streams=NoiseStreams(7, "case"),
                    slice_ids=np.arange(len(images)), card=CARD, batch_size=6, rounds=rounds,
                    on_chunk=lambda nxt, st: touched.append(rounds.last_rows))
    assert rounds.finished
    first = [b for r, b, _ in seen if r == 0]
    assert first[:2] == [6, 6] and sum(first) == 2 * 2 * len(images)  # round 0: all slices x 2 members
    assert all(b <= 6 for _, b, _ in seen)
    assert all(a <= b for a, b in touched)


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("bs, stop_after", [(2, 3), (5, 4), (14, 2), (3, 11)])
def test_an_interrupted_auto_run_resumes_to_the_same_bits(tmp_path, bs, stop_after):
    """Chunks saved with `PartialRun` as `segment` saves them; the run stops after `stop_after` chunks (at
    batch 2 and 3 a slice's round is split by a chunk's end); loading and resuming gives the same bits."""
    images = _toy_images()
    auto = AutoN(n_max=16, n_min=2, n_step=2, tol=0.08)
    whole = _run(auto, images, bs=bs)
    partial = PartialRun(tmp_path, "case")
    partial.start({"fingerprint": {"x": 1}})
    rounds = Rounds(len(images), auto)
    saved = {"next": 0, "chunks": 0}

    class Stop(Exception):
        pass

    def on_chunk(nxt, st):
        partial.save_chunk(saved["next"], nxt, st, None, rows=rounds.last_rows, schedule=rounds.state(st))
        saved["next"] = nxt
        saved["chunks"] += 1
        if saved["chunks"] == stop_after:
            raise Stop
    with pytest.raises(Stop):
        _run(auto, images, bs=bs, rounds=rounds, on_chunk=on_chunk)
    # covered: round 0 (batch 2), a slice's round split by the chunk's end (3, 5), the end of a round (14)
    assert (rounds.open is not None) == (bs in (3, 5)) and rounds.round == {2: 0, 5: 1, 14: 1, 3: 2}[bs]
    assert len(partial.chunk_files()) <= len(images) + 1  # superseded chunk files are removed

    again = PartialRun(tmp_path, "case")
    start, stats = again.load(len(images), None, (H, H))
    assert start == saved["next"]
    restored = Rounds.restore(len(images), auto, again.schedule, stats, start)
    resumed = _run(auto, images, bs=bs, stats=stats, start_item=start, rounds=restored)
    _same(resumed, whole)

    bad = dict(again.schedule)
    bad["active"] = np.zeros_like(bad["active"])
    with pytest.raises(ValueError):
        Rounds.restore(len(images), auto, bad, stats, start)
    with pytest.raises(ValueError):
        Rounds.restore(len(images), auto, again.schedule, stats, start + 1)


# ------------------------------------------------------------------------------------------- options
def test_ensemble_size_reads_n_and_the_auto_options():
    assert ensemble_size(5) == 5 and ensemble_size("7") == 7
    assert ensemble_size("auto") == AutoN() == AutoN(n_max=100, n_min=5, n_step=5, tol=0.01)
    got = ensemble_size("AUTO", n_max=20, n_min=3, n_step=2, n_tol=0)
    assert got == AutoN(n_max=20, n_min=3, n_step=2, tol=0.0)
    assert ensemble_identity(got) == {"n": "auto", "n_min": 3, "n_step": 2, "n_max": 20, "n_tol": 0.0}
    assert ensemble_identity(5) == {"n": 5}
    assert check_sampling_options(n="auto", n_max=10) == AutoN(n_max=10)
    for kw, needle in [(dict(n=5, n_max=10), "--n-max only apply to --n auto"),
                       (dict(n="auto", n_max=3, n_min=5), "--n-max 3 is below --n-min 5"),
                       (dict(n="auto", n_tol=-0.1), "--n-tol must be a number >= 0"),
                       (dict(n="auto", n_tol=math.nan), "--n-tol must be a number >= 0"),
                       (dict(n="auto", n_step=0), "--n-step must be a whole number of at least 1"),
                       (dict(n="auto", n_max=2.5), "--n-max must be a whole number"),
                       (dict(n="many"), "--n must be a whole number of at least 1 or auto"),
                       (dict(n=0), "--n must be at least 1"),
                       (dict(n="auto", save_samples=True), "--save-samples needs a fixed --n")]:
        with pytest.raises(UsageError, match=needle.replace("+", r"\+")):
            check_sampling_options(**kw)


# ------------------------------------------------------------------------------------ segment, end to end
CASE = "BraTS18_CBICA_ASK"
runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A random tiny FLAIR model (every parameter perturbed) on a 16x16 grid, as ONNX."""
    pytest.importorskip("torch")
    from diffseg_engine.train.perturb import perturbed

    from diffseg_engine.export.onnx_export import export_onnx
    from diffseg_engine.train.unet import UNetModel
    from diffseg_engine.artifacts.weights import save_weights
    tmp = tmp_path_factory.mktemp("auto_model")
    net = perturbed(UNetModel(CARD.architecture), seed=5)
    weights = tmp / "auto.safetensors"
    save_weights(weights, {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}, CARD)
    return export_onnx(weights, tmp / "auto.onnx")


def _segment(*args) -> tuple[int, str]:
    res = runner.invoke(app, ["segment", *[str(a) for a in args]])
    return res.exit_code, res.output


def _maps(out: Path, kinds=("mean", "variance", "entropy", "mask")) -> dict[str, bytes]:
    return {k: (out / f"{CASE}_{k}.nii.gz").read_bytes() for k in kinds}


def _array(out: Path, kind: str) -> np.ndarray:
    return np.asarray(nib.load(str(out / f"{CASE}_{kind}.nii.gz")).dataobj)


def _prov(out: Path) -> dict:
    return json.loads((out / f"{CASE}_provenance.json").read_text())


AUTO = ["--n", "auto", "--n-max", "8", "--n-min", "2", "--n-step", "2"]
COMMON = ["--steps", "2", "--sampler", "ddim", "--eta", "1", "--seed", "0", "-q"]


@pytest.fixture(scope="module")
def auto_run(flair, model, tmp_path_factory):
    """One `segment --n auto` run whose slices stop at different counts, and its provenance."""
    out = tmp_path_factory.mktemp("auto") / "out"
    code, output = _segment(flair, "--model", model, "--out", out, *AUTO, "--n-tol", "0.5", "--batch-size", "5",
                            *COMMON)
    assert code == 0, output
    return out, _prov(out)


def test_segment_auto_records_the_members_and_matches_fixed_runs(auto_run, flair, model, tmp_path):
    out, prov = auto_run
    s = prov["sampling"]
    assert (s["n"], s["n_min"], s["n_step"], s["n_max"], s["n_tol"]) == ("auto", 2, 2, 8, 0.5)
    assert prov["run"]["n"] == "auto" and prov["run"]["n_tol"] == 0.5 and prov["run"]["n_max"] == 8
    m = s["members"]
    counts = np.array(m["per_slice"])
    assert len(counts) == s["slices"] == len(m["slice_index"]) == 12 and m["slice_axis"] == 2
    assert m["total"] == int(counts.sum()) == s["work_items"] and m["max"] <= 8 and m["min"] >= 4
    assert len(set(counts.tolist())) >= 2, counts  # the tolerance made some slices stop before others
    assert m["slices_stopped_early"] == int((counts < 8).sum()) > 0
    # the members map: every brain voxel of a slice holds that slice's count, 0 outside the brain
    members = _array(out, "members")
    assert members.dtype == np.uint16 and "members" in prov["outputs"]
    brain = np.asarray(nib.load(str(flair)).dataobj) != 0
    for z, c in zip(m["slice_index"], counts):
        assert set(np.unique(members[:, :, z][brain[:, :, z]]).tolist()) == {c}
    assert not members[~brain].any()
    # every slice that stopped at k members has the maps of a fixed --n k run on that slice
    mean, var = _array(out, "mean"), _array(out, "variance")
    for k in sorted(set(counts.tolist())):
        fixed = tmp_path / f"n{k}"
        code, output = _segment(flair, "--model", model, "--out", fixed, "--n", k, "--batch-size", "5", *COMMON)
        assert code == 0, output
        assert not (fixed / f"{CASE}_members.nii.gz").exists()
        for z in np.array(m["slice_index"])[counts == k]:
            np.testing.assert_array_equal(mean[:, :, z], _array(fixed, "mean")[:, :, z])
            np.testing.assert_array_equal(var[:, :, z], _array(fixed, "variance")[:, :, z])


def test_segment_auto_tolerance_zero_writes_the_bytes_of_fixed_n_max(flair, model, tmp_path):
    code, output = _segment(flair, "--model", model, "--out", tmp_path / "fixed", "--n", "6", "--batch-size", "4",
                            *COMMON)
    assert code == 0, output
    for bs, quiet in (("4", True), ("7", False)):
        out = tmp_path / f"auto{bs}"
        code, output = _segment(flair, "--model", model, "--out", out, "--n", "auto", "--n-max", "6", "--n-min",
                                "2", "--n-step", "3", "--n-tol", "0", "--batch-size", bs,
                                *(COMMON if quiet else COMMON[:-1]))
        assert code == 0, output
        if not quiet:  # the summary line says what was drawn
            assert "72 members (6-6 per slice, 0 of 12 slices stopped early)" in output, output
        assert _maps(out) == _maps(tmp_path / "fixed")
        assert _prov(out)["sampling"]["members"]["per_slice"] == [6] * 12


def test_an_interrupted_auto_segment_resumes_and_other_runs_are_refused(auto_run, flair, model, tmp_path,
                                                                        monkeypatch):
    import diffseg_engine.io.partial
    real_save = diffseg_engine.io.partial.PartialRun.save_chunk
    calls = [0]

    def stop_after_four(self, *a, **k):
        real_save(self, *a, **k)
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
    out = tmp_path / "out"
    args = [flair, "--model", model, "--out", out, *AUTO, "--n-tol", "0.5", "--batch-size", "5", *COMMON]
    monkeypatch.setattr(diffseg_engine.io.partial.PartialRun, "save_chunk", stop_after_four)
    code, output = _segment(*args)
    assert code == 130 and "resume" in output
    monkeypatch.setattr(diffseg_engine.io.partial.PartialRun, "save_chunk", real_save)
    # a fixed run, or an auto run with another tolerance, is not the same run: refused, naming what differs
    code, output = _segment(flair, "--model", model, "--out", out, "--n", "8", "--batch-size", "5", *COMMON)
    assert code == EXIT_CODES[OutputError] and "other parameters" in output and "n auto -> 8" in output, output
    code, output = _segment(*args[:-len(COMMON) - 4], "--n-tol", "0.1", "--batch-size", "5", *COMMON)
    assert code == EXIT_CODES[OutputError] and "n_tol 0.5 -> 0.1" in output, output
    code, output = _segment(*args)
    assert code == 0, output
    assert _prov(out)["sampling"]["resumed_from_item"] > 0
    ref, _ = auto_run
    assert _maps(out, ("mean", "variance", "mask", "members")) == _maps(ref, ("mean", "variance", "mask", "members"))
    assert not (out / f".{CASE}.partial").exists()


@pytest.mark.parametrize("opts, needle", [
    (["--n-max", "10"], "--n-max only apply to --n auto"),
    (["--n", "auto", "--n-max", "3", "--n-min", "5"], "--n-max 3 is below --n-min 5"),
    (["--n", "auto", "--n-tol", "-1"], "--n-tol"),
    (["--n", "lots"], "--n must be a whole number"),
    (["--n", "auto", "--save-samples"], "--save-samples needs a fixed --n"),
])
def test_auto_option_errors_are_one_line_with_the_usage_code(flair, model, tmp_path, opts, needle):
    res = runner.invoke(app, ["segment", str(flair), "--model", str(model), "--out", str(tmp_path / "o"), "-q",
                              *opts])
    assert res.exit_code == EXIT_CODES[UsageError], res.output
    assert needle in res.output and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "o").exists()


def test_python_api_and_cohorts_take_auto(auto_run, flair, model, tmp_path, monkeypatch):
    from diffseg_engine.api import Segmenter, segment_paths
    from diffseg_engine.pipeline.cohort import run_case, CohortEntry
    from diffseg_engine.pipeline.options import RunSettings
    ref, prov = auto_run
    seg = Segmenter(model, n="auto", n_max=8, n_min=2, n_step=2, n_tol=0.5, sampler="ddim", steps=2, eta=1.0,
                    batch_size=5)
    assert seg.n == AutoN(n_max=8, n_min=2, n_step=2, tol=0.5)
    res = seg(nib.load(str(flair)), case_id=CASE)
    for k in ("mean", "variance", "mask", "members"):
        np.testing.assert_array_equal(getattr(res, k), _array(ref, k))
    assert res.members_per_slice.tolist() == prov["sampling"]["members"]["per_slice"]
    assert res.settings["n"] == "auto" and res.settings["members_total"] == prov["sampling"]["members"]["total"]
    assert set(res.to_nifti()) == {"mean", "variance", "mask", "members"}
    fixed = seg(nib.load(str(flair)), case_id=CASE, n=3)
    assert fixed.members is None and fixed.members_per_slice.tolist() == [3] * 12
    with pytest.raises(UsageError, match="only apply to --n auto"):
        Segmenter(model, n=5, n_max=10)
    with pytest.raises(UsageError, match="--save-samples needs a fixed --n"):
        seg.segment_files(flair, tmp_path / "x", save_samples=True)
    # files: the same maps as the CLI; a cohort run skips it as the same run, and redoes it for another tol
    monkeypatch.setattr("diffseg_engine.maps.overview.write_overview", lambda *a, **k: None)
    one = segment_paths(flair, tmp_path / "one", model, n="auto", n_max=8, n_min=2, n_step=2, n_tol=0.5,
                        sampler="ddim", steps=2, eta=1.0, batch_size=5, overview=False)
    assert _maps(tmp_path / "one", ("mean", "variance", "members")) == _maps(ref, ("mean", "variance", "members"))
    assert one.members is not None
    entry = CohortEntry(CASE, inputs=(flair,))
    same = RunSettings(n=seg.n, plan=seg.plan, batch_size=5, overview=False)
    assert run_case(entry, seg.engine, tmp_path / "one", same).status == "skipped"
    other = RunSettings(n=AutoN(n_max=8, n_min=2, n_step=2, tol=0.1), plan=seg.plan, batch_size=5, overview=False)
    st = run_case(entry, seg.engine, tmp_path / "one", other)
    assert st.status == "failed" and "already holds results" in st.message  # not skipped: another run
    assert run_case(entry, seg.engine, tmp_path / "one", RunSettings(n=8, plan=seg.plan, batch_size=5,
                                                                      overview=False)).status == "failed"
