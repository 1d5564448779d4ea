"""What the dispatch's hook check costs in a CPU forward (see ``docs/kernels.md``, "Where they never run").

Before a block takes its fused paths, :func:`metaformer.kernels.guards.parts_hooked` walks the block's
parts for hooks (a hooked part sends the block to its plain composition). This script times that walk
over every block of a model against the model's forward, in interleaved rounds in one process, and
reports the medians and the check's share of the forward. fp32, ``torch.inference_mode``, 224x224.

Usage::

    python benchmarks/bench_cpu_hook_check.py                        # poolformer_s12, caformer_s18; batch 1, 16
    python benchmarks/bench_cpu_hook_check.py --models convformer_s18 --batches 1 --output /tmp/hooks.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import metaformer
from metaformer import MetaFormerBlock
from metaformer.kernels.guards import parts_hooked

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_models import write_results  # noqa: E402

MODELS = ("poolformer_s12", "caformer_s18")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=metaformer.list_models())
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=11, help="interleaved rounds (median reported)")
    p.add_argument("--output", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if min(args.batches) < 1 or args.size < 32 or args.rounds < 1:
        p.error("--batches and --rounds must be at least 1 and --size at least 32")
    return args


def time_model(name: str, batch: int, size: int, rounds: int) -> dict:
    """Median seconds of one forward and of the hook check over all its blocks, timed in interleaved rounds."""
    model = metaformer.create(name).eval()
    blocks = [m for m in model.modules() if type(m) is MetaFormerBlock]
    x = torch.randn(batch, 3, size, size)
    forward, check = [], []
    with torch.inference_mode():
        model(x)  # weights folded and packed outside the timing
        for _ in range(rounds):
            start = time.perf_counter()
            model(x)
            forward.append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(10):
                hooked = [parts_hooked(b) for b in blocks]
            check.append((time.perf_counter() - start) / 10)
    assert not any(hooked), "a block of a fresh model has hooks"
    fwd, chk = statistics.median(forward), statistics.median(check)
    return {"blocks": len(blocks), "forward_s": fwd, "check_s": chk, "check_per_block_s": chk / len(blocks),
            "share": chk / fwd}


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    print(f"{args.size}x{args.size}, fp32, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for name in args.models:
        for batch in args.batches:
            r = time_model(name, batch, args.size, args.rounds)
            results[f"{name}@{batch}"] = r
            print(f"{name:20s} batch {batch:3d}: forward {r['forward_s'] * 1e3:8.2f} ms, check {r['check_s'] * 1e6:6.1f} us "
                  f"({r['check_per_block_s'] * 1e6:.1f} us x {r['blocks']} blocks) = {100 * r['share']:.2f}%",
                  flush=True)
    write_results(args.output, {"batches": args.batches, "size": args.size, "rounds": args.rounds}, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
