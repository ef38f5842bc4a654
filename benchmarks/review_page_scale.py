"""The cohort review page at 1 000 cases: how long writing it and opening it in headless Chromium take.

A folder of N cases is made from one real finished case (its provenance with the lesion numbers varied, and
its overview picture), as a cohort of N would leave it; then `diffseg-engine report` writes the page (cold:
every thumbnail made; warm: thumbnails reused), and Chromium opens it: time to DOMContentLoaded and to the
load event (lazy thumbnails: only those in view are fetched), and a sort of all rows by lesion volume.

    python benchmarks/review_page_scale.py --case-dir demo-out --n 1000 --out benchmarks/results/review_page_scale-cpu

Needs chromium and chromium-driver (Debian) and selenium. Writes OUT.md and OUT.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _host import host_info  # noqa: E402

from diffseg_engine.pipeline.review import REPORT_NAME, write_review  # noqa: E402


def make_folder(src: Path, out: Path, n: int) -> None:
    prov_path = next(src.glob("*_provenance.json"))
    case = prov_path.name[: -len("_provenance.json")]
    prov = json.loads(prov_path.read_text())
    overview = src / f"{case}_overview.png"
    rng = np.random.default_rng(0)
    for i in range(n):
        cid = f"CASE-{i:05d}"
        p = dict(prov, case_id=cid, outputs={"overview": f"{cid}_overview.png"})
        p["lesion"] = dict(prov["lesion"], lesion_ml=float(rng.uniform(0, 150)),
                           mean_variance_in_lesion=float(rng.uniform(0, 0.1)))
        (out / f"{cid}_provenance.json").write_text(json.dumps(p))
        (out / f"{cid}_overview.png").symlink_to(overview.resolve())


def open_in_chromium(page: Path) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium")
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        d.get(page.as_uri())
        t = d.execute_script("const n = performance.getEntriesByType('navigation')[0];"
                             "return [n.domContentLoadedEventEnd, n.loadEventEnd];")
        sort_ms = d.execute_script("const t0 = performance.now();"
                                   "document.querySelector('th[data-key=lesion]').click();"
                                   "return performance.now() - t0;")
        rows = d.execute_script("return document.querySelectorAll('#cases tbody tr').length")
        fetched = d.execute_script("return Array.from(document.images).filter(i => i.complete && i.naturalWidth)"
                                   ".length")
    finally:
        d.quit()
    return {"dom_content_loaded_ms": t[0], "load_ms": t[1], "sort_ms": sort_ms, "rows": rows,
            "thumbnails_loaded_at_open": fetched}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case-dir", required=True, help="an output folder holding one finished case")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_folder(Path(a.case_dir), folder, a.n)
        t0 = time.perf_counter()
        write_review(folder)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_review(folder)
        warm = time.perf_counter() - t0
        page = folder / REPORT_NAME
        size = page.stat().st_size
        thumbs = sum(p.stat().st_size for p in (folder / "report_files" / "thumbs").iterdir())
        browser = open_in_chromium(page)
    res = {"n": a.n, "write_cold_s": cold, "write_warm_s": warm, "page_bytes": size, "thumbnail_bytes": thumbs,
           **browser, "machine": host_info()["cpu"], "command": "python " + " ".join(["benchmarks/review_page_scale.py",
                                                                                     *sys.argv[1:]])}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(
        f"# The review page at {a.n} cases ({res['machine']})\n\nCommand: `{res['command']}`\n\n"
        f"| what | measured |\n|---|---|\n"
        f"| writing the page, thumbnails made (cold) | {cold:.1f} s |\n"
        f"| writing the page again, thumbnails reused | {warm:.1f} s |\n"
        f"| page size | {size / 1e6:.2f} MB (+ {thumbs / 1e6:.1f} MB of thumbnails beside it) |\n"
        f"| Chromium: DOMContentLoaded / load event | {browser['dom_content_loaded_ms']:.0f} / "
        f"{browser['load_ms']:.0f} ms |\n"
        f"| rows rendered; thumbnails fetched at open (lazy) | {browser['rows']}; "
        f"{browser['thumbnails_loaded_at_open']} |\n"
        f"| sorting all rows by lesion volume | {browser['sort_ms']:.0f} ms |\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
