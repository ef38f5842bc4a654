"""The cohort review page: `report.html` in an output folder, read from what the folder holds.

Owns: `review_rows` (one row per case: status, the uncertainty rank, lesion volume, members drawn, input-check
warnings, the failure's reason, its files), `folder_problems` (missing, partial and foreign files, named),
`review_order` (the one ranking rule: most uncertain first), `write_review` (the page, its thumbnails in
`report_files/`) and `REPORT_NAME`.
The page is one self-contained HTML file (inline style and script, no network); each case's overview PNG is
beside it and a small thumbnail of it in `report_files/thumbs/`, loaded lazily, so a thousand cases open fast.
Templating is Jinja2 with autoescaping, thumbnails Pillow: no HTML escaping or image code by hand here.
Imports: jinja2 (lazily), numpy (lazily), pillow (lazily); `core.errors`, `io.atomic`, `maps.outputs`. Never torch.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..io.atomic import atomic_write
from ..core.errors import OutputError, UsageError
from ..maps.outputs import SUFFIXES

REPORT_NAME = "report.html"
ASSET_DIR = "report_files"
THUMB_WIDTH = 220
#: Files of an output folder that belong to the folder, not to a case.
FOLDER_FILES = ("cohort_summary.csv", "cohort_summary.md", REPORT_NAME)
STATUS_RECORDS = ".diffseg-cohort"


def review_order(rows: Iterable[dict]) -> list[dict]:
    """Cases with maps first, most uncertain first: highest mean variance inside the predicted lesion, then
    (no lesion, or tied) the largest uncertain volume, then the case id; then the cases without maps by id.
    Sets `uncertainty_rank` (1 = review first) on the ranked rows."""
    rows = list(rows)

    def key(r: dict) -> tuple:
        mv = r.get("mean_variance_in_lesion")
        return (-(mv if isinstance(mv, (int, float)) and not math.isnan(mv) else -1.0),
                -(r.get("uncertain_ml") or 0.0), r["case_id"])
    ranked = sorted((r for r in rows if r.get("lesion_voxels") is not None), key=key)
    for i, r in enumerate(ranked, 1):
        r["uncertainty_rank"] = i
    return ranked + sorted((r for r in rows if r.get("lesion_voxels") is None), key=lambda r: r["case_id"])


@dataclass
class FolderScan:
    """What an output folder holds, by case id: complete provenances, unreadable ones, case files, interrupted
    runs, failure records; and the files that belong to no case."""

    provenance: dict[str, dict] = field(default_factory=dict)
    broken_provenance: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[Path]] = field(default_factory=dict)
    partial: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)


def _case_of(name: str) -> tuple[str, str] | None:
    """(case id, key) for a file name a run writes, else None. The longest suffix wins (`_mask.nii.gz` over
    `.nii.gz`)."""
    for key, suffix in sorted(SUFFIXES.items(), key=lambda kv: -len(kv[1])):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], key
    return None


def scan_folder(out_dir: Path) -> FolderScan:
    scan = FolderScan()
    for p in sorted(out_dir.iterdir()):
        name = p.name
        if p.is_dir():
            if name.startswith(".") and name.endswith(".partial"):
                scan.partial.add(name[1:-len(".partial")])
            elif name == STATUS_RECORDS:
                for rec in sorted(p.glob("*.json")):
                    try:
                        data = json.loads(rec.read_text())
                        scan.failures[str(data.get("case_id") or rec.stem)] = str(data.get("message", ""))
                    except (OSError, ValueError, AttributeError):
                        scan.failures[rec.stem] = "unreadable failure record"
            elif name != ASSET_DIR:
                scan.foreign.append(name + "/")
            continue
        if name in FOLDER_FILES or name.startswith("."):  # the folder's own files, locks and temp files
            continue
        hit = _case_of(name)
        if hit is None:
            scan.foreign.append(name)
            continue
        case_id, key = hit
        scan.files.setdefault(case_id, []).append(p)
        if key == "provenance":
            try:
                prov = json.loads(p.read_text())
                if not isinstance(prov, dict):
                    raise ValueError("not a JSON object")
                if prov.get("complete") is not True:
                    scan.broken_provenance[case_id] = "provenance does not mark the run complete"
                else:
                    scan.provenance[case_id] = prov
            except (OSError, ValueError) as exc:
                scan.broken_provenance[case_id] = f"provenance is not readable JSON ({exc})"
    # "label" (`ID.nii.gz` of --format qubrats) matches any NIfTI: keep it only for known cases
    known = set(scan.provenance) | set(scan.broken_provenance) | scan.partial | set(scan.failures)
    for case_id in [c for c in scan.files if c not in known]:
        keys = {_case_of(p.name)[1] for p in scan.files[case_id]}
        if keys <= {"label"}:
            scan.foreign += [p.name for p in scan.files.pop(case_id)]
    scan.foreign.sort()
    return scan


def _summary_csv(out_dir: Path) -> tuple[dict[str, dict], str | None]:
    path = out_dir / FOLDER_FILES[0]
    if not path.exists():
        return {}, None
    try:
        with open(path, newline="") as f:
            rows = {r["case_id"]: r for r in csv.DictReader(f) if r.get("case_id")}
        return rows, None
    except (OSError, csv.Error, KeyError, UnicodeDecodeError) as exc:
        return {}, f"{path.name} is not readable ({exc}); cases are listed from the files alone"


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def review_rows(out_dir: str | Path, scan: FolderScan | None = None) -> tuple[list[dict], list[str]]:
    """One row per case the folder knows of (its summary CSV, provenances, case files, interrupted runs,
    failure records), ranked by `review_order`; and the problems found, each a sentence naming the file."""
    out_dir = Path(out_dir)
    scan = scan or scan_folder(out_dir)
    listed, csv_problem = _summary_csv(out_dir)
    problems = [csv_problem] if csv_problem else []
    ids = sorted(set(listed) | set(scan.provenance) | set(scan.broken_provenance) | set(scan.files)
                 | scan.partial | set(scan.failures))
    rows = []
    for cid in ids:
        prov = scan.provenance.get(cid)
        entry = listed.get(cid, {})
        files = sorted(scan.files.get(cid, []))
        row: dict[str, Any] = {"case_id": cid, "files": [(p.name, p.stat().st_size) for p in files],
                               "warnings": [], "message": "", "overview": None, "lesion_ml": None,
                               "lesion_voxels": None, "mean_variance_in_lesion": None, "uncertain_ml": None,
                               "members": None, "n": None}
        if prov is not None and entry.get("status") != "failed":
            row["status"] = "done"
            lesion = prov.get("lesion") if isinstance(prov.get("lesion"), dict) else {}
            sampling = prov.get("sampling") if isinstance(prov.get("sampling"), dict) else {}
            checks = prov.get("input_checks") if isinstance(prov.get("input_checks"), dict) else {}
            row.update({k: _num(lesion.get(k)) for k in ("lesion_ml", "mean_variance_in_lesion", "uncertain_ml")})
            row["lesion_voxels"] = lesion.get("lesion_voxels")
            row["members"] = sampling.get("work_items")
            row["n"] = sampling.get("n")
            row["warnings"] = [str(w) for w in checks.get("warnings", []) or []] + \
                [f"forced past: {o}" for o in checks.get("overridden", []) or []]
            expected = prov.get("outputs") if isinstance(prov.get("outputs"), dict) else {}
            missing = sorted(str(n) for n in expected.values() if not (out_dir / str(n)).exists())
            if missing:
                row["status"] = "incomplete"
                row["message"] = "missing " + ", ".join(missing)
                problems.append(f"{cid}: the provenance lists {', '.join(missing)}, which the folder lacks")
            overview = out_dir / f"{cid}{SUFFIXES['overview']}"
            row["overview"] = overview.name if overview.exists() else None
        elif cid in scan.failures or entry.get("status") == "failed":
            row["status"] = "failed"
            row["message"] = scan.failures.get(cid) or entry.get("message") or "failed (no reason recorded)"
        elif cid in scan.partial:
            row["status"] = "interrupted"
            row["message"] = "interrupted: run the same command again to resume it"
            problems.append(f"{cid}: an interrupted run (.{cid}.partial); run the same command again to resume it")
        elif cid in scan.broken_provenance:
            row["status"] = "incomplete"
            row["message"] = scan.broken_provenance[cid]
            problems.append(f"{cid}{SUFFIXES['provenance']}: {scan.broken_provenance[cid]}")
        elif files:
            row["status"] = "incomplete"
            row["message"] = "files without a provenance (the run did not finish): " + ", ".join(p.name for p in files)
            problems.append(f"{cid}: {', '.join(p.name for p in files)} without {cid}{SUFFIXES['provenance']} "
                            "(the run did not finish)")
        else:
            row["status"] = entry.get("status") or "pending"
            row["message"] = entry.get("message") or ""
        rows.append(row)
    if scan.foreign:
        problems.append("files that are not outputs of this tool: " + ", ".join(scan.foreign))
    return review_order(rows), problems


def _thumb_name(case_id: str) -> str:
    return hashlib.sha1(case_id.encode()).hexdigest()[:16] + ".jpg"


def _lesion_panel(im):
    """The overview's mean-overlay panel (middle column) that shows the most overlay colour (red to yellow over
    the grey image): the slice with the most lesion, cropped to its image. The whole picture if it has none."""
    import numpy as np
    a = np.asarray(im, np.int16)
    h, w, _ = a.shape
    x0 = w // 3
    width = int(0.27 * w)  # the panel without its colour bar (which sits in the column's last quarter)
    col = a[:, x0:x0 + width]
    hot = ((col[..., 0] > 180) & (col[..., 0] - col[..., 2] > 90)).sum(1)  # overlay pixels per image row
    inked = (col < 235).any(axis=2).any(axis=1)  # rows that are not white page
    # runs of inked rows: each panel's image (titles are short runs of their own)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inked.astype(np.int8), [0]])))
    runs = [(lo, hi) for lo, hi in zip(edges[::2], edges[1::2]) if hi - lo >= 16]
    if not runs or hot.sum() == 0:
        return im
    lo, hi = max(runs, key=lambda r: hot[r[0]:r[1]].sum())
    cols = np.flatnonzero((col[lo:hi] < 235).any(axis=2).any(axis=0))
    left, right = x0 + int(cols[0]), x0 + int(cols[-1]) + 1
    return im.crop((left, int(lo), right, int(hi)))


def _thumbnail(src: Path, dst: Path) -> bool:
    """A THUMB_WIDTH-wide JPEG of the overview's mean-overlay panel with the most lesion, rewritten only when
    the overview is newer; False if the overview is not a readable image."""
    from PIL import Image, UnidentifiedImageError
    try:
        if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
            return True
        with Image.open(src) as im:
            im = _lesion_panel(im.convert("RGB"))
            im.thumbnail((THUMB_WIDTH, THUMB_WIDTH))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
    except (OSError, UnidentifiedImageError, ValueError):
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dst) as f:
        f.write(buf.getvalue())
    return True


def _template():
    import jinja2
    env = jinja2.Environment(autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    text = resources.files("diffseg_engine").joinpath("templates", "review.html.j2").read_text()
    return env.from_string(text)


def _fmt(v: Any, nd: int) -> str:
    return "" if v is None else f"{v:.{nd}f}"


@dataclass(frozen=True)
class ReviewPage:
    """A written review page: where, cases per status, and the problems it names."""

    path: Path
    counts: dict[str, int]
    problems: list[str]


def write_review(out_dir: str | Path, *, title: str | None = None, settings: dict | None = None) -> ReviewPage:
    """Write `out_dir/report.html` (and `report_files/thumbs/`) from what `out_dir` holds.

    Never fails on what it finds: missing, partial or foreign files are named on the page. `settings`: how
    the cohort was sampled (shown in the header) when the caller knows it."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir} is not a folder", fix="give the --out folder of a segment run")
    rows, problems = review_rows(out_dir)
    thumbs = out_dir / ASSET_DIR / "thumbs"
    for r in rows:
        r["thumb"] = None
        if r.get("overview"):
            name = _thumb_name(r["case_id"])
            if _thumbnail(out_dir / r["overview"], thumbs / name):
                r["thumb"] = f"{ASSET_DIR}/thumbs/{name}"
            else:
                problems.append(f"{r['overview']}: not a readable PNG")
                r["overview"] = None
        r["lesion_ml_text"] = _fmt(r.get("lesion_ml"), 2)
        r["variance_text"] = _fmt(r.get("mean_variance_in_lesion"), 4)
        r["uncertain_text"] = _fmt(r.get("uncertain_ml"), 2)
    counts = statuses_of(rows)
    details = {r["case_id"]: {"files": [[n, s] for n, s in r["files"]], "warnings": r["warnings"],
                              "message": r["message"], "overview": r["overview"], "status": r["status"]}
               for r in rows}
    from .. import __version__
    html = _template().render(
        title=title or f"Cohort review: {out_dir.resolve().name}", rows=rows, problems=problems, counts=counts,
        details=details, settings=settings or {}, version=__version__,
        generated=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    path = out_dir / REPORT_NAME
    try:
        with atomic_write(path) as f:
            f.write(html.encode())
    except OSError as exc:  # pragma: no cover - atomic_write already turns these into OutputError
        raise OutputError(f"cannot write the review page ({exc})", path=path) from None
    return ReviewPage(path, counts, problems)


def statuses_of(rows: Sequence[dict]) -> dict[str, int]:
    """Cases per status, for callers that print a line after writing the page."""
    out: dict[str, int] = {}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out
