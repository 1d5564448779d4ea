"""CPU evaluation under glibc's default allocator settings and with freed memory kept, ours and timm.

With its default settings glibc's ``malloc`` hands the large blocks of a forward pass back to the
operating system when they are freed (``mmap`` above a sliding threshold, heap trimming above twice
it), so the next forward faults every page in again and the kernel zeroes it. This script counts those
minor page faults per forward and times the same models in processes started with
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set out of reach (``kept``: nothing is handed
back, so nothing faults after the first call) against processes without them (``default``).

The settings are per process (glibc reads them at start), so the two sides cannot share one process:
each round starts one process per (model side, allocator) pair, in an order rotated from round to round,
and each process reports the median of its own timed forwards. The table gives the median over rounds
and the faults per forward. fp32, ``torch.inference_mode``, batch 16, 224x224; timm's side is its model
in channels_last (its faster layout for these models on this machine, see ``bench_cpu.py``).

Usage::

    python benchmarks/bench_cpu_allocator.py                      # poolformer_s12, caformer_s18, 5 rounds
    python benchmarks/bench_cpu_allocator.py --models convformer_s18 --rounds 3 --output /tmp/alloc.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("poolformer_s12", "caformer_s18")
SIDES = ("ours", "timm_cl")
ALLOCATORS = {"default": {}, "kept": {"MALLOC_MMAP_THRESHOLD_": "4000000000",
                                      "MALLOC_TRIM_THRESHOLD_": "4000000000"}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   choices=("poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="rounds of processes (median reported)")
    p.add_argument("--calls", type=int, default=5, help="timed forwards in each process (after 2 warm-up calls)")
    p.add_argument("--output", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.size < 32 or args.rounds < 1 or args.calls < 1:
        p.error("--batch, --rounds and --calls must be at least 1 and --size at least 32")
    return args


def measure(name: str, side: str, batch: int, size: int, calls: int) -> dict:
    """Median ms and minor page faults per forward of one model side, in this process (and whether this
    process runs with the ``kept`` settings)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cpu_models  # the models exactly as bench_cpu.py builds its "ours" and "timm_cl" variants

    forward, _x = cpu_models.make_variant(name, side, False, batch, size)
    times, faults = [], []
    with torch.inference_mode():
        for _ in range(2):
            forward()
        for _ in range(calls):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    kept = all(os.environ.get(k) == v for k, v in ALLOCATORS["kept"].items())
    return {"ms": 1e3 * statistics.median(times), "faults": statistics.median(faults), "kept": kept}


def _in_child(name: str, side: str, allocator: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATORS["kept"]}
    env.update(ALLOCATORS[allocator])
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_cpu_allocator as b; "
            "print(json.dumps(b.measure(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:]))))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), name, side,
                           str(args.batch), str(args.size), str(args.calls)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} {side} ({allocator}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    pairs = [(side, alloc) for side in SIDES for alloc in ALLOCATORS]
    results = {}
    for name in args.models:
        runs = {pair: [] for pair in pairs}
        for i in range(args.rounds):
            for pair in pairs[i % len(pairs):] + pairs[:i % len(pairs)]:
                runs[pair].append(_in_child(name, *pair, args))
        row = {}
        for (side, alloc), got in runs.items():
            row[f"{side}/{alloc}"] = {"median_ms": statistics.median(r["ms"] for r in got),
                                      "faults_per_forward": statistics.median(r["faults"] for r in got)}
        for side in SIDES:
            row[f"{side}/kept"]["vs_default"] = row[f"{side}/default"]["median_ms"] / row[f"{side}/kept"]["median_ms"]
        for alloc in ALLOCATORS:
            row[f"ours/{alloc}"]["vs_timm_cl"] = row[f"timm_cl/{alloc}"]["median_ms"] / row[f"ours/{alloc}"]["median_ms"]
        results[name] = row
        print(f"{name}: (batch {args.batch}, {args.size}x{args.size}, {args.rounds} rounds)")
        for key, r in row.items():
            extra = "  ".join(f"{k} {v:.2f}x" for k, v in r.items() if k.startswith("vs_"))
            print(f"  {key:16s} {r['median_ms']:8.1f} ms  {r['faults_per_forward']:8.0f} faults/forward  {extra}")
    if args.output is not None:
        from metaformer.files import write_text

        setup = {"batch": args.batch, "size": args.size, "rounds": args.rounds, "calls": args.calls,
                 "threads": os.cpu_count(), "allocators": ALLOCATORS}
        records = [{"model": name, "side": key.split("/")[0], "allocator": key.split("/")[1], **r}
                   for name, row in results.items() for key, r in row.items()]
        write_text(args.output, json.dumps({"setup": setup, "records": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
