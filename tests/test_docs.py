"""The documentation: README.md and the pages under docs/, built as a site by MkDocs (mkdocs.yml).

Checks that the site builds in strict mode (every link, anchor and image resolves; every page is in the nav),
that the README stays short with a two-command Quickstart, that no page carries machine paths, issue numbers
or development history, that every `benchmarks/...` file a page names exists, and that the README's links
into docs/ resolve (files and anchors).
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MKDOCS_YML = ROOT / "mkdocs.yml"

MAX_README_LINES = 200
QUICKSTART = ["make demo", "make test"]

#: Text no page may contain: paths of a development machine, issue numbers, development history.
FORBIDDEN = {
    "machine path": re.compile(r"/work/|/tmp/|\.\./shared"),
    "issue number": re.compile(r"\bissues? #?\d+|(?<![\w&/])#\d+\b", re.I),
    "development history": re.compile(
        r"\b(?:previous|earlier|last|this|next|former) sessions?\b|\bsessions? \d|\bsessions? ago\b"
        r"|\b(?:previous|former|old) default\b|\bin session\b", re.I),
}

#: A file under benchmarks/ named in the text (a script or a results file, with its extension).
BENCH_PATH = re.compile(r"benchmarks/[A-Za-z0-9_./-]*[A-Za-z0-9_]\.(?:py|sh|md|json|jsonl|csv|png|log|txt)\b")
#: A relative Markdown link (not http(s), not mailto): [text](target) or [text](target#anchor).
MD_LINK = re.compile(r"!?\[[^\]]*\]\((?!https?:|mailto:)([^)#\s]*)(?:#([^)\s]*))?\)")


def pages() -> list[Path]:
    """README.md and every Markdown file under docs/ (docs/images/README.md included)."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def nav_pages() -> list[str]:
    """The .md files named in mkdocs.yml's nav (read without a YAML parser: one `- Title: file.md` a line)."""
    text = MKDOCS_YML.read_text()
    nav = text.split("\nnav:", 1)[1]
    return re.findall(r"^\s+-\s+[^:\n]+:\s*(\S+\.md)\s*$", nav, re.M)


def excluded_docs() -> list[str]:
    """The paths under `exclude_docs: |` in mkdocs.yml (not pages of the site)."""
    m = re.search(r"^exclude_docs:\s*\|\n((?:[ \t]+\S.*\n)+)", MKDOCS_YML.read_text(), re.M)
    return [line.strip() for line in m.group(1).splitlines()] if m else []


def slug(heading: str) -> str:
    """The anchor Markdown renderers (MkDocs' toc, GitHub) give a heading: lower case, punctuation dropped,
    spaces as hyphens."""
    s = re.sub(r"[`*_]", "", heading.strip().lower())
    s = re.sub(r"[^\w\s-]", "", s)
    return re.sub(r"\s+", "-", s).strip("-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def test_site_builds_in_strict_mode(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (it is in the `test` extra: pip install -e '.[test]')")
    out = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(MKDOCS_YML),
                          "--site-dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    for page in nav_pages():
        assert (out / Path(page).with_suffix(".html")).is_file(), page


def test_site_settings():
    """Strict (a warning fails the build), plain .html pages, a theme built into MkDocs (no extra package)."""
    text = MKDOCS_YML.read_text()
    assert re.search(r"^strict:\s*true\s*$", text, re.M)
    assert re.search(r"^use_directory_urls:\s*false\s*$", text, re.M)
    assert re.search(r"^theme:\s*\n\s+name:\s*(mkdocs|readthedocs)\s*$", text, re.M)


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail into docs/"


def test_quickstart_is_exactly_the_two_commands():
    section = README.read_text().split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```[a-z]*\n(.*?)```", section, re.S)
    commands = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    assert [c for c in commands if c] == QUICKSTART


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_no_page_has_machine_paths_issue_numbers_or_history(name):
    pattern = FORBIDDEN[name]
    found = [f"{p.relative_to(ROOT)}:{i}: {m.group(0)!r}" for p in pages()
             for i, line in enumerate(p.read_text().splitlines(), 1) for m in pattern.finditer(line)]
    assert not found, f"{name} in the documentation:\n" + "\n".join(found)


def test_every_benchmarks_path_named_exists():
    missing = sorted({f"{p.relative_to(ROOT)}: {m}" for p in pages() for m in BENCH_PATH.findall(p.read_text())
                      if not (ROOT / m).exists()})
    assert not missing, "benchmark scripts or results files named but not in the repository:\n" + "\n".join(missing)


def test_every_docs_page_is_in_the_nav():
    nav = nav_pages()
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")} - set(excluded_docs())
    assert sorted(on_disk - set(nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(nav) - on_disk) == [], "nav entries without a page"
    assert len(nav) == len(set(nav)), "a page listed twice in the nav"


def test_readme_links_into_docs_resolve():
    links = MD_LINK.findall(README.read_text())
    into_docs = [(t, a) for t, a in links if t.startswith("docs/")]
    assert into_docs, "the README links to no docs page"
    broken = [f"{t}#{a}" if a else t for t, a in into_docs
              if not (ROOT / t).is_file() or (a and t.endswith(".md") and a not in anchors(ROOT / t))]
    assert not broken, f"README links that do not resolve: {broken}"
    other = [t for t, _ in links if t and not t.startswith("docs/") and not (ROOT / t).exists()]
    assert not other, f"README links to missing files: {other}"
