"""Many cases in one run: `segment` over a cohort.

Owns: finding a cohort's cases (`list_cohort`: a folder of case folders in any naming of ../shared/data, a
flat folder of files, or a text file listing cases), splitting it deterministically for job arrays
(`select_part`), running one case (`segment_entry`: skip a finished same run (`segment.finished_run`), else
`segment.segment_case` with its lock, resume and atomic outputs; `run_case`: the same with its status recorded,
a failure recorded, not raised), the single-process loop (`run_cohort`), and the cohort summary
(`write_summary`: CSV and Markdown, one row per case, ranked by uncertainty, and the review page
`review.write_review`). The Ray runner (`cohort_ray`)
reuses `run_case` and `write_summary`; `evaluate` segments its labelled cases with `segment_entry`.
Imports: `backends`, `core`, `inputs`, `io`, `maps`, `models` (lazily), `options`, `review`, `segment` (lazily).
Never torch.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..io.atomic import atomic_write
from ..backends.base import StepBackend
from ..inputs.cases import classify_file, find_case
from ..core.ensemble import describe_size
from ..core.errors import (DatasetError, DiffsegError, MissingModalityError, OutputBusyError, OutputError,
                     UsageError)
from ..maps.outputs import output_paths
from ..core.progress import ProgressBar
from .review import review_order, write_review
from .options import RunSettings

#: File names of the cohort summary, in the output folder.

SUMMARY_NAMES = {"csv": "cohort_summary.csv", "md": "cohort_summary.md"}
#: Hidden folder of per-case failure records (removed again when the case later succeeds).
STATUS_DIR = ".diffseg-cohort"
#: Suffixes of a file listing cases (one path per line).
LIST_SUFFIXES = (".txt", ".lst", ".list", ".csv")
STATUSES = ("done", "skipped", "failed", "pending")


@dataclass(frozen=True)
class CohortEntry:
    """One case of a cohort, as `segment.resolve_case` takes it: `inputs` (a case folder or one file) or
    `modality_args` (``flair=PATH`` pairs, for cases whose files share a flat folder)."""

    case_id: str
    inputs: tuple[Path, ...] = ()
    modality_args: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return str(self.inputs[0]) if self.inputs else ", ".join(self.modality_args)


@dataclass
class CaseStatus:
    """What happened to one case in this run: status is one of `STATUSES`."""

    case_id: str
    status: str
    source: str = ""
    message: str = ""
    seconds: float = 0.0  # wall time spent on the case in this run
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CohortResult:
    statuses: list[CaseStatus]
    summary: dict[str, Path]

    @property
    def failed(self) -> list[CaseStatus]:
        return [s for s in self.statuses if s.status == "failed"]

    def counts(self) -> dict[str, int]:
        return {k: sum(s.status == k for s in self.statuses) for k in STATUSES}


# ------------------------------------------------------------------------------------------ finding cases
def is_cohort_source(path: str | Path) -> bool:
    """True for a list file, or a folder that is not itself one case (a folder of cases, a flat folder of
    several cases' files); False for a case folder or an image file (today's one-case `segment`)."""
    path = Path(path)
    if path.is_file():
        return path.name.lower().endswith(LIST_SUFFIXES)
    if not path.is_dir():
        return False
    try:
        return not find_case(path).modalities
    except MissingModalityError:  # two files for one modality: a flat folder of several cases
        return True


def list_cohort(source: str | Path) -> list[CohortEntry]:
    """The cases of `source`, sorted by case id.

    source: a folder of case folders (any naming `cases.find_case` reads; sub-folders without an image are
    skipped), a flat folder of NIfTI files (``<ID>_<modality>.nii.gz`` grouped by ID; a file without a
    modality token in its name is one case of its own, 3D or 4D), or a text file with one case per line (a
    case folder or an image file; relative to the list's folder; blank lines and ``#`` comments ignored).
    Raises `DatasetError` if there is no case, a listed path is missing or two cases share an id (their
    outputs would collide).
    """
    source = Path(source)
    if source.is_file():
        entries = _from_list(source)
    elif source.is_dir():
        entries = _from_folder(source)
    else:
        raise DatasetError("not found", path=source, fix="give a folder of cases or a text file listing them")
    if not entries:
        raise DatasetError("holds no case with an image", path=source,
                           fix="give a folder of case folders, or a text file with one case folder or image per line")
    seen: dict[str, CohortEntry] = {}
    for e in entries:
        if e.case_id in seen:
            raise DatasetError(f"two cases have the id {e.case_id} ({seen[e.case_id].source} and {e.source}); "
                               f"their outputs would overwrite each other", path=source,
                               fix="rename one of them, or segment them into different --out folders")
        seen[e.case_id] = e
    return sorted(entries, key=lambda e: e.case_id)


def _from_list(path: Path) -> list[CohortEntry]:
    from .segment import case_id_of
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        p = Path(text).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.exists():
            raise DatasetError(f"line {number}: {text} not found", path=path,
                               fix="list existing case folders or image files, one per line")
        entries.append(CohortEntry(case_id_of(p), inputs=(p,)))
    return entries


def _from_folder(root: Path) -> list[CohortEntry]:
    from .segment import case_id_of
    try:
        flat = bool(find_case(root).modalities)
    except MissingModalityError:  # the root holds several cases' files side by side
        flat = True
    if not flat:
        entries = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                if not find_case(sub).modalities:
                    continue  # not a case folder
            except MissingModalityError:
                pass  # a case with two files for one modality: listed, and reported as failed when run
            entries.append(CohortEntry(case_id_of(sub), inputs=(sub,)))
        return entries
    groups: dict[str, dict[str, Path]] = {}
    singles: list[Path] = []
    for f in sorted(root.iterdir()):
        role = classify_file(f)
        low = f.name.lower()
        if role is None and f.is_file() and not f.name.startswith(".") and low.endswith((".nii", ".nii.gz")):
            singles.append(f)
        elif role is not None and role[0] == "modality":
            case = groups.setdefault(case_id_of(f), {})
            if role[1] in case:
                raise MissingModalityError(f"case {case_id_of(f)} has two files for modality {role[1]}: "
                                           f"{case[role[1]].name} and {f.name}", path=root,
                                           fix="keep exactly one file per modality and case")
            case[role[1]] = f
    entries = [CohortEntry(cid, modality_args=tuple(f"{m}={p}" for m, p in sorted(mods.items())))
               for cid, mods in groups.items()]
    return entries + [CohortEntry(case_id_of(f), inputs=(f,)) for f in singles]


def select_part(entries: Sequence[CohortEntry], num_parts: int = 1, part_id: int = 0) -> list[CohortEntry]:
    """Part `part_id` (0-based) of `num_parts`: every `num_parts`-th case of the cohort sorted by case id,
    starting at the `part_id`-th. The parts are disjoint, together hold every case, differ in size by at most
    one, and depend only on the list of case ids (the same on every node of a job array)."""
    if num_parts < 1:
        raise UsageError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise UsageError(f"--part-id must lie in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}",
                         fix="number the parts from 0, e.g. --part-id $SLURM_ARRAY_TASK_ID with --array=0-"
                             f"{num_parts - 1}")
    ordered = sorted(entries, key=lambda e: e.case_id)
    return ordered[part_id::num_parts]


def check_cohort_output(out_dir: str | Path, entries: Sequence[CohortEntry]) -> None:
    """`OutputError` before any model is loaded if `out_dir` is a listed input or the folder of one (results
    there would be taken for inputs later), is a file, or cannot be created."""
    out = Path(out_dir).absolute()
    for e in entries:
        for p in (*e.inputs, *(Path(a.split("=", 1)[1]) for a in e.modality_args)):
            p = p.absolute()
            folder = p if p.is_dir() else p.parent
            if out == p or out == folder:
                raise OutputError(f"is an input of case {e.case_id} or its folder", path=out_dir,
                                  fix="choose a new folder for --out")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError("is or lies under a file, not a folder", path=out_dir, fix="choose a folder for --out")


# ------------------------------------------------------------------------------------------ running cases
def _status_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / STATUS_DIR / f"{case_id}.json"


def _record(out_dir: Path, status: CaseStatus) -> None:
    """Keep a failure on disk (so a summary written by another part or the Ray driver knows it); a success
    removes an earlier failure record."""
    path = _status_path(out_dir, status.case_id)
    if status.status == "failed":
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write(json.dumps({k: v for k, v in status.to_dict().items() if k != "provenance"}).encode())
    else:
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass


def segment_entry(entry: CohortEntry, backend: StepBackend, out_dir: str | Path, settings: RunSettings, *,
                  model_sha: str | None = None, quiet: bool = True, command: str = "",
                  progress_factory: Callable[..., ProgressBar] = ProgressBar) -> tuple[str, dict]:
    """Segment one case of a cohort into `out_dir`, unless (without `settings.overwrite`) its provenance there
    says it is finished by the same run (`segment.finished_run`): ("skipped", that provenance) or ("done", the
    new one). Raises what `segment.resolve_case` and `segment.segment_case` raise. model_sha: the model file's
    sha256 (`segment.model_sha256`), computed here when not given."""
    from .segment import finished_run, resolve_case, segment_case
    from .models import model_sha256
    out_dir = Path(out_dir)
    card = backend.card
    if model_sha is None:
        model_sha = model_sha256(backend)
    if not settings.overwrite:
        prov = finished_run(out_dir, entry.case_id, card, backend.name, settings.plan, settings.n, settings.seed,
                            settings.save_samples, model_sha, settings.output_format, settings.min_component)
        if prov is not None:
            return "skipped", prov
    case = resolve_case(list(entry.inputs), list(entry.modality_args), card, force=settings.force)
    if case.case_id != entry.case_id:  # e.g. a 4D file named <id>.nii.gz: keep the cohort's id
        case.case_id = entry.case_id
    res = segment_case(case, backend, out_dir, settings, quiet=quiet, command=command,
                       progress_factory=progress_factory)
    return "done", res.provenance


def run_case(entry: CohortEntry, backend: StepBackend, out_dir: str | Path, settings: RunSettings, *,
             model_sha: str | None = None, quiet: bool = True, command: str = "",
             progress_factory: Callable[..., ProgressBar] = ProgressBar) -> CaseStatus:
    """`segment_entry` with its status recorded; never raises a `DiffsegError` (it becomes a "failed" status,
    also recorded on disk). A case finished earlier by the same run is "skipped". KeyboardInterrupt and
    unexpected crashes propagate (the Ray runner retries those)."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    try:
        what, prov = segment_entry(entry, backend, out_dir, settings, model_sha=model_sha, quiet=quiet,
                                   command=command, progress_factory=progress_factory)
    except DiffsegError as exc:
        status = CaseStatus(entry.case_id, "failed", entry.source, f"{type(exc).__name__}: {exc}",
                            time.perf_counter() - t0)
        if not isinstance(exc, OutputBusyError):  # another run is working on it: not a failure to keep
            _record(out_dir, status)
        return status
    message = "finished earlier by the same run" if what == "skipped" else ""
    status = CaseStatus(entry.case_id, what, entry.source, message, time.perf_counter() - t0, prov)
    _record(out_dir, status)
    return status


# ------------------------------------------------------------------------------------------ the summary
SUMMARY_COLUMNS = ("uncertainty_rank", "case_id", "status", "lesion_ml", "lesion_voxels", "mean_variance_in_lesion",
                   "uncertain_ml", "max_variance", "preprocess_s", "sampling_s", "write_s", "seconds_this_run",
                   "n", "members", "sampler", "steps", "seed", "source", "message")


def _prov_from_disk(out_dir: Path, case_id: str) -> dict | None:
    try:
        prov = json.loads(output_paths(out_dir, case_id)["provenance"].read_text())
    except (OSError, ValueError):
        return None
    return prov if isinstance(prov, dict) and prov.get("complete") is True else None


def _lesion_of(out_dir: Path, prov: dict) -> dict:
    """The provenance's lesion numbers; for a provenance written before they were recorded, from the maps."""
    if isinstance(prov.get("lesion"), dict):
        return prov["lesion"]
    from ..io.nifti_io import load_image
    from ..maps.lesions import lesion_summary
    paths = output_paths(out_dir, prov["case_id"])
    try:
        mask, var = load_image(paths["mask"]), load_image(paths["variance"])
    except DiffsegError:
        return {}
    return lesion_summary(mask.data, var.data, mask.image.header.get_zooms()[:3])


def summary_rows(cohort: Sequence[CohortEntry], out_dir: str | Path,
                 statuses: Sequence[CaseStatus] = ()) -> list[dict[str, Any]]:
    """One row per case of `cohort`, ranked by uncertainty: the status of this run where it ran the case,
    else what the output folder says (done: a complete provenance; failed: a failure record; else pending).
    Rank 1 is the case to review first: the highest mean variance inside the predicted lesion, then (cases
    without a lesion, or tied) the largest uncertain volume; cases without maps are not ranked."""
    out_dir = Path(out_dir)
    here = {s.case_id: s for s in statuses}
    rows = []
    for e in cohort:
        st = here.get(e.case_id)
        prov = (st.provenance if st is not None and st.provenance else None) or _prov_from_disk(out_dir, e.case_id)
        if st is not None:
            status, message, seconds = st.status, st.message, round(st.seconds, 3)
        elif prov is not None:
            status, message, seconds = "done", "", None
        else:
            try:
                rec = json.loads(_status_path(out_dir, e.case_id).read_text())
                status, message, seconds = "failed", str(rec.get("message", "")), None
            except (OSError, ValueError):
                status, message, seconds = "pending", "", None
        if status == "failed":
            prov = None  # maps on disk, if any, are from an earlier run with other parameters
        row: dict[str, Any] = {"case_id": e.case_id, "status": status, "source": e.source, "message": message,
                               "seconds_this_run": seconds}
        if prov is not None:
            lesion = _lesion_of(out_dir, prov)
            t = prov.get("timings", {})
            s = prov.get("sampling", {})
            row.update({k: lesion.get(k) for k in ("lesion_ml", "lesion_voxels", "mean_variance_in_lesion",
                                                   "uncertain_ml", "max_variance")})
            row.update({k: t.get(k) for k in ("preprocess_s", "sampling_s", "write_s")})
            row.update({k: s.get(k) for k in ("n", "sampler", "steps", "seed")})
            row["members"] = s.get("work_items")  # members drawn in all (--n auto: fewer than slices x n_max)
        rows.append(row)

    return review_order(rows)


def _cell(v: Any, nd: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e-3 and v != 0 else f"{round(v, nd)}"
    return str(v)


def _markdown(rows: Sequence[dict], settings: RunSettings | None, counts: dict[str, int]) -> str:
    lines = ["# Cohort summary", ""]
    if settings is not None:
        d = settings.describe()
        lines.append(f"Sampling: {d['sampler']} {d['steps']} steps, eta {d['eta']}, {describe_size(settings.n)}, "
                     f"seed {d['seed']}.")
    lines.append("Cases: " + ", ".join(f"{counts[k]} {k}" for k in STATUSES if counts.get(k)) + ".")
    lines += ["", "## Review first", "",
              "Ranked by the mean ensemble variance inside the predicted lesion (mask = mean > 0.5), then by the "
              "volume where the members disagree (variance > 0.05): open the top cases first.", "",
              "| rank | case | lesion (ml) | mean variance in lesion | uncertain (ml) | status |",
              "|---:|---|---:|---:|---:|---|"]
    for r in rows:
        if r.get("uncertainty_rank") is not None:
            lines.append(f"| {r['uncertainty_rank']} | {r['case_id']} | {_cell(r.get('lesion_ml'), 2)} | "
                         f"{_cell(r.get('mean_variance_in_lesion'))} | {_cell(r.get('uncertain_ml'), 2)} | "
                         f"{r['status']} |")
    lines += ["", "## Every case", "",
              "| case | status | preprocess (s) | sampling (s) | write (s) | this run (s) | message |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: r["case_id"]):
        msg = str(r.get("message") or "").replace("|", "\\|")
        lines.append(f"| {r['case_id']} | {r['status']} | {_cell(r.get('preprocess_s'), 1)} | "
                     f"{_cell(r.get('sampling_s'), 1)} | {_cell(r.get('write_s'), 1)} | "
                     f"{_cell(r.get('seconds_this_run'), 1)} | {msg} |")
    return "\n".join(lines) + "\n"


def write_summary(cohort: Sequence[CohortEntry], out_dir: str | Path, statuses: Sequence[CaseStatus] = (), *,
                  settings: RunSettings | None = None) -> dict[str, Path]:
    """Write `SUMMARY_NAMES` (CSV: `SUMMARY_COLUMNS`, ranked; Markdown: the review list and every case) into
    `out_dir`, each atomically (parts of a job array may finish together: the last one's view wins)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(cohort, out_dir, statuses)
    counts = {k: sum(r["status"] == k for r in rows) for k in STATUSES}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_COLUMNS})
    paths = {"csv": out_dir / SUMMARY_NAMES["csv"], "md": out_dir / SUMMARY_NAMES["md"]}
    with atomic_write(paths["csv"]) as f:
        f.write(buf.getvalue().encode())
    with atomic_write(paths["md"]) as f:
        f.write(_markdown(rows, settings, counts).encode())
    d = settings.describe() if settings is not None else None
    paths["html"] = write_review(out_dir, settings=None if d is None else {
        "sampler": f"{d['sampler']} {d['steps']} steps, eta {d['eta']}", "ensemble": describe_size(settings.n),
        "seed": d["seed"]}).path
    return paths
