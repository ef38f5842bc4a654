"""The cohort review page (`report.html`), tested as a user sees it: a real cohort run of the shipped default
model on real BraTS cases (one of them broken), opened in headless Chromium; and output folders with missing,
partial, foreign and hostile files, which give a page that names them and never a crash."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffseg_engine.cli import app
from diffseg_engine.pipeline.review import REPORT_NAME, review_rows, write_review

GOOD = ("BraTS18_CBICA_ASK", "BRATS2013_pat0003", "BraTS18_TCIA02_606")
BROKEN = "BraTS18_no_flair"
runner = CliRunner()


def _console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


@pytest.fixture(scope="module")
def cohort_out(shared_data, tmp_path_factory) -> Path:
    """`segment COHORT -o OUT` with the shipped default model, N = 2: three real cases and one whose folder
    lacks its FLAIR (a failed case with its reason)."""
    tmp = tmp_path_factory.mktemp("review")
    src = tmp / "cohort"
    src.mkdir()
    for cid in GOOD:
        (src / cid).symlink_to(shared_data / "train" / cid, target_is_directory=True)
    broken = src / BROKEN
    broken.mkdir()
    (broken / f"{BROKEN}_t1.nii.gz").symlink_to(
        shared_data / "train" / "BraTS18_CBICA_ASK" / "BraTS18_CBICA_ASK_t1.nii.gz")
    out = tmp / "out"
    res = runner.invoke(app, ["segment", str(src), "-o", str(out), "--n", "2", "--quiet"])
    assert res.exit_code == 18, res.output  # a cohort with a failed case
    return out


def test_every_cohort_run_writes_the_review_page(cohort_out):
    page = cohort_out / REPORT_NAME
    assert page.exists()
    rows, problems = review_rows(cohort_out)
    by_id = {r["case_id"]: r for r in rows}
    assert set(by_id) == {*GOOD, BROKEN} and problems == []
    assert by_id[BROKEN]["status"] == "failed" and "flair" in by_id[BROKEN]["message"].lower()
    done = [r for r in rows if r["status"] == "done"]
    assert [r["uncertainty_rank"] for r in done] == [1, 2, 3]
    variances = [r["mean_variance_in_lesion"] for r in done]
    assert variances == sorted(variances, reverse=True)  # most uncertain first
    assert all(r["members"] > 0 and r["lesion_ml"] > 0 and r["overview"] for r in done)
    assert len(list((cohort_out / "report_files" / "thumbs").glob("*.jpg"))) == len(GOOD)


def test_review_page_renders_sorts_filters_and_opens_a_case_in_chromium(cohort_out, chromium, tmp_path):
    from selenium.webdriver.common.by import By
    d = chromium
    d.get_log("browser")  # drop what an earlier page logged
    d.get((cohort_out / REPORT_NAME).as_uri())
    rows = d.find_elements(By.CSS_SELECTOR, "#cases tbody tr")
    assert [r.get_attribute("data-case") for r in rows][:3] == [
        r["case_id"] for r in review_rows(cohort_out)[0][:3]]
    assert len(rows) == len(GOOD) + 1
    # every thumbnail loaded (decoded with a size), the failed case shows none
    loaded = d.execute_script("return Array.from(document.querySelectorAll('img.thumb')).map("
                              "i => i.complete && i.naturalWidth > 0)")
    assert loaded == [True] * len(GOOD)
    # the failed case's row names its reason
    failed = d.find_element(By.CSS_SELECTOR, f"tr[data-case='{BROKEN}']")
    assert "failed" in failed.text and "flair" in failed.text.lower()
    # sorting: by case id ascending, then descending
    d.find_element(By.CSS_SELECTOR, "th[data-key=case]").click()
    ids = [r.get_attribute("data-case") for r in d.find_elements(By.CSS_SELECTOR, "#cases tbody tr")]
    assert ids == sorted(ids)
    d.find_element(By.CSS_SELECTOR, "th[data-key=case]").click()
    ids = [r.get_attribute("data-case") for r in d.find_elements(By.CSS_SELECTOR, "#cases tbody tr")]
    assert ids == sorted(ids, reverse=True)
    # sorting by lesion volume: numbers, not text; the failed case (no volume) last
    d.find_element(By.CSS_SELECTOR, "th[data-key=lesion]").click()
    vols = [r.get_attribute("data-lesion") for r in d.find_elements(By.CSS_SELECTOR, "#cases tbody tr")]
    assert vols[-1] == "" and [float(v) for v in vols[:-1]] == sorted(float(v) for v in vols[:-1])
    # filtering: by status, then by text
    d.execute_script("const s = document.getElementById('status'); s.value = 'failed';"
                     "s.dispatchEvent(new Event('input'));")
    visible = [r for r in d.find_elements(By.CSS_SELECTOR, "#cases tbody tr") if r.is_displayed()]
    assert [r.get_attribute("data-case") for r in visible] == [BROKEN]
    d.execute_script("const s = document.getElementById('status'); s.value = '';"
                     "s.dispatchEvent(new Event('input'));")
    box = d.find_element(By.ID, "filter")
    box.send_keys(GOOD[1].lower())
    visible = [r for r in d.find_elements(By.CSS_SELECTOR, "#cases tbody tr") if r.is_displayed()]
    assert [r.get_attribute("data-case") for r in visible] == [GOOD[1]]
    # a click opens the case: its full overview (loaded) and its files
    visible[0].click()
    dialog = d.find_element(By.ID, "case-dialog")
    assert dialog.is_displayed() and GOOD[1] in dialog.text
    assert d.execute_script("const i = document.getElementById('d-image'); return i.complete && i.naturalWidth")
    names = [a.text for a in d.find_elements(By.CSS_SELECTOR, "#d-files a")]
    assert f"{GOOD[1]}_mask.nii.gz" in names and f"{GOOD[1]}_provenance.json" in names
    assert _console_errors(d) == []
    shot = os.environ.get("DIFFSEG_SCREENSHOTS")
    if shot:  # docs/images/ is refreshed with the real page by `DIFFSEG_SCREENSHOTS=docs/images pytest ...`
        d.find_element(By.ID, "close").click()
        box.clear()
        d.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'));"
                         "document.querySelector('th[data-key=rank]').click();")
        d.save_screenshot(str(Path(shot) / "review-page.png"))


def _write(path: Path, text: str = "") -> Path:
    path.write_text(text)
    return path


def test_missing_partial_foreign_and_hostile_files_are_named_never_a_crash(cohort_out, chromium, tmp_path):
    """A copy of the real run, damaged: a case lost its mask, another's provenance is truncated, an interrupted
    run's partial folder, maps without a provenance, a stray file and folder, a case id full of HTML."""
    out = tmp_path / "out"
    shutil.copytree(cohort_out, out, symlinks=True)
    (out / f"{GOOD[0]}_mask.nii.gz").unlink()
    prov = out / f"{GOOD[1]}_provenance.json"
    prov.write_text(prov.read_text()[:200])
    (out / ".half_case.partial").mkdir()
    _write(out / "orphan_mean.nii.gz", "x")
    _write(out / "notes.txt", "mine")
    (out / "stuff").mkdir()
    evil = '<img src=x onerror="document.title=1">&"case'
    src = json.loads((out / f"{GOOD[2]}_provenance.json").read_text())
    src["case_id"] = evil
    src["outputs"] = {}
    src["input_checks"] = {"warnings": ['<b id="injected">bold</b> warning'], "overridden": []}
    _write(out / f"{evil}_provenance.json", json.dumps(src))
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert "problem" in res.output
    rows, problems = review_rows(out)
    by_id = {r["case_id"]: r for r in rows}
    text = "\n".join(problems)
    assert f"{GOOD[0]}_mask.nii.gz" in text and by_id[GOOD[0]]["status"] == "incomplete"
    assert f"{GOOD[1]}_provenance.json: provenance is not readable JSON" in text
    assert "half_case: an interrupted run" in text and by_id["half_case"]["status"] == "interrupted"
    assert "orphan_mean.nii.gz without orphan_provenance.json" in text
    assert "notes.txt" in text and "stuff/" in text
    assert by_id[evil]["status"] == "done"
    d = chromium
    d.get_log("browser")
    d.get((out / REPORT_NAME).as_uri())
    from selenium.webdriver.common.by import By
    assert d.title.startswith("Cohort review")  # the onerror handler never ran
    assert d.find_elements(By.ID, "injected") == []  # the warning's markup is text
    cell = d.find_element(By.CSS_SELECTOR, "#cases tbody tr td:nth-child(3)")
    ids = [c.text for c in d.find_elements(By.CSS_SELECTOR, "#cases tbody tr td:nth-child(3)")]
    assert evil in ids and cell is not None
    assert len(d.find_elements(By.CSS_SELECTOR, "#problems li")) == len(problems)
    assert _console_errors(d) == []


def test_report_of_an_empty_or_missing_folder(tmp_path):
    page = write_review(tmp_path)
    assert page.counts == {} and page.problems == [] and "No case outputs" in page.path.read_text()
    res = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "is not a folder" in (res.stderr if hasattr(res, "stderr") else res.output)
