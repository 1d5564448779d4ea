"""CPU benchmark of poolformer_s12: timm's eager model vs metaformer's default and optimized models.

One process, one interleaved loop: every round times each variant once, so machine load drifts
affect all of them alike; the table reports medians over the rounds. Variants (fp32, batch 16,
224x224, ``torch.inference_mode``):

- ``timm``: ``timm.create_model("poolformer_s12")`` in eval mode, called on a plain NCHW batch;
- ``ours``: ``metaformer.create("poolformer_s12")``, default forward, same NCHW batch;
- ``ours_optimized``: ``metaformer.optimize_for_inference`` of that model, same batch.

Also a training step (forward + backward of ``logits.sum()``, train mode, batch 16) of ``timm``
and ``ours``. Throughput is compared with the machine's fp32 GEMM peak, measured in the same loop
as a 2048x2048 ``torch.mm`` (``2 * 2048**3`` FLOPs); model FLOPs are ``2 * MACs`` with the MACs
counted by ``torch.utils.flop_counter`` (convolutions and matmuls) on timm's model at batch 1
(the variant table says 1.8 GMACs).

Usage::

    python benchmarks/bench_cpu.py                       # writes benchmarks/results/cpu.json
    python benchmarks/bench_cpu.py --reps 15 --train-reps 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import metaformer

MODEL = "poolformer_s12"
GEMM_N = 2048


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--size", type=int, default=224, help="image side (default 224)")
    p.add_argument("--reps", type=int, default=11, help="interleaved inference rounds (median reported)")
    p.add_argument("--train-reps", type=int, default=5, help="interleaved training-step rounds (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "cpu.json",
                   help="JSON results file (default benchmarks/results/cpu.json)")
    return p.parse_args(argv)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _macs_per_image(model: torch.nn.Module, size: int) -> float:
    # Counted on timm's model: FlopCounterMode does not see the oneDNN fused primitives our eval path uses.
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()

    timm_model = timm.create_model(MODEL).eval()
    ours = metaformer.create(MODEL).eval()
    ours_opt = metaformer.optimize_for_inference(ours)
    x = torch.randn(args.batch, 3, args.size, args.size)
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    macs = _macs_per_image(timm_model, args.size)

    infer = {"timm": lambda: timm_model(x), "ours": lambda: ours(x), "ours_optimized": lambda: ours_opt(x)}
    times = {k: [] for k in infer}
    gemm = []
    with torch.inference_mode():
        for fn in infer.values():  # warm-up (oneDNN primitive caches, allocator)
            fn()
        torch.mm(a, b)
        for _ in range(args.reps):
            gemm.append(_timed(lambda: torch.mm(a, b)))
            for k, fn in infer.items():
                times[k].append(_timed(fn))
    peak = 2 * GEMM_N ** 3 / statistics.median(gemm)  # FLOP/s
    peak_best = 2 * GEMM_N ** 3 / min(gemm)
    load_mid = os.getloadavg()

    train_times = {}
    if args.train_reps > 0:
        t_train = timm.create_model(MODEL).train()
        o_train = metaformer.create(MODEL).train()

        def step(model):
            def run():
                model.zero_grad(set_to_none=True)
                model(x).sum().backward()
            return run

        steps = {"timm": step(t_train), "ours": step(o_train)}
        train_times = {k: [] for k in steps}
        for fn in steps.values():
            fn()
        for _ in range(args.train_reps):
            for k, fn in steps.items():
                train_times[k].append(_timed(fn))
    load_after = os.getloadavg()

    flops_per_image = 2 * macs
    results = {
        "model": MODEL, "batch": args.batch, "size": args.size, "dtype": "float32",
        "macs_per_image": macs, "flops_per_image": flops_per_image,
        "gemm_peak_gflops_median": peak / 1e9, "gemm_peak_gflops_best": peak_best / 1e9,
        "inference": {}, "train_step": {},
        "machine": {
            "cpu": _cpu_name(), "os_cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "metaformer": metaformer.__version__,
            "python": platform.python_version(),
            "loadavg_before": load_before, "loadavg_after_inference": load_mid, "loadavg_after": load_after,
        },
        "reps": args.reps, "train_reps": args.train_reps,
    }
    base = statistics.median(times["timm"])
    for k, ts in times.items():
        med = statistics.median(ts)
        ips = args.batch / med
        results["inference"][k] = {
            "median_s": med, "min_s": min(ts), "img_per_s": ips, "speedup_vs_timm": base / med,
            "gemm_peak_share": ips * flops_per_image / peak, "times_s": ts,
        }
    if train_times:
        base_t = statistics.median(train_times["timm"])
        for k, ts in train_times.items():
            med = statistics.median(ts)
            results["train_step"][k] = {"median_s": med, "min_s": min(ts), "img_per_s": args.batch / med,
                                        "speedup_vs_timm": base_t / med, "times_s": ts}

    m = results["machine"]
    print(f"{MODEL}, batch {args.batch}, {args.size}x{args.size}, fp32, CPU: {m['cpu']} "
          f"({m['os_cpu_count']} cores, {m['torch_threads']} torch threads), torch {m['torch']}, timm {m['timm']}")
    print(f"load average (1/5/15 min) before {_fmt_load(load_before)}, after inference {_fmt_load(load_mid)}, "
          f"after training {_fmt_load(load_after)}")
    print(f"fp32 GEMM peak ({GEMM_N}^3 torch.mm): median {peak / 1e9:.1f} GFLOP/s, best {peak_best / 1e9:.1f}; "
          f"model {macs / 1e9:.2f} GMACs/image = {flops_per_image / 1e9:.2f} GFLOPs/image")
    print(f"\ninference ({args.reps} interleaved rounds, median)")
    print(f"{'variant':<16}{'ms/batch':>10}{'min ms':>9}{'img/s':>9}{'vs timm':>9}{'GEMM peak':>11}")
    for k, r in results["inference"].items():
        print(f"{k:<16}{r['median_s'] * 1e3:>10.0f}{r['min_s'] * 1e3:>9.0f}{r['img_per_s']:>9.2f}"
              f"{r['speedup_vs_timm']:>8.2f}x{100 * r['gemm_peak_share']:>10.1f}%")
    if train_times:
        print(f"\ntraining step, forward + backward ({args.train_reps} interleaved rounds, median)")
        print(f"{'variant':<16}{'ms/step':>10}{'min ms':>9}{'img/s':>9}{'vs timm':>9}")
        for k, r in results["train_step"].items():
            print(f"{k:<16}{r['median_s'] * 1e3:>10.0f}{r['min_s'] * 1e3:>9.0f}{r['img_per_s']:>9.2f}"
                  f"{r['speedup_vs_timm']:>8.2f}x")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return results


def _fmt_load(load) -> str:
    return "/".join(f"{v:.2f}" for v in load)


if __name__ == "__main__":
    main()
