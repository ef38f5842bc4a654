"""The shipped default model: what its files say, that they agree, and that it segments real tumour.

`segment` without `--model` runs `diffseg_engine/models/default.onnx`; these tests pin what a user relies on
when they do: a FLAIR diffusion model whose card, weights, ONNX graph and validation record belong together,
and which finds tumour on a validation patient it was never trained on.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from diffseg_engine.backends import read_card
from diffseg_engine.inputs.cases import find_case
from diffseg_engine.io.nifti_io import load_image
from diffseg_engine.core.noise import NoiseStreams
from diffseg_engine.artifacts.onnx_file import inspect_onnx
from diffseg_engine.inputs.preprocess import prepare_case, prepare_label
from diffseg_engine.sampling.sampler import chosen_plan, sample_ensemble
from diffseg_engine.pipeline.models import DEFAULT_MODEL_DIR, default_model, open_model
from diffseg_engine.artifacts.weights import load_weights


def test_shipped_files_belong_together_and_fit_the_budget():
    onnx, st = DEFAULT_MODEL_DIR / "default.onnx", DEFAULT_MODEL_DIR / "default.safetensors"
    assert default_model() == onnx
    # each shipped file stays under the repository's 4 MB limit for tracked files
    assert onnx.stat().st_size <= 4 * 2**20 and st.stat().st_size <= 4 * 2**20
    card = read_card(onnx)
    tensors, st_card = load_weights(st)  # checks the weights against the card's sha256
    assert card == st_card and card.objective == "diffusion"
    assert card.modalities == ("flair",) and card.preset == "cpu-small" and card.diffusion.prediction == "x0"
    tr0 = card.training
    # the recipe whose noise draws carry the ensemble: the network sees x_t made from the true mask
    assert tr0["recycling"] is False and tr0["augmentations"] == ["flip_lr"] and tr0["targets"] == "soft"
    info = inspect_onnx(onnx)
    assert info.stored_digest == info.digest and not info.external
    tr = card.training
    assert tr["steps"] > 0 and tr["val_cases"] and not set(tr["val_cases"]) & set(tr["train_cases"])
    validation = json.loads((DEFAULT_MODEL_DIR / "default_validation.json").read_text())
    assert sorted(validation["validation_cases"]) == sorted(tr["val_cases"])
    # the record names the weights it measured: the shipped tensors' sha256 (checked against them on load)
    assert validation["weights_sha256"] == card.weights_sha256
    # the record measured the shipped file itself, at the sampler `segment` uses by default
    d = card.diffusion
    default_rows = [r for r in validation["results"] if r["model"].endswith("models/default.onnx")
                    and (r["plan"]["sampler"], r["plan"]["steps"]) == (d.sampler, d.sampling_steps)]
    assert default_rows and {"1", "5"} <= set(default_rows[0]["summary"]["plain"])
    assert set(default_rows[0]["per_patient"]) == set(tr["val_cases"])
    log = [json.loads(line) for line in (DEFAULT_MODEL_DIR / "default_train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log if r["event"] == "checkpoint") == tr["steps"]


def test_shipped_onnx_equals_its_torch_weights():
    pytest.importorskip("torch")
    from diffseg_engine.export.onnx_export import check_parity
    assert check_parity(DEFAULT_MODEL_DIR / "default.safetensors", DEFAULT_MODEL_DIR / "default.onnx") < 1e-4


@pytest.mark.slow
def test_shipped_model_finds_the_tumour_of_a_validation_patient(shared_data):
    """The 4 slices with the most tumour of BraTS18_CBICA_ASK (held out from training), the card's default
    sampler, N=3, through the engine: the ensemble mask matches the ground truth (Dice > 0.75 on the network
    grid), and the slices' tumour-free brain stays background."""
    eng = open_model(None, "onnxruntime", "cpu")
    case = find_case(shared_data / "train" / "BraTS18_CBICA_ASK")
    assert case.case_id in eng.card.training["val_cases"]
    img = load_image(case.require(["flair"])[0])
    prep = prepare_case([img.data], img.affine, eng.card.preprocessing)
    lab = prepare_label(load_image(case.label).data, prep)
    pos = np.sort(np.argsort(lab.reshape(len(lab), -1).sum(1))[-4:])
    stats = sample_ensemble(eng.run_chunk, prep.inputs[pos], members=3, plan=chosen_plan(eng.card),
                            streams=NoiseStreams(0, case.case_id), slice_ids=pos, card=eng.card, batch_size=12)
    pred, gt = stats.mean > 0.5, lab[pos] > 0.5
    dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    assert dice > 0.75, dice
    assert (pred & ~gt).sum() < 0.25 * gt.sum()  # no whole-brain false positives


def test_default_batch_keeps_cpu_memory_bounded_and_lets_gpus_batch_wide():
    """On a CPU the default batch never exceeds CPU_BATCH_CAP (a whole volume peaked at 1810 MiB there,
    benchmarks/results/end_to_end-cpu.md); on CUDA it may grow; never more than the work there is."""
    from diffseg_engine.pipeline.core import CPU_BATCH_CAP, default_batch_size
    card = read_card(DEFAULT_MODEL_DIR / "default.onnx")
    assert default_batch_size(card, 10_000, "cpu") <= CPU_BATCH_CAP
    assert default_batch_size(card, 10_000, "cuda") >= default_batch_size(card, 10_000, "cpu")
    assert default_batch_size(card, 3, "cuda") == 3
