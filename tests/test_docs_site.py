"""The built documentation site: every page builds without a warning, and the pages read well in a browser.

The site is built once for this module (``mkdocs build --strict``). The browser checks open the built
pages in headless Chromium (driven by playwright, from the test extra, with the system's browser:
``apt-get install chromium`` on Debian, or set ``METAFORMER_CHROMIUM`` to a Chrome/Chromium binary)
at 1280 and 1920 px wide, assert what a reader needs (every table column in view without sideways
scrolling, model names unbroken, every benchmark row shown, API signatures wrapped) and save
screenshots for a human to look at under ``build/docs-screenshots/`` (or ``$METAFORMER_DOCS_SCREENSHOTS``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import docs_hook

import metaformer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
SCREENSHOTS = Path(os.environ.get("METAFORMER_DOCS_SCREENSHOTS", ROOT / "build" / "docs-screenshots"))
WIDTHS = (1280, 1920)
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = pytest.mark.slow  # one site build (~30 s) and a browser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(folder of the built site, mkdocs' output)."""
    for module in ("mkdocs", "mkdocstrings", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[test]'")
    folder = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    return folder, output


def test_every_page_builds_without_warnings(site):
    folder, output = site
    warnings = [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not warnings, "\n".join(warnings)
    # mkdocstrings formats long signatures only with black or ruff installed (the docs extra has black).
    assert "Formatting signatures requires" not in output, output
    pages = [p.relative_to(DOCS) for p in DOCS.rglob("*.md") if "_hooks" not in p.parts]
    built = [p for p in pages if (folder / (p.with_suffix("") if p.name != "index.md" else p.parent)
                                  / "index.html").is_file()]
    assert sorted(map(str, built)) == sorted(map(str, pages)), "pages of docs/ missing from the built site"


def test_generated_pages_are_complete(site):
    folder, _ = site
    zoo = (folder / "zoo" / "index.html").read_text()
    assert all(name in zoo for name in metaformer.VARIANTS)
    api = (folder / "api" / "index.html").read_text()
    for name in metaformer.__all__:
        assert f'id="metaformer.{name}"' in api, f"metaformer.{name} missing from the built API page"


# ------------------------------------------------------------------------------ the browser
def _chromium():
    wanted = os.environ.get("METAFORMER_CHROMIUM")
    names = [wanted] if wanted else ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    for name in names:
        path = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed: pip install -e '.[test]'")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium or Chrome found (apt-get install chromium, or set METAFORMER_CHROMIUM=/path/to/it); "
                    "the rendered pages are not checked")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        yield instance
        instance.close()


def _open(browser, folder: Path, page: str, width: int):
    tab = browser.new_page(viewport={"width": width, "height": 1000})
    tab.goto((folder / page / "index.html").as_uri())
    tab.wait_for_load_state("load")
    return tab


# The tables of a page: the model tables (first column "model") or the measurement tables (all others
# outside folded details).
_TABLES = """(kind) => [...document.querySelectorAll('article table')].filter(t => {
  const first = (t.querySelector('th') || {}).textContent || '';
  return kind === 'model' ? first.trim() === 'model' : !t.closest('details');
})"""
# Problems of those tables: sideways scrolling of the page, of the table or of any element around it
# that clips it, and header cells out of view.
_TABLE_PROBLEMS = """(kind) => {
  const problems = [];
  const page = document.documentElement;
  if (page.scrollWidth > window.innerWidth + 1) problems.push(`the page scrolls sideways (${page.scrollWidth} px)`);
  const tables = (""" + _TABLES + """)(kind);
  if (!tables.length) problems.push(`no ${kind} table on the page`);
  tables.forEach((table, i) => {
    let visibleRight = window.innerWidth;
    for (let el = table; el && el !== document.body; el = el.parentElement) {
      if (getComputedStyle(el).overflowX === 'visible') continue;
      visibleRight = Math.min(visibleRight, el.getBoundingClientRect().right);
      if (el.scrollWidth > el.clientWidth + 1)
        problems.push(`table ${i}: <${el.tagName.toLowerCase()} class="${el.className}"> scrolls sideways ` +
                      `(${el.scrollWidth} px of content in ${el.clientWidth})`);
    }
    table.querySelectorAll('th').forEach(th => {
      const r = th.getBoundingClientRect();
      if (r.width < 1 || r.right > visibleRight + 1) problems.push(`table ${i}: column "${th.textContent}" is out of view`);
    });
  });
  return problems;
}"""


def _shoot(tab, name: str, full_page: bool = False) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


@pytest.mark.parametrize("width", WIDTHS)
def test_zoo_tables_show_every_column_and_whole_names(site, browser, width):
    tab = _open(browser, site[0], "zoo", width)
    _shoot(tab, f"zoo-{width}")
    problems = tab.evaluate(_TABLE_PROBLEMS, "model")
    # The first column's names: one line box each (a name broken inside a word has two).
    # (the variant tables, those with a params column; the dense-prediction results table repeats some names)
    names = tab.evaluate("() => (" + _TABLES + """)('model')
        .filter(t => [...t.querySelectorAll('th')].some(th => th.textContent.trim() === 'params'))
        .flatMap(t => [...t.tBodies[0].rows])
        .map(tr => [tr.cells[0].textContent.trim(), [...tr.cells[0].querySelectorAll('code')]
                    .map(c => c.getClientRects().length)])""")
    variant_tables = tab.locator("article table").filter(has=tab.locator("th", has_text="params"))
    for i in range(variant_tables.count()):
        variant_tables.nth(i).screenshot(path=str(SCREENSHOTS / f"zoo-{width}-table{i + 1}.png"))
    tab.close()
    assert not problems, "\n".join(problems)
    assert sorted(n for n, _ in names) == sorted(metaformer.VARIANTS)
    broken = [n for n, boxes in names if boxes != [1]]
    assert not broken, f"model names wrapped at {width} px: {broken}"


@pytest.mark.parametrize("width", WIDTHS)
def test_performance_page_describes_the_runs_and_shows_every_row(site, browser, width):
    results = docs_hook("results_page")
    files = sorted(p for p in RESULTS.glob("*") if p.suffix in (".json", ".jsonl", ".csv")) if RESULTS.is_dir() else []
    loaded = [results.load(p) for p in files]
    tab = _open(browser, site[0], "performance", width)
    _shoot(tab, f"performance-{width}", full_page=True)
    problems = tab.evaluate(_TABLE_PROBLEMS, "results") if loaded else []
    rows = tab.evaluate("() => (" + _TABLES + ")('results').map(t => t.tBodies[0].rows.length)")
    text = tab.inner_text("article")
    tab.close()
    assert not problems, "\n".join(problems)
    assert rows == [len(records) for _, records in loaded if records]
    for setup, _ in loaded:  # the chart and the table say what was measured, where
        for key in ("model", "batch", "cpu", "device", "dtype"):
            if setup.get(key) is not None:
                assert str(setup[key]) in text, f"{key} = {setup[key]} is not on the performance page"
    if not files:
        assert "No benchmark figures" in text


def test_api_pages_wrap_signatures_and_fit_their_tables(site, browser):
    folder = site[0]
    pages = ["api"] + sorted(f"api/{p.parent.name}" for p in (folder / "api").glob("*/index.html"))
    tab = browser.new_page(viewport={"width": WIDTHS[0], "height": 1000})
    overflowing, count = [], 0
    for page in pages:
        tab.goto((folder / page / "index.html").as_uri())
        if page in ("api", "api/model"):
            _shoot(tab, f"{page.replace('/', '-')}-{WIDTHS[0]}")
        count += tab.evaluate("() => document.querySelectorAll('.doc-signature').length")
        overflowing += [f"{page}: {text}" for text in tab.evaluate(
            """() => [...document.querySelectorAll('.doc-signature code, article table')].filter(el => {
              for (let a = el; a && a.tagName !== 'ARTICLE'; a = a.parentElement)
                if (getComputedStyle(a).overflowX !== 'visible' && a.scrollWidth > a.clientWidth + 1) return true;
              return false;
            }).map(el => el.textContent.trim().replace(/\\s+/g, ' ').slice(0, 60))""")]
    tab.close()
    assert count >= len(metaformer.__all__)
    assert not overflowing, f"signatures or tables that scroll sideways at {WIDTHS[0]} px: {overflowing}"
