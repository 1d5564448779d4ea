"""GPU benchmark of every MetaFormer family against timm, and of the LayerNorm / StarReLU kernels.

One run gives the whole table. Per model (poolformer_s12, poolformerv2_s12, identityformer_s12,
randformer_s12, convformer_s18, caformer_s18; timm registers no IdentityFormer or RandFormer, so for
those its ``MetaFormer`` class is assembled as the release builds them): timm's model eager in NCHW (``timm_nchw``), eager in
channels_last (``timm_cl``) and ``torch.compile``d in channels_last (``timm_compiled``), and ours with its
default dispatch in channels_last (``ours``; ``ours_nchw`` and ``ours_compiled`` on request), bf16
autocast, batch 128 at 224x224: inference (``torch.no_grad``) and a training step (forward, loss,
backward, gradients set to None) with its peak memory. The eager variants' inference is also timed as the
replay of a captured CUDA graph (``inference_graph``; ``--no-graph`` skips it): the GPU's time alone. At batch
128 ours is launch-bound on a slow or busy host (its GPU time is a third to a half of timm's, its host time
about timm's), so the eager figures move with the host's load by tens of percent and the graph replays are
the comparison of the GPUs' work.

Correctness first, per model, before anything is timed: ours carries timm's weights (converted by
``load_state_dict_into``) and its logits must match timm's in fp32 (TF32 off) within 1e-4 of the
largest logit; the bf16-autocast difference is reported. A mismatch stops the run (exit status 2).

The eager variants of every model run first, then the compiled ones while ``--budget-s`` allows
(a compiled variant is started only with ``--compile-reserve-s`` left; what is skipped is recorded as
such). Before the models, the kernels' micro-benchmarks (gpu_glue.py). Timing as in
bench_pool_mixer_gpu.py (``triton.testing.do_bench``, L2 flushed, medians with 20/80 % quantiles).

Usage::

    python benchmarks/bench_gpu_families.py                 # writes benchmarks/results/gpu_families.json
    python benchmarks/bench_gpu_families.py --models convformer_s18 --no-kernels
    python benchmarks/bench_gpu_families.py --smoke --models poolformer_s12 --size 64   # CPU plumbing check (no compile)
    python benchmarks/bench_gpu_families.py --table results/h100/gpu_families*.json  # markdown tables of saved runs

Exit status: 0 done, 1 missing requirement (no GPU), 2 wrong results, 3 a variant failed (the others ran).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (  # noqa: E402
    BenchmarkError,
    bench,
    header_lines,
    machine_info,
    no_tf32,
    rel_diff,
    settings,
    write_json,
)
from gpu_models import _peak_memory_mib, _step  # noqa: E402

MODELS = ["poolformer_s12", "poolformerv2_s12", "identityformer_s12", "randformer_s12", "convformer_s18",
          "caformer_s18"]
VARIANTS = ["timm_nchw", "timm_cl", "ours", "ours_nchw", "timm_compiled", "ours_compiled"]
DEFAULT_VARIANTS = ["timm_nchw", "timm_cl", "ours", "timm_compiled"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, help=f"default: all of {MODELS}")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0, help="kernels: timed time per case")
    p.add_argument("--model-rep-ms", type=float, default=300.0, help="models: timed time per case")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new work after this many seconds")
    p.add_argument("--compile-reserve-s", type=float, default=75.0, help="time a compiled variant needs at least")
    p.add_argument("--no-compile", action="store_true", help="skip every torch.compile variant")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernels' micro-benchmarks")
    p.add_argument("--no-graph", action="store_true",
                   help="skip the eager variants' inference as CUDA-graph replays (the GPU's time alone)")
    p.add_argument("--kernels-share", type=float, default=0.25,
                   help="with --budget-s: the kernels' part starts no new case after this share of the budget")
    p.add_argument("--kernels-only", action="store_true", help="skip the models")
    p.add_argument("--glue-dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--glue-layouts", nargs="+", default=["channels_last"], choices=["channels_last", "nchw"])
    p.add_argument("--glue-batch", type=int, default=128)
    p.add_argument("--peak-gbps", type=float, default=None)
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "gpu_families.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CPU: no triton variants)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--profile", action="store_true",
                   help="after the timings, profile each model's eager variants (inference and a training step): "
                        "the top operators by device time and the device's busy share of the wall time")
    p.add_argument("--table", nargs="+", type=Path, default=None, metavar="JSON",
                   help="print markdown tables of saved runs (merged per model, a later file's variant wins) and exit")
    args = p.parse_args(argv)
    if args.table:
        return args
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        p.error(f"unknown models {unknown}; choose from {MODELS}")
    if args.smoke:  # the plumbing only: tiny batches, no torch.compile (minutes on a CPU)
        args.batch, args.glue_batch, args.no_compile = 2, 2, True
        args.warmup_ms, args.rep_ms, args.model_rep_ms = 1.0, 5.0, 5.0
    args.device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    return args


def _timm_model(name: str):
    """timm's model: registered, or (identityformer_s12, randformer_s12, which timm does not register) timm's
    ``MetaFormer`` assembled as the release builds them (poolformerv2_s12's parts with another token mixer)."""
    import timm
    from timm.models.metaformer import GroupNorm1NoBias, MetaFormer

    if name in timm.list_models(name):
        return timm.create_model(name)
    from metaformer.mixers import RandomMixing

    class RandomMixing14(RandomMixing):  # timm's stage tests issubclass(mixer, ...): classes, not partials
        def __init__(self, dim, **kwargs):
            super().__init__(dim, spatial_size=14)

    class RandomMixing7(RandomMixing):
        def __init__(self, dim, **kwargs):
            super().__init__(dim, spatial_size=7)

    mixers = {"identityformer_s12": torch.nn.Identity,
              "randformer_s12": [torch.nn.Identity, torch.nn.Identity, RandomMixing14, RandomMixing7]}
    if name not in mixers:
        raise ValueError(f"no timm counterpart for {name!r}; choose from {MODELS}")
    return MetaFormer(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), token_mixers=mixers[name],
                      norm_layers=GroupNorm1NoBias, use_mlp_head=False)


def _build(name: str, timm_state=None):
    """timm's model, or ours carrying timm's weights (``timm_state``)."""
    import metaformer
    from metaformer.weights import load_state_dict_into

    if timm_state is None:
        torch.manual_seed(0)
        return _timm_model(name)
    ours = metaformer.create(name)
    load_state_dict_into(ours, timm_state, layout="timm")
    return ours


# timm's PoolFormer v1 pools before its head norm, the original release (and ours) normalises the map first:
# everything before the head agrees, so the check compares the final maps for every family and the logits
# only where the heads agree too.
_HEAD_DIFFERS = {"poolformer_s12"}


def _outputs(model, x, autocast: bool) -> dict:
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        feats = model.forward_features(x)
        return {"features": feats.float(), "logits": model.forward_head(feats).float()}


def check_family(args, name: str, x) -> dict:
    """Ours (timm's weights) against timm: final maps (and logits where the heads agree) in fp32 within 1e-3
    of the largest value (raises), bf16 reported."""
    with no_tf32():
        timm_model = _build(name).to(args.device).eval()
        ours = _build(name, timm_model.state_dict()).to(args.device).eval()
        out = {}
        for autocast in (False, True) if args.device.type == "cuda" else (False,):
            a, b = _outputs(ours, x[:8], autocast), _outputs(timm_model, x[:8], autocast)
            for part in ("features",) if name in _HEAD_DIFFERS else ("features", "logits"):
                ref = b[part]
                out[f"{part}_{'bf16' if autocast else 'fp32'}"] = rel_diff(a[part], ref)
    bad = {k: v for k, v in out.items() if k.endswith("fp32") and not v <= 1e-3}
    if bad:
        raise BenchmarkError(f"{name}: ours differs from timm (same weights, fp32): " +
                             ", ".join(f"{k[:-5]} by {v:.3g} of the largest value" for k, v in bad.items()))
    return {"rel_diff_vs_timm_" + k: v for k, v in out.items()}


def _variant_model(args, name: str, variant: str, x) -> tuple:
    """One variant's model (timm's, or ours with timm's weights) and input, on the device in its layout."""
    model = _build(name)
    if variant.startswith("ours"):
        model = _build(name, model.state_dict())
    fmt = torch.contiguous_format if variant.endswith("nchw") else torch.channels_last
    return model.to(args.device).to(memory_format=fmt), x.contiguous(memory_format=fmt)


def time_variant(args, name: str, variant: str, x) -> dict:
    """Inference and training-step timings of one variant (after a torch._dynamo.reset() when compiled)."""
    model, xin = _variant_model(args, name, variant, x)
    t0 = time.perf_counter()
    if variant.endswith("compiled"):
        torch._dynamo.reset()
        model = torch.compile(model, dynamic=False)
    row = {}
    for train in (False, True):
        model.train(train)
        fn = _step(model, xin, train, args.device)
        r = bench(fn, args.device, args.warmup_ms, args.model_rep_ms)
        r["img_per_s"] = args.batch / (r["median_ms"] * 1e-3)
        if train:
            r["peak_mem_mib"] = _peak_memory_mib(fn, args.device)
        row["train_step" if train else "inference"] = r
        if not train and args.device.type == "cuda" and not args.no_graph and not variant.endswith("compiled"):
            g = bench(fn, args.device, args.warmup_ms, args.model_rep_ms, "cudagraph")
            row["inference_graph"] = {**g, "img_per_s": args.batch / (g["median_ms"] * 1e-3)}
    row["seconds_incl_compile"] = round(time.perf_counter() - t0, 1)
    del model
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def ratios(rows: dict) -> dict:
    """Ours against timm's best eager layout and against timm compiled, per pass (speed and peak memory)."""
    out = {}
    for part in ("inference", "train_step"):
        eager = [rows[v][part] for v in ("timm_nchw", "timm_cl") if v in rows]
        best = min(eager, key=lambda r: r["median_ms"]) if eager else None
        for ours in ("ours", "ours_nchw", "ours_compiled"):
            if ours not in rows:
                continue
            mine = rows[ours][part]
            if best:
                out[f"{ours}_vs_timm_best_eager_{part}"] = best["median_ms"] / mine["median_ms"]
            if "timm_compiled" in rows:
                out[f"{ours}_vs_timm_compiled_{part}"] = rows["timm_compiled"][part]["median_ms"] / mine["median_ms"]
            if part == "train_step" and best and best.get("peak_mem_mib") and mine.get("peak_mem_mib"):
                out[f"{ours}_peak_mem_vs_timm_best_eager"] = mine["peak_mem_mib"] / best["peak_mem_mib"]
    graphs = [rows[v]["inference_graph"]["median_ms"] for v in ("timm_nchw", "timm_cl") if "inference_graph" in rows.get(v, {})]
    if graphs and "inference_graph" in rows.get("ours", {}):
        out["ours_vs_timm_best_graph_inference"] = min(graphs) / rows["ours"]["inference_graph"]["median_ms"]
    return out


def bench_models(args, results: dict, save, t_end) -> None:
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    models = results.setdefault("models", {})
    eager = [v for v in args.variants if not v.endswith("compiled")]
    compiled = [] if args.no_compile else [v for v in args.variants if v.endswith("compiled")]
    for name in args.models:  # correctness of every model before anything is timed
        models[name] = {"checks": check_family(args, name, x), "variants": {}, "skipped": {}}
        print(f"  {name}: ours vs timm {models[name]['checks']}", flush=True)
    # eager: every variant of one model together; compiled: timm's compiled model for every model first (the bar
    # the issue sets), then ours compiled, so that a short budget still gives the comparison that matters
    order = [(name, v) for name in args.models for v in eager] + [(name, v) for v in compiled for name in args.models]
    for name, variant in order:
        left = t_end - time.perf_counter()
        need = args.compile_reserve_s if variant.endswith("compiled") else 10.0
        if left < need:
            models[name]["skipped"][variant] = f"time budget ({left:.0f} s left, {need:.0f} s needed)"
            print(f"  {name:18} {variant:14} skipped: time budget", flush=True)
            continue
        try:
            row = time_variant(args, name, variant, x)
        except Exception as e:  # e.g. a compile failure: recorded, and the other variants still run
            models[name].setdefault("errors", {})[variant] = f"{type(e).__name__}: {e}"[:2000]
            print(f"  {name:18} {variant:14} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            save()
            continue
        models[name]["variants"][variant] = row
        models[name]["ratios"] = ratios(models[name]["variants"])
        inf, tr = row["inference"], row["train_step"]
        print(f"  {name:18} {variant:14} inference {inf['median_ms']:8.2f} ms {inf['img_per_s']:7.0f} img/s | "
              f"train {tr['median_ms']:8.2f} ms {tr['img_per_s']:6.0f} img/s"
              + (f", peak {tr['peak_mem_mib']:.0f} MiB" if tr.get("peak_mem_mib") else "")
              + (f" | graph {row['inference_graph']['median_ms']:.2f} ms" if "inference_graph" in row else ""),
              flush=True)
        save()


def profile_variant(args, name: str, variant: str, x, steps: int = 3, top: int = 15) -> dict:
    """Where one eager variant's time goes, per pass: the wall time of ``steps`` calls (unprofiled); the device
    time of their kernels (profiled), whose share of the wall time says whether the GPU waited for Python;
    the ``top`` kernels by device time and operators by their own CPU time (Python and dispatch overhead)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model, xin = _variant_model(args, name, variant, x)
    cuda = args.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {}
    for train in (False, True):
        model.train(train)
        fn = _step(model, xin, train, args.device)
        for _ in range(2):  # warm: self-checks, autotuning, allocator
            fn()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()  # the wall time without the profiler's own overhead
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        # kernels are events of their own (device_type CUDA) under Kineto; the operators' rows repeat their time
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]

        def device_us(e):
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)

        def row(e, us):
            return {"name": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": us / 1e3 / steps}
        busy_ms = sum(device_us(e) for e in kernels) / 1e3 / steps if cuda else None
        cpu_ops = [e for e in events if e.device_type == DeviceType.CPU]
        out["train_step" if train else "inference"] = {
            "wall_ms_per_step": wall_ms, "device_ms_per_step": busy_ms,
            "device_busy_share": busy_ms / wall_ms if cuda and wall_ms else None,
            "top_kernels": [row(e, device_us(e)) for e in sorted(kernels, key=device_us, reverse=True)[:top]],
            "top_cpu_ops": [row(e, float(e.self_cpu_time_total))
                            for e in sorted(cpu_ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]]}
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


def profile_models(args, results: dict, save) -> None:
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    for name in args.models:
        for variant in [v for v in args.variants if not v.endswith("compiled")]:
            try:
                prof = profile_variant(args, name, variant, x)
            except Exception as e:  # recorded; the timings already saved stand
                results["models"][name].setdefault("errors", {})[f"profile {variant}"] = f"{type(e).__name__}: {e}"
                continue
            results["models"][name].setdefault("profiles", {})[variant] = prof
            share = prof["inference"]["device_busy_share"]
            print(f"  profile {name:18} {variant:10} inference wall {prof['inference']['wall_ms_per_step']:.2f} ms"
                  + (f", device busy {share:.0%}" if share is not None else "")
                  + f"; top CPU op: {prof['inference']['top_cpu_ops'][0]['name']}", flush=True)
            save()


def print_table(results: dict) -> None:
    print("\nmodel               ours vs timm's best eager (inference / train) | vs timm compiled | peak mem vs best"
          " | graph replays")
    for name, m in results.get("models", {}).items():
        r = m.get("ratios", {})

        def f(key, r=r):
            return f"{r[key]:.2f}x" if key in r else "-"
        print(f"  {name:18} {f('ours_vs_timm_best_eager_inference'):>7} / {f('ours_vs_timm_best_eager_train_step'):>7}"
              f" | {f('ours_vs_timm_compiled_inference'):>7} / {f('ours_vs_timm_compiled_train_step'):>7}"
              f" | {f('ours_peak_mem_vs_timm_best_eager'):>7} | {f('ours_vs_timm_best_graph_inference'):>7}")


TABLE_VARIANTS = ["timm_nchw", "timm_cl", "timm_compiled", "ours", "ours_compiled"]


def markdown_tables(files: list) -> str:
    """Inference and training tables (img/s, ratios to timm's best eager layout and to timm compiled, peak
    memory) of saved runs; a model's variants are merged over the files, each ratio from the medians."""
    merged, machines = {}, []
    for path in files:
        data = json.loads(Path(path).read_text())
        if data.get("kind") != "gpu_families":
            raise SystemExit(f"{path}: not a bench_gpu_families.py result (kind {data.get('kind')!r})")
        machines.append(data.get("machine", {}).get("device", "?"))
        for name, m in data.get("models", {}).items():
            merged.setdefault(name, {}).update(m.get("variants", {}))
    lines = [f"Devices: {', '.join(sorted(set(machines)))}; img/s (batch / median time); ratios are ours' speed over "
             "timm's (above 1: ours faster).", ""]
    for part, title in (("inference", "Inference"), ("train_step", "Training step")):
        head = [v for v in TABLE_VARIANTS if any(v in rows for rows in merged.values())]
        cols = head + ["ours / timm best eager", "ours / timm compiled", "ours compiled / timm compiled"]
        if part == "train_step":
            cols.append("peak memory ours / timm best eager")
        lines += [f"**{title}**", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, rows in merged.items():
            ms = {v: rows[v][part]["median_ms"] for v in head if v in rows}
            cells = [f"{rows[v][part]['img_per_s']:.0f}" if v in rows else "-" for v in head]
            eager = [v for v in ("timm_nchw", "timm_cl") if v in ms]
            best = min(eager, key=ms.get) if eager else None

            def ratio(a, b, ms=ms):
                return f"{ms[b] / ms[a]:.2f}x" if a in ms and b in ms else "-"
            cells += [ratio("ours", best) if best else "-", ratio("ours", "timm_compiled"),
                      ratio("ours_compiled", "timm_compiled")]
            if part == "train_step":
                mem = {v: rows[v][part].get("peak_mem_mib") for v in ("ours", best) if v in rows}
                cells.append(f"{mem['ours'] / mem[best]:.2f}x" if best and all(mem.values()) and len(mem) == 2 else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    graphed = {name: {v: r["inference_graph"]["median_ms"] for v, r in rows.items() if "inference_graph" in r}
               for name, rows in merged.items()}
    if any(graphed.values()):
        head = [v for v in ("timm_nchw", "timm_cl", "ours") if any(v in g for g in graphed.values())]
        lines += ["**Inference, the GPU's time alone (CUDA-graph replays)**", "",
                  "| model | " + " | ".join(head) + " | ours / timm best |", "|---" * (len(head) + 2) + "|"]
        for name, ms in graphed.items():
            if not ms:
                continue
            best = min((ms[v] for v in ("timm_nchw", "timm_cl") if v in ms), default=None)
            cells = [f"{merged[name][v]['inference_graph']['img_per_s']:.0f}" if v in ms else "-" for v in head]
            cells.append(f"{best / ms['ours']:.2f}x" if best and "ours" in ms else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown_tables(args.table))
        return 0
    t_end = time.perf_counter() + (args.budget_s if args.budget_s else float("inf"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_families: no CUDA device: this benchmark needs a GPU (or --smoke for a CPU run of its "
              "plumbing). Exiting.", file=sys.stderr)
        return 1
    from gpu_glue import bench_glue, weighted

    info = machine_info(args.peak_gbps) if args.device.type == "cuda" else {"device": str(args.device), "peak_gbps": None}
    results = {"kind": "gpu_families", "machine": info, "autocast": "bfloat16", "settings": settings(args)}
    for line in header_lines(info) if args.device.type == "cuda" else [f"device: {args.device} (smoke run)"]:
        print(line)

    def save():
        write_json(args.output, results)

    try:
        if not args.no_kernels:
            print(f"\nkernels, batch {args.glue_batch}, {args.glue_dtype}, GB/s on the ideal traffic", flush=True)
            args.kernels_end = time.perf_counter() + args.kernels_share * (t_end - time.perf_counter())
            records = bench_glue(args, info)
            results.update(kernels=records, kernels_weighted_convformer_s18=weighted(records))
            save()
        if not args.kernels_only:
            print(f"\nmodels, batch {args.batch}, {args.size}x{args.size}, bf16 autocast", flush=True)
            bench_models(args, results, save, t_end)
            print_table(results)
            if args.profile:
                print("\nprofiles (eager variants)", flush=True)
                profile_models(args, results, save)
    except BenchmarkError as e:
        print(f"\nCORRECTNESS FAILURE, nothing timed is trustworthy: {e}", file=sys.stderr)
        return 2
    finally:
        import metaformer.kernels as K

        K.set_backend("auto")
    save()
    print(f"\nwrote {args.output}")
    failed = {name: m["errors"] for name, m in results.get("models", {}).items() if m.get("errors")}
    if failed:
        print(f"variants that failed (recorded in the JSON): {failed}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
