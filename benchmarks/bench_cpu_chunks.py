"""CPU evaluation with and without cache-sized chunks (see ``docs/kernels.md``).

In evaluation a block whose MLP hidden tensor would exceed ``metaformer.kernels.cpu_eval._CHUNK_ABOVE``
runs a few samples at a time, unless the process keeps freed blocks of that size
(``cpu_eval.KEPT_BLOCK_BYTES``, from glibc's settings at start): ``default`` is that rule, ``chunks`` chunks
whatever the settings, ``no_chunks`` raises the threshold out of reach. Run it once as it is and once with
``MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000`` to see both sides of the rule.

One process; every model is timed in interleaved rounds, each round calling both variants once in an
order alternated from round to round, so load drifts affect them alike. Medians, img/s, and the ratio to
the default. fp32, ``torch.inference_mode``, batch 16, 224x224.

Usage::

    python benchmarks/bench_cpu_chunks.py                            # poolformer_s12 ... caformer_s18
    python benchmarks/bench_cpu_chunks.py --models poolformerv2_s12 --rounds 21 --output /tmp/chunks.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import metaformer
from metaformer.kernels import cpu_eval

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_models import write_results  # noqa: E402

MODELS = ("poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18")
# name -> (chunk threshold, kept block bytes); None: the library's own
VARIANTS = {"default": (None, None), "chunks": (None, 0), "no_chunks": (1 << 62, None)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=metaformer.list_models())
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=11, help="interleaved rounds (median reported)")
    p.add_argument("--output", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.size < 32 or args.rounds < 1:
        p.error("--batch and --rounds must be at least 1 and --size at least 32")
    return args


def time_model(name: str, batch: int, size: int, rounds: int) -> dict:
    """Median seconds per forward of each variant, timed in interleaved rounds."""
    model = metaformer.create(name).eval()
    x = torch.randn(batch, 3, size, size)
    chunk_above, kept = cpu_eval._CHUNK_ABOVE, cpu_eval.KEPT_BLOCK_BYTES
    times = {k: [] for k in VARIANTS}
    try:
        with torch.inference_mode():
            for i in range(rounds):
                order = list(VARIANTS)
                order = order[i % len(order):] + order[:i % len(order)]
                for key in order:
                    above, kept_bytes = VARIANTS[key]
                    cpu_eval._CHUNK_ABOVE = chunk_above if above is None else above
                    cpu_eval.KEPT_BLOCK_BYTES = kept if kept_bytes is None else kept_bytes
                    model(x)  # weights packed for this variant's shapes, outside the timing
                    start = time.perf_counter()
                    model(x)
                    times[key].append(time.perf_counter() - start)
    finally:
        cpu_eval._CHUNK_ABOVE, cpu_eval.KEPT_BLOCK_BYTES = chunk_above, kept
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    print(f"batch {args.batch}, {args.size}x{args.size}, fp32, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; img/s (ratio to default)")
    for name in args.models:
        med = time_model(name, args.batch, args.size, args.rounds)
        results[name] = {k: {"median_s": v, "img_per_s": args.batch / v, "vs_default": med["default"] / v}
                         for k, v in med.items()}
        print(f"{name:20s} " + "  ".join(f"{k} {args.batch / v:6.2f} ({med['default'] / v:.2f}x)"
                                         for k, v in med.items()), flush=True)
    write_results(args.output, {"batch": args.batch, "size": args.size, "rounds": args.rounds,
                                "kept_block_bytes": cpu_eval.KEPT_BLOCK_BYTES}, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
