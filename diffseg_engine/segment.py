"""`segment`: one case from NIfTI in to mean / variance / mask NIfTI out, on the input grid.

Owns: resolving the user's inputs to the model's modalities (`resolve_case`), the default batch size, the
output names and the provenance record, and `segment_case` which ties preprocessing, the sampler, a backend
and the inverse preprocessing together.
Imports: numpy, nibabel (via nifti_io), the runtime modules below it. Never torch (the torch backend is
opened through `backends.open_backend` only when asked for).
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import __version__
from .atomic import atomic_write
from .backends.base import StepBackend, open_backend
from .card import ModelCard
from .cases import canonical_modality, classify_file, find_case
from .errors import InputImageError, MissingModalityError, OutputError, UsageError
from .noise import NoiseStreams
from .nifti_io import LoadedImage, load_image
from .preprocess import prepare_case, restore
from .progress import ProgressBar
from .sampler import SamplingPlan, sample_ensemble
from .weights import file_sha256 as _sha256

OUTPUT_SUFFIXES = ("mean", "variance", "mask", "provenance", "overview")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models"
DEMO_INPUT = Path(__file__).resolve().parent / "demo" / "TCGA-DU-7294_flair.nii.gz"


@dataclass
class CaseInput:
    case_id: str
    images: list[LoadedImage]  # in the model's modality order
    reference: LoadedImage  # the grid the outputs are written on
    sources: dict[str, str] = field(default_factory=dict)  # modality -> file


def default_model() -> Path:
    for name in ("default.onnx", "default.safetensors"):
        if (DEFAULT_MODEL_DIR / name).is_file():
            return DEFAULT_MODEL_DIR / name
    raise UsageError("no --model given and no default model is installed with this package",
                     fix="pass --model PATH (a .onnx or .safetensors file written by diffseg-engine)")


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


def resolve_case(inputs: Sequence[Path], modality_args: Sequence[str], card: ModelCard) -> CaseInput:
    """Match the user's inputs to `card.modalities` and load them (validated, same grid).

    inputs: a case folder (any naming of ../shared/data), one 3D file (single-modality models), or one 4D
    file with the modalities on the last axis in the model's order. modality_args: ``flair=PATH`` pairs.
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
    return CaseInput(case_id=case_id or "case", images=loaded, reference=loaded[0],
                     sources={m: str(files[m]) for m in need})


def _check_same_grid(images: list[LoadedImage], names: list[str]) -> None:
    ref = images[0]
    for im, name in zip(images[1:], names[1:]):
        if im.data.shape != ref.data.shape:
            raise InputImageError(f"{name} has shape {im.data.shape} but {names[0]} has {ref.data.shape}",
                                  path=im.path, fix="resample all modalities onto one grid (co-register) first")
        if not np.allclose(im.affine, ref.affine, atol=1e-3, rtol=0):
            raise InputImageError(f"{name} has a different affine (voxel-to-world) than {names[0]} ({ref.path.name})",
                                  path=im.path, fix="resample all modalities onto one grid (co-register) first")


def default_batch_size(card: ModelCard, work_items: int) -> int:
    """Largest batch whose activations fit comfortably in a quarter of the available memory (cap 256)."""
    avail = 4 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    a = card.architecture
    # activations kept alive by the U-Net's skips, ~ model_channels * H * W floats * (levels, blocks) factor
    per_item = 4 * a.model_channels * card.image_size ** 2 * (4 * a.num_res_blocks + 6) * max(a.channel_mult)
    return int(max(1, min(256, work_items, (avail // 4) // max(per_item, 1))))


def output_paths(out_dir: Path, case_id: str) -> dict[str, Path]:
    return {"mean": out_dir / f"{case_id}_mean.nii.gz", "variance": out_dir / f"{case_id}_variance.nii.gz",
            "mask": out_dir / f"{case_id}_mask.nii.gz", "provenance": out_dir / f"{case_id}_provenance.json",
            "overview": out_dir / f"{case_id}_overview.png"}


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


def segment_case(case: CaseInput, backend: StepBackend, out_dir: Path, *, n: int = 5, plan: SamplingPlan,
                 seed: int = 0, batch_size: int = 0, overwrite: bool = False, quiet: bool = False,
                 save_samples: bool = False, overview: bool = True, command: str = "",
                 progress_factory: Callable[..., ProgressBar] = ProgressBar) -> SegmentResult:
    """Sample an ensemble of `n` masks for every brain slice of `case` and write the maps to `out_dir`."""
    card = backend.card
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if not 0 <= seed < 2**63:
        raise UsageError(f"--seed must lie in [0, 2**63), got {seed}")
    if batch_size < 0:
        raise UsageError(f"--batch-size must be positive (0: automatic), got {batch_size}")
    out_dir = Path(out_dir)
    paths = output_paths(out_dir, case.case_id)
    input_files = {Path(p).resolve() for p in case.sources.values()}
    if any(p.resolve() in input_files for p in paths.values()):
        raise OutputError("an output would overwrite an input file", path=out_dir, fix="choose another --out")
    if not overwrite and any(p.exists() for p in paths.values()):
        raise OutputError(f"already holds results for {case.case_id}", path=out_dir,
                          fix="pass --overwrite to replace them, or choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".diffseg-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(f"cannot write here ({exc.strerror or exc})", path=out_dir,
                          fix="choose a writable --out folder") from None

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prepared = prepare_case([im.data for im in case.images], case.reference.affine, card.preprocessing,
                            names=[im.path for im in case.images])  # errors name the file at fault
    timings["preprocess_s"] = time.perf_counter() - t0
    S = len(prepared.inputs)
    items = S * n
    bs = batch_size or default_batch_size(card, items)
    backend.allocate(bs)
    streams = NoiseStreams(seed, case.case_id)
    samples = None
    if save_samples:
        samples = np.zeros((S, n, card.image_size, card.image_size), np.float32)
    total = items * len(plan.coefs)
    t1 = time.perf_counter()
    with progress_factory(total, f"segment {case.case_id}", unit="step·member", quiet=quiet) as bar:
        stats = sample_ensemble(
            backend.infer, prepared.inputs, members=n, plan=plan, streams=streams,
            slice_ids=prepared.slice_index, card=card, batch_size=bs, on_progress=bar.advance,
            on_member=(lambda s, m, p: samples.__setitem__((s, m), p)) if samples is not None else None)
    timings["sampling_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    mean = restore(prepared, stats.mean).astype(np.float32)
    variance = restore(prepared, stats.variance).astype(np.float32)
    mask = (mean > 0.5).astype(np.uint8)
    from .nifti_io import save_like
    # the provenance file marks a complete set: an old one must not vouch for maps half replaced (--overwrite)
    paths["provenance"].unlink(missing_ok=True)
    save_like(case.reference, mean, paths["mean"], np.float32)
    save_like(case.reference, variance, paths["variance"], np.float32)
    save_like(case.reference, mask, paths["mask"], np.uint8)
    if samples is not None:
        paths["samples"] = out_dir / f"{case.case_id}_samples.nii.gz"
        _save_samples(case.reference, prepared, samples, paths["samples"])
    if not overview:
        paths.pop("overview")
    else:
        try:
            from .overview import write_overview
            paths["overview"] = write_overview(
                out_dir / f"{case.case_id}_overview.png", case.images[-1].data, mean, variance,
                case.reference.affine, image_label=card.modalities[-1],
                title=f"{case.case_id} — {card.name}, {plan.sampler} {plan.steps} steps, N={n}, seed {seed}")
        except ImportError:  # matplotlib missing: the maps are written, the picture is skipped
            paths.pop("overview")
    timings["write_s"] = time.perf_counter() - t2
    prov = {
        "case_id": case.case_id, "complete": True, "inputs": case.sources,
        "input_sha256": {m: _sha256(Path(p)) for m, p in case.sources.items()},
        "model_card": card.to_dict(), "sampling": {**plan.describe(), "n": n, "seed": seed, "batch_size": bs,
                                                   "slices": S, "work_items": items},
        "backend": backend.describe(), "versions": _versions(), "timings": timings,
        "outputs": {k: str(v.name) for k, v in paths.items() if k != "provenance"}, "command": command,
        "definitions": {"mean": "mean over members of clip((x0-low)/(high-low), 0, 1)",
                        "variance": "population variance over members of the same", "mask": "mean > 0.5"},
    }
    _write_json_atomic(paths["provenance"], prov)  # written last: marks completion
    return SegmentResult(case.case_id, paths, mean, variance, mask, prov)


def _save_samples(reference: LoadedImage, prepared, samples: np.ndarray, path: Path) -> None:
    from .nifti_io import save_like
    vols = [restore(prepared, samples[:, m]) for m in range(samples.shape[1])]
    arr = (np.stack(vols, axis=-1) > 0.5).astype(np.uint8)
    hdr = reference.image.header.copy()
    hdr.set_data_shape(arr.shape)
    img = type(reference.image)(arr, reference.image.affine, hdr)
    save_like(LoadedImage(data=arr, image=img, path=reference.path), arr, path, np.uint8)


def open_model(model: str | Path | None, backend: str, device: str = "auto") -> StepBackend:
    return open_backend(backend, Path(model) if model else default_model(), device=device)
