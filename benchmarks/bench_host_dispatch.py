"""The host's Python work of the CUDA fast paths, measured on a CPU: the dispatch, the kernels' launch code and
Triton's own host functions, with every Triton launch replaced by a no-op.

    python benchmarks/bench_host_dispatch.py --output benchmarks/results/host_dispatch.json
    python benchmarks/bench_host_dispatch.py --src /tmp/old/src src   # two source trees, interleaved rounds

On a GPU ours is launch-bound at batch 128 (``benchmarks/results/gpu.md``): the host's time is the eager time,
and a slow host stretches it. This script measures the part of that time that is our own Python and
Triton's launch preparation, on any machine: under ``TRITON_INTERPRET=1`` with the ``"triton"`` backend the
CUDA block halves run on CPU tensors, and replacing the kernels' ``kernel[grid](...)`` calls with no-ops
leaves everything around them. Per model (batch 1 at 8x8 by default, so that PyTorch's CPU operations stay
small), inference and a training step's forward and backward:

- ``wall_ms``: the median time per call (PyTorch's CPU operations included; compare it only between trees);
- ``ours_us``: cProfile's own time of metaformer's functions per call, ``triton_us`` that of Triton's host
  functions (``triton.cdiv`` and the like), ``calls``: Python calls in metaformer per call. cProfile
  inflates call-heavy code, so compare these between trees or commits, not with a GPU's figures.

Each tree runs in its own subprocess (``PYTHONPATH`` set to it), the trees alternating over ``--rounds``; the
summary gives the medians over rounds and each tree's ratio to the first. No GPU is needed, and nothing is
measured on one: the GPU's own figures come from ``bench_gpu_host.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_common import alternating, tree_problem, write_json  # noqa: E402

MODELS = ["poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"]
MODES = ("inference", "train")

# Runs in a subprocess with PYTHONPATH set to one tree and TRITON_INTERPRET=1; prints one JSON line.
CHILD = r'''
import cProfile, json, pstats, statistics, sys, time
import torch
import metaformer
from metaformer import kernels
from metaformer.kernels import triton_kernels, triton_ln_kernels


class NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


for module in (triton_kernels, triton_ln_kernels):
    for name in dir(module):
        if name.endswith("_kernel"):
            setattr(module, name, NoLaunch())
torch.set_num_threads(1)
kernels.set_backend("triton")
models, size, calls = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
out = {}
for name in models:
    torch.manual_seed(0)
    model = metaformer.create(name).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    for mode in ("inference", "train"):
        model.train(mode == "train")

        def run():
            if mode == "inference":
                with torch.inference_mode():
                    return model(x)
            model.zero_grad(set_to_none=True)
            model(x).float().sum().backward()

        for _ in range(3):
            run()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(calls):
            run()
        profile.disable()
        stats = pstats.Stats(profile).stats
        own = [(path, tt, n) for (path, _, _), (_, n, tt, _, _) in stats.items()]
        out[f"{name} {mode}"] = {
            "wall_ms": 1e3 * statistics.median(times),
            "ours_us": 1e6 * sum(tt for p, tt, _ in own if "metaformer" in p) / calls,
            "triton_us": 1e6 * sum(tt for p, tt, _ in own if "site-packages" in p and "triton" in p) / calls,
            "calls": sum(n for p, _, n in own if "metaformer" in p) / calls,
        }
print(json.dumps(out))
'''


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", nargs="+", default=[str(HERE.parent / "src")],
                   help="source trees to compare (each a directory holding the metaformer package)")
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--size", type=int, default=8, help="input side (batch 1)")
    p.add_argument("--calls", type=int, default=20, help="timed and profiled calls per case and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the trees alternating")
    p.add_argument("--output", type=Path, default=HERE / "results" / "host_dispatch.json")
    return p.parse_args(argv)


def run_tree(src: str, args) -> dict:
    """One round of one tree, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": src, "TRITON_INTERPRET": "1"}
    env.pop("METAFORMER_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(args.models), str(args.size), str(args.calls)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_host_dispatch: the run of {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = tree_problem(args.src)
    if problem:
        print(f"bench_host_dispatch: --src: {problem}", file=sys.stderr)
        return 2
    rounds = {src: [] for src in args.src}
    for r, src in alternating(args.src, args.rounds):
        rounds[src].append(run_tree(src, args))
        print(f"  round {r + 1}: {src} done", flush=True)
    cases = list(rounds[args.src[0]][0])
    summary = {src: {case: {k: statistics.median(rd[case][k] for rd in rs) for k in rs[0][case]} for case in cases}
               for src, rs in rounds.items()}
    base = args.src[0]
    print(f"\n{'case':26} {'tree':>6} {'wall ms':>9} {'ours us':>9} {'triton us':>10} {'calls':>7}   vs tree 1 "
          "(ours + triton)")
    for case in cases:
        for i, src in enumerate(args.src, 1):
            s, b = summary[src][case], summary[base][case]
            ratio = (b["ours_us"] + b["triton_us"]) / (s["ours_us"] + s["triton_us"])
            print(f"{case:26} {i:>6} {s['wall_ms']:9.2f} {s['ours_us']:9.0f} {s['triton_us']:10.0f} {s['calls']:7.0f}"
                  f"   {ratio:.2f}x")
    write_json(args.output, {"kind": "host_dispatch", "settings": {k: str(v) if isinstance(v, Path) else v
                                                                   for k, v in vars(args).items()},
                             "trees": args.src, "rounds": rounds, "summary": summary})
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
