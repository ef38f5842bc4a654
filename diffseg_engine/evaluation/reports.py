"""The reports of an evaluation: the summary and the files written from it.

Owns: `summarize` (the summary dict: pooled slice scores, the means of the per-case metrics, uncertainty and
ensemble-size curves, every case's row), `write_reports` and what it writes (`REPORT_NAMES`: per-case CSV,
per-slice CSV, JSON and Markdown summaries, the Dice-vs-ensemble-size PNG; then the page of figures,
`page.write_page`), and `DEFINITIONS`, the text that says what each number is. The per-case columns, their means and their Markdown cells come from
`columns.METRICS`; nothing here names a per-case metric.
Imports: matplotlib (lazily), numpy; `columns`, `core.errors`, `io.atomic`, `metrics`, `page` (lazily), `protocol`.
Never torch.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import metrics as M
from ..io.atomic import atomic_write
from ..core.errors import OutputError
from . import columns as C
from .protocol import CaseScores, SliceScores

REPORT_NAMES = {"cases_csv": "evaluation_cases.csv", "slices_csv": "evaluation_slices.csv",
                "summary_md": "evaluation_summary.md", "summary_json": "evaluation_summary.json",
                "ensemble_png": "evaluation_ensemble_size.png",
                # the page and its figures (`page.write_page`; a figure only where a case has what it draws)
                "page": "evaluation_report.html", "evaluation_dice_per_case": "evaluation_dice_per_case.png",
                "evaluation_reliability": "evaluation_reliability.png",
                "evaluation_error_detection": "evaluation_error_detection.png",
                "evaluation_dice_vs_lesion_size": "evaluation_dice_vs_lesion_size.png"}
#: What every report writes; the rest of `REPORT_NAMES` where there is something to draw.
ALWAYS_WRITTEN = ("cases_csv", "slices_csv", "summary_md", "summary_json", "page")

DEFINITIONS = {
    "ground_truth": "whole tumour: label > 0",
    "prediction": "mask > 0.5 (<case>_mask.nii.gz), or label > 0 of a plain <case>.nii.gz label map",
    "test_slices": "axial slices (axis closest to superior-inferior in the affine) with non-empty ground truth",
    "slice_means": "mean over all test slices; *_nonempty: over test slices with a non-empty prediction "
                   "(the paper's values in brackets); slice_hd95_mean_nonempty is the paper's HD95 column",
    "hd95": M.HD95_DEFINITION,
    "hd95_directed_max": "MONAI style: max of the two directed 95th percentiles (comparison only)",
    "ensemble_curve": "ensemble of the first k members = mean(members[:k]) > 0.5 (strict); k=1 is the single run",
    "uncertainty": "u = clip(variance/0.25, 0, 1); errors = (pred != gt) inside the brain (any modality != 0)",
    "enrichment": "(|errors in top-q% variance voxels| / |errors|) / (|top-q% voxels| / |brain|)",
    "high_variance_error_dice": "Dice(brain & variance > threshold, errors)",
    "filtered_dice": "variance-filtered Dice (not the QU-BraTS score): Dice on voxels with u <= tau, tau in "
                     "linspace(0,1,n_levels); both empty -> 1; AUC = trapezoid over tau in [0,1]",
    "error_detection": "errors = (mask != truth) among the brain voxels of slices whose ground truth holds tumour; "
                       "AUROC of each uncertainty map for telling them from correct voxels (0.5 = chance); "
                       "ECE: 10 equal bins of the ensemble mean there, sum of |tumour share - mean| x bin share",
    "qu_brats": "QU-BraTS whole tumour, as the organisers' scorer (github.com/RagMeh11/QU-BraTS): uncertainty = "
                "100 x entropy of the mean, thresholds 0,25,50,75,100, voxels with u > th filtered; Dice on the "
                "grid, FTP/FTN inside the brain; score = (AUC_Dice + 1-AUC_FTP + 1-AUC_FTN)/3",
}


def _pooled_slices(scores: Sequence[CaseScores]) -> dict[str, Any]:
    sl = [c.slices for c in scores if c.ok and c.slices is not None]
    if not sl:
        return {"n_test_slices": 0}
    pooled = SliceScores(axis=-1, index=np.concatenate([s.index for s in sl]),
                         dice=np.concatenate([s.dice for s in sl]), jaccard=np.concatenate([s.jaccard for s in sl]),
                         hd95=np.concatenate([s.hd95 for s in sl]), pred_empty=np.concatenate([s.pred_empty for s in sl]))
    return pooled.summary()


def summarize(scores: Sequence[CaseScores], *, policy: str | M.EmptyPolicy = M.BRATS,
              meta: dict | None = None) -> dict[str, Any]:
    """The summary dict written as JSON (NaN -> null) and rendered as Markdown. The means of the per-case metrics
    are `columns.group_means` of the scored cases, one part per `columns.GROUPS` entry."""
    from .. import __version__
    policy = M.get_policy(policy)
    ok = [c for c in scores if c.ok]
    unc_cases = [c for c in ok if c.uncertainty is not None]
    unc = {"n_cases": len(unc_cases), **C.group_means(ok, "uncertainty"),
           "qu_brats_n_cases": sum(c.qubrats is not None for c in ok), **C.group_means(ok, "qu_brats")}
    if unc_cases:
        unc["taus"] = unc_cases[0].uncertainty.taus.tolist()
        unc["filtered_dice_mean"] = np.mean([c.uncertainty.filtered_dice for c in unc_cases], axis=0).tolist()
    curve_cases = [c for c in ok if c.curve is not None]
    curve: dict[str, Any] = {"n_cases": len(curve_cases)}
    if curve_cases:
        common = sorted(set.intersection(*(set(c.curve.sizes) for c in curve_cases)))
        curve["sizes"] = common
        for key in ("dice", "jaccard", "hd95_mm", "slice_dice_mean"):
            curve[key if key == "slice_dice_mean" else f"{key}_mean"] = [
                C.mean_std([getattr(c.curve, key)[c.curve.sizes.index(k)] for c in curve_cases])[0] for k in common]
        curve.update(C.group_means(ok, "ensemble_curve"))
    unmatched = list(getattr(scores, "unmatched_predictions", []))
    return {
        "tool": "diffseg-engine evaluate", "version": __version__,
        "policy": policy.to_dict(), "hd95_definition": M.HD95_DEFINITION, "definitions": DEFINITIONS,
        "cases": {"total": len(scores), "scored": len(ok),
                  "missing_prediction": [c.case_id for c in scores if c.status == "missing prediction"],
                  "not_scored": {c.case_id: c.status for c in scores if not c.ok},
                  "unmatched_predictions": unmatched},
        "slices_pooled": _pooled_slices(scores),
        "slices_per_case_mean": C.group_means(ok, "slices_per_case_mean"),
        "volume_3d": C.group_means(ok, "volume_3d"), "uncertainty": unc, "ensemble_curve": curve,
        "per_case": [c.to_dict() for c in scores],
        "meta": meta or {},
    }


def _json_clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_clean(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _csv_value(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(float(v)) else f"{float(v):.6g}"
    return v


def _f(v: Any, nd: int = 3) -> str:
    """A value in Markdown: "–" where there is none (None, NaN, ""), floats with `nd` decimals, text with its
    "|" (which would end the table cell) written as "/"."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or (isinstance(v, str) and not v):
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v).replace("|", "/")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _case_cells(r: dict, metrics: Sequence[C.Metric]) -> list[str]:
    """The Markdown per-case cells of one (JSON-clean) row."""
    shown = {m.name: _f(r[m.name], m.digits) for m in C.METRICS}
    return [m.cell.format(shown[m.name], **shown) for m in metrics]


def _mean_cell(m: C.Metric, group: dict) -> str:
    key = m.key or m.name
    return m.mean_cell.format(**{s: _f(group[f"{key}_{s}"], m.digits) for s in C.GROUPS[m.group]})


def _markdown(summary: dict) -> str:
    s, v, c = summary["slices_pooled"], summary["volume_3d"], summary["cases"]
    lines = ["# Segmentation evaluation", ""]
    meta = summary.get("meta") or {}
    if meta:
        lines += [f"- {k}: {meta[k]}" for k in sorted(meta)] + [""]
    lines += [f"- Cases: {c['total']} labelled, {c['scored']} scored.",
              f"- Empty-mask policy: {summary['policy']['text']}.",
              f"- {summary['hd95_definition']}.",
              f"- Ground truth: {DEFINITIONS['ground_truth']}; prediction: {DEFINITIONS['prediction']}.", ""]
    if c["not_scored"]:
        lines += ["Not scored:", ""] + [f"- {k}: {msg}" for k, msg in sorted(c["not_scored"].items())] + [""]
    if c["unmatched_predictions"]:
        lines += [f"Predictions without a labelled case: {', '.join(c['unmatched_predictions'])}", ""]
    lines += ["## Per-slice scores (paper Table 1 protocol, pooled over all test slices)", "",
              f"Test slices: axial slices with non-empty ground truth. Means over all test slices; in brackets over "
              f"test slices with a non-empty prediction. HD95 (mm) over non-empty predictions only "
              f"(over all test slices under the policy: {_f(s.get('slice_hd95_mean'))}).", "",
              "| Dice | HD95 | Jaccard | empty | test slices |", "|---|---|---|---|---|"]
    if s.get("n_test_slices"):
        lines.append(f"| {_f(s['slice_dice_mean'])} [{_f(s['slice_dice_mean_nonempty'])}] | "
                     f"{_f(s['slice_hd95_mean_nonempty'])} | {_f(s['slice_jaccard_mean'])} "
                     f"[{_f(s['slice_jaccard_mean_nonempty'])}] | {s['n_empty_pred']} | {s['n_test_slices']} |")
    else:
        lines.append("| – | – | – | – | 0 |")
    volume = [m for m in C.in_group("volume_3d") if m.mean_column]
    cases = [m for m in C.METRICS if m.column]
    lines += ["", "## Per-volume scores (3D, mean ± sd over scored cases)", "",
              *_table([m.mean_column for m in volume], [[_mean_cell(m, v) for m in volume]]), "",
              "## Per case", "",
              *_table([m.column for m in cases], [_case_cells(r, cases) for r in summary["per_case"]])]
    u = summary["uncertainty"]
    if u.get("n_cases"):
        lines += ["", f"## Uncertainty vs error ({u['n_cases']} case(s) with a variance map; means over cases)", "",
                  f"- Errors among the top {_f(u['unc_top_percent'], 1)} % variance voxels: "
                  f"{_f(u['unc_error_fraction_in_top'])} of all errors, vs {_f(u['unc_top_fraction'], 4)} of brain "
                  f"voxels: enrichment {_f(u['unc_enrichment'], 2)}x.",
                  f"- Dice(variance > {_f(u['unc_variance_threshold'], 3)}, errors): "
                  f"{_f(u['unc_high_variance_error_dice'])}.",
                  f"- Variance-filtered Dice AUC: {_f(u['var_filtered_dice_auc'])}.",
                  f"- Error detection ({DEFINITIONS['error_detection']}): AUROC of the variance "
                  f"{_f(u.get('variance_auroc'))}, of the entropy of the mean {_f(u.get('entropy_auroc'))}; "
                  f"expected calibration error of the mean {_f(u.get('ece'), 4)}.",
                  f"- QU-BraTS, whole tumour ({u['qu_brats_n_cases']} case(s)): Dice AUC "
                  f"{_f(u['qu_brats_dice_auc'])}, FTP AUC {_f(u['qu_brats_ftp_auc'])}, FTN AUC "
                  f"{_f(u['qu_brats_ftn_auc'], 4)}; score {_f(u['qu_brats_score'])}.",
                  f"- Definitions: {DEFINITIONS['uncertainty']}; {DEFINITIONS['enrichment']}; "
                  f"{DEFINITIONS['filtered_dice']}; {DEFINITIONS['qu_brats']}."]
    cv = summary["ensemble_curve"]
    if cv.get("n_cases") and cv.get("sizes"):
        lines += ["", f"## Dice against ensemble size (paper Figure 4; {cv['n_cases']} case(s))", "",
                  f"Single run (member 0): Dice 3D {_f(cv['single_run_dice_mean'])}, slice Dice "
                  f"{_f(cv['single_run_slice_dice_mean'])}. {DEFINITIONS['ensemble_curve']}.", "",
                  "| members | Dice 3D | Jaccard 3D | HD95 mm | slice Dice |", "|---|---|---|---|---|"]
        for i, k in enumerate(cv["sizes"]):
            lines.append(f"| {k} | {_f(cv['dice_mean'][i])} | {_f(cv['jaccard_mean'][i])} | "
                         f"{_f(cv['hd95_mm_mean'][i], 2)} | {_f(cv['slice_dice_mean'][i])} |")
    return "\n".join(lines) + "\n"


def _write_bytes(path: Path, data: bytes) -> Path:
    try:
        with atomic_write(path) as f:
            f.write(data)
    except OSError as exc:
        raise OutputError(f"cannot be written ({exc.strerror or exc})", path=path,
                          fix="check the output folder exists, is writable and has free space") from None
    return path


def _plot_curves(scores: Sequence[CaseScores], path: Path) -> Path | None:
    curve_cases = [c for c in scores if c.ok and c.curve is not None and len(c.curve.sizes) > 0]
    if not curve_cases:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for c in curve_cases:
        ax.plot(c.curve.sizes, c.curve.dice, marker="o", ms=3, lw=1, alpha=0.7, label=c.case_id)
    if len(curve_cases) > 1:
        common = sorted(set.intersection(*(set(c.curve.sizes) for c in curve_cases)))
        mean = [np.nanmean([c.curve.dice[c.curve.sizes.index(k)] for c in curve_cases]) for k in common]
        ax.plot(common, mean, color="black", lw=2.5, label="mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Number of samples in ensemble")
    ax.set_ylabel("Dice (3D, whole tumour)")
    ax.set_title("Dice against ensemble size")
    ax.grid(alpha=0.3)
    if len(curve_cases) <= 12:
        ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return _write_bytes(path, buf.getvalue())


def write_reports(scores: Sequence[CaseScores], out_dir: str | Path, *, policy: str | M.EmptyPolicy = M.BRATS,
                  meta: dict | None = None) -> dict[str, Path]:
    """Write `REPORT_NAMES` into `out_dir` (atomically): per-case CSV, per-slice CSV, Markdown and JSON
    summaries, and the Dice-vs-ensemble-size PNG when any case has a curve. Returns name -> path."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot be created ({exc.strerror or exc})", path=out_dir,
                          fix="choose a writable output folder") from None
    summary = summarize(scores, policy=policy, meta=meta)
    paths: dict[str, Path] = {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([m.name for m in C.METRICS])
    for c in scores:
        w.writerow([_csv_value(v) for v in c.row().values()])
    paths["cases_csv"] = _write_bytes(out_dir / REPORT_NAMES["cases_csv"], buf.getvalue().encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("case_id", "axis", "slice", "dice", "jaccard", "hd95_mm", "pred_empty", "gt_voxels"))
    for c in scores:
        if c.ok and c.slices is not None:
            s = c.slices
            for t in range(s.n):
                w.writerow((c.case_id, s.axis, int(s.index[t]), _csv_value(s.dice[t]), _csv_value(s.jaccard[t]),
                            _csv_value(s.hd95[t]), int(bool(s.pred_empty[t])),
                            "" if s.gt_voxels is None else int(s.gt_voxels[t])))
    paths["slices_csv"] = _write_bytes(out_dir / REPORT_NAMES["slices_csv"], buf.getvalue().encode())
    clean = _json_clean(summary)
    paths["summary_json"] = _write_bytes(out_dir / REPORT_NAMES["summary_json"],
                                         (json.dumps(clean, indent=2, allow_nan=False) + "\n").encode())
    paths["summary_md"] = _write_bytes(out_dir / REPORT_NAMES["summary_md"], _markdown(clean).encode())
    png = _plot_curves(scores, out_dir / REPORT_NAMES["ensemble_png"])
    if png is not None:
        paths["ensemble_png"] = png
    try:
        from .page import write_page
    except ImportError:  # pragma: no cover - jinja2 and matplotlib are runtime dependencies
        return paths
    extra = [{"title": "Dice against ensemble size (paper Figure 4)", "file": png.name}] if png is not None else []
    page, figures = write_page(scores, clean, out_dir, definitions=DEFINITIONS,
                               files=[p.name for p in paths.values() if p != png], extra_figures=extra)
    for f in figures:
        if Path(f["file"]).stem in REPORT_NAMES:  # the page's own figures (the ensemble-size one is above)
            paths[Path(f["file"]).stem] = out_dir / f["file"]
    paths["page"] = page
    return paths
