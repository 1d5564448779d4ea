"""PyTorch's CPU LayerNorm with and without a weight (see ``docs/kernels.md``, "The norm without affine").

The fast paths fold the channel LayerNorm's affine into the next convolution, so the norm they run has no
affine of its own. PyTorch's CPU forward without a weight runs a scalar loop; with one, a vectorised loop.
This script times ``F.layer_norm`` over the channels of the (B, H, W, C) rows of convformer_s18's stages
(batch 16 at 224x224 by default) without a weight, with a weight of ones (what the fast paths pass: the same
values, bit for bit) and with a weight and a bias, forward and backward, in interleaved rounds in one
process, and reports the medians and the ratio to the weightless call. fp32.

Usage::

    python benchmarks/bench_cpu_layernorm.py
    python benchmarks/bench_cpu_layernorm.py --batch 4 --rounds 5 --output /tmp/ln.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_models import write_results  # noqa: E402

# convformer_s18's stages at 224x224: (side, channels)
STAGES = ((56, 64), (28, 128), (14, 320), (7, 512))
VARIANTS = ("none", "ones", "ones_zeros")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224, help="image side; the stages are 1/4 ... 1/32 of it")
    p.add_argument("--rounds", type=int, default=21, help="interleaved rounds (median reported)")
    p.add_argument("--calls", type=int, default=5, help="calls per timing")
    p.add_argument("--output", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.calls < 1 or args.size < 32:
        p.error("--batch, --rounds and --calls must be at least 1 and --size at least 32")
    return args


def _affine(variant: str, c: int):
    ones, zeros = torch.ones(c), torch.zeros(c)
    return {"none": (None, None), "ones": (ones, None), "ones_zeros": (ones, zeros)}[variant]


def time_shape(batch: int, side: int, c: int, rounds: int, calls: int) -> dict:
    """Median seconds of one forward and one backward per variant, timed in interleaved rounds."""
    rows = torch.randn(batch * side * side, c)
    stats = {v: torch.native_layer_norm(rows, (c,), *_affine(v, c), 1e-6) for v in VARIANTS}
    grad = torch.randn_like(rows)
    forward = {v: [] for v in VARIANTS}
    backward = {v: [] for v in VARIANTS}
    with torch.no_grad():
        for v in VARIANTS:
            assert torch.equal(stats[v][0], stats["none"][0]), "a weight of ones changed the output"
        for _ in range(rounds):
            for v in VARIANTS:
                w, b = _affine(v, c)
                start = time.perf_counter()
                for _ in range(calls):
                    F.layer_norm(rows, (c,), w, b, 1e-6)
                forward[v].append((time.perf_counter() - start) / calls)
                _, mean, rstd = stats[v]
                start = time.perf_counter()
                for _ in range(calls):
                    torch.ops.aten.native_layer_norm_backward(grad, rows, (c,), mean, rstd, w, b, [True, False, False])
                backward[v].append((time.perf_counter() - start) / calls)
    out = {}
    for v in VARIANTS:
        out[v] = {"forward_s": statistics.median(forward[v]), "backward_s": statistics.median(backward[v])}
    for v in VARIANTS:
        out[v]["forward_vs_none"] = out["none"]["forward_s"] / out[v]["forward_s"]
        out[v]["backward_vs_none"] = out["none"]["backward_s"] / out[v]["backward_s"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    print(f"fp32, {torch.get_num_threads()} threads, {args.rounds} rounds; speed-up over no weight in brackets")
    for side, c in STAGES:
        side = max(1, side * args.size // 224)
        key = f"{args.batch}x{side}x{side}x{c}"
        r = results[key] = time_shape(args.batch, side, c, args.rounds, args.calls)
        cells = ", ".join(f"{v} fwd {r[v]['forward_s'] * 1e3:.3f} ms ({r[v]['forward_vs_none']:.2f}x) "
                          f"bwd {r[v]['backward_s'] * 1e3:.3f} ms ({r[v]['backward_vs_none']:.2f}x)" for v in VARIANTS)
        print(f"{key:16s} {cells}", flush=True)
    write_results(args.output, {"batch": args.batch, "size": args.size, "rounds": args.rounds,
                                "calls": args.calls}, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
