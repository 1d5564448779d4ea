"""CPU evaluation at a few batch sizes in turn against each batch size alone (see ``docs/kernels.md``,
"Folded weights are cached, never stale").

A server with varying batches, or a segmentation model on images of several sizes, evaluates one model at
several input shapes in turn. Our evaluation paths keep oneDNN weights packed per input shape; this script
times each batch size ``steady`` (the same size twice, the second call timed) and ``in_turn`` (all sizes
one after the other), in interleaved rounds in one process, for ours and for timm in channels_last, and
reports the medians and ``in_turn / steady`` (1.0: changing shape costs nothing). fp32,
``torch.inference_mode``, 224x224.

Usage::

    python benchmarks/bench_cpu_shapes.py                          # poolformer_s12, convformer_s18; batches 1-4
    python benchmarks/bench_cpu_shapes.py --models caformer_s18 --batches 1 8 --output /tmp/shapes.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

import metaformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_models import write_results  # noqa: E402

MODELS = ("poolformer_s12", "convformer_s18")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=metaformer.list_models())
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 3, 4])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--output", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if min(args.batches) < 1 or len(set(args.batches)) < 2 or args.size < 32 or args.rounds < 1:
        p.error("--batches needs two or more sizes of at least 1, --rounds at least 1 and --size at least 32")
    return args


def _side(name: str, side: str):
    if side == "ours":
        return metaformer.create(name).eval(), torch.contiguous_format
    return timm.create_model(name).eval().to(memory_format=torch.channels_last), torch.channels_last


def time_model(name: str, batches, size: int, rounds: int) -> dict:
    """Per side and batch size: median seconds of a call steady and in turn, and their ratio."""
    sides = {side: _side(name, side) for side in ("ours", "timm_cl")}
    xs = {side: {b: torch.randn(b, 3, size, size).contiguous(memory_format=fmt) for b in batches}
          for side, (_, fmt) in sides.items()}
    times = {side: {b: {"steady": [], "in_turn": []} for b in batches} for side in sides}
    with torch.inference_mode():
        for r in range(rounds):
            for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                model = sides[side][0]
                for b in batches:
                    model(xs[side][b])
                    start = time.perf_counter()
                    model(xs[side][b])
                    times[side][b]["steady"].append(time.perf_counter() - start)
                for b in batches:
                    start = time.perf_counter()
                    model(xs[side][b])
                    times[side][b]["in_turn"].append(time.perf_counter() - start)
    out = {}
    for side, per_batch in times.items():
        for b, t in per_batch.items():
            steady, in_turn = statistics.median(t["steady"]), statistics.median(t["in_turn"])
            out[f"{side}@{b}"] = {"steady_s": steady, "in_turn_s": in_turn, "in_turn_vs_steady": in_turn / steady}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    print(f"{args.size}x{args.size}, fp32, {torch.get_num_threads()} threads, {args.rounds} rounds, "
          f"batches {args.batches} in turn")
    for name in args.models:
        rows = time_model(name, args.batches, args.size, args.rounds)
        results[name] = rows
        for key, r in rows.items():
            print(f"{name:18s} {key:10s} steady {r['steady_s'] * 1e3:8.1f} ms, in turn {r['in_turn_s'] * 1e3:8.1f} ms "
                  f"({r['in_turn_vs_steady']:.2f}x)", flush=True)
    write_results(args.output, {"batches": args.batches, "size": args.size, "rounds": args.rounds}, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
