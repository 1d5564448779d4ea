"""Where a forward's time goes on a GPU: the host's (Python and kernel launches) against the GPU's, ours and
timm's.

    PYTHONPATH=src python benchmarks/bench_gpu_host.py --output benchmarks/results/h100/gpu_host.json
    PYTHONPATH=src python benchmarks/bench_gpu_host.py --smoke --output /tmp/host.json   # the plumbing, on CPU

Per model and side (channels_last, bf16 autocast, batch 128 at 224x224), for inference (``inference_mode``)
and a training step's forward and backward:

- ``host_ms``: the time the call takes to return after a synchronisation (the host enqueues the work and
  returns; the median of eight calls, and the fastest);
- ``wall_ms``: until the GPU has finished;
- ``launches``: kernel launches per call (``torch.profiler``);
- ``graph_ms`` (inference): the replay of the call captured in a CUDA graph (``do_bench_cudagraph``): the
  GPU's time alone;
- ours only, ``--profile``: cProfile of three calls (the top functions by their own time and by cumulative time).

``--trees A B ...`` compares ours from several source trees (each a directory holding the ``metaformer``
package, e.g. an older commit's ``src`` from ``git archive``): each tree runs in its own subprocess with
``PYTHONPATH`` set to it, the trees alternating over ``--rounds``, and the summary gives each tree's median
host, wall and graph time per model and mode, and its ratio to the first tree's (above 1: faster).

When ``host_ms`` is about ``wall_ms`` the call is launch-bound: the GPU waits for the host, and the eager
figures move with the host's speed and load. ``graph_ms`` against timm's is then the comparison of the work
on the GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import alternating, begin, bench, settings, tree_problem, write_json  # noqa: E402

MODELS = ["poolformer_s12", "poolformerv2_s12", "identityformer_s12", "convformer_s18", "caformer_s18"]
TIMM = {"poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"}  # timm registers these
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--sides", nargs="+", default=["ours", "timm"], choices=["ours", "timm"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--calls", type=int, default=8, help="timed calls per case")
    p.add_argument("--profile", action="store_true", help="cProfile ours (three calls per case)")
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "gpu_host.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device: the plumbing only")
    p.add_argument("--trees", nargs="+", type=Path, help="source trees to compare (ours only), in subprocesses")
    p.add_argument("--rounds", type=int, default=2, help="with --trees: rounds, the trees alternating")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.size, args.calls = 2, 64, 2
    args.device = torch.device("cpu" if args.smoke else "cuda")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def launches(fn, device: torch.device) -> int:
    """Kernel launches during one call of ``fn`` (0 on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    return sum(e.count for e in prof.key_averages() if e.key in LAUNCH_EVENTS)


def case(args, model, train: bool, profile: bool) -> dict:
    """One model in one mode: host and wall time, launches, the graph replay (inference on CUDA)."""
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device).contiguous(memory_format=torch.channels_last)
    model.train(train)

    def fn():
        if train:
            with torch.autocast(args.device.type, torch.bfloat16):
                y = model(x)
            y.float().logsumexp(1).mean().backward()
            return
        with torch.inference_mode(), torch.autocast(args.device.type, torch.bfloat16):
            model(x)

    for _ in range(3):
        fn()
    host, wall = [], []
    for _ in range(args.calls):
        _sync(args.device)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        _sync(args.device)
        host.append(1e3 * (t1 - t0))
        wall.append(1e3 * (time.perf_counter() - t0))
    r = {"host_ms": statistics.median(host), "host_min_ms": min(host), "wall_ms": statistics.median(wall),
         "launches": launches(fn, args.device)}
    if not train and args.device.type == "cuda":
        r["graph_ms"] = bench(fn, args.device, 25.0, 100.0, "cudagraph")["median_ms"]
    if profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(3):
            fn()
        pr.disable()
        _sync(args.device)
        for order, top in (("tottime", 35), ("cumulative", 45)):
            out = io.StringIO()
            pstats.Stats(pr, stream=out).sort_stats(order).print_stats(top)
            r[f"profile_{order}"] = out.getvalue()
    model.eval()
    return r


def build(side: str, name: str):
    if side == "ours":
        import metaformer

        return metaformer.create(name)
    import timm

    return timm.create_model(name)


def compare_trees(args, argv) -> int:
    """``--trees``: this script on ours alone, once per tree and round in a subprocess (the trees alternating),
    then the medians per tree and their ratios to the first tree."""
    import subprocess
    import tempfile

    trees = [str(t.resolve()) for t in args.trees]
    problem = tree_problem(trees)
    if problem:
        print(f"bench_gpu_host: --trees: {problem}", file=sys.stderr)
        return 2
    child = _without(list(argv if argv is not None else sys.argv[1:]), ("--trees", "--rounds", "--output", "--sides"))
    rounds = {tree: [] for tree in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (r, tree) in enumerate(alternating(trees, args.rounds)):
            out = Path(tmp) / f"run{i}.json"
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *child, "--sides", "ours",
                                   "--output", str(out)], env=env, text=True, capture_output=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:] + proc.stderr[-3000:], file=sys.stderr)
                print(f"bench_gpu_host: the run of {tree} failed", file=sys.stderr)
                return 1
            run = json.loads(out.read_text())
            if Path(run["metaformer_path"]).parent != Path(tree):
                print(f"bench_gpu_host: the run of {tree} imported metaformer from {run['metaformer_path']}; "
                      "put the tree first on the path (an installed copy may shadow it)", file=sys.stderr)
                return 1
            rounds[tree].append(run)
            print(f"  round {r + 1}: {tree} done", flush=True)
    first = rounds[trees[0]][0]
    keys = ("host_ms", "wall_ms", "graph_ms")
    summary = {}
    for tree, runs in rounds.items():
        summary[tree] = {}
        for model in first["models"]:
            summary[tree][model] = {mode: {k: statistics.median(run["models"][model][mode][k] for run in runs)
                                           for k in keys if k in first["models"][model][mode]}
                                    for mode in first["models"][model]}
    print(f"\n{'model, mode':30} {'tree':>4} {'host ms':>8} {'wall ms':>8} {'graph ms':>9}   host vs tree 1")
    for model in first["models"]:
        for mode in first["models"][model]:
            base = summary[trees[0]][model][mode]
            for i, tree in enumerate(trees, 1):
                s = summary[tree][model][mode]
                graph = f"{s['graph_ms']:9.2f}" if "graph_ms" in s else f"{'-':>9}"
                print(f"{model + ', ' + mode:30} {i:>4} {s['host_ms']:8.2f} {s['wall_ms']:8.2f} {graph}   "
                      f"{base['host_ms'] / s['host_ms']:.2f}x")
    write_json(args.output, {"kind": "gpu_host_trees", "machine": first["machine"], "settings": settings(args),
                             "trees": trees, "rounds": rounds, "summary": summary})
    print(f"\nwrote {args.output}")
    return 0


def _without(argv: list, options: tuple) -> list:
    """``argv`` without ``options`` and the values that follow each."""
    out, skipping = [], False
    for a in argv:
        if a.startswith("--"):
            skipping = a.split("=")[0] in options
            if skipping:
                continue
        elif skipping:
            continue
        out.append(a)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trees:
        return compare_trees(args, argv)
    results = begin(args, "gpu_host", models={})
    if results is None:
        return 1
    import metaformer

    results["metaformer_path"] = str(Path(metaformer.__file__).resolve().parent)  # which tree ran
    for name in args.models:
        for side in args.sides:
            if side == "timm" and name not in TIMM:
                continue
            torch.manual_seed(0)
            model = build(side, name).to(args.device).to(memory_format=torch.channels_last)
            profile = args.profile and side == "ours"
            r = results["models"][f"{name} {side}"] = {mode: case(args, model, mode == "train", profile)
                                                      for mode in ("inference", "train")}
            inf, tr = r["inference"], r["train"]
            graph = f", graph {inf['graph_ms']:.2f}" if "graph_ms" in inf else ""
            print(f"  {name:18} {side:4} inference host {inf['host_ms']:6.2f} wall {inf['wall_ms']:6.2f}{graph} ms, "
                  f"{inf['launches']} launches | train host {tr['host_ms']:6.2f} wall {tr['wall_ms']:6.2f} ms, "
                  f"{tr['launches']} launches", flush=True)
            write_json(args.output, results)
            del model
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
    write_json(args.output, results)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
