"""`evaluate`: segment labelled cases (or take existing predictions), score them, write the reports.

Owns: `evaluate_folder`, which the CLI calls, its option checks (`check_options`) and `EvaluationResult`. The
segmenting goes through `cohort` (`cohort.segment_entry`: a case finished by the same run, `segment.finished_run`,
is reused), the scoring and the reports through `diffseg_engine.evaluation` (`protocol`, `uncertainty`,
`predictions`, `reports`, with the per-case metrics in `evaluation.columns`). It re-exports the scoring names in `__all__`.
Imports: `cohort` (lazily), `core`, `evaluation`, `models` (lazily), `options`. Never torch.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..evaluation import columns  # first: the package says so when scipy is missing
from ..evaluation import metrics as M
from ..core.errors import InputImageError, MissingModalityError, OutputError, UsageError
from ..evaluation.predictions import FolderScores, find_prediction, labelled_cases, score_folder
from ..evaluation.protocol import (CaseScores, EnsembleCurve, SliceScores, check_sizes, default_ensemble_sizes,
                                  ensemble_curve, score_case, slice_scores)
from ..evaluation.reports import ALWAYS_WRITTEN, DEFINITIONS, REPORT_NAMES, summarize, write_reports
from ..evaluation.uncertainty import (MAX_VARIANCE, UncertaintyScores, check_options as check_uncertainty_options,
                                     filtered_dice_curve, uncertainty_scores)
from .options import check_sampling_options
from ..core.progress import ProgressBar

#: The per-case CSV's columns as shipped (the reports take them from `evaluation.columns.METRICS` when written).
CSV_COLUMNS = tuple(m.name for m in columns.METRICS)

__all__ = ["ALWAYS_WRITTEN", "CSV_COLUMNS", "DEFINITIONS", "MAX_VARIANCE", "REPORT_NAMES", "CaseScores", "EnsembleCurve",
           "EvaluationResult", "FolderScores", "SliceScores", "UncertaintyScores", "check_options",
           "default_ensemble_sizes", "ensemble_curve", "evaluate_folder", "filtered_dice_curve", "find_prediction",
           "labelled_cases", "score_case", "score_folder", "slice_scores", "summarize", "uncertainty_scores",
           "write_reports"]


@dataclass
class EvaluationResult:
    scores: list[CaseScores]
    reports: dict[str, Path]
    summary: dict[str, Any]
    predictions: Path


def check_options(*, n: int = 5, seed: int = 0, batch_size: int = 0, policy: str | M.EmptyPolicy = "brats",
                  ensemble_sizes: Sequence[int] | None = None, top_percent: float = 5.0,
                  n_levels: int = 100) -> M.EmptyPolicy:
    """`UsageError` for option values of `evaluate_folder` that cannot work, before any file is read; returns the
    empty-mask policy. Each check is that of the module owning the option (`options`, `evaluation.protocol`,
    `evaluation.uncertainty`, `metrics`)."""
    check_sampling_options(n=n, seed=seed, batch_size=batch_size)
    check_uncertainty_options(top_percent, n_levels)
    check_sizes(ensemble_sizes)
    if isinstance(policy, M.EmptyPolicy):
        return policy
    try:
        return M.get_policy(policy)
    except ValueError:
        raise UsageError(f"unknown empty-mask policy {policy!r}",
                         fix=f"choose one of {', '.join(M.POLICIES)}") from None


def evaluate_folder(gt_root: str | Path, out_dir: str | Path, *, predictions: str | Path | None = None,
                    backend: Any = None, plan: Any = None, n: int = 5, seed: int = 0, batch_size: int = 0,
                    policy: str | M.EmptyPolicy = "brats", ensemble_sizes: Sequence[int] | None = None,
                    top_percent: float = 5.0, variance_threshold: float = 0.05, n_levels: int = 100,
                    overwrite: bool = False, quiet: bool = False, overview: bool = False, command: str = "",
                    progress_factory: Callable[..., ProgressBar] = ProgressBar, force: bool = False) -> EvaluationResult:
    """Score segmentations of the labelled cases under `gt_root` and write the reports into `out_dir`.

    Exactly one of:
    * ``predictions``: an existing folder of ``<case>_mask.nii.gz`` (+ optional ``_variance``, ``_samples``)
      or of plain ``<case>.nii.gz`` masks -- scored as they are;
    * ``backend`` (a `StepBackend`, e.g. `segment.open_model(...)`) and ``plan`` (`sampler.plan_sampling`):
      every labelled case is first segmented into ``out_dir/predictions`` by `cohort.segment_entry` (``n``
      members, ``seed``, ``batch_size``, ``save_samples=True`` so the ensemble-size curve can be drawn), then
      scored. A case finished there by the same run (`segment.finished_run`: same model, inputs, sampler, steps,
      eta, n, seed, backend, engine version) is reused; unfinished work of the same run resumes; other earlier
      results there raise `OutputError` unless ``overwrite``; a case whose modalities are missing or
      unreadable is reported as "segmentation failed: ...".

    The reports (`REPORT_NAMES`) are refused if already in `out_dir` unless ``overwrite``; ``overwrite`` also
    re-segments cases. Raises `UsageError` for bad options, `DatasetError` for folders without usable cases,
    `OutputError` for unwritable outputs.
    """
    policy_obj = check_options(n=n, seed=seed, batch_size=batch_size, policy=policy, ensemble_sizes=ensemble_sizes,
                               top_percent=top_percent, n_levels=n_levels)
    if (predictions is None) == (backend is None):
        raise UsageError("give either a prediction folder or a model to segment with, not both (nor neither)",
                         fix="pass --predictions DIR to score existing results, or --model to segment first")
    if backend is not None and plan is None:
        raise UsageError("segmenting needs a sampling plan", fix="pass plan=sampler.plan_sampling(card, ...)")
    out_dir = Path(out_dir)
    existing = [out_dir / name for name in REPORT_NAMES.values() if (out_dir / name).exists()]
    if existing and not overwrite:
        raise OutputError(f"already holds evaluation results ({existing[0].name})", path=out_dir,
                          fix="pass --overwrite to replace them, or choose another --out")
    cases = labelled_cases(gt_root)
    meta: dict[str, Any] = {"ground_truth": str(gt_root), "command": command}
    failures: dict[str, str] = {}
    t0 = time.perf_counter()
    if backend is not None:
        from .cohort import CohortEntry, segment_entry
        from .options import RunSettings
        from .models import model_sha256
        pred_dir = out_dir / "predictions"
        meta.update({"mode": "segment then score", "sampling": {**plan.describe(), "n": n, "seed": seed},
                     "backend": backend.describe(), "model": backend.card.name})
        settings = RunSettings(n=n, plan=plan, seed=seed, batch_size=batch_size, save_samples=True,
                               overview=overview, overwrite=overwrite, force=force)
        model_sha = model_sha256(backend)
        for case in cases:
            try:
                segment_entry(CohortEntry(case.case_id, inputs=(case.folder,)), backend, pred_dir, settings,
                              model_sha=model_sha, quiet=quiet, command=command, progress_factory=progress_factory)
            except (InputImageError, MissingModalityError) as exc:  # the case's inputs; other errors stop the run
                failures[case.case_id] = f"segmentation failed: {exc}"
        meta["segmentation_s"] = round(time.perf_counter() - t0, 3)
    else:
        pred_dir = Path(predictions)
        meta["mode"] = "score existing predictions"
    meta["predictions"] = str(pred_dir)
    scores = score_folder(pred_dir, gt_root, policy=policy_obj, ensemble_sizes=ensemble_sizes,
                          top_percent=top_percent, variance_threshold=variance_threshold, n_levels=n_levels,
                          quiet=quiet, failures=failures)
    reports = write_reports(scores, out_dir, policy=policy_obj, meta=meta)
    summary = json.loads(reports["summary_json"].read_text())
    return EvaluationResult(scores=list(scores), reports=reports, summary=summary, predictions=pred_dir)
