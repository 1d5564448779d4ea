"""Kernel part of bench_gpu_families.py: channel LayerNorm, the fused residual update + LayerNorm, and
StarReLU, at convformer_s18's stage shapes (the MLP's hidden width, 4C, for StarReLU).

Variants: ``triton`` (``metaformer.kernels`` with the backend forced), ``eager`` (the plain composition
the baselines' layers run: ``LayerNorm2d``'s permute + ``F.layer_norm``, ``Scale`` + add, ``StarReLU``) and
``compiled`` (its ``torch.compile``). Correctness first: the output and every gradient of ``triton``
against the composition in fp32 (fp64 for fp32 inputs) on the same rounded inputs. GB/s on each op's
ideal traffic (passes over the tensor: ``IDEAL``), which the kernels also move.
"""

from __future__ import annotations

import time

import torch
from gpu_common import bench, compare, peak_memory_mib

STAGES = [(64, 56, 3), (128, 28, 3), (320, 14, 9), (512, 7, 3)]  # convformer_s18: (C, H = W, blocks)
SMOKE_STAGES = [(8, 9, 1), (20, 5, 1)]
# passes over the (B, C, H, W) tensor: forward, forward + backward (the parameters' gradients are reductions)
IDEAL = {"layernorm": (2, 5), "residual_layernorm": (4, 10), "star_relu": (2, 5)}
OPS = tuple(IDEAL)
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-5}


def _problem(op: str, C: int, S: int, batch: int, dtype, layout: str, device):
    """(inputs, parameters, grad outputs) of one op; parameters in fp32 as the models keep them."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    width = 4 * C if op == "star_relu" else C

    def t(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(shape, generator=g) * scale + shift).to(device=device, dtype=dt)

    x = t(batch, width, S, S).contiguous(memory_format=fmt)
    if op == "star_relu":
        params = [t(1, scale=0.1, shift=1.0, dt=torch.float32), t(1, scale=0.1, dt=torch.float32)]
        return [x], params, [torch.randn_like(x)]
    params = [t(C, scale=0.2, shift=1.0, dt=torch.float32)]
    if op == "layernorm":
        return [x], params, [torch.randn_like(x)]
    params.append(t(C, scale=0.2, shift=1.0, dt=torch.float32))  # res scale
    y = t(batch, C, S, S).contiguous(memory_format=fmt)
    return [x, y], params, [torch.randn_like(x), torch.randn_like(x)]


def _fn(op: str, variant: str, autocast=None):
    """(x-like inputs, parameters) -> outputs, for one variant (the PyTorch ones under ``autocast`` to that
    dtype when given)."""
    import metaformer.kernels as K
    from metaformer.kernels import torch_ln

    if variant == "triton":
        ops = {"layernorm": lambda x, w: K.layernorm_channels(x, w, eps=1e-6),
               "residual_layernorm": lambda x, y, w, r: K.residual_layernorm(x, y, w, eps=1e-6, res_scale=r),
               "star_relu": lambda x, s, b: K.star_relu(x, s, b)}
        return ops[op]
    ops = {"layernorm": lambda x, w: torch_ln.layernorm_channels_torch(x, w, eps=1e-6),
           "residual_layernorm": lambda x, y, w, r: torch_ln.residual_layernorm_torch(x, y, w, eps=1e-6, res_scale=r),
           "star_relu": torch_ln.star_relu_torch}
    fn = ops[op]
    if variant == "compiled":
        torch._dynamo.reset()
        fn = torch.compile(fn, dynamic=False)
    if autocast is None:
        return fn

    def under_autocast(*args):  # as in a model: the fp32 parameters meet bf16/fp16 activations under autocast
        with torch.autocast(args[0].device.type, dtype=autocast):
            return fn(*args)

    return under_autocast


def _outputs(fn, xs, params, grads_out) -> dict:
    leaves = [t.detach().requires_grad_(True) for t in (*xs, *params)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, leaves, grads_out[:len(outs)])
    return {**{f"output {i}": o.detach() for i, o in enumerate(outs)}, **{f"d input {i}": d for i, d in enumerate(grads)}}


def bench_glue(args, info: dict) -> list:
    """One record per op, stage, pass and variant (milliseconds, GB/s, share of the DRAM peak, error)."""
    import metaformer.kernels as K

    stages = SMOKE_STAGES if args.smoke else STAGES
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.glue_dtype]
    peak = info.get("peak_gbps")
    triton_ok = args.device.type == "cuda" or K._interpreting()
    records = []
    for op in OPS:
        for layout in args.glue_layouts:
            for C, S, blocks in stages:
                if time.perf_counter() > getattr(args, "kernels_end", float("inf")):
                    records.append({"op": op, "layout": layout, "stage": f"{C}x{S}x{S}", "skipped": "time budget"})
                    continue
                xs, params, gout = _problem(op, C, S, args.glue_batch, dtype, layout, args.device)
                ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
                want = _outputs(_fn(op, "eager"), [x.to(ref_dtype) for x in xs], [p.to(ref_dtype) for p in params],
                                [g.to(ref_dtype) for g in gout])
                nbytes = xs[0].numel() * xs[0].element_size()
                for variant in ("triton", "eager", "compiled"):
                    if (variant == "triton" and not triton_ok) or (variant == "compiled" and args.no_compile):
                        continue
                    K.set_backend("triton" if variant == "triton" else "auto")
                    fn = _fn(op, variant, autocast=None if dtype == torch.float32 else dtype)
                    error = None
                    if variant == "triton":
                        got = _outputs(fn, xs, params, gout)
                        error = max(compare(f"{op} {variant} ({layout}, {C}x{S}x{S})", got, want, TOL[dtype]).values())
                    rows = _time(args, fn, xs, params, gout)
                    for pas, r in rows.items():
                        gbps = IDEAL[op][pas == "fwd+bwd"] * nbytes / (r["median_ms"] * 1e-3) / 1e9
                        records.append({"op": op, "layout": layout, "dtype": args.glue_dtype, "stage": f"{C}x{S}x{S}",
                                        "blocks": blocks, "shape": list(xs[0].shape), "pass": pas, "variant": variant,
                                        **r, "gbps": gbps, "peak_share": gbps / peak if peak else None,
                                        **({"max_rel_error": error} if error is not None else {})})
                    K.set_backend("auto")
                _print(records, op, layout, f"{C}x{S}x{S}")
    return records


def _time(args, fn, xs, params, gout) -> dict:
    leaves = [t.detach().requires_grad_(True) for t in (*xs, *params)]

    def fwd():
        with torch.no_grad():
            fn(*xs, *params)

    def fwd_bwd():
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, leaves, gout[:len(outs)])

    res = {"fwd": bench(fwd, args.device, args.warmup_ms, args.rep_ms),
           "fwd+bwd": bench(fwd_bwd, args.device, args.warmup_ms, args.rep_ms)}
    res["fwd+bwd"]["peak_mem_mib"] = peak_memory_mib(fwd_bwd, args.device)
    return res


def _print(records, op, layout, stage) -> None:
    rows = [r for r in records if (r["op"], r["layout"], r["stage"]) == (op, layout, stage)]
    for pas in ("fwd", "fwd+bwd"):
        sel = {r["variant"]: r for r in rows if r["pass"] == pas}
        line = f"  {op:18} {'CL' if layout == 'channels_last' else 'NCHW':4} {stage:>9} {pas:7} |"
        line += "".join(f" {v} {r['median_ms']:.3f} ms ({r['gbps']:.0f} GB/s)" for v, r in sel.items())
        if "triton" in sel:
            t = sel["triton"]["median_ms"]
            line += " | triton" + "".join(f" {r['median_ms'] / t:.2f}x vs {v}" for v, r in sel.items() if v != "triton")
        print(line, flush=True)


def weighted(records) -> dict:
    """Per op, layout, pass and variant: the stage times weighted by convformer_s18's blocks per stage (ms),
    and the kernels' speed-up over each other variant on that sum."""
    sums = {}
    for r in records:
        if "skipped" in r:
            continue
        key = (r["op"], r["layout"], r["pass"])
        sums.setdefault(key, {}).setdefault(r["variant"], 0.0)
        sums[key][r["variant"]] += r["blocks"] * r["median_ms"]
    out = {}
    for (op, layout, pas), by_variant in sums.items():
        entry = {"ms": dict(by_variant)}
        if "triton" in by_variant:
            entry["triton_speedup"] = {v: ms / by_variant["triton"] for v, ms in by_variant.items() if v != "triton"}
        out[f"{op} {layout} {pas}"] = entry
    return out


__all__ = ["IDEAL", "OPS", "STAGES", "bench_glue", "weighted"]
