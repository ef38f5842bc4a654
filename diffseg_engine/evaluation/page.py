"""The evaluation page: `evaluation_report.html`, the figures and headline numbers of one evaluation together.

Owns: `write_page` (the figures of `figures.FIGURES` as PNG files beside the page, and the page itself from the
summary `reports.summarize` made) and `PAGE_NAME`. One self-contained HTML file (inline style, no script, no
network) with its figures beside it. Templating is Jinja2 with autoescaping.
Imports: jinja2 (lazily); `figures`, `io.atomic`. Never torch.
"""
from __future__ import annotations

import datetime as _dt
import math
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from ..io.atomic import atomic_write
from .figures import FIGURES

PAGE_NAME = "evaluation_report.html"  # = reports.REPORT_NAMES["page"]


def _fmt(v: Any, nd: int = 3) -> str:
    import jinja2
    if v is None or isinstance(v, jinja2.Undefined) or (isinstance(v, float) and math.isnan(v)) or v == "":
        return "–"
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v)


def write_figures(scores: Sequence[Any], out_dir: Path) -> list[dict]:
    """Each figure that has something to draw, as out_dir/<stem>.png; [{"title", "file"}] in page order."""
    out = []
    for stem, (title, draw) in FIGURES.items():
        png = draw(scores)
        if png is None:
            continue
        with atomic_write(out_dir / f"{stem}.png") as f:
            f.write(png)
        out.append({"title": title, "file": f"{stem}.png"})
    return out


def write_page(scores: Sequence[Any], summary: dict, out_dir: str | Path, *, definitions: dict[str, str],
               files: Sequence[str] = (), extra_figures: Sequence[dict] = ()) -> tuple[Path, list[dict]]:
    """Write the figures and the page into `out_dir` (`definitions`: what each number is, `reports.DEFINITIONS`);
    returns (page path, the figures written)."""
    import jinja2

    from .. import __version__
    out_dir = Path(out_dir)
    figures = write_figures(scores, out_dir) + list(extra_figures)
    env = jinja2.Environment(autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                             undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(
        resources.files("diffseg_engine").joinpath("templates", "evaluation.html.j2").read_text())
    meta = {str(k): v for k, v in (summary.get("meta") or {}).items()}
    html = template.render(
        title="Segmentation evaluation", generated=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        version=__version__, meta=meta, cases=summary["cases"], slices=summary["slices_pooled"],
        volume=summary["volume_3d"], uncertainty=summary["uncertainty"], per_case=summary["per_case"],
        figures=figures, files=[*files, *(f["file"] for f in figures)], definitions=definitions, fmt=_fmt)
    path = out_dir / PAGE_NAME
    with atomic_write(path) as f:
        f.write(html.encode())
    return path, figures
