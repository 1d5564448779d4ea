"""Whole-model part of bench_pool_mixer_gpu.py: timm's model and ours, eager and compiled.

bf16 autocast, channels_last model and input, batch 128 at 224x224 by default; inference
(``torch.no_grad``) and a training step (forward, loss, backward, gradients set to None), timed
like the mixer half, and the peak memory of a training step. Before timing, our model's logits on
the Triton path are compared with the same model on the PyTorch path.
"""

from __future__ import annotations

import torch
from gpu_common import BenchmarkError, bench, rel_diff


def _step(model, x, train: bool, device):
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if train:
                model(x).float().logsumexp(1).mean().backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(x)
    return run


def _peak_memory_mib(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _check_ours(model, x, device) -> float:
    """Relative max difference of our logits, Triton path vs PyTorch path (bf16 autocast)."""
    import metaformer.kernels as K

    outs = {}
    for backend in ("auto", "torch"):
        K.set_backend(backend)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            outs[backend] = model(x).float()
    K.set_backend("auto")
    err = rel_diff(outs["auto"], outs["torch"])
    if not err <= 3e-2:
        raise BenchmarkError(f"our model's logits on the Triton path differ from the PyTorch path by {err:.3g} "
                             "(relative to the largest logit)")
    return err


def _ratios(results: dict) -> None:
    for part in ("inference", "train_step"):
        rows = results[part]
        base = rows.get("timm")
        for r in rows.values():
            if base:
                r["speedup_vs_timm"] = base["median_ms"] / r["median_ms"]
            if base and r.get("peak_mem_mib") and base.get("peak_mem_mib"):
                r["peak_mem_vs_timm"] = r["peak_mem_mib"] / base["peak_mem_mib"]
    ours = results["train_step"].get("ours", {})
    results["target_train_step_1.3x_timm_at_0.75x_memory"] = (
        ours["speedup_vs_timm"] >= 1.3 and ours["peak_mem_vs_timm"] <= 0.75 if "peak_mem_vs_timm" in ours else None)


def bench_models(args, results: dict, save) -> None:
    """Adds the whole-model rows to ``results`` (``inference``, ``train_step``: variant -> timings),
    calling ``save()`` after each variant."""
    import timm

    import metaformer
    import metaformer.kernels as K

    device = args.device
    K.set_backend("auto")
    fmt = torch.channels_last
    x = torch.randn(args.model_batch, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
    build = {"timm": lambda: timm.create_model(args.model), "ours": lambda: metaformer.create(args.model)}
    variants = [v for v in args.model_variants if not (v.endswith("compiled") and args.no_compile)]
    results.update({"model": args.model, "model_batch": args.model_batch, "size": args.size, "autocast": "bfloat16",
                    "memory_format": "channels_last", "inference": {}, "train_step": {}})
    print(f"\nwhole model {args.model}, batch {args.model_batch}, {args.size}x{args.size}, bf16 autocast, "
          f"channels_last, {device}", flush=True)
    for name in variants:
        torch.manual_seed(0)
        model = build[name.split("_")[0]]().to(device).to(memory_format=fmt)
        if name == "ours" and device.type == "cuda":
            results["logits_rel_diff_triton_vs_torch"] = _check_ours(model.eval(), x, device)
        if name.endswith("compiled"):
            torch._dynamo.reset()
            model = torch.compile(model, dynamic=False)
        for train in (False, True):
            model.train(train)
            fn = _step(model, x, train, device)
            r = bench(fn, device, args.warmup_ms, args.model_rep_ms)
            r["img_per_s"] = args.model_batch / (r["median_ms"] * 1e-3)
            if train:
                r["peak_mem_mib"] = _peak_memory_mib(fn, device)
            results["train_step" if train else "inference"][name] = r
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _ratios(results)
        for part in ("inference", "train_step"):
            r = results[part][name]
            print(f"  {name:14} {part:10}: {r['median_ms']:8.2f} ms, {r['img_per_s']:6.0f} img/s"
                  + (f", {r['speedup_vs_timm']:.2f}x timm" if "speedup_vs_timm" in r else "")
                  + (f", peak {r['peak_mem_mib']:.0f} MiB" if r.get("peak_mem_mib") else "")
                  + (f" = {r['peak_mem_vs_timm']:.2f}x timm" if "peak_mem_vs_timm" in r else ""), flush=True)
        save()
