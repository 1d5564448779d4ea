"""GPU benchmark of the PoolFormer token-mixer half-block, then of the whole model against timm.

Mixer half ``y = x + ls * (AvgPool2d(GroupNorm(x)) - GroupNorm(x))`` at poolformer_s12's four stage
shapes (batch 128, channels_last by default), forward (no grad) and forward + backward
(``torch.autograd.grad`` of x, the norm's weight and bias and the layer scale, with a precomputed
dy), for these variants:

- ``triton``: ``metaformer.kernels.pool_mixer_residual`` on the Triton kernels (backend forced);
- ``torch``: the same call on our PyTorch formulation, and ``torch_compiled``: its torch.compile;
- ``eager``: the plain composition (nn.GroupNorm(1, C) + nn.AvgPool2d + sub + scale + add), as
  timm and the original release run it, and ``compiled``: its torch.compile.

Correctness first: every variant but the plain ones is compared, forward (``y - x``) and backward
(dx, d weight, d layer scale), with the plain composition in fp32 (fp64 for fp32 inputs) on the same
rounded inputs; any disagreement stops the run (exit status 2) before anything is timed.

Timing: ``triton.testing.do_bench`` (L2 flushed before every call; medians and 20/80 % quantiles)
or ``--timer cudagraph``; each compiled case after ``torch._dynamo.reset()`` with ``dynamic=False``
(a shared code object would hit the recompile limit and fall back to eager silently).
Bandwidth: ``GB/s = passes * numel * bytes / t`` with the ideal traffic (forward: read x, write y =
2 passes; forward + backward: 5) for every variant, and for ``triton`` also its actual traffic (3 and
8 passes: statistics, stencil; backward reduction, dx), as a share of the card's own DRAM peak.

Whole model (``--model``, default poolformer_s12): timm's model and ours, eager and compiled, bf16
autocast, channels_last, inference and a training step (forward, loss, backward), with peak memory.

Usage::

    python benchmarks/bench_pool_mixer_gpu.py                   # writes benchmarks/results/gpu.json
    python benchmarks/bench_pool_mixer_gpu.py --dtypes bf16 --layouts nchw channels_last --no-models
    python benchmarks/bench_pool_mixer_gpu.py --smoke           # tiny CPU run of the plumbing, no GPU

Exit status: 0 done, 1 missing requirement (no GPU, no Triton), 2 wrong results.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (  # noqa: E402
    BenchmarkError,
    bench,
    compare,
    header_lines,
    machine_info,
    peak_memory_mib,
    settings,
    write_json,
)

STAGES = [(64, 56, 2), (128, 28, 2), (320, 14, 6), (512, 7, 2)]  # poolformer_s12: (C, H = W, blocks)
SMOKE_STAGES = [(8, 9, 1), (16, 5, 1)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-5}
PASSES = {"fwd": (2, 3), "fwd+bwd": (5, 8)}  # (ideal, triton's actual) passes over the tensor
VARIANTS = ("triton", "torch", "torch_compiled", "eager", "compiled")
CHECKED = ("triton", "torch", "torch_compiled")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="mixer batch size (default 128)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--layouts", nargs="+", default=["channels_last"], choices=["channels_last", "nchw"])
    p.add_argument("--pool-size", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up time per case")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench timed time per case")
    p.add_argument("--timer", choices=["do_bench", "cudagraph"], default="do_bench")
    p.add_argument("--peak-gbps", type=float, default=None, help="DRAM bandwidth (default: by device name)")
    p.add_argument("--triton-config", default="", help="TritonConfig fields, e.g. tile=2048,num_warps=8")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--compile-dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                   help="mixer half: dtypes with torch.compile variants (default: all)")
    p.add_argument("--no-models", action="store_true", help="skip the whole-model part")
    p.add_argument("--models-only", action="store_true", help="skip the mixer-half part")
    p.add_argument("--no-model-compile", action="store_true", help="whole model: eager variants only")
    p.add_argument("--model", default="poolformer_s12")
    p.add_argument("--model-batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224, help="whole model: image side (default 224)")
    p.add_argument("--model-rep-ms", type=float, default=1000.0, help="whole model: timed time per case")
    p.add_argument("--model-variants", nargs="+", default=["timm", "ours", "timm_compiled", "ours_compiled"],
                   choices=["timm", "ours", "timm_compiled", "ours_compiled"], help="in this order; timm first")
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, any device (CPU: torch and eager variants, triton under TRITON_INTERPRET=1)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.model_batch, args.size = 2, 2, 32
        args.warmup_ms, args.rep_ms, args.model_rep_ms = 1.0, 5.0, 5.0
    args.device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    return args


def parse_config(text: str) -> dict:
    """``"tile=2048,num_warps=8"`` -> {"tile": 2048, "num_warps": 8}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise SystemExit(f"--triton-config: expected name=integer items, got {item!r}")
        out[key.strip()] = int(value)
    return out


class RefMixerHalf(nn.Module):
    """The unfused token-mixer half-block, as the original release writes it."""

    def __init__(self, dim: int, pool_size: int = 3, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(1, dim, eps=eps)
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)
        self.ls = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        n = self.norm(x)
        return x + self.ls[:, None, None] * (self.pool(n) - n)


class FusedMixerHalf(nn.Module):
    """The same half-block through ``pool_mixer_residual`` (norm bias cancels exactly)."""

    def __init__(self, ref: RefMixerHalf):
        from metaformer.kernels import pool_mixer_residual

        super().__init__()
        self.ref = ref
        self.kernel = pool_mixer_residual  # imported here, not while torch.compile traces forward

    def forward(self, x):
        r = self.ref
        return self.kernel(x, r.norm.weight * r.ls, eps=r.norm.eps, pool_size=r.pool.kernel_size)


def _grads(fn, x, params, dy):
    x = x.detach().requires_grad_(True)
    y = fn(x)
    grads = torch.autograd.grad(y, [x, *params], dy, allow_unused=True)
    return y, grads


def _outputs(fn, x, ref: RefMixerHalf, dy) -> dict:
    y, (dx, dw, _, dls) = _grads(fn, x, [ref.norm.weight, ref.norm.bias, ref.ls], dy)
    return {"y - x": y.detach() - x, "dx": dx, "d weight": dw, "d layer scale": dls}


def _variant(name: str, ref: RefMixerHalf):
    """(callable, backend to select while it runs)."""
    import metaformer.kernels as K

    if name == "triton":
        return FusedMixerHalf(ref), "triton"
    if name == "torch":
        return FusedMixerHalf(ref), "torch"
    module = ref if name in ("eager", "compiled") else FusedMixerHalf(ref)
    if name.endswith("compiled"):
        torch._dynamo.reset()
        module = torch.compile(module, dynamic=False)
    K.set_backend("auto")
    return module, "auto"


def bench_mixer(args, info: dict) -> list:
    import metaformer.kernels as K

    stages = SMOKE_STAGES if args.smoke else STAGES
    peak = info.get("peak_gbps")
    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for layout in args.layouts:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            for C, S, blocks in stages:
                torch.manual_seed(0)
                ref = RefMixerHalf(C, args.pool_size).to(args.device)
                with torch.no_grad():
                    ref.norm.weight.normal_(1.0, 0.1)
                    ref.norm.bias.normal_(0.0, 0.1)
                    ref.ls.normal_(0.0, 1.0)  # large enough that y - x is not hidden by the rounding of y
                ref = ref.to(dtype)
                x = torch.randn(args.batch, C, S, S, device=args.device).to(dtype).contiguous(memory_format=fmt)
                dy = torch.randn_like(x)
                ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
                ref_hi = copy.deepcopy(ref).to(ref_dtype)  # the same rounded parameters and inputs, computed wider
                want = _outputs(ref_hi, x.to(ref_dtype), ref_hi, dy.to(ref_dtype))
                params = [ref.norm.weight, ref.norm.bias, ref.ls]
                row = {"dtype": dname, "layout": layout, "shape": [args.batch, C, S, S], "blocks": blocks,
                       "numel": x.numel(), "bytes_per_element": x.element_size(), "errors": {}, "variants": {}}
                for name in args.variants:
                    if name.endswith("compiled") and (args.no_compile or dname not in (args.compile_dtypes or [dname])):
                        continue
                    if name == "triton" and not (args.device.type == "cuda" or K._interpreting()):
                        continue
                    fn, backend = _variant(name, ref)
                    K.set_backend(backend)
                    if name in CHECKED:
                        got = _outputs(fn, x, ref, dy)
                        row["errors"][name] = compare(f"{name} ({dname}, {layout}, {C}x{S}x{S})", got, want,
                                                      TOL[dtype])
                    row["variants"][name] = _time_variant(args, name, fn, x, dy, params, peak)
                    K.set_backend("auto")
                rows.append(row)
                _print_row(row)
    return rows


def _time_variant(args, name: str, fn, x, dy, params, peak) -> dict:
    xg = x.detach().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            fn(x)

    def fwd_bwd():
        torch.autograd.grad(fn(xg), [xg, *params], dy, allow_unused=True)

    res = {"fwd": bench(fwd, args.device, args.warmup_ms, args.rep_ms, args.timer),
           "fwd+bwd": bench(fwd_bwd, args.device, args.warmup_ms, args.rep_ms, args.timer)}
    res["fwd+bwd"]["peak_mem_mib"] = peak_memory_mib(fwd_bwd, args.device)
    nbytes = x.numel() * x.element_size()
    for pas, r in res.items():
        ideal, actual = PASSES[pas]
        t = r["median_ms"] * 1e-3
        r["gbps_ideal"] = ideal * nbytes / t / 1e9
        r["peak_share_ideal"] = r["gbps_ideal"] / peak if peak else None
        if name == "triton":
            r["gbps_actual"] = actual * nbytes / t / 1e9
            r["peak_share_actual"] = r["gbps_actual"] / peak if peak else None
    return res


def _print_row(row: dict) -> None:
    v = row["variants"]
    C, S = row["shape"][1], row["shape"][2]
    for pas in PASSES:
        layout = "CL" if row["layout"] == "channels_last" else "NCHW"
        line = f"{row['dtype']:4} {layout:4} {f'{C}x{S}x{S}':>10} {pas:7} |"
        line += "".join(f" {k} {r[pas]['median_ms']:.3f}" for k, r in v.items()) + " ms"
        if "triton" in v:
            t = v["triton"][pas]
            line += " | triton speed-up" + "".join(f" {r[pas]['median_ms'] / t['median_ms']:.2f}x vs {k}"
                                                    for k, r in v.items() if k != "triton")
            share = t.get("peak_share_actual")
            line += f" | {t['gbps_actual']:.0f} GB/s actual, {t['gbps_ideal']:.0f} ideal"
            line += f" ({100 * share:.0f}% of peak)" if share else ""
        if pas == "fwd+bwd" and all(r[pas]["peak_mem_mib"] is not None for r in v.values()):
            line += " | peak MiB " + "/".join(f"{r[pas]['peak_mem_mib']:.0f}" for r in v.values())
        print(line, flush=True)


def mixer_records(rows: list) -> tuple:
    """(records, targets): one flat record per case, pass and variant (what the docs plot), plus per dtype,
    layout and pass a ``poolformer_s12`` record, the stage times weighted by blocks per stage; and the
    issue's target per dtype and layout (triton fwd+bwd >= 4x eager and >= compiled; None if not measured)."""
    records, weighted = [], {}
    for row in rows:
        C, S = row["shape"][1], row["shape"][2]
        for name, res in row["variants"].items():
            for pas, r in res.items():
                rec = {"dtype": row["dtype"], "layout": row["layout"], "shape": f"{C}x{S}x{S}", "pass": pas,
                       "variant": name, **{k: v for k, v in r.items()}}
                if name in row["errors"]:
                    rec["max_rel_error"] = max(row["errors"][name].values())
                if "triton" in row["variants"]:
                    rec["triton_speedup"] = r["median_ms"] / row["variants"]["triton"][pas]["median_ms"]
                records.append(rec)
                key = (row["dtype"], row["layout"], pas, name)
                weighted[key] = weighted.get(key, 0.0) + row["blocks"] * r["median_ms"]
    targets = {}
    for (dtype, layout, pas, name), ms in weighted.items():
        t = weighted.get((dtype, layout, pas, "triton"))
        records.append({"dtype": dtype, "layout": layout, "shape": "poolformer_s12 (blocks x stages)", "pass": pas,
                        "variant": name, "median_ms": ms, **({"triton_speedup": ms / t} if t else {})})
        if t and pas == "fwd+bwd" and name == "triton":
            eager, comp = (weighted.get((dtype, layout, pas, v)) for v in ("eager", "compiled"))
            targets[f"mixer_{dtype}_{layout}_fwd_bwd_triton_vs_eager"] = eager / t if eager else None
            targets[f"mixer_{dtype}_{layout}_fwd_bwd_triton_vs_compiled"] = comp / t if comp else None
            targets[f"target_mixer_{dtype}_{layout}_4x_eager_and_at_least_compiled"] = (
                eager / t >= 4 and comp / t >= 1 if eager and comp else None)
    return records, targets


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("bench_pool_mixer_gpu: no CUDA device: this benchmark needs a GPU (or --smoke for a CPU run of its "
              "plumbing). Exiting.", file=sys.stderr)
        return 1
    import metaformer.kernels as K
    from metaformer.kernels import triton_impl
    if args.device.type == "cuda" and "triton" in args.variants and not K.TRITON_AVAILABLE:
        print(f"bench_pool_mixer_gpu: Triton is unavailable ({K.TRITON_IMPORT_ERROR!r}). Exiting.", file=sys.stderr)
        return 1
    if args.triton_config:
        if triton_impl is None:
            print("bench_pool_mixer_gpu: --triton-config needs Triton. Exiting.", file=sys.stderr)
            return 1
        triton_impl.set_config(**parse_config(args.triton_config))
    info = machine_info(args.peak_gbps) if args.device.type == "cuda" else {"device": str(args.device), "peak_gbps": None}
    results = {"kind": "pool_mixer_gpu", "machine": info, "settings": settings(args),
        "triton_config": vars(triton_impl.get_config()) if triton_impl else None}
    for line in header_lines(info) if args.device.type == "cuda" else [f"device: {args.device} (smoke run)"]:
        print(line)
    if args.device.type == "cuda" and not info["peak_gbps"]:
        print(f"WARNING: {info['peak_source']}; shares of the peak are left out", file=sys.stderr)
    try:
        if not args.models_only:
            timer = {"do_bench": "do_bench, L2 flushed before each call", "cudagraph": "CUDA-graph replays"}[args.timer]
            print(f"\nmixer half, batch {args.batch}, pool {args.pool_size}, medians of "
                  f"{timer if args.device.type == 'cuda' else 'perf_counter'}; GB/s on the "
                  f"ideal traffic (fwd 2, fwd+bwd 5 passes) and, for triton, on its actual traffic (3 and 8)", flush=True)
            records, targets = mixer_records(bench_mixer(args, info))
            mixer_path = args.output.with_name(args.output.stem + "_mixer.json")
            write_json(mixer_path, {"machine": info, "triton_config": results["triton_config"], "records": records})
            results.update(mixer_file=mixer_path.name, **targets)
            write_json(args.output, results)  # what is done survives a later failure or a kill
        if not args.no_models:
            from gpu_models import bench_models

            bench_models(args, results, lambda: write_json(args.output, results))
    except BenchmarkError as e:
        print(f"\nCORRECTNESS FAILURE, nothing timed is trustworthy: {e}", file=sys.stderr)
        return 2
    write_json(args.output, results)
    print(f"\nwrote {args.output}" + (f" and {results['mixer_file']}" if "mixer_file" in results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
