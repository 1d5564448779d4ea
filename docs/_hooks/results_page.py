"""The performance page: benchmark result files rendered as a setup summary, a chart and a full table.

Reads every ``*.json``, ``*.jsonl`` and ``*.csv`` under ``benchmarks/results/`` whatever fields it
holds: a list of flat records, ``{"records": [...]}``, or the benchmarks' own shape (scalar settings
at the top, ``"machine"``/``"settings"`` objects, and sections such as ``"inference": {variant:
{field: number}}``). Scalars at the top and in the metadata objects describe the setup; each
(section, variant) becomes a table row; lists (per-repetition times) stay in the file. Known field
names get a plain-words legend; unknown ones are shown as recorded.
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HOW_TO_BENCHMARK = (
    "No benchmark figures are in the repository yet (none found under `benchmarks/results/`). "
    "To produce them, run `python benchmarks/bench_cpu.py` (whole model against timm on a CPU, writes "
    "`benchmarks/results/cpu.json`) or `python benchmarks/bench_pool_mixer_gpu.py` on a GPU (see "
    "[kernels](kernels.md)), or save any figures under `benchmarks/results/` as JSON (one object, a list of "
    "objects or JSON lines) or CSV (one row per measurement): the next build of this site shows them here."
)

# Which script writes which file (shown under the file's title).
SCRIPTS = {"cpu.json": "benchmarks/bench_cpu.py", "gpu.json": "benchmarks/bench_pool_mixer_gpu.py",
           "gpu_mixer.json": "benchmarks/bench_pool_mixer_gpu.py", "gpu_session.json": "benchmarks/gpu_session.py"}
# Titles of the files whose records do not name a model.
TITLES = {"gpu_mixer.json": "The pooling mixer's half-block (fused kernels against PyTorch)"}
# Objects holding facts about the run rather than measurements.
META = ("machine", "settings", "setup", "environment", "triton_config", "config")
# Keys shown in the one-line summary, in this order, with their labels.
SUMMARY = (("model", "model"), ("kind", "benchmark"), ("model_batch", "batch"), ("batch", "batch"),
           ("batch_size", "batch"), ("size", "image side"), ("dtype", "dtype"), ("autocast", "autocast"),
           ("memory_format", "memory format"), ("cpu", "CPU"), ("device", "device"),
           ("os_cpu_count", "logical CPUs"), ("torch_threads", "torch threads"), ("torch", "torch"))
# Plain-words meaning of the fields the benchmarks write.
COLUMNS = {
    "pass": "what is timed: `inference` (forward in eval mode, no autograd), `train_step` (forward and backward); "
            "`fwd`, `fwd+bwd` for the mixer alone",
    "dtype": "data type of the tensors",
    "layout": "memory layout of the input: `channels_last` or contiguous NCHW",
    "shape": "the mixer's input per image, channels x height x width; `poolformer_s12 (blocks x stages)` sums "
             "each stage's time times its number of blocks",
    "variant": "which implementation (see the variants below)",
    "median_s": "median wall time of one batch over the timed rounds, seconds (lower is better)",
    "min_s": "fastest round, seconds",
    "median_ms": "median time of one call, milliseconds (lower is better)",
    "min_ms": "fastest call, milliseconds",
    "img_per_s": "images per second: batch size / median time (higher is better)",
    "img_per_sec": "images per second (higher is better)",
    "speedup_vs_timm": "timm's median time / this variant's: above 1 is faster than timm",
    "gemm_peak_share": "achieved FLOP/s (2 x MACs per image x images/s) as a share of the fp32 matrix-multiply "
                       "peak measured on the same machine in the same run",
    "peak_mem_mib": "peak GPU memory of one step, MiB",
    "peak_mem_vs_timm": "peak memory / timm's (below 1 uses less)",
    "triton_speedup": "this variant's time / the Triton kernels' time",
    "gbps": "memory bandwidth on the ideal traffic, GB/s",
    "max_rel_error": "largest error against the fp32 reference, relative to the largest magnitude",
    "vs_timm_best": "timm's best eager time (NCHW or channels_last) / this variant's: above 1 is faster",
    "vs_timm_compiled": "timm under `torch.compile` (best layout) / this variant's: above 1 is faster",
    "train_peak_mib": "peak resident memory of training steps above the memory after building, MiB (CPU)",
    "peak_rss_mib": "peak resident memory of the process, MiB",
    "base_rss_mib": "resident memory after building model, optimiser and batch, MiB",
}
VARIANTS = {
    "timm": "`timm.create_model(name)`, timm's port, eager",
    "ours": "`metaformer.create(name)`, the default forward (fused pooling mixer, channels_last and fused MLPs "
            "on CPU)",
    "ours_optimized": "`metaformer.optimize_for_inference(model)`: norms and layer scales folded into the "
                      "convolutions",
    "timm_nchw": "`timm.create_model(name)`, eager, NCHW batch",
    "timm_cl": "timm's model and batch in channels_last, eager",
    "timm_compiled": "timm's model under `torch.compile` (Inductor), NCHW",
    "timm_compiled_cl": "timm's model under `torch.compile` (Inductor), channels_last",
    "ours_compiled": "our model under `torch.compile` (Inductor)",
    "eager": "the plain PyTorch composition (GroupNorm, pooling, subtraction, scale, residual)",
    "compiled": "that composition under `torch.compile`",
    "triton": "metaformer's Triton kernels",
    "torch": "metaformer's fused pure-PyTorch path",
}
# Preferred metric of the chart, in order, and whether higher is better.
METRICS = (("img_per_s", True), ("img_per_sec", True), ("images_per_sec", True), ("throughput", True),
           ("speedup", True), ("triton_speedup", True), ("gbps", True), ("median_ms", False), ("median_s", False),
           ("ms", False), ("time_ms", False), ("time", False))


# ------------------------------------------------------------------------------------ reading
def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load(path: Path) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """(setup, records) of one results file: the run's settings and one flat dict per measurement."""
    text = path.read_text()
    if path.suffix == ".csv":
        return {}, [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(text.splitlines())]
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    setup: Dict[str, Any] = {}
    if isinstance(data, list):
        records = [r for r in data if isinstance(r, dict)]
    elif isinstance(data, dict):
        records = []
        for key, value in data.items():
            if _scalar(value) or (isinstance(value, list) and all(_scalar(v) for v in value) and len(value) <= 4):
                setup[key] = value
        for key, value in data.items():
            if isinstance(value, dict) and key in META:  # the top level's own fields win
                for k, v in value.items():
                    if _scalar(v) or isinstance(v, list):
                        setup.setdefault(k, v)
            elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                records += value
            elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                records += [{"pass": key, "variant": name, **fields} for name, fields in value.items()]
        if not records and setup:  # a single flat measurement
            records, setup = [setup], {}
    else:
        records = []
    flat = [{k: _number(v) for k, v in r.items() if _scalar(v)} for r in records]
    return setup, flat


# ---------------------------------------------------------------------------------- rendering
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if 1e3 <= abs(value) < 1e9:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, list):
        return " / ".join(_fmt(v) for v in value)
    if isinstance(value, dict):  # e.g. one of bench_cpu.py's updates: its flat fields
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()
                         if _scalar(v) or (isinstance(v, list) and all(_scalar(x) for x in v)))
    return "" if value is None else str(value)


def _cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|")


def _header(key: str) -> str:
    """A column name that may wrap after its underscores, never inside a word."""
    return "_<wbr>".join(html.escape(part) for part in key.split("_"))


def summary(setup: Dict[str, Any]) -> str:
    """One sentence naming the model, batch, machine and software of a run (what the chart shows)."""
    seen, parts = set(), []
    for key, label in SUMMARY:
        if key in setup and setup[key] not in (None, "") and label not in seen:
            seen.add(label)
            value = setup[key]
            parts.append(f"{label} {value}x{value}" if key == "size" else f"{label} {_fmt(value)}")
    return ", ".join(parts)


def metric(records: List[Dict[str, Any]]) -> Optional[Tuple[str, bool]]:
    """The field to chart (present and numeric in every record) and whether higher is better."""
    keys = [k for k in records[0] if all(_is_number(r.get(k)) for r in records)]
    for want, higher in METRICS:
        for k in keys:
            if k.lower() == want:
                return k, higher
    return (keys[0], True) if keys else None


def _label(record: Dict[str, Any], metric_key: str) -> str:
    parts = [f"{v}" for k, v in record.items() if k != metric_key and isinstance(v, str) and len(v) < 40]
    return " · ".join(parts) or "?"


def bar_chart_svg(labels: List[str], values: List[float], title: str) -> str:
    """A horizontal bar chart as inline SVG (no plotting library needed); ``title`` is its caption."""
    width, label_w, bar_h, gap, top = 760, 300, 18, 6, 26
    height = top + len(values) * (bar_h + gap) + 8
    peak = max(values) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{html.escape(title)}" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'style="max-width:100%;height:auto;font:12px sans-serif">',
             f'<text x="0" y="14" fill="currentColor" font-weight="bold">{html.escape(title)}</text>']
    for i, (label, value) in enumerate(zip(labels, values)):
        y = top + i * (bar_h + gap)
        w = max(1.0, (width - label_w - 70) * value / peak)
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" fill="currentColor">'
                     f'{html.escape(label[:48])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#5c6bc0"/>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 13}" fill="currentColor">{value:.4g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def file_markdown(path: Path, root: Path) -> List[str]:
    """The section of one results file: title, setup, chart, complete table and legend."""
    where = path.relative_to(root) if path.is_relative_to(root) else path
    try:
        setup, records = load(path)
    except (OSError, ValueError) as e:
        return [f"### `{where}`", "", f"Could not read this file: {html.escape(str(e))}", ""]
    if not records:
        return []
    line = summary(setup)
    out = [f"### {html.escape(str(TITLES.get(path.name) or setup.get('model') or setup.get('kind') or path.stem))}"
           + (f" on {html.escape(str(setup.get('cpu') or setup.get('device')))}"
              if setup.get("cpu") or setup.get("device") else ""), ""]
    made_by = f", written by `{SCRIPTS[path.name]}`" if path.name in SCRIPTS else ""
    out += [f"From `{where}`{made_by}. " + (f"Setup: {line}." if line else ""), ""]
    chosen = metric(records)
    if chosen:
        key, higher = chosen
        batch = setup.get("model_batch") or setup.get("batch")
        title = f"{key}, {'higher' if higher else 'lower'} is better" + (
            f" ({setup['model']}, batch {batch})" if setup.get("model") and batch else "")
        svg = bar_chart_svg([_label(r, key) for r in records], [float(r[key]) for r in records], title)
        out += [f'<div class="mf-chart">{svg}</div>', ""]
    keys = list(dict.fromkeys(k for r in records for k in r))
    out += ['<div class="mf-table mf-results" markdown>', "",
            "| " + " | ".join(_header(k) for k in keys) + " |",
            "|" + "".join("--:|" if any(_is_number(r.get(k)) for r in records) else "---|" for k in keys)]
    out += ["| " + " | ".join(_cell(_fmt(r.get(k))) for k in keys) + " |" for r in records]
    out += ["", "</div>", "", f"All {len(records)} measurements of the file. What the columns mean:", ""]
    out += [f"- **{k}**: {COLUMNS.get(k, 'as recorded in the file')}" for k in keys]
    variants = [v for v in dict.fromkeys(r.get("variant") for r in records) if v in VARIANTS]
    if variants:
        out += ["", "The variants:", ""] + [f"- **{v}**: {VARIANTS[v]}" for v in variants]
    extra = {k: v for k, v in setup.items() if k not in {key for key, _ in SUMMARY}}
    if extra:
        out += ["", f'??? info "Everything else recorded about this run ({len(extra)} fields)"', "",
                "    | field | value |", "    |---|---|"]
        out += [f"    | `{html.escape(k)}` | {_cell(_fmt(v))} |" for k, v in extra.items()]
    return out + [""]


def benchmarks_markdown(folder: Path, root: Optional[Path] = None) -> str:
    """A section per results file under ``folder``, or how to produce them."""
    files = sorted(p for p in folder.glob("*") if p.suffix in (".json", ".jsonl", ".csv")) if folder.is_dir() else []
    out: List[str] = []
    for path in files:
        out += file_markdown(path, root or folder.parent.parent)
    return "\n".join(out) if out else HOW_TO_BENCHMARK
