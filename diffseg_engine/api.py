"""The Python API: what a researcher calls from a notebook.

Owns: `Segmenter` (a model loaded once, sampling settings fixed; maps a volume -- arrays with an affine, or a
nibabel image -- to mean, variance and mask arrays on the input grid, writing no file), `Segmentation` (those
maps and the lesion numbers), and `segment_paths` (files in, files out: one case or a cohort, as the
``segment`` command). In memory it runs the same core as `segment` (`pipeline.core`: the backend's
`run_chunk`, so its device loop too), so the maps are exactly those `segment` writes for the same case id,
seed and settings. Imports: nibabel (lazily), numpy; `core`, `inputs` (lazily), `maps`, `pipeline`, `sampling`. Never torch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .core.ensemble import AutoN, ensemble_identity, max_members
from .core.errors import InputImageError, MissingModalityError, UsageError
from .maps.lesions import DEFAULT_MIN_COMPONENT, lesion_summary
from .pipeline.core import case_maps, default_batch_size, sample_case
from .pipeline.options import RunSettings, check_sampling_options
from .pipeline.segment import prepare_checked
from .sampling.sampler import chosen_plan


@dataclass
class Segmentation:
    """One case's ensemble maps on the input grid [X, Y, Z]."""

    case_id: str
    mean: np.ndarray  # float32 in [0, 1]: mean over members of each member's mask
    variance: np.ndarray  # float32 in [0, 0.25]: population variance over members
    mask: np.ndarray  # uint8 {0, 1}: mean > 0.5 without components under min_component of the largest
    affine: np.ndarray  # [4, 4] voxel -> world, the input's
    lesion: dict  # `lesions.lesion_summary`: lesion_ml, mean_variance_in_lesion, uncertain_ml, ...
    settings: dict  # sampler, steps, eta, n (and n_min, n_step, n_max, n_tol for auto), seed, backend, device
    members: np.ndarray | None = None  # n="auto": uint16, the members each voxel's slice got (`ensemble_maps.members_map`)
    members_per_slice: np.ndarray | None = None  # int [S]: members of each processed slice, in `slice_index` order
    slice_index: np.ndarray | None = None  # int [S]: the processed slices, voxel indices along the slice axis

    def to_nifti(self) -> dict[str, Any]:
        """The maps as nibabel images on the input's affine (nothing is written): mean, variance, mask, and
        for n="auto" members."""
        import nibabel as nib
        keys = ("mean", "variance", "mask") + (("members",) if self.members is not None else ())
        return {k: nib.Nifti1Image(getattr(self, k), self.affine) for k in keys}


def _zooms(affine: np.ndarray) -> tuple[float, float, float]:
    a = np.asarray(affine, np.float64)
    return tuple(float(z) for z in np.linalg.norm(a[:3, :3], axis=0))


class Segmenter:
    """A model loaded once, with fixed sampling settings::

        seg = Segmenter(n=5)                      # the shipped default model; or Segmenter("model.onnx")
        out = seg(nib.load("flair.nii.gz"))       # or seg(array, affine)
        out.mean, out.variance, out.mask          # numpy arrays on the input grid

    model: a .onnx or .safetensors file (None: the shipped default). sampler, steps, eta, mirror (odd members
    on the left-right mirror image): None takes the model card's. n: members per slice, or "auto" (as
    ``--n auto``: rounds of members until a slice's mean and variance settle, with n_max, n_min, n_step and
    n_tol as the ``--n-*`` options; None: their defaults). seed and the case id decide the noise: same seed,
    same maps. min_component: the mask's clean-up (`lesions.lesion_mask`; 0 keeps every component). force:
    segment volumes that fail the input checks (not skull-stripped, not the model's modality, brain beyond
    the crop window) with a logged warning instead of `InputImageError`.
    """

    def __init__(self, model: str | Path | None = None, *, n: int | str | AutoN = 5, sampler: str | None = None,
                 steps: int | None = None, eta: float | None = None, seed: int = 0, batch_size: int = 0,
                 backend: str = "onnxruntime", device: str = "auto", n_max: int | None = None,
                 n_min: int | None = None, n_step: int | None = None, n_tol: float | None = None,
                 min_component: float = DEFAULT_MIN_COMPONENT, force: bool = False, mirror: bool | None = None):
        from .pipeline.models import default_model, open_model
        size = check_sampling_options(n=n, steps=steps, seed=seed, batch_size=batch_size, sampler=sampler,
                                      eta=eta, backend=backend, device=device, n_max=n_max, n_min=n_min,
                                      n_step=n_step, n_tol=n_tol, min_component=min_component)  # before any file
        self.model = Path(model) if model is not None else default_model()
        self.engine = open_model(self.model, backend, device)
        self.card = self.engine.card
        self.settings = RunSettings(n=size, plan=chosen_plan(self.card, sampler, steps, eta, mirror), seed=int(seed),
                                    batch_size=int(batch_size), min_component=float(min_component), force=bool(force))

    @property
    def plan(self):
        """The sampling plan (`sampler.SamplingPlan`)."""
        return self.settings.plan

    @property
    def n(self):
        """Members per slice: N, or an `ensemble.AutoN`."""
        return self.settings.n

    @property
    def modalities(self) -> tuple[str, ...]:
        """The images the model takes, in order (e.g. ("flair",))."""
        return tuple(self.card.modalities)

    def __call__(self, image: Any, affine: np.ndarray | None = None, **kw) -> Segmentation:
        return self.segment(image, affine, **kw)

    def segment(self, image: Any, affine: np.ndarray | None = None, *, case_id: str = "case",
                n: int | str | AutoN | None = None, seed: int | None = None) -> Segmentation:
        """Segment one volume in memory; no file is read or written.

        image: a nibabel image (3D; or 4D with the modalities on the last axis in `modalities` order), a numpy
        array [X, Y, Z] (single-modality models) or [X, Y, Z, C], a sequence of [X, Y, Z] arrays or images in
        `modalities` order, or a mapping modality -> array or image. affine: [4, 4], needed for arrays (taken
        from the image otherwise). case_id and seed pick the noise streams (`segment` uses the case folder's
        name or the file's case id: pass the same to get its maps exactly). n: this call's ensemble size (an
        int, "auto" with the default --n-* values, or an `ensemble.AutoN`); None: the Segmenter's.
        """
        settings = self.settings
        if n is not None or seed is not None:
            settings = replace(settings, n=settings.n if n is None else n, seed=settings.seed if seed is None else seed)
        vols, affine = self._volumes(image, affine)
        prepared, _, _ = prepare_checked(vols, affine, _zooms(affine), self.card, force=settings.force)
        bs = settings.batch_size or default_batch_size(self.card, len(prepared.inputs) * max_members(settings.n),
                                                        self.engine.device)
        self.engine.allocate(bs)
        stats = sample_case(self.engine, prepared, settings, case_id, bs)
        maps = case_maps(prepared, stats, _zooms(affine), settings)
        return Segmentation(case_id, maps.mean, maps.variance, maps.mask, np.asarray(affine, np.float64),
                            lesion_summary(maps.mask, maps.variance, _zooms(affine)),
                            {**settings.plan.describe(), **ensemble_identity(settings.n), "seed": settings.seed,
                             "members_total": int(stats.count.sum()), **self.engine.describe(),
                             "min_component": settings.min_component, "mask_cleanup": maps.cleaned.describe()},
                            members=maps.members, members_per_slice=stats.count.copy(),
                            slice_index=np.asarray(prepared.slice_index).copy())

    def _volumes(self, image: Any, affine: np.ndarray | None) -> tuple[list[np.ndarray], np.ndarray]:
        need = self.modalities
        if isinstance(image, Mapping):
            from .inputs.cases import canonical_modality
            given = {canonical_modality(k): v for k, v in image.items()}
            missing = [m for m in need if m not in given]
            if missing:
                raise MissingModalityError(f"the model needs {list(need)}; missing {', '.join(missing)}",
                                           fix=f"pass a mapping with the keys {', '.join(need)}")
            image = [given[m] for m in need]
        if isinstance(image, (list, tuple)):
            parts = [self._array(im, affine) for im in image]
            if len(parts) != len(need):
                raise MissingModalityError(f"got {len(parts)} volumes; the model needs {len(need)} ({', '.join(need)})")
            affine = parts[0][1]
            vols = [p[0] for p in parts]
        else:
            arr, affine = self._array(image, affine)
            if arr.ndim == 4:
                if arr.shape[-1] != len(need):
                    raise MissingModalityError(f"4D volume has {arr.shape[-1]} channels on its last axis; the "
                                               f"model needs {len(need)} ({', '.join(need)}, in that order)")
                vols = [np.ascontiguousarray(arr[..., c]) for c in range(arr.shape[-1])]
            elif len(need) == 1:
                vols = [arr]
            else:
                raise MissingModalityError(f"one 3D volume cannot feed a model of {len(need)} modalities "
                                           f"({', '.join(need)})", fix="pass a 4D array, a list or a mapping")
        shapes = {v.shape for v in vols}
        if len(shapes) != 1 or len(next(iter(shapes))) not in (2, 3):
            raise InputImageError(f"the volumes must be 3D and of one shape, got {[v.shape for v in vols]}")
        return vols, affine

    @staticmethod
    def _array(image: Any, affine: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(image, "affine") and hasattr(image, "dataobj"):  # a nibabel image
            return np.asarray(image.dataobj, np.float32), np.asarray(image.affine, np.float64)
        if affine is None:
            raise UsageError("a numpy volume needs its affine (voxel -> world, 4x4)",
                             fix="call seg(array, affine), e.g. the affine of the NIfTI it came from")
        a = np.asarray(affine, np.float64)
        if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
            raise InputImageError(f"the affine must be a finite, invertible 4x4 matrix, got shape {a.shape}")
        return np.asarray(image, np.float32), a

    def segment_files(self, inputs: str | Path | Sequence[str | Path], out_dir: str | Path, *,
                      modality: Sequence[str] = (), overwrite: bool = False, save_samples: bool = False,
                      overview: bool = True, quiet: bool = True):
        """One case from files to files, as the ``segment`` command (lock, resume, atomic outputs, provenance):
        returns `segment.SegmentResult`."""
        from .pipeline.segment import check_output, resolve_case, segment_case
        settings = replace(self.settings, save_samples=save_samples, overview=overview, overwrite=overwrite)
        inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
        case = resolve_case([Path(p) for p in inputs], list(modality), self.card, force=self.settings.force)
        check_output(out_dir, case, overwrite=overwrite)
        return segment_case(case, self.engine, Path(out_dir), settings, quiet=quiet, command="diffseg_engine.api")

    def segment_cohort(self, source: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                       save_samples: bool = False, overview: bool = True, num_parts: int = 1, part_id: int = 0,
                       quiet: bool = True):
        """A folder of cases or a list file into `out_dir` with this loaded model, as ``segment INPUT_DIR``
        (skips finished cases, records failures, writes the summary): returns `cohort.CohortResult`."""
        from .pipeline.cohort import check_cohort_output, list_cohort, select_part
        from .pipeline.cohort_run import run_cohort
        settings = replace(self.settings, save_samples=save_samples, overview=overview, overwrite=overwrite)
        cohort = list_cohort(source)
        check_cohort_output(out_dir, cohort)
        return run_cohort(select_part(cohort, num_parts, part_id), self.engine, out_dir, settings, cohort=cohort,
                          quiet=quiet, command="diffseg_engine.api")


def segment_paths(inputs: str | Path | Sequence[str | Path], out_dir: str | Path, model: str | Path | None = None,
                  **options: Any):
    """Files in, files out, in one call: a cohort (a folder of cases or a list file) gives a
    `cohort.CohortResult`, one case (a case folder, a 3D or 4D file) a `segment.SegmentResult`. options:
    those of `Segmenter` (n, n_max, n_min, n_step, n_tol, sampler, steps, eta, mirror, seed, batch_size,
    backend, device, min_component, force) and of its `segment_files` / `segment_cohort` (overwrite,
    save_samples, overview, ...)."""
    from .pipeline.cohort import is_cohort_source
    keys = ("n", "n_max", "n_min", "n_step", "n_tol", "sampler", "steps", "eta", "mirror", "seed", "batch_size",
            "backend", "device", "min_component", "force")
    seg = Segmenter(model, **{k: options.pop(k) for k in keys if k in options})
    single = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if len(single) == 1 and not options.get("modality") and is_cohort_source(single[0]):
        return seg.segment_cohort(single[0], out_dir, **options)
    return seg.segment_files(single, out_dir, **options)
