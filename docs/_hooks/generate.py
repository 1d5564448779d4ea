"""MkDocs hooks: pages generated from the code at every build, so the docs never drift from it.

- ``<!-- metaformer:zoo-table -->`` in a page becomes the model table built from
  ``metaformer.zoo.VARIANTS`` (names, parts, parameters, MACs, release top-1, ADE20K mIoU, weight sources
  and tags) and the release's dense-prediction results from ``metaformer.zoo.DENSE_RESULTS``.
- ``<!-- metaformer:zoo-count -->`` becomes the number of registered models.
- ``<!-- metaformer:benchmarks -->`` becomes a bar chart (inline SVG) and a table of the benchmark
  figures found in ``benchmarks/results/*.json`` / ``*.csv``, or a sentence saying how to produce them.
- ``:func:`x``` style roles left in docstrings become (optional) cross-references.
- Pages other helpers write (``cli.md``, ``kernels.md``) get a stub while they do not exist yet, so
  that the navigation stays valid.

Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from pathlib import Path
from typing import Any

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
    markdown = markdown.replace("<!-- metaformer:benchmarks -->", benchmarks_markdown(RESULTS))
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
    names = [_mixer_name(m) for m in variant.mixers]
    return names[0] if len(set(names)) == 1 else ", ".join(names)


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
             "`segmentation/` and `detection/` READMEs of sail-sg/poolformer. Build the same models with "
             "`metaformer.create_segmenter` and `metaformer.create_detector`, and load the release's checkpoints "
             "into them (see [segmentation and detection](how-to/segmentation.md)).", "",
             "| model | ADE20K mIoU (Semantic FPN) | COCO box AP (RetinaNet) | COCO box AP (Mask R-CNN) | "
             "COCO mask AP (Mask R-CNN) |", "|---|--:|--:|--:|--:|"]
    for name, r in DENSE_RESULTS.items():
        lines.append(f"| [`{name}`](#{name}) | {_figure(r.ade20k_miou)} | {_figure(r.retinanet_box_ap)} | "
                     f"{_figure(r.mask_rcnn_box_ap)} | {_figure(r.mask_rcnn_mask_ap)} |")
    return "\n".join(lines + [""])


def zoo_markdown() -> str:
    """The model tables, generated from ``metaformer.zoo.VARIANTS`` and ``metaformer.zoo.DENSE_RESULTS``."""
    from metaformer.zoo import DENSE_RESULTS

    variants = list(_variants().values())
    lines = [
        "| model | release | depths | dims | token mixers | params | MACs (224) | top-1 (release) | "
        "ADE20K mIoU (release) | crop | weights (default tag first) |",
        "|---|---|---|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for v in variants:
        tags = ", ".join(f"`{s.tag}`" for s in v.sources) or "none"
        top1 = f"{v.top1:.1f}" if v.top1 is not None else "—"
        macs = f"{v.macs:.1f}G" if v.macs is not None else "—"
        release = "PoolFormer (v1)" if v.paper == "poolformer" else "MetaFormer baselines"
        miou = _figure(DENSE_RESULTS[v.name].ade20k_miou) if v.name in DENSE_RESULTS else "—"
        lines.append(
            f"| [`{v.name}`](#{v.name}) | {release} | {'-'.join(map(str, v.depths))} | "
            f"{'-'.join(map(str, v.dims))} | {_mixers(v)} | {v.params:,} | {macs} | {top1} | {miou} | "
            f"{v.crop_pct:g} | {tags} |")
    lines += ["", f"{len(variants)} models. Parameters, MACs at 224x224, ImageNet-1k top-1 and ADE20K mIoU "
              "(Semantic FPN) are the figures the registry records from the releases (`Variant.params`, "
              "`Variant.macs`, `Variant.top1`, `metaformer.zoo.DENSE_RESULTS`), not measurements of this library; "
              "a dash means the release reports no such figure for that model.", "", dense_markdown(),
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


# ---------------------------------------------------------------------------- benchmarks
HOW_TO_BENCHMARK = (
    "No benchmark figures are in the repository yet (none found under `benchmarks/results/`). "
    "To produce them, run for example `metaformer benchmark -m poolformer_s12 --json > "
    "benchmarks/results/poolformer_s12.json` (see the [command line](cli.md)), or the kernel benchmark "
    "`python benchmarks/bench_pool_mixer_gpu.py` on a GPU (see [kernels](kernels.md)), and save the "
    "figures under `benchmarks/results/` as JSON (one object, a list of objects or JSON lines) or CSV "
    "(one row per measurement): the next build of this site plots them here."
)
# Preferred metrics, in order; the first one present in the records is plotted.
METRICS = ("img_per_s", "img_per_sec", "images_per_sec", "throughput", "speedup", "gbps", "GB/s", "step_ms_median", "ms",
           "median_ms", "time_ms", "time")


def read_records(path: Path) -> list:
    """The measurement records (dicts) of one JSON, JSON-lines or CSV file."""
    text = path.read_text()
    if path.suffix == ".csv":
        records = list(csv.DictReader(text.splitlines()))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
            # {"inference": {"timm": {...}, "ours": {...}}, ...}: one record per (section, variant)
            nested = [{"pass": section, "variant": name,
                       **{k: v for k, v in fields.items() if not isinstance(v, (list, dict))}}
                      for section, variants in data.items() if isinstance(variants, dict)
                      and variants and all(isinstance(f, dict) for f in variants.values())
                      for name, fields in variants.items()]
            data = lists[0] if lists else nested or [data]
        records = [r for r in data if isinstance(r, dict)]
    return [{k: _number(v) for k, v in r.items()} for r in records]


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _metric(records: list) -> str | None:
    keys = [k for k in records[0] if all(_is_number(r.get(k)) for r in records)]
    for want in METRICS:
        for k in keys:
            if k.lower() == want.lower():
                return k
    return keys[0] if keys else None


def _label(record: dict, metric: str) -> str:
    parts = [f"{v}" for k, v in record.items() if k != metric and isinstance(v, str) and len(v) < 40]
    return " · ".join(parts) or "?"


def bar_chart_svg(labels: list, values: list, metric: str) -> str:
    """A horizontal bar chart as inline SVG (no plotting library needed)."""
    width, label_w, bar_h, gap = 760, 330, 18, 6
    top = 24
    height = top + len(values) * (bar_h + gap) + 8
    peak = max(values) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" style="max-width:100%;font:12px sans-serif">',
             f'<text x="{label_w}" y="14" fill="currentColor">{html.escape(metric)}</text>']
    for i, (label, value) in enumerate(zip(labels, values)):
        y = top + i * (bar_h + gap)
        w = max(1.0, (width - label_w - 90) * value / peak)
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" fill="currentColor">'
                     f'{html.escape(label[:52])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#5c6bc0"/>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 13}" fill="currentColor">{value:.4g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def benchmarks_markdown(folder: Path) -> str:
    """A chart and a table per results file under ``folder``, or how to produce them."""
    files = sorted(p for p in folder.glob("*") if p.suffix in (".json", ".jsonl", ".csv")) if folder.is_dir() else []
    out = []
    for path in files:
        try:
            records = read_records(path)
        except (OSError, ValueError) as e:
            out += [f"### `{path.name}`", "", f"Could not read this file: {html.escape(str(e))}", ""]
            continue
        if not records:
            continue
        keys = list(dict.fromkeys(k for r in records for k in r))
        metric = _metric(records)
        out += [f"### `{path.relative_to(ROOT)}`", ""]
        if metric:
            out += [bar_chart_svg([_label(r, metric) for r in records], [float(r[metric]) for r in records],
                                  metric), ""]
        out += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in records:
            cells = [f"{r[k]:.4g}" if _is_number(r.get(k)) and isinstance(r.get(k), float) else str(r.get(k, ""))
                     for k in keys]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out) if out else HOW_TO_BENCHMARK
