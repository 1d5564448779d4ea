"""MkDocs hooks: pages generated from the code at every build, so the docs never drift from it.

- ``<!-- metaformer:zoo-table -->`` in a page becomes the model table built from
  ``metaformer.zoo.VARIANTS`` (names, parts, parameters, MACs, release top-1, weight sources and tags)
  and the release's dense-prediction results (ADE20K mIoU, COCO AP) from ``metaformer.zoo.DENSE_RESULTS``.
- ``<!-- metaformer:zoo-count -->`` becomes the number of registered models.
- ``<!-- metaformer:benchmarks -->`` becomes, per result file in ``benchmarks/results/``, the run's
  setup, a bar chart (inline SVG) and the complete table (``results_page.py``), or how to produce them.
- ``:func:`x``` style roles left in docstrings become (optional) cross-references.
- Pages other helpers write (``cli.md``, ``kernels.md``) get a stub while they do not exist yet, so
  that the navigation stays valid.

Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # mkdocs loads this file alone: find results_page.py

from results_page import HOW_TO_BENCHMARK, benchmarks_markdown  # noqa: E402

__all__ = ["zoo_markdown", "benchmarks_markdown", "HOW_TO_BENCHMARK"]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
STUBS = {
    "cli.md": "# Command line\n\nThe `metaformer` command (validate, train, predict, benchmark, info, list); "
              "this page is being written. Run `metaformer --help` meanwhile.\n",
    "kernels.md": "# Kernels\n\nThe fused pooling kernels of `metaformer.kernels`; this page is being written. "
                  "See the [API reference](api/kernels.md) meanwhile.\n",
}


# ----------------------------------------------------------------------------------- events
def on_files(files, config, **kwargs):
    """Adds a stub for every page that is in the navigation but not (yet) written."""
    from mkdocs.structure.files import File

    for name, text in STUBS.items():
        if files.get_file_from_path(name) is None:
            files.append(File.generated(config, name, content=text))
    return files


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    """Replaces the generation markers by their content."""
    if "<!-- metaformer:" not in markdown:
        return markdown
    markdown = markdown.replace("<!-- metaformer:zoo-count -->", str(len(_variants())))
    markdown = markdown.replace("<!-- metaformer:zoo-table -->", zoo_markdown())
    markdown = markdown.replace("<!-- metaformer:benchmarks -->", benchmarks_markdown(RESULTS, ROOT))
    return markdown


_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|exc|obj|const):<code>(~?)([\w.]+)</code>")


def on_page_content(html_text: str, page, config, files, **kwargs) -> str:
    """Turns the reST roles of docstrings (``:func:`metaformer.create```) into optional autorefs.

    They link when the target is documented and stay plain code otherwise (no build warning).
    """

    def link(match: re.Match) -> str:
        short, identifier = match.group(1), match.group(2)
        title = identifier.rsplit(".", 1)[-1] if short else identifier
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    return _ROLE.sub(link, html_text)


# --------------------------------------------------------------------------------- the zoo
def _variants() -> dict:
    from metaformer.zoo import VARIANTS

    return VARIANTS


def _mixer_name(mixer: Any) -> str:
    base = mixer
    while hasattr(base, "func"):  # functools.partial
        base = base.func
    name = getattr(base, "__name__", str(base))
    size = getattr(mixer, "keywords", {}).get("spatial_size")
    return f"{name}({size[0]}x{size[1]})" if size else name


def _mixers(variant) -> str:
    """One name when every stage has the same mixer, else the stages' names with repeats counted."""
    names = [_mixer_name(m) for m in variant.mixers]
    runs: list = []
    for n in names:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return names[0] if len(runs) == 1 else ", ".join(f"{n} x{k}" if k > 1 else n for n, k in runs)


def _source_link(source) -> str:
    if source.hf_hub_id:
        if source.hf_filename == "model.safetensors":
            return f"[`{source.hf_hub_id}`](https://huggingface.co/{source.hf_hub_id})"
        url = f"https://huggingface.co/{source.hf_hub_id}/blob/main/{source.hf_filename}"
        return f"[`{source.hf_hub_id}/{source.hf_filename}`]({url})"
    return f"[GitHub release]({source.url})"


def _figure(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def dense_markdown() -> str:
    """The release's dense-prediction results, generated from ``metaformer.zoo.DENSE_RESULTS``."""
    from metaformer.zoo import DENSE_RESULTS

    lines = ["## Dense prediction (release)", "",
             "The PoolFormer release's results with ImageNet-1k pretrained backbones (`metaformer.zoo.DENSE_RESULTS`): "
             "Semantic FPN on ADE20K (40k iterations, single-scale mIoU on the validation set, mmsegmentation "
             "0.19) and RetinaNet / Mask R-CNN on COCO val2017 (1x schedule, mmdetection 2.19), from the "
             "`segmentation/` and `detection/` READMEs of [sail-sg/poolformer](https://github.com/sail-sg/poolformer) "
             "(*MetaFormer is Actually What You Need for Vision*, [arXiv 2111.11418](https://arxiv.org/abs/2111.11418)). Build the same models with "
             "`metaformer.create_segmenter` and `metaformer.create_detector`, and load the release's checkpoints "
             "into them (see [segmentation and detection](how-to/segmentation.md)).", "",
             '<div class="mf-table" markdown>', "",
             "| model | ADE20K mIoU (Semantic FPN) | COCO box AP (RetinaNet) | COCO box AP (Mask R-CNN) | "
             "COCO mask AP (Mask R-CNN) |", "|---|--:|--:|--:|--:|"]
    for name, r in DENSE_RESULTS.items():
        lines.append(f"| [`{name}`](#{name}) | {_figure(r.ade20k_miou)} | {_figure(r.retinanet_box_ap)} | "
                     f"{_figure(r.mask_rcnn_box_ap)} | {_figure(r.mask_rcnn_mask_ap)} |")
    return "\n".join(lines + ["", "</div>", ""])


RELEASES = {
    "poolformer": ("PoolFormer release", "*MetaFormer is Actually What You Need for Vision* (CVPR 2022, "
                   "[arXiv 2111.11418](https://arxiv.org/abs/2111.11418)), code and weights "
                   "[sail-sg/poolformer](https://github.com/sail-sg/poolformer): PoolFormer and the hybrid "
                   "MetaFormers of its token-mixer study."),
    "baselines": ("MetaFormer baselines", "*MetaFormer Baselines for Vision* (TPAMI 2024, "
                  "[arXiv 2210.13452](https://arxiv.org/abs/2210.13452)), code and weights "
                  "[sail-sg/metaformer](https://github.com/sail-sg/metaformer)."),
}


def _zoo_table(variants: list) -> list:
    lines = ['<div class="mf-table mf-zoo" markdown>', "",
             "| model | depths | widths | token mixers | params | MACs | top-1 | crop | weights |",
             "|---|---|---|---|--:|--:|--:|--:|---|"]
    for v in variants:
        tags = (f"`{v.sources[0].tag}`" + (f" [+{len(v.sources) - 1}](#{v.name})" if len(v.sources) > 1 else "")
                if v.sources else "none")
        top1 = f"{v.top1:.1f}" if v.top1 is not None else "—"
        macs = f"{v.macs:.1f}G" if v.macs is not None else "—"
        lines.append(f"| [`{v.name}`](#{v.name}) | {'-'.join(map(str, v.depths))} | {'-'.join(map(str, v.dims))} | "
                     f"{_mixers(v)} | {v.params:,} | {macs} | {top1} | {v.crop_pct:g} | {tags} |")
    return lines + ["", "</div>", ""]


def zoo_markdown() -> str:
    """The model tables (one per release) and every weight source, generated from ``metaformer.zoo.VARIANTS``."""
    variants = list(_variants().values())
    lines = []
    for paper, (title, about) in RELEASES.items():
        rows = [v for v in variants if (v.paper == "poolformer") == (paper == "poolformer")]
        lines += [f"## {title}", "", about, ""] + _zoo_table(rows)
    lines += [f"{len(variants)} models. *depths* and *widths*: blocks and channels per stage. *params*, *MACs* "
              "(multiply-accumulates per 224x224 image) and ImageNet-1k *top-1* are the figures the registry "
              "records from the releases (`Variant.params`, `Variant.macs`, `Variant.top1`), not measurements of "
              "this library; a dash means none is recorded. *crop*: the evaluation crop fraction. *weights*: "
              "the default tag, and how many more sources the model has (all listed below).", "", dense_markdown(),
              "## Weight sources", "",
              "Every source of every model: load one with `metaformer.create(\"NAME.TAG\", pretrained=True)` "
              "(`pretrained=True` without a tag takes the first).", ""]
    for v in variants:
        lines += [f"### {v.name} {{ #{v.name} }}", ""]
        if not v.sources:
            lines += ["No released weights.", ""]
            continue
        lines += ["| name.tag | layout | file | input | classes | crop |", "|---|---|---|---|--:|--:|"]
        for s in v.sources:
            lines.append(f"| `{v.name}.{s.tag}` | `{s.layout}` | {_source_link(s)} | "
                         f"{s.input_size[1]}x{s.input_size[2]} | {s.num_classes:,} | {s.crop_pct:g} |")
        lines.append("")
    return "\n".join(lines)
