"""One cohort command: list the cases, take this part, then run them in this process or on Ray.

Owns: `run_cohort` (the single-process loop over one loaded backend) and `segment_cohort` (what
`diffseg-engine segment INPUT_DIR|LIST` does). Imports: `backends`, `cohort`, `cohort_ray` (lazily), `core.progress`, `models` (lazily), `options`. Never torch.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

from ..backends import StepBackend
from ..core.progress import ProgressBar
from .cohort import (CaseStatus, CohortEntry, CohortResult, _record, check_cohort_output, list_cohort, run_case,
                     select_part, write_summary)
from .options import RunSettings

LOGGER = logging.getLogger(__name__)


def run_cohort(entries: Sequence[CohortEntry], backend: StepBackend, out_dir: str | Path, settings: RunSettings, *,
               cohort: Sequence[CohortEntry] | None = None, quiet: bool = False, command: str = "",
               progress_factory: Callable[..., ProgressBar] = ProgressBar,
               on_case: Callable[[CaseStatus], None] | None = None) -> CohortResult:
    """Segment `entries` one after the other with one loaded `backend`, then write the cohort summary.

    cohort: the whole cohort when `entries` is one part of it (the summary lists every case, those of other
    parts as found on disk). A failed case is recorded and the others go on; `CohortResult.failed` lists them.
    """
    from .models import model_sha256
    out_dir = Path(out_dir)
    model_sha = model_sha256(backend)
    statuses = []
    for i, entry in enumerate(entries):
        t0 = time.perf_counter()
        try:
            st = run_case(entry, backend, out_dir, settings, model_sha=model_sha, quiet=quiet, command=command,
                          progress_factory=progress_factory)
        except Exception as exc:  # noqa: BLE001 - an engine crash on one case must not stop the cohort
            st = CaseStatus(entry.case_id, "failed", entry.source, f"unexpected {type(exc).__name__}: {exc}",
                            time.perf_counter() - t0)
            _record(out_dir, st)
        statuses.append(st)
        if on_case:
            on_case(st)
        if not quiet:
            what = st.message if st.status != "done" else f"{st.seconds:.1f} s"
            LOGGER.info(f"[{i + 1}/{len(entries)}] {st.case_id}: {st.status} ({what})")
    summary = write_summary(cohort if cohort is not None else entries, out_dir, statuses, settings=settings)
    return CohortResult(statuses, summary)


def segment_cohort(source: str | Path, out_dir: str | Path, model: str | Path, settings: RunSettings, *,
                   backend: str = "onnxruntime", device: str = "auto", num_parts: int = 1, part_id: int = 0,
                   ray_address: str | None = None, use_ray: bool = False, quiet: bool = False,
                   command: str = "", threads: int = 0) -> CohortResult:
    """What `diffseg-engine segment INPUT_DIR|LIST --out OUT` does: list the cohort, take part `part_id` of
    `num_parts`, check `out_dir`, then load the model once and segment the part's cases (in this process, or
    on Ray with `use_ray`: `cohort_ray.run_cohort_ray`), and write the summary of the whole cohort.

    Every listing and output error is raised before the model is loaded. Failed cases do not raise: see
    `CohortResult.failed`."""
    cohort = list_cohort(source)
    part = select_part(cohort, num_parts, part_id)
    check_cohort_output(out_dir, cohort)
    if use_ray:
        from .cohort_ray import run_cohort_ray
        return run_cohort_ray(part, model, out_dir, settings, cohort=cohort, backend=backend, device=device,
                              address=ray_address, quiet=quiet, command=command)
    from .models import open_model
    eng = open_model(model, backend, device, threads=threads)
    return run_cohort(part, eng, out_dir, settings, cohort=cohort, quiet=quiet, command=command)
