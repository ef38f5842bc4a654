"""`segment`: one case from NIfTI in to mean / variance / mask NIfTI out, on the input grid.

Owns: resolving and validating the user's inputs for the model's modalities (`resolve_case`, which also
preprocesses, so every input error surfaces before a model is loaded), the checks on `--out`
(`check_output`), the default batch size, the output names, the provenance record and, for ``--n auto``, the
members each slice got (`members_map`, `members_summary`), and `segment_case`,
which ties preprocessing, the sampler, a backend and the inverse preprocessing together: under a per-case
lock (`lock`), saving each finished chunk (`partial`) so that an interrupted run resumes, writing all maps
together (`atomic.AtomicFiles`) and the provenance JSON last, as the mark of a finished case. The files'
names are `outputs`' (`output_paths` is re-exported here for its callers).
Imports: nibabel (lazily), numpy, onnxruntime (lazily); `artifacts`, `backends`, `core`, `inputs`, `io`, `maps`,
`models`, `options`, `sampling`. Never torch.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from ..artifacts.card import ModelCard
from ..artifacts.weights import file_sha256 as _sha256
from ..backends import StepBackend
from ..core.ensemble import EnsembleSize, EnsembleStats, describe_size, ensemble_identity, is_auto, max_members, \
    sampled_size
from ..core.errors import BatchMemoryError, CropWindowError, InputImageError, MissingModalityError, OutputError, \
    UsageError
from ..core.progress import ProgressBar
from ..inputs.cases import canonical_modality, classify_file, find_case
from ..inputs.preprocess import PreparedCase, prepare_case, restore
from ..inputs.sanity import check_case
from ..io.atomic import AtomicFiles, atomic_write
from ..io.lock import OutputLock
from ..io.nifti_io import LoadedImage, encode_like, load_image
from ..io.partial import PartialRun, describe_mismatch
from ..maps.ensemble_maps import CaseMaps, members_summary
from ..maps.lesions import DEFAULT_MIN_COMPONENT, lesion_summary
from ..maps.outputs import SUBMISSION_KEYS, SUFFIXES, output_paths
from ..maps.qubrats import WHOLE_TUMOUR_LABEL, label_map, uncertainty_map
from ..sampling.rounds import Rounds
from ..sampling.sampler import SamplingPlan
from .core import case_maps, default_batch_size, sample_case
from .models import model_sha256
from .options import RunSettings

log = logging.getLogger(__name__)


@dataclass
class CaseInput:
    case_id: str
    images: list[LoadedImage]  # in the model's modality order
    reference: LoadedImage  # the grid the outputs are written on
    sources: dict[str, str] = field(default_factory=dict)  # modality -> file
    prepared: PreparedCase | None = None  # network input (`resolve_case` fills it in)
    prepare_s: float = 0.0
    forced: list[str] = field(default_factory=list)  # input checks overridden by force=True (`sanity`)
    warnings: list[str] = field(default_factory=list)  # input checks that warned (`sanity`)


def case_id_of(path: Path) -> str:
    """The case id `segment` gives a case folder (its name) or a file (`_case_id_from_file`)."""
    path = Path(path)
    return path.resolve().name if path.is_dir() else _case_id_from_file(path)


def _case_id_from_file(path: Path) -> str:
    """`BraTS18_X_flair.nii.gz` -> `BraTS18_X`; a name without a modality token stays whole."""
    stem = path.name
    for ext in (".nii.gz", ".nii"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
    head, sep, _ = max(stem.rpartition("_"), stem.rpartition("-"), key=lambda p: len(p[0]))
    return head if sep and head and classify_file(path) is not None else stem


def _split_4d(loaded: LoadedImage) -> list[LoadedImage]:
    parts = []
    for c in range(loaded.data.shape[-1]):
        vol = np.ascontiguousarray(loaded.data[..., c])
        hdr = loaded.image.header.copy()
        hdr.set_data_shape(vol.shape)
        img = type(loaded.image)(vol, loaded.image.affine, hdr)
        parts.append(LoadedImage(data=vol, image=img, path=loaded.path))
    return parts


def resolve_case(inputs: Sequence[Path], modality_args: Sequence[str], card: ModelCard, *,
                 prepare: bool = True, force: bool = False) -> CaseInput:
    """Match the user's inputs to `card.modalities`, load them (validated, same grid) and, with `prepare`,
    preprocess them for the network (which refuses constant images, an in-plane size the model cannot take...)
    and check that each looks like a skull-stripped, BraTS-preprocessed volume of its modality
    (`sanity.check_case`: refused unless `force`, which makes the refusals warnings; `CaseInput.forced` lists
    what was overridden, for the provenance).

    inputs: a case folder (any naming of ../shared/data), one 3D file (single-modality models), or one 4D
    file with the modalities on the last axis in the model's order. modality_args: ``flair=PATH`` pairs.
    Needs only the model card, so every input error is reported before a model is loaded.
    """
    need = list(card.modalities)
    files: dict[str, Path] = {}
    case_id = None
    for arg in modality_args:
        if "=" not in arg:
            raise UsageError(f"--modality {arg!r} is not NAME=PATH", fix="write e.g. --modality flair=scan.nii.gz")
        name, p = arg.split("=", 1)
        canon = canonical_modality(name)
        if canon in files:
            raise MissingModalityError(f"--modality {canon} is given twice ({files[canon]} and {p})")
        files[canon] = Path(p)
    loaded: list[LoadedImage]
    if files:
        if inputs:
            raise UsageError("give either input paths or --modality NAME=PATH, not both")
        missing = [m for m in need if m not in files]
        if missing:
            raise MissingModalityError(f"the model needs {need}; missing --modality {', '.join(missing)}",
                                       fix=f"add --modality {missing[0]}=PATH")
        loaded = [load_image(files[m]) for m in need]
        case_id = _case_id_from_file(files[need[0]])
    elif len(inputs) != 1:
        raise UsageError(f"give one input (a case folder, a 3D or a 4D NIfTI), got {len(inputs)}",
                         fix="or name each file with --modality NAME=PATH")
    else:
        src = Path(inputs[0])
        if src.is_dir():
            case = find_case(src)
            paths = case.require(need)
            files = dict(zip(need, paths))
            loaded = [load_image(p) for p in paths]
            case_id = case.case_id
        elif not src.exists():
            raise InputImageError("input not found", path=src, fix="check the path")
        else:
            im = load_image(src)
            case_id = _case_id_from_file(src)
            if im.data.ndim == 4:
                if im.data.shape[-1] != len(need):
                    raise MissingModalityError(
                        f"4D image has {im.data.shape[-1]} volumes on its last axis; the model needs {len(need)} "
                        f"({', '.join(need)}, in that order)", path=src,
                        fix="give a 4D file with exactly these modalities, or one file per --modality")
                loaded = _split_4d(im)
                files = {m: src for m in need}
            elif len(need) == 1:
                role = classify_file(src)
                if role and role[0] == "modality" and role[1] != need[0]:
                    raise MissingModalityError(f"file name says {role[1]} but the model needs {need[0]}", path=src,
                                               fix=f"pass --modality {need[0]}=PATH to use this file anyway")
                loaded, files = [im], {need[0]: src}
            else:
                raise MissingModalityError(f"a single 3D image cannot feed a model of {len(need)} modalities "
                                           f"({', '.join(need)})", path=src,
                                           fix="give the case folder, a 4D file, or --modality NAME=PATH for each")
    _check_same_grid(loaded, need)
    case = CaseInput(case_id=case_id or "case", images=loaded, reference=loaded[0],
                     sources={m: str(files[m]) for m in need})
    if prepare:
        t0 = time.perf_counter()
        case.prepared, case.forced, case.warnings = prepare_checked(
            [im.data for im in loaded], loaded[0].affine, loaded[0].image.header.get_zooms()[:3], card,
            names=[im.path for im in loaded], force=force)
        case.prepare_s = time.perf_counter() - t0
    return case


def prepare_checked(volumes: Sequence[np.ndarray], affine: np.ndarray, zooms: Sequence[float], card: ModelCard, *,
                    names: Sequence[object] | None = None,
                    force: bool = False) -> tuple[PreparedCase, list[str], list[str]]:
    """`prepare_case` and the input checks of `sanity.check_case`, in the order a user is best told: every
    hard refusal of preprocessing (shape, field of view, constant image...) first, then the sanity checks
    (not skull-stripped, not the model's modality), then the crop-window refusal, which a native head scan
    also triggers as a consequence of its skull. Returns (prepared, overridden refusals, warnings); with
    `force` the sanity and crop-window refusals are warnings, listed as overridden."""
    window_refusal = None
    try:
        prepared = prepare_case(volumes, affine, card.preprocessing, names=names, force=force)
    except CropWindowError as exc:
        window_refusal = exc
    verdicts = check_case(volumes, affine, zooms, card.modalities, card.preprocessing, names=names, force=force)
    if window_refusal is not None:
        raise window_refusal
    forced = [v for v in verdicts if v.startswith("refuse: ")] + list(prepared.geometry.forced)
    return prepared, forced, [v for v in verdicts if v.startswith("warn: ")]


def _check_same_grid(images: list[LoadedImage], names: list[str]) -> None:
    ref = images[0]
    ref_zooms = np.asarray(ref.image.header.get_zooms()[:3], np.float64)
    for im, name in zip(images[1:], names[1:]):
        if im.data.shape != ref.data.shape:
            raise InputImageError(f"{name} has shape {im.data.shape} but {names[0]} has {ref.data.shape}",
                                  path=im.path, fix="resample all modalities onto one grid (co-register) first")
        zooms = np.asarray(im.image.header.get_zooms()[:3], np.float64)
        if zooms.shape == ref_zooms.shape and not np.allclose(zooms, ref_zooms, atol=1e-4, rtol=0):
            raise InputImageError(f"{name} has voxel spacing {tuple(float(z) for z in zooms)} mm but {names[0]} "
                                  f"has {tuple(float(z) for z in ref_zooms)} mm", path=im.path,
                                  fix="resample all modalities onto one grid (co-register) first")
        if not np.allclose(im.affine, ref.affine, atol=1e-3, rtol=0):
            raise InputImageError(f"{name} has a different affine (voxel-to-world) than {names[0]} ({ref.path.name})",
                                  path=im.path, fix="resample all modalities onto one grid (co-register) first")


def _all_outputs(out_dir: Path, case_id: str) -> dict[str, Path]:
    return output_paths(out_dir, case_id, tuple(SUFFIXES))


def members_path(out_dir: Path, case_id: str) -> Path:
    """``--n auto`` only: the members each slice got, as a map on the input grid."""
    return output_paths(out_dir, case_id, ("members",))["members"]


def check_output(out_dir: str | Path, case: CaseInput, *, overwrite: bool = False) -> None:
    """Refuse an `--out` that cannot work, leaving nothing behind: an input file or an input's folder (a
    ``<case>_mask.nii.gz`` there would later be taken for the case's label), a path that is or lies under a
    file, a folder that cannot be written, or one that already holds this case's results (unless
    `overwrite`). Writability is probed with a file (or folder) that is removed at once. `segment_case`
    checks again under the lock."""
    out_dir = Path(out_dir)
    inputs = {Path(p).resolve() for p in case.sources.values()}
    target = out_dir.resolve()
    if target in inputs:
        raise OutputError("is an input image, not a folder for the results", path=out_dir,
                          fix="choose a new folder for --out")
    if target in {p.parent for p in inputs}:
        raise OutputError("is the folder of an input image: results there (e.g. <case>_mask.nii.gz) would be "
                          "taken for the case's own files later", path=out_dir, fix="choose another --out folder")
    if any(p.resolve() in inputs for p in _all_outputs(out_dir, case.case_id).values()):
        raise OutputError("an output would overwrite an input file", path=out_dir, fix="choose another --out")
    existing = out_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == out_dir.absolute() else f"lies under the file {existing}"
        raise OutputError(f"{where}, not a folder", path=out_dir, fix="choose a folder for --out")
    try:  # a real probe (permissions, read-only file systems, root...) that leaves nothing behind
        if existing == out_dir.absolute():
            tempfile.TemporaryFile(dir=out_dir, prefix=".diffseg-probe-").close()
        else:
            first = existing / out_dir.absolute().relative_to(existing).parts[0]
            first.mkdir()
            first.rmdir()
    except OSError as exc:
        raise OutputError(f"cannot be written ({exc.strerror or exc})", path=out_dir,
                          fix="choose a writable --out folder") from None
    _refuse_results(out_dir, case.case_id, overwrite)


def _refuse_results(out_dir: Path, case_id: str, overwrite: bool) -> None:
    """Finished results (a provenance JSON) or maps without unfinished work to resume are refused."""
    if overwrite:
        return
    paths = _all_outputs(out_dir, case_id)
    resumable = PartialRun(out_dir, case_id).exists()
    if paths["provenance"].exists() or (not resumable and any(p.exists() for p in paths.values())):
        raise OutputError(f"already holds results for {case_id}", path=out_dir,
                          fix="pass --overwrite to replace them, or choose another --out")


def _write_json_atomic(path: Path, data: dict) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def _versions() -> dict:
    import nibabel
    v = {"diffseg_engine": __version__, "numpy": np.__version__, "nibabel": nibabel.__version__,
         "python": platform.python_version(), "platform": platform.platform()}
    try:
        import onnxruntime
        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return v


@dataclass
class SegmentResult:
    case_id: str
    outputs: dict[str, Path]
    mean: np.ndarray  # on the input grid
    variance: np.ndarray
    mask: np.ndarray
    provenance: dict
    members: np.ndarray | None = None  # --n auto: the members each voxel's slice got (`members_map`)


def _make_folder(out_dir: Path) -> list[Path]:
    """mkdir -p `out_dir` and check a file can be created there; returns the folders it created."""
    created = []
    p = out_dir.absolute()
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".diffseg-probe-", delete=True)
        probe.close()
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(f"cannot write here ({exc.strerror or exc})", path=out_dir,
                          fix="choose a writable --out folder") from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    for f in folders:  # deepest first
        try:
            f.rmdir()
        except OSError:
            break


def run_identity(case_id: str, card: ModelCard, backend_name: str, plan: SamplingPlan, n: EnsembleSize,
                 seed: int, save_samples: bool, input_sha: dict[str, str], model_sha: str | None,
                 min_component: float = DEFAULT_MIN_COMPONENT) -> dict:
    """What makes two runs of a case "the same run" (the one definition): engine version, case, the inputs'
    and the model's sha256, the model card, the backend, sampler/steps/eta/mirror, the ensemble size (n; for
    ``--n auto`` n = "auto" with n_min, n_step, n_max and n_tol: `ensemble.ensemble_identity`, so an auto run
    and a fixed one are never the same run), seed, whether member masks are kept and the mask's component
    clean-up (`lesions.lesion_mask`). A resumed run must match it (with the slices, `_fingerprint`); a
    finished one that matches it is skipped by a cohort run (`finished_run`). Recorded in the provenance JSON
    as ``run``."""
    return {
        "format": 1, "engine": __version__, "case_id": case_id, "inputs_sha256": dict(input_sha),
        "model_sha256": model_sha, "card_sha256": hashlib.sha256(card.to_json().encode()).hexdigest(),
        "backend": backend_name, **plan.describe(), **ensemble_identity(n), "seed": int(seed),
        "save_samples": bool(save_samples), "min_component": float(min_component),
    }


def _fingerprint(case: CaseInput, backend: StepBackend, plan: SamplingPlan, n: EnsembleSize, seed: int,
                 save_samples: bool, input_sha: dict[str, str], model_sha: str | None) -> dict:
    """Everything that decides the sampled chunks: a resumed run must match it exactly. The mask clean-up
    (`min_component`) comes after sampling, so a resume may change it (it keeps its default here)."""
    prepared = case.prepared
    return {
        **run_identity(case.case_id, backend.card, backend.name, plan, n, seed, save_samples, input_sha, model_sha),
        "slices": int(len(prepared.inputs)),
        "slice_index_sha256": hashlib.sha256(np.asarray(prepared.slice_index, np.int64).tobytes()).hexdigest(),
    }


def finished_run(out_dir: str | Path, case_id: str, card: ModelCard, backend_name: str, plan: SamplingPlan,
                 n: EnsembleSize, seed: int, save_samples: bool, model_sha: str | None, output_format: str = "nifti",
                 min_component: float = DEFAULT_MIN_COMPONENT) -> dict | None:
    """The provenance of a finished run of `case_id` in `out_dir` that is the same run (`run_identity`) as the
    one these parameters would start, its inputs (the files it recorded) unchanged, and every file of
    `output_format` there; else None. Reads no image: only the provenance JSON and the sha256 of the recorded
    input files."""
    maps = output_paths(Path(out_dir), case_id)
    try:
        prov = json.loads(maps["provenance"].read_text())
        inputs = {m: Path(p) for m, p in prov["inputs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if prov.get("complete") is not True or not all(p.is_file() for p in inputs.values()):
        return None
    if not all(maps[k].is_file() for k in ("mean", "variance", "mask")):
        return None
    if output_format == "qubrats" and not all(
            p.is_file() for p in output_paths(Path(out_dir), case_id, SUBMISSION_KEYS).values()):
        return None  # finished as plain maps; the submission files are still to be written
    want = run_identity(case_id, card, backend_name, plan, n, seed, save_samples,
                        {m: _sha256(p) for m, p in inputs.items()}, model_sha, min_component)
    return prov if prov.get("run") == json.loads(json.dumps(want)) else None


def segment_case(case: CaseInput, backend: StepBackend, out_dir: Path, settings: RunSettings, *, quiet: bool = False,
                 command: str = "", progress_factory: Callable[..., ProgressBar] = ProgressBar) -> SegmentResult:
    """Sample an ensemble of `settings.n` masks for every brain slice of `case` and write the maps to
    `out_dir`; the mask drops components under `settings.min_component` of the largest (`lesions.lesion_mask`).

    settings.n: N members per slice, or `ensemble.AutoN` (``--n auto``: rounds until each slice's maps settle;
    the members each slice got are recorded in the provenance and written as ``<case>_members.nii.gz``).

    Runs under an exclusive lock on this case's outputs (`OutputBusyError` if another run holds it). Each
    finished chunk is saved in ``out_dir/.<case>.partial/``; a later call with the same parameters resumes
    from there (bit-identical maps at the same batch size, which a resume with batch size 0 reuses), one with
    other parameters is refused unless `settings.overwrite`, which discards it. The maps are written together,
    the provenance JSON last; then the unfinished-work folder is removed. Nothing is left in `out_dir` by a run
    that fails before its first chunk finishes.
    """
    out_dir = Path(out_dir)
    check_output(out_dir, case, overwrite=settings.overwrite)
    if case.prepared is None:
        t0 = time.perf_counter()
        card = backend.card
        case.prepared = prepare_case([im.data for im in case.images], case.reference.affine, card.preprocessing,
                                     names=[im.path for im in case.images])  # errors name the file at fault
        case.prepare_s = time.perf_counter() - t0
    created = _make_folder(out_dir)
    try:
        with OutputLock(out_dir, case.case_id):
            return _segment_locked(case, backend, out_dir, settings, quiet=quiet, command=command,
                                   progress_factory=progress_factory)
    finally:
        _remove_empty(created)  # only where nothing (no finished result, no unfinished work) was left


@dataclass
class _Run:
    """One case's run as it goes from resuming to the provenance."""

    partial: PartialRun
    fingerprint: dict
    input_sha: dict[str, str]
    model_sha: str | None
    rounds: Rounds
    samples: np.ndarray | None  # --save-samples: every member's map [S, n, h, w]
    start: int = 0  # work items finished by an earlier run
    stats: EnsembleStats | None = None
    batch_size: int = 0  # as started
    batch_size_final: int = 0  # after halvings for memory
    timings: dict[str, float] = field(default_factory=dict)


def _segment_locked(case: CaseInput, backend: StepBackend, out_dir: Path, settings: RunSettings, *, quiet: bool,
                    command: str, progress_factory: Callable[..., ProgressBar]) -> SegmentResult:
    _refuse_results(out_dir, case.case_id, settings.overwrite)  # again, now that no other run can be writing
    for stale in out_dir.glob(f".{case.case_id}_*.tmp"):  # temp files of a run killed while writing
        stale.unlink(missing_ok=True)
    run = _resume_or_start(case, backend, out_dir, settings)
    _sample(case, backend, settings, run, quiet=quiet, progress_factory=progress_factory)
    t2 = time.perf_counter()
    maps = case_maps(case.prepared, run.stats, case.reference.image.header.get_zooms()[:3], settings)
    paths = _write_maps(case, backend.card, out_dir, settings, maps, run.samples)
    run.timings["write_s"] = time.perf_counter() - t2
    prov = _provenance(case, backend, settings, run, maps, paths, command)
    _write_json_atomic(paths["provenance"], prov)  # written last: marks completion
    run.partial.remove()
    return SegmentResult(case.case_id, paths, maps.mean, maps.variance, maps.mask, prov, maps.members)


def _resume_or_start(case: CaseInput, backend: StepBackend, out_dir: Path, settings: RunSettings) -> _Run:
    """The run's starting point: unfinished work of the same run resumed (`partial`), else a fresh start
    (unfinished work of other parameters refused, or discarded with `overwrite`)."""
    n, prepared = settings.n, case.prepared
    input_sha = {m: _sha256(Path(p)) for m, p in case.sources.items()}
    model_sha = model_sha256(backend)
    fingerprint = _fingerprint(case, backend, settings.plan, n, settings.seed, settings.save_samples, input_sha,
                               model_sha)
    S, h = len(prepared.inputs), backend.card.image_size
    sched = sampled_size(n, settings.plan.mirror)  # what the rounds run (mirrored --n auto: even counts)
    samples = np.zeros((S, n, h, h), np.float32) if settings.save_samples else None
    partial = PartialRun(out_dir, case.case_id)
    run = _Run(partial, fingerprint, input_sha, model_sha, Rounds(S, sched), samples,
               timings={"preprocess_s": case.prepare_s})
    batch_size = settings.batch_size
    try:
        old = partial.params() if partial.exists() else None
        if old is not None and old.get("fingerprint") == fingerprint:
            run.start, run.stats = partial.load(S, None if is_auto(n) else n, (h, h), samples)
            if is_auto(n):
                try:
                    run.rounds = Rounds.restore(S, sched, partial.schedule or {}, run.stats, run.start)
                except ValueError as exc:
                    raise partial._broken(str(exc)) from None
            batch_size = batch_size or int(old.get("batch_size") or 0)  # auto: the size the run started with
        elif partial.exists():
            if old is None:
                raise partial._broken("no params.json")
            raise OutputError(f"holds unfinished work for {case.case_id} with other parameters "
                              f"({describe_mismatch(old.get('fingerprint') or {}, fingerprint)})", path=out_dir,
                              fix="rerun with the same parameters to resume it, or pass --overwrite to discard it")
    except OutputError:
        if not settings.overwrite:
            raise
        # --overwrite: unfinished work that cannot be resumed is discarded
        run.start, run.stats, run.rounds = 0, None, Rounds(S, sched)
        if samples is not None:
            samples[:] = 0
    items = S * max_members(sched)  # for --n auto the most there can be
    run.batch_size = run.batch_size_final = batch_size or default_batch_size(backend.card, items, backend.device)
    if run.start == 0:
        partial.start({"fingerprint": fingerprint, "batch_size": run.batch_size})
    else:
        log.info("%s: resuming after %d of %s%d work items", case.case_id, run.start,
                 "at most " if is_auto(n) else "", run.rounds.planned_items(run.start))
    return run


def _sample(case: CaseInput, backend: StepBackend, settings: RunSettings, run: _Run, *, quiet: bool,
            progress_factory: Callable[..., ProgressBar]) -> None:
    """Sample the rest of the run (`pipeline.core.sample_case`), each finished chunk saved for a resume."""
    backend.allocate(run.batch_size)
    K, rounds, partial, samples = len(settings.plan.coefs), run.rounds, run.partial, run.samples
    saved = {"next": run.start}

    def on_chunk(next_item: int, st) -> None:
        if is_auto(settings.n):
            partial.save_chunk(saved["next"], next_item, st, None, rows=rounds.last_rows, schedule=rounds.state(st))
            bar.set_total(rounds.planned_items(next_item) * K)  # slices that stopped shorten the run
        else:
            partial.save_chunk(saved["next"], next_item, st, settings.n, samples)
        saved["next"] = next_item

    def on_batch_size(new: int, err: BatchMemoryError) -> None:
        run.batch_size_final = new
        log.warning("%s: %s -- retrying that chunk at batch size %d", case.case_id, err, new)

    t1 = time.perf_counter()
    try:
        with progress_factory(rounds.planned_items(run.start) * K, f"segment {case.case_id}", unit="step·member",
                              quiet=quiet, initial=run.start * K) as bar:
            run.stats = sample_case(
                backend, case.prepared, settings, case.case_id, run.batch_size, stats=run.stats,
                start_item=run.start, rounds=rounds, on_progress=bar.advance, on_chunk=on_chunk,
                on_batch_size=on_batch_size,
                on_member=(lambda s, m, p: samples.__setitem__((s, m), p)) if samples is not None else None)
    except BaseException:
        if not partial.chunk_files():  # on disk, not saved["next"]: Ctrl-C may land just after a commit
            partial.remove()  # nothing worth resuming: leave --out as it was
        raise
    run.timings["sampling_s"] = time.perf_counter() - t1


def _write_maps(case: CaseInput, card: ModelCard, out_dir: Path, settings: RunSettings, maps: CaseMaps,
                samples: np.ndarray | None) -> dict[str, Path]:
    """Every map of the run's output format, written together (`atomic.AtomicFiles`); stale files of another
    format removed. Returns the paths written (the provenance's included, written later)."""
    case_id, qubrats = case.case_id, settings.output_format == "qubrats"
    paths = output_paths(out_dir, case_id)
    if maps.members is not None:
        paths["members"] = members_path(out_dir, case_id)
    if qubrats:
        paths.update(output_paths(out_dir, case_id, SUBMISSION_KEYS))
    if samples is not None:
        paths.update(output_paths(out_dir, case_id, ("samples",)))
    picture = _overview_png(case, card, settings.plan, settings.n, settings.seed, maps.mean, maps.variance) \
        if settings.overview else None
    if picture is None:
        paths.pop("overview")
    ref = case.reference
    with AtomicFiles() as files:  # every map complete on disk before any replaces an old one
        files.write_bytes(paths["mean"], encode_like(ref, maps.mean, paths["mean"], np.float32))
        files.write_bytes(paths["variance"], encode_like(ref, maps.variance, paths["variance"], np.float32))
        files.write_bytes(paths["entropy"], encode_like(ref, maps.entropy, paths["entropy"], np.float32))
        files.write_bytes(paths["mask"], encode_like(ref, maps.mask, paths["mask"], np.uint8))
        if qubrats:
            files.write_bytes(paths["label"], encode_like(ref, label_map(maps.mask), paths["label"], np.uint8))
            files.write_bytes(paths["unc_whole"], encode_like(ref, uncertainty_map(maps.mean), paths["unc_whole"],
                                                              np.uint8))
        if samples is not None:
            files.write_bytes(paths["samples"], _samples_blob(ref, case.prepared, samples, paths["samples"]))
        if maps.members is not None:
            files.write_bytes(paths["members"], encode_like(ref, maps.members, paths["members"], np.uint16))
        if picture is not None:
            files.write_bytes(paths["overview"], picture)
        # the provenance file marks a complete set: an old one must not vouch for maps half replaced
        paths["provenance"].unlink(missing_ok=True)
        files.commit()
    if not qubrats:  # --overwrite of a qubrats run: no stale submission beside the new maps
        for stale in output_paths(out_dir, case_id, SUBMISSION_KEYS).values():
            stale.unlink(missing_ok=True)
    if maps.members is None:  # --overwrite of an auto run: no stale member-count map beside the new maps
        members_path(out_dir, case_id).unlink(missing_ok=True)
    return paths


#: What each map is, in the provenance.
DEFINITIONS = {
    "mean": "mean over members of clip((x0-low)/(high-low), 0, 1)",
    "variance": "population variance over members of the same",
    "mask": "mean > 0.5, without 26-connected components smaller than min_component x the largest one's voxels "
            "(mask_cleanup; the mean map keeps them)",
    "entropy": "binary entropy of the mean in bits, in [0, 1]: -m log2 m - (1-m) log2 (1-m)",
}
AUTO_DEFINITIONS = {"members": "--n auto: the members drawn for the voxel's slice (uint16; 0 outside the brain and "
                               "the processed slices)"}
QUBRATS_DEFINITIONS = {
    "label": f"QU-BraTS label map: {WHOLE_TUMOUR_LABEL} where mask (whole tumour only: tumour core and enhancing "
             "tumour are not modelled and stay empty)",
    "unc_whole": "QU-BraTS whole-tumour uncertainty, uint8 0..100 = round(100 x entropy)"}


def _provenance(case: CaseInput, backend: StepBackend, settings: RunSettings, run: _Run, maps: CaseMaps,
                paths: dict[str, Path], command: str) -> dict:
    """The provenance record of a finished run (written last: it marks the case complete)."""
    card, n, plan, prepared = backend.card, settings.n, settings.plan, case.prepared
    auto, qubrats = is_auto(n), settings.output_format == "qubrats"
    zooms = case.reference.image.header.get_zooms()[:3]
    return {
        "case_id": case.case_id, "complete": True, "inputs": case.sources, "input_sha256": run.input_sha,
        "model_sha256": run.model_sha, "model_card": card.to_dict(),
        "sampling": {**plan.describe(), **ensemble_identity(n), "seed": settings.seed, "batch_size": run.batch_size,
                     "batch_size_final": run.batch_size_final, "resumed_from_item": run.start,
                     "slices": len(prepared.inputs), "work_items": int(run.stats.count.sum()),
                     **({"members": members_summary(run.stats.count, prepared, n.n_max)} if auto else {})},
        "geometry": prepared.geometry.describe(),  # input orientation/spacing and what preprocessing did to them
        "backend": backend.describe(), "versions": _versions(), "timings": run.timings,
        "run": run_identity(case.case_id, card, backend.name, plan, n, settings.seed, settings.save_samples,
                            run.input_sha, run.model_sha, settings.min_component),
        "lesion": lesion_summary(maps.mask, maps.variance, zooms),
        "mask_cleanup": {"min_component": float(settings.min_component), **maps.cleaned.describe()},
        "outputs": {k: str(v.name) for k, v in paths.items() if k != "provenance"}, "command": command,
        "definitions": {**DEFINITIONS, **(AUTO_DEFINITIONS if auto else {}),
                        **(QUBRATS_DEFINITIONS if qubrats else {})},
        "format": settings.output_format,
        "input_checks": {"forced": bool(case.forced), "overridden": case.forced, "warnings": case.warnings},
    }


def _overview_png(case: CaseInput, card: ModelCard, plan: SamplingPlan, n: EnsembleSize, seed: int, mean: np.ndarray,
                  variance: np.ndarray) -> bytes | None:
    """The overview picture as PNG bytes, or None where matplotlib is missing (the maps are written anyway)."""
    try:
        from ..maps.overview import write_overview
    except ImportError:
        return None
    buf = io.BytesIO()
    try:
        write_overview(f"{case.case_id}_overview.png", case.images[-1].data, mean, variance, case.reference.affine,
                       image_label=card.modalities[-1], file=buf,
                       title=f"{case.case_id} — {card.name}, {plan.sampler} {plan.steps} steps, {describe_size(n)}"
                             f"{' (odd members mirrored)' if plan.mirror else ''}, seed {seed}")
    except ImportError:
        return None
    return buf.getvalue() or None


def _samples_blob(reference: LoadedImage, prepared, samples: np.ndarray, path: Path) -> bytes:
    """Every member's mask as a 4D uint8 NIfTI [..., n] on the reference grid."""
    vols = [restore(prepared, samples[:, m]) for m in range(samples.shape[1])]
    arr = (np.stack(vols, axis=-1) > 0.5).astype(np.uint8)
    hdr = reference.image.header.copy()
    hdr.set_data_shape(arr.shape)
    img = type(reference.image)(arr, reference.image.affine, hdr)
    return encode_like(LoadedImage(data=arr, image=img, path=reference.path), arr, path, np.uint8)
