"""Cohorts: many cases in one `segment` command, job-array parts, Ray, and the Python API.

Real BraTS cases (../shared/data) with a random tiny model on a 16x16 grid (as tests/test_engine.py), N=2,
2 DDPM steps: the files, statuses and summaries are what is under test, not the model's quality.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from diffseg_engine.artifacts.card import Preprocessing  # noqa: E402
from diffseg_engine.cli import app  # noqa: E402
from diffseg_engine.pipeline.cohort import SUMMARY_NAMES, CohortEntry, is_cohort_source, list_cohort, select_part
from diffseg_engine.pipeline.options import RunSettings
from diffseg_engine.pipeline.cohort_run import segment_cohort
from diffseg_engine.core.errors import DatasetError, InputImageError, MissingModalityError, UsageError  # noqa: E402
from diffseg_engine.sampling.sampler import chosen_plan  # noqa: E402

SMALL_PREP = Preprocessing(crop_size=224, downsample=14)  # 16x16 network grid
MAPS = ("mean", "variance", "mask")
GOOD = ("BraTS18_CBICA_AOO", "BRATS2013_pat0003")
#: One batch size everywhere: the maps agree to 1e-6 across batch sizes, and byte for byte at the same one.
BATCH = 64
runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A random tiny FLAIR model (every parameter perturbed) on a 16x16 grid, as ONNX."""
    from diffseg_engine.export.onnx_export import export_onnx
    from diffseg_engine.train.presets import build_card, get_preset
    from diffseg_engine.train.unet import UNetModel
    from diffseg_engine.artifacts.weights import save_weights
    tmp = tmp_path_factory.mktemp("cohort_model")
    card = build_card(get_preset("tiny"), ("flair",), name="test-cohort").replace(preprocessing=SMALL_PREP)
    from diffseg_engine.train.perturb import perturbed
    net = perturbed(UNetModel(card.architecture), seed=3)
    weights = tmp / "cohort.safetensors"
    save_weights(weights, {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}, card)
    return export_onnx(weights, tmp / "cohort.onnx")


def _cohort(shared_data: Path, root: Path, ids=GOOD) -> Path:
    """A folder of case folders (symlinks to real cases)."""
    root.mkdir(parents=True, exist_ok=True)
    for cid in ids:
        (root / cid).symlink_to(shared_data / "train" / cid, target_is_directory=True)
    return root


def _settings(model: Path, n: int = 2, steps: int = 2, seed: int = 0) -> RunSettings:
    from diffseg_engine.backends import read_card
    return RunSettings(n=n, plan=chosen_plan(read_card(model), "ddpm", steps), seed=seed, batch_size=BATCH,
                       overview=False)


def _cli(*args) -> tuple[int, str]:
    res = runner.invoke(app, ["segment", *[str(a) for a in args]])
    try:
        err = res.stderr
    except ValueError:
        err = res.output
    return res.exit_code, (res.output + (err or "")).strip()


def _no_overview(monkeypatch) -> None:
    import diffseg_engine.maps.overview
    # the overview picture is not under test here, and drawing it would dominate the time
    monkeypatch.setattr(diffseg_engine.maps.overview, "write_overview", lambda *a, **k: None)


def _summary(out: Path) -> list[dict]:
    with open(out / SUMMARY_NAMES["csv"]) as f:
        return list(csv.DictReader(f))


def _bytes(out: Path, ids) -> dict[str, bytes]:
    return {f"{cid}_{k}": (out / f"{cid}_{k}.nii.gz").read_bytes() for cid in ids for k in MAPS}


@pytest.fixture(scope="module")
def reference_run(shared_data, model, tmp_path_factory):
    """The single-process run of the two good cases (the library call behind `segment INPUT_DIR`)."""
    tmp = tmp_path_factory.mktemp("reference")
    src = _cohort(shared_data, tmp / "cohort")
    out = tmp / "out"
    res = segment_cohort(src, out, model, _settings(model), quiet=True)
    assert [s.status for s in res.statuses] == ["done", "done"]
    return src, out


# --------------------------------------------------------------------------------------------- listing
def test_list_cohort_layouts_parts_and_refusals(shared_data, tmp_path):
    train = shared_data / "train"
    every = list_cohort(train)
    ids = [e.case_id for e in every]
    assert ids == sorted(p.name for p in train.iterdir() if p.is_dir()) and len(ids) == 40
    assert all(e.inputs == (train / e.case_id,) for e in every)
    assert is_cohort_source(train) and not is_cohort_source(train / "BraTS18_CBICA_AOO")
    assert not is_cohort_source(train / "BraTS18_CBICA_AOO" / "BraTS18_CBICA_AOO_flair.nii.gz")
    # a list file: comments, blank lines, a folder relative to the list, an image file by absolute path
    lst = tmp_path / "cases.txt"
    flair = train / "BraTS18_CBICA_ASK" / "BraTS18_CBICA_ASK_flair.nii.gz"
    (tmp_path / "data").symlink_to(train, target_is_directory=True)
    lst.write_text(f"# my cohort\ndata/BraTS18_CBICA_AOO\n\n{flair}   # one file\n")
    assert is_cohort_source(lst)
    listed = list_cohort(lst)
    assert [(e.case_id, e.inputs) for e in listed] == [("BraTS18_CBICA_AOO", (tmp_path / "data/BraTS18_CBICA_AOO",)),
                                                      ("BraTS18_CBICA_ASK", (flair,))]
    # a flat folder of several cases' files: grouped by case id, one --modality pair each
    flat = tmp_path / "flat"
    flat.mkdir()
    for cid in ("BraTS18_CBICA_AOO", "BraTS18_CBICA_ARW"):
        for m in ("flair", "t1"):
            (flat / f"{cid}_{m}.nii.gz").symlink_to(train / cid / f"{cid}_{m}.nii.gz")
    assert is_cohort_source(flat)
    assert [(e.case_id, e.modality_args) for e in list_cohort(flat)] == [
        (cid, (f"flair={flat}/{cid}_flair.nii.gz", f"t1={flat}/{cid}_t1.nii.gz"))
        for cid in ("BraTS18_CBICA_AOO", "BraTS18_CBICA_ARW")]
    # refusals: two cases with one id, a missing listed path, nothing to segment
    lst.write_text("data/BraTS18_CBICA_AOO\ndata/BraTS18_CBICA_AOO/\n")
    with pytest.raises(DatasetError, match="two cases have the id BraTS18_CBICA_AOO"):
        list_cohort(lst)
    lst.write_text("data/BraTS18_CBICA_AOO\ndata/nope\n")
    with pytest.raises(DatasetError, match="line 2: data/nope not found"):
        list_cohort(lst)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no case"):
        list_cohort(tmp_path / "empty")


@pytest.mark.parametrize("k", [1, 2, 3, 5, 12, 13])
def test_parts_are_disjoint_complete_balanced_and_order_free(shared_data, k):
    every = list_cohort(shared_data / "train")
    parts = [select_part(every, k, i) for i in range(k)]
    ids = [e.case_id for p in parts for e in p]
    assert sorted(ids) == sorted(e.case_id for e in every) and len(set(ids)) == len(ids)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    shuffled = every[:]
    random.Random(k).shuffle(shuffled)
    assert [select_part(shuffled, k, i) for i in range(k)] == parts  # same on every node of a job array
    with pytest.raises(UsageError, match="--part-id must lie in 0.."):
        select_part(every, k, k)
    with pytest.raises(UsageError, match="--num-parts"):
        select_part(every, 0, 0)


# --------------------------------------------------------------------------------------------- the command
def test_cohort_command_failure_skip_rerun_and_summary(shared_data, model, tmp_path, monkeypatch):
    _no_overview(monkeypatch)
    src = _cohort(shared_data, tmp_path / "cohort")
    broken = src / "Broken01"  # a case without the FLAIR the model needs
    broken.mkdir()
    (broken / "Broken01_t1.nii.gz").symlink_to(shared_data / "train/BraTS18_CBICA_AOO/BraTS18_CBICA_AOO_t1.nii.gz")
    out = tmp_path / "out"
    args = [src, "--model", model, "--out", out, "--n", 2, "--sampler", "ddpm", "--steps", 2, "--batch-size", BATCH,
            "--quiet"]
    code, text = _cli(*args)
    assert code == 18, text  # some cases failed: errors.CasesFailedError
    assert "1 of 3 cases failed (Broken01)" in text and "2 done, 0 skipped" in text
    for cid in GOOD:
        assert all((out / f"{cid}_{k}.nii.gz").is_file() for k in MAPS)
        assert json.loads((out / f"{cid}_provenance.json").read_text())["complete"] is True
    assert not list(out.glob("Broken01_*"))
    rows = {r["case_id"]: r for r in _summary(out)}
    assert set(rows) == {*GOOD, "Broken01"}
    assert rows["Broken01"]["status"] == "failed" and "has no flair image" in rows["Broken01"]["message"]
    assert rows["Broken01"]["uncertainty_rank"] == ""
    for cid in GOOD:  # the summary's numbers are those of the maps on disk
        r = rows[cid]
        assert r["status"] == "done" and (r["n"], r["steps"], r["sampler"]) == ("2", "2", "ddpm")
        mask_img = nib.load(str(out / f"{cid}_mask.nii.gz"))
        mask = np.asarray(mask_img.dataobj) > 0
        var = np.asarray(nib.load(str(out / f"{cid}_variance.nii.gz")).dataobj)
        voxel_ml = float(np.prod(mask_img.header.get_zooms()[:3])) / 1000
        assert int(r["lesion_voxels"]) == int(mask.sum()) > 0
        assert float(r["lesion_ml"]) == pytest.approx(mask.sum() * voxel_ml, abs=1e-3)
        assert float(r["mean_variance_in_lesion"]) == pytest.approx(float(var[mask].mean()), rel=1e-5)
        assert float(r["uncertain_ml"]) == pytest.approx((var > 0.05).sum() * voxel_ml, abs=1e-3)
        assert float(r["sampling_s"]) > 0
    ranked = sorted(GOOD, key=lambda c: -float(rows[c]["mean_variance_in_lesion"]))
    assert [rows[c]["uncertainty_rank"] for c in ranked] == ["1", "2"]
    md = (out / SUMMARY_NAMES["md"]).read_text()
    review = md.split("## Review first")[1].split("## Every case")[0]
    assert review.index(ranked[0]) < review.index(ranked[1]) and "Broken01" not in review
    assert re.search(r"\| Broken01 \| failed \|.*has no flair image", md)

    # the same command again: finished cases are skipped (files untouched), the broken one fails again
    def results():
        return {p.name: p.stat().st_mtime_ns for p in out.glob("*_*") if p.name.startswith(GOOD)}
    before = results()
    assert len(before) == 10  # mean, variance, entropy, mask, provenance of each
    code, text = _cli(*args)
    assert code == 18 and "0 done, 2 skipped" in text, text
    assert results() == before
    # fixed: only that case runs now, and the run succeeds
    (broken / "Broken01_flair.nii.gz").symlink_to(
        shared_data / "train/BraTS18_CBICA_ASK/BraTS18_CBICA_ASK_flair.nii.gz")
    code, text = _cli(*args)
    assert code == 0 and "1 done, 2 skipped" in text, text
    assert {r["case_id"]: r["status"] for r in _summary(out)} == {**{c: "skipped" for c in GOOD}, "Broken01": "done"}
    assert not (out / ".diffseg-cohort").exists()
    # other parameters into the same folder: refused per case (never silently mixed), --overwrite replaces
    code, text = _cli(*[a if a != 2 else 3 for a in args])
    assert code == 18 and "3 of 3 cases failed" in text, text
    assert all("--overwrite" in r["message"] for r in _summary(out))
    # an input case folder as --out is refused before anything runs
    code, text = _cli(src, "--model", model, "--out", src / GOOD[0], "--quiet")
    assert code == 14 and "is an input" in text, text
    code, text = _cli(src / GOOD[0], "--model", model, "--out", out, "--num-parts", 2)
    assert code == 2 and "this input is one case" in text, text


def test_parts_give_the_single_process_files_byte_for_byte(reference_run, model, tmp_path, monkeypatch):
    _no_overview(monkeypatch)
    src, ref = reference_run
    out = tmp_path / "parts"
    seen = []
    for i in range(2):  # as two jobs of an array would: same command, its own --part-id
        code, text = _cli(src, "--model", model, "--out", out, "--n", 2, "--sampler", "ddpm", "--steps", 2,
                          "--batch-size", BATCH, "--num-parts", 2, "--part-id", i, "--quiet")
        assert code == 0 and "1 done" in text, text
        seen.append({r["case_id"]: r["status"] for r in _summary(out)})
    assert seen[0] == {GOOD[1]: "done", GOOD[0]: "pending"} or seen[0] == {GOOD[0]: "done", GOOD[1]: "pending"}
    assert seen[1] == {c: "done" for c in GOOD}  # the last part to finish sees the whole cohort
    assert _bytes(out, GOOD) == _bytes(ref, GOOD)


def test_cohort_honours_format_force_and_threads(shared_data, model, tmp_path, monkeypatch):
    """What a one-case `segment` takes, a cohort takes too: --format qubrats writes the submission files of
    each case (and a plain-maps run of the same parameters is not "finished" for it), --force reaches the
    input checks of every case (a native head scan is segmented, the provenance saying what was overridden)."""
    _no_overview(monkeypatch)
    src = _cohort(shared_data, tmp_path / "cohort", ids=GOOD[:1])
    native = src / "Native01"
    native.mkdir()
    (native / "Native01_flair.nii.gz").symlink_to(
        shared_data / "other/TCGA-FG-6692-native/TCGA-FG-6692-native_flair.nii.gz")
    out = tmp_path / "out"
    args = [src, "--model", model, "--out", out, "--n", 2, "--sampler", "ddpm", "--steps", 2, "--batch-size", BATCH,
            "--quiet", "--threads", 1]
    code, text = _cli(*args)
    assert code == 18 and "1 of 2 cases failed (Native01)" in text, text
    assert "skull-stripped" in {r["case_id"]: r for r in _summary(out)}["Native01"]["message"]
    code, text = _cli(*args, "--format", "qubrats", "--force")
    # the finished case is not skipped, as it lacks its submission files; replacing its maps takes --overwrite
    assert code == 18 and "1 of 2 cases failed (BraTS18_CBICA_AOO)" in text, text
    assert "--overwrite" in {r["case_id"]: r for r in _summary(out)}[GOOD[0]]["message"]
    code, text = _cli(*args, "--format", "qubrats", "--force", "--overwrite")
    assert code == 0 and "2 done, 0 skipped" in text, text
    for cid in (GOOD[0], "Native01"):
        assert (out / f"{cid}.nii.gz").is_file() and (out / f"{cid}_unc_whole.nii.gz").is_file()
    prov = json.loads((out / "Native01_provenance.json").read_text())
    assert prov["input_checks"]["forced"] is True
    code, text = _cli(*args, "--format", "qubrats", "--force")
    assert code == 0 and "0 done, 2 skipped" in text, text
    code, text = _cli(*args)  # plain maps, unforced: the finished forced run holds them all
    assert code == 0 and "0 done, 2 skipped" in text, text


def test_evaluate_scores_a_cohort_run_without_sampling_it_again(shared_data, model, tmp_path, monkeypatch):
    """One definition of "the same run" (`segment.finished_run`): `evaluate` takes the cases a cohort `segment
    --save-samples` wrote into its predictions folder as they are, and refuses to mix in another run's (another
    seed, or an input file that changed since)."""
    from diffseg_engine.pipeline import evaluate as E
    from diffseg_engine.core.errors import OutputError
    from diffseg_engine.pipeline.models import open_model
    _no_overview(monkeypatch)
    cid = GOOD[0]
    src = tmp_path / "cohort"
    (src / cid).mkdir(parents=True)
    for kind in ("flair", "seg"):
        (src / cid / f"{cid}_{kind}.nii.gz").symlink_to(shared_data / "train" / cid / f"{cid}_{kind}.nii.gz")
    out = tmp_path / "eval"
    code, text = _cli(src, "--model", model, "--out", out / "predictions", "--n", 2, "--sampler", "ddpm", "--steps", 2,
                      "--batch-size", BATCH, "--save-samples", "--quiet")
    assert code == 0 and "1 done" in text, text
    eng = open_model(model, "onnxruntime", "cpu")
    calls = []
    inner = eng.infer
    monkeypatch.setattr(eng, "infer", lambda *a: calls.append(1) or inner(*a))
    settings = _settings(model)
    res = E.evaluate_folder(src, out, backend=eng, plan=settings.plan, n=2, batch_size=BATCH, quiet=True, n_levels=5)
    (sc,) = res.scores
    assert not calls and sc.ok and sc.curve.n_members == 2 and sc.uncertainty is not None
    for p in res.reports.values():
        p.unlink()
    with pytest.raises(OutputError, match="already holds results"):  # another seed: not the same run
        E.evaluate_folder(src, out, backend=eng, plan=settings.plan, n=2, seed=1, batch_size=BATCH, quiet=True)
    flair = src / cid / f"{cid}_flair.nii.gz"
    flair.unlink()
    flair.symlink_to(shared_data / "train/BraTS18_CBICA_ASK/BraTS18_CBICA_ASK_flair.nii.gz")  # same grid, new image
    with pytest.raises(OutputError, match="already holds results"):
        E.evaluate_folder(src, out, backend=eng, plan=settings.plan, n=2, batch_size=BATCH, quiet=True)
    assert not calls


# --------------------------------------------------------------------------------------------- Ray
#: A hard limit on each Ray test, its fixtures' setup and teardown included (pytest-timeout, in the `test`
#: extra): should anything in Ray ever hang, pytest prints every thread's stack and exits with status 1 instead
#: of stalling CI. The "thread" method, because a signal cannot interrupt a driver blocked in Ray: Ray's
#: signal check turns only KeyboardInterrupt into an error and drops any other exception a signal handler raises
#: (a 15 s limit of the "signal" method let a 40 s `ray.wait` run to its end). `schedule` itself never blocks
#: for more than seconds, so this is a backstop that should never fire. Measured: 5-40 s per test here.
RAY_TIME_LIMIT_S = 300
ray_time_limit = pytest.mark.timeout(RAY_TIME_LIMIT_S, method="thread")


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster of 2 CPUs on this machine (not local mode), shared by the Ray tests below.

    Its workers run at the tests' own priority: Ray starts them at niceness 15 by default, and on a machine busy
    with other work they then crawl (a case took 115-120 s instead of 10-12 s beside three other jobs on the
    2 cores here), which would make the time limit a lottery."""
    ray = pytest.importorskip("ray", reason="the ray package is not installed (it is in the `test` extra)")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _system_config={"worker_niceness": 0})
    yield ray
    ray.shutdown()


@pytest.mark.slow
@ray_time_limit
def test_ray_run_gives_the_single_process_files_byte_for_byte(ray_cluster, reference_run, model, tmp_path):
    """`run_cohort_ray` on the real cluster (one `SegmentWorker` per CPU, each asking for 1 CPU) writes the
    single-process run's files byte for byte (and the job-array parts do too: the test above)."""
    src, ref = reference_run
    out = tmp_path / "ray"
    res = segment_cohort(src, out, model, _settings(model), use_ray=True, quiet=True)
    assert [(s.case_id, s.status) for s in res.statuses] == [(c, "done") for c in sorted(GOOD)], \
        [(s.case_id, s.status, s.message) for s in res.statuses]
    assert _bytes(out, GOOD) == _bytes(ref, GOOD)
    prov = json.loads((out / f"{GOOD[0]}_provenance.json").read_text())
    assert prov["run"] == json.loads((ref / f"{GOOD[0]}_provenance.json").read_text())["run"]
    assert {r["status"] for r in _summary(out)} == {"done"}
    # again: the workers skip the finished cases
    res = segment_cohort(src, out, model, _settings(model), use_ray=True, quiet=True)
    assert {s.status for s in res.statuses} == {"skipped"}


def _actor_classes():
    """FlakyWorker (its first call kills its process), AlwaysCrashes (run raises), Quick: defined in a function
    so that Ray ships them to the workers by value (the workers cannot import this test module)."""
    class FlakyWorker:
        def run(self, entry):
            marker = Path(entry.inputs[0])
            if not marker.exists():  # the first attempt kills the worker process
                marker.write_text("died once")
                os._exit(1)
            return {"case_id": entry.case_id, "status": "done", "source": str(marker), "message": "",
                    "seconds": 0.0, "provenance": {}}

    class AlwaysCrashes:
        def run(self, entry):
            raise RuntimeError("engine crashed")

    class Quick:
        def run(self, entry):
            return {"case_id": entry.case_id, "status": "done", "source": "", "message": "", "seconds": 0.0,
                    "provenance": {}}
    return FlakyWorker, AlwaysCrashes, Quick


#: The test actors ask for half a CPU, so that each fits beside those still alive. With 1 CPU each, the two
#: restarted FlakyWorkers held both of the cluster's CPUs, AlwaysCrashes stayed pending for ever and the old
#: `schedule` waited for it: the hang that had made these tests opt-in (now `schedule` gives such a worker up,
#: the next test shows). A restarted actor also never waits for the CPU of the process that died.
HALF_CPU = {"num_cpus": 0.5}


@pytest.mark.slow
@ray_time_limit
def test_ray_schedule_retries_a_case_whose_worker_died(ray_cluster, tmp_path):
    """A case whose worker process died is retried on the worker Ray restarted; one whose run() raises is
    retried on the same live worker, then reported with the error."""
    from diffseg_engine.pipeline.cohort_ray import schedule
    ray = ray_cluster
    FlakyWorker, AlwaysCrashes, _ = _actor_classes()
    entries = [CohortEntry("A", inputs=(tmp_path / "a.marker",)), CohortEntry("B", inputs=(tmp_path / "b.marker",))]
    actors = [ray.remote(max_restarts=3, **HALF_CPU)(FlakyWorker).remote() for _ in range(2)]
    retried = []
    statuses = schedule(actors, entries, retries=2, start_timeout=120,
                        on_retry=lambda e, k, exc: retried.append((e.case_id, k)))
    assert [(s.case_id, s.status) for s in statuses] == [("A", "done"), ("B", "done")]
    assert sorted(retried) == [("A", 1), ("B", 1)]
    bad = [ray.remote(**HALF_CPU)(AlwaysCrashes).remote()]  # run() raises: retried on the same, live worker
    statuses = schedule(bad, entries[:1], retries=1, start_timeout=120)
    assert statuses[0].status == "failed" and "failed 2 times on Ray" in statuses[0].message
    assert "engine crashed" in statuses[0].message
    for a in actors + bad:
        ray.kill(a)


@pytest.mark.slow
@ray_time_limit
def test_ray_schedule_never_waits_for_ever_on_a_worker(ray_cluster, tmp_path):
    """Ray keeps an actor it cannot place pending for ever; `schedule` gives it up after `start_timeout` (the
    other workers run the cases, or with none left the cases fail), and gives up one that died for good."""
    import time

    from diffseg_engine.pipeline.cohort_ray import schedule
    ray = ray_cluster
    FlakyWorker, _, Quick = _actor_classes()
    entries = [CohortEntry(c, inputs=(tmp_path / f"{c}.marker",)) for c in "ABC"]
    nowhere = {"num_cpus": 0, "resources": {"a_resource_no_node_has": 1}}
    t0 = time.monotonic()
    # one worker that cannot be placed beside one that works (started already, so that the 3 s bound only the
    # other): the working one runs every case
    works = ray.remote(**HALF_CPU)(Quick).remote()
    ray.get(works.__ray_ready__.remote(), timeout=120)
    actors = [ray.remote(**nowhere)(Quick).remote(), works]
    statuses = schedule(actors, entries, start_timeout=3)
    assert [(s.case_id, s.status) for s in statuses] == [(c, "done") for c in "ABC"]
    # no worker can be placed: every case fails once the start time is up
    statuses = schedule([ray.remote(**nowhere)(Quick).remote()], entries, start_timeout=3)
    assert {s.status for s in statuses} == {"failed"}
    assert all("not run on Ray: no worker left (a worker did not start within 3 s" in s.message for s in statuses)
    # the only worker dies for good (no restarts left): its case and the rest fail, nothing waits
    once = [ray.remote(max_restarts=0, **HALF_CPU)(FlakyWorker).remote()]
    statuses = schedule(once, entries, retries=2, start_timeout=120)
    assert {s.status for s in statuses} == {"failed"}
    assert all("not run on Ray: no worker left (ActorDiedError" in s.message for s in statuses), statuses
    assert time.monotonic() - t0 < 60
    for a in actors + once:
        ray.kill(a)


# --------------------------------------------------------------------------------------------- Python API
def test_segmenter_maps_a_volume_in_memory_exactly_as_segment_writes_it(reference_run, model, tmp_path,
                                                                         monkeypatch):
    from diffseg_engine.api import Segmenter
    _, ref = reference_run
    cid = GOOD[0]
    flair = nib.load(str(ref.parent / "cohort" / cid / f"{cid}_flair.nii.gz"))
    monkeypatch.chdir(tmp_path)
    seg = Segmenter(model, n=2, sampler="ddpm", steps=2, batch_size=BATCH)
    assert seg.modalities == ("flair",)
    res = seg(flair, case_id=cid)
    for k in MAPS:
        np.testing.assert_array_equal(getattr(res, k), np.asarray(nib.load(str(ref / f"{cid}_{k}.nii.gz")).dataobj))
    np.testing.assert_array_equal(res.affine, flair.affine)
    prov = json.loads((ref / f"{cid}_provenance.json").read_text())
    assert res.lesion == prov["lesion"]
    # an array with its affine, a mapping, a list: the same maps; nothing was written anywhere
    data = np.asarray(flair.dataobj)
    for call in (lambda: seg(data, flair.affine, case_id=cid), lambda: seg({"FLAIR": data}, flair.affine, case_id=cid),
                 lambda: seg.segment([flair], case_id=cid)):
        np.testing.assert_array_equal(call().mean, res.mean)
    assert list(tmp_path.iterdir()) == []
    other = seg(flair, case_id=cid, seed=1)
    assert not np.array_equal(other.mean, res.mean)
    with pytest.raises(UsageError, match="needs its affine"):
        seg(data)
    with pytest.raises(MissingModalityError, match="4D volume has 2 channels"):
        seg(np.stack([data, data], -1), flair.affine)
    with pytest.raises(MissingModalityError, match="missing flair"):
        seg({"t1": data}, flair.affine)
    with pytest.raises(InputImageError, match="invertible"):
        seg(data, np.zeros((4, 4)))
    with pytest.raises(UsageError, match="--n must be at least 1"):
        Segmenter(model, n=0)


def test_segment_paths_one_case_and_a_cohort(reference_run, model, tmp_path):
    from diffseg_engine.api import segment_paths
    src, ref = reference_run
    one = segment_paths(src / GOOD[1], tmp_path / "one", model, n=2, sampler="ddpm", steps=2,
                        batch_size=BATCH, overview=False)
    assert one.case_id == GOOD[1] and one.outputs["mean"].read_bytes() == (ref / f"{GOOD[1]}_mean.nii.gz").read_bytes()
    many = segment_paths(src, tmp_path / "one", model, n=2, sampler="ddpm", steps=2, batch_size=BATCH,
                         overview=False)
    assert {s.case_id: s.status for s in many.statuses} == {GOOD[0]: "done", GOOD[1]: "skipped"}
    assert _bytes(tmp_path / "one", GOOD) == _bytes(ref, GOOD)


def _readme_block(heading: str) -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    """The README's example, as written, on the shipped default model: runs, writes nothing, prints the maps."""
    code = _readme_block("## Python API")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    res = scope["result"]
    shape = scope["image"].shape
    assert res.mean.shape == res.variance.shape == res.mask.shape == shape
    assert res.mask.dtype == np.uint8 and 0 <= res.mean.min() and res.mean.max() <= 1
    assert "ml" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
