"""The documentation: every public name is documented, the generated pages are right, the site builds."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import metaformer

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))
MODULE_PAGES = ["mixers", "layers", "blocks", "model", "zoo", "weights", "hub"]


def _directives() -> set:
    """Every ``::: identifier`` of the API reference pages."""
    found = set()
    for page in API_PAGES:
        found.update(re.findall(r"^:::\s+([\w.]+)\s*$", page.read_text(), flags=re.M))
    return found


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "_hooks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", metaformer.__all__)
def test_public_name_is_in_the_api_reference(name):
    assert f"metaformer.{name}" in _directives(), (
        f"metaformer.{name} is public but no API page renders it; add `::: metaformer.{name}` to docs/api/index.md")


@pytest.mark.parametrize("name", metaformer.__all__)
def test_public_name_has_a_docstring(name):
    obj = getattr(metaformer, name)
    if not (inspect.isclass(obj) or callable(obj)):
        pytest.skip(f"{name} is data ({type(obj).__name__}); its page describes it")
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"metaformer.{name} has no docstring"
    # getdoc falls back to a base class's docstring; a public class needs its own.
    if inspect.isclass(obj):
        assert obj.__doc__ and obj.__doc__.strip(), f"metaformer.{name} has no docstring of its own"


@pytest.mark.parametrize("module", MODULE_PAGES)
def test_module_has_an_api_page(module):
    assert f"metaformer.{module}" in _directives(), f"docs/api/{module}.md should render metaformer.{module}"
    assert importlib.import_module(f"metaformer.{module}").__doc__, f"metaformer.{module} has no module docstring"


def test_every_nav_page_exists():
    yaml = pytest.importorskip("yaml")

    class _Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml may use python tags (!!python/name:...) in extensions; ignore any tag.
    _Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)

    def pages(nav):
        for item in nav:
            if isinstance(item, str):
                yield item
            elif isinstance(item, dict):
                for value in item.values():
                    yield from (pages(value) if isinstance(value, list) else [value])

    others = {"cli.md", "kernels.md"}  # written by others; the build hook stubs them while missing
    missing = [p for p in pages(config["nav"]) if not (DOCS / p).is_file() and p not in others]
    assert not missing, f"pages in the nav but not in docs/: {missing}"


def test_zoo_table_lists_every_model_with_its_sources():
    table = _hooks().zoo_markdown()
    for name, variant in metaformer.VARIANTS.items():
        assert f"| [`{name}`](#{name}) |" in table
        assert f"{variant.params:,}" in table
        for source in variant.sources:
            assert f"`{name}.{source.tag}`" in table
            assert (source.hf_hub_id or source.url) in table
    assert f"{len(metaformer.VARIANTS)} models" in table


def test_zoo_lists_the_release_dense_results():
    from metaformer.zoo import DENSE_RESULTS

    # sail-sg/poolformer segmentation/README.md (Semantic FPN, ADE20K) and detection/README.md (COCO, 1x)
    release = {"poolformer_s12": (37.2, 36.2, 37.3, 34.6), "poolformer_s24": (40.3, 38.9, 40.1, 37.0),
               "poolformer_s36": (42.0, 39.5, 41.0, 37.7), "poolformer_m36": (42.4, None, None, None),
               "poolformer_m48": (42.7, None, None, None)}
    assert {name: tuple(vars(r).values()) for name, r in DENSE_RESULTS.items()} == release
    table = _hooks().zoo_markdown()
    for name, figures in release.items():
        cells = " | ".join("—" if f is None else f"{f:.1f}" for f in figures)
        assert f"| [`{name}`](#{name}) | {cells} |" in table
        assert f"| {metaformer.VARIANTS[name].top1:.1f} | {figures[0]:.1f} |" in table  # the zoo's mIoU column


def test_benchmark_page_placeholder_and_plot(tmp_path):
    hooks = _hooks()
    assert hooks.benchmarks_markdown(tmp_path / "absent") == hooks.HOW_TO_BENCHMARK
    (tmp_path / "models.json").write_text(json.dumps([
        {"model": "poolformer_s12", "mode": "inference", "img_per_sec": 100.0, "batch_size": 8},
        {"model": "poolformer_s24", "mode": "inference", "img_per_sec": 50.0, "batch_size": 8}]))
    (tmp_path / "kernels.csv").write_text("shape,dtype,speedup\n64x56,bf16,2.5\n512x7,fp32,1.5\n")
    hooks.ROOT = tmp_path  # results paths are shown relative to the repository root
    page = hooks.benchmarks_markdown(tmp_path)
    assert page.count("<svg") == 2
    assert "img_per_sec" in page and "poolformer_s24" in page and "speedup" in page and "64x56" in page


def test_docstring_roles_become_optional_autorefs():
    out = _hooks().on_page_content("see :func:<code>~metaformer.zoo.list_models</code>.", None, None, None)
    assert out == ('see <autoref identifier="metaformer.zoo.list_models" optional><code>list_models</code>'
                   '</autoref>.')


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs / mkdocstrings not installed (pip install -e '.[docs]')")
    if importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    zoo = (site / "zoo" / "index.html").read_text()
    assert all(name in zoo for name in metaformer.VARIANTS)
    api = (site / "api" / "index.html").read_text()
    for name in metaformer.__all__:
        assert f'id="metaformer.{name}"' in api, f"metaformer.{name} missing from the built API page"
