"""The documentation: every public name is documented and the generated pages are right (the built site:
test_docs_site.py)."""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import pytest
from helpers import docs_hook

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
    table = docs_hook("generate").zoo_markdown()
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
    table = docs_hook("generate").zoo_markdown()
    for name, figures in release.items():
        cells = " | ".join("—" if f is None else f"{f:.1f}" for f in figures)
        assert f"| [`{name}`](#{name}) | {cells} |" in table


# The shapes the benchmarks write: benchmarks/bench_cpu.py (cpu.json), bench_pool_mixer_gpu.py (gpu.json and
# gpu_mixer.json); figures made up.
CPU_RUN = {"model": "poolformer_s12", "batch": 16, "size": 224, "dtype": "float32", "macs_per_image": 1.8e9,
           "inference": {"timm": {"median_s": 0.57, "img_per_s": 27.9, "speedup_vs_timm": 1.0, "times_s": [0.5, 0.6]},
                         "ours": {"median_s": 0.37, "img_per_s": 43.7, "speedup_vs_timm": 1.57, "times_s": [0.3]}},
           "train_step": {"timm": {"median_s": 1.38, "img_per_s": 11.6},
                          "ours": {"median_s": 1.17, "img_per_s": 13.7}},
           "machine": {"cpu": "Some CPU 9000", "os_cpu_count": 2, "torch_threads": 2, "loadavg_before": [0.5, 0.4, 0.3]},
           "reps": 11}
GPU_RUN = {"kind": "pool_mixer_gpu", "machine": {"device": "NVIDIA H200", "peak_gbps": 4800.0},
           "settings": {"batch": 64, "timer": "do_bench"}, "triton_config": {"BLOCK": 1024},
           "mixer_file": "gpu_mixer.json", "model": "poolformer_s12", "model_batch": 128, "autocast": "bfloat16",
           "inference": {v: {"median_ms": ms, "img_per_s": 128 / ms * 1e3} for v, ms in (("timm", 9.0), ("ours", 6.0))},
           "train_step": {v: {"median_ms": ms, "peak_mem_mib": 900.0} for v, ms in (("timm", 30.0), ("ours", 20.0))}}
MIXER_RUN = {"machine": {"device": "NVIDIA H200"}, "records": [
    {"dtype": "bf16", "layout": "channels_last", "shape": f"64x{s}x{s}", "pass": "fwd", "variant": v, "median_ms": m}
    for s in (56, 28) for v, m in (("eager", 0.4), ("triton", 0.1))]}


def test_benchmark_page_placeholder():
    results = docs_hook("results_page")
    assert results.benchmarks_markdown(Path("/nonexistent")) == results.HOW_TO_BENCHMARK
    assert docs_hook("generate").HOW_TO_BENCHMARK == results.HOW_TO_BENCHMARK


def test_benchmark_page_describes_each_run_and_keeps_every_row(tmp_path):
    results = docs_hook("results_page")
    folder = tmp_path / "benchmarks" / "results"
    folder.mkdir(parents=True)
    for name, data in (("cpu.json", CPU_RUN), ("gpu.json", GPU_RUN), ("gpu_mixer.json", MIXER_RUN)):
        (folder / name).write_text(json.dumps(data))
    (folder / "kernels.csv").write_text("shape,dtype,speedup\n64x56,bf16,2.5\n512x7,fp32,1.5\n")
    page = results.benchmarks_markdown(folder, tmp_path)
    assert page.count("<svg") == 4
    sections = page.split("\n### ")
    cpu = next(s for s in sections if "`benchmarks/results/cpu.json`" in s)
    # the setup in words: model, batch, image size, dtype, CPU, threads; the script that wrote it
    for fact in ("poolformer_s12", "batch 16", "224x224", "float32", "Some CPU 9000", "torch threads 2",
                 "benchmarks/bench_cpu.py"):
        assert fact in cpu, fact
    table = [line for line in cpu.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + 4  # header + every (pass, variant)
    assert "times_s" not in table[0] and "median_<wbr>s" in table[0]  # lists stay in the file
    assert "**img_per_s**: images per second" in cpu and "**ours**: `metaformer.create(name)`" in cpu
    assert "`loadavg_before` | 0.5 / 0.4 / 0.3" in cpu  # everything else recorded, folded away
    gpu = next(s for s in sections if "`benchmarks/results/gpu.json`" in s)
    assert "NVIDIA H200" in gpu and "batch 128" in gpu and "autocast bfloat16" in gpu
    assert sum(line.startswith("| ") and "---" not in line for line in gpu.split("???")[0].splitlines()) == 1 + 4
    mixer = next(s for s in sections if "`benchmarks/results/gpu_mixer.json`" in s)
    assert all(f"64x{s}x{s}" in mixer for s in (56, 28)) and "lower is better" in mixer
    assert "64x56" in page and "speedup, higher is better" in page


def test_benchmark_page_reads_the_repository_results():
    results = docs_hook("results_page")
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        setup, records = results.load(path)
        assert records, f"{path.name}: no measurements found"
        assert all(not isinstance(v, (list, dict)) for r in records for v in r.values())


def test_docstring_roles_become_optional_autorefs():
    out = docs_hook("generate").on_page_content("see :func:<code>~metaformer.zoo.list_models</code>.", None, None, None)
    assert out == ('see <autoref identifier="metaformer.zoo.list_models" optional><code>list_models</code>'
                   '</autoref>.')


def test_nothing_cites_notes_that_are_not_in_the_repository():
    """Facts are stated with their sources (the papers, the original repositories), never as a pointer to
    working notes that users do not have."""
    pattern = re.compile(r"REFERENCE(-BASELINES)?\.md|/work/" + "shared|\\.\\./shared")
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "mkdocs.yml", *DOCS.rglob("*.md"),
             *(ROOT / "examples").rglob("*.*"), *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
             *(ROOT / "src").rglob("*.py")]
    # src/metaformer/cli/train.py's module docstring is reworded on the command-line branch (issue 16, 2-4, 7).
    files = [f for f in files if "cli" not in f.relative_to(ROOT).parts[:3]]
    cited = [f"{f.relative_to(ROOT)}:{n}" for f in files if f.is_file()
             for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not cited, f"cites notes absent from the repository: {cited}"
