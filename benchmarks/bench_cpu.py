"""CPU benchmark of every MetaFormer family: timm (NCHW, channels_last, torch.compile) against ours.

One process; for each model and pass, every variant is built, warmed up (torch.compile compiles
then), and timed in interleaved rounds: each round calls every variant once, in an order rotated from
round to round, so load drifts affect all of them alike. The table reports medians over the rounds.
fp32, batch 16, 224x224 by default, torch's default thread count (the machine's cores).

Variants:

- ``timm_nchw``, ``timm_cl``: timm's model on an NCHW batch, and with the model and batch in
  channels_last (``model.to(memory_format=torch.channels_last)``); ``timm_best`` is the faster of the two;
- ``timm_compiled``, ``timm_compiled_cl``: ``torch.compile(timm model)`` (Inductor, default mode) on the
  NCHW batch, and in channels_last; ``timm compiled`` in the table is the faster of the two;
- ``ours``: ``metaformer.create(name)``, default forward (the fused paths), on the NCHW batch;
- ``ours_optimized`` (inference): ``metaformer.optimize_for_inference`` of that model;
- ``ours_compiled``: ``torch.compile(our model)``;
- ``floor``: every ``nn.Conv2d`` / ``nn.Linear`` call of the model and every attention product
  (``scaled_dot_product_attention``, the kernel timm's attention and ours both use; recorded with hooks on
  the plain composition) run on its own, same shapes and layout, forward (and, in training, backward): the
  work any implementation must do. In inference the convolutions run as oneDNN primitives on weights packed
  once (``nn.Conv2d`` reorders its weight on every call, which a packed model does not pay); in training the
  depthwise convolutions run as our SepConv's node (``nn.Conv2d``'s backward takes their weight gradient ~10x
  slower than the forward; ``metaformer.kernels.sepconv_train``). ``timm best / floor`` is the largest speed-up over timm that removing
  everything else could give (norms, activations, loss and optimiser are left out of the floor, and the
  attention product runs with q = k = v: generous).
- ``floor_passes``: the floor, then the passes over whole tensors that nothing PyTorch exposes on CPU can
  fold into those products (``cpu_models.record_passes``): every norm whose output a product takes, written
  out; a pooling or identity mixer's norm statistics (one reduction pass); the pooling; the square of
  StarReLU. Residual additions, scales and the pooling half's combination are left out, as if free. In
  training each pass also runs its backward (ATen's norm backward, ``avg_pool2d``'s backward, one product
  for the square's, ``gelu_backward`` for each GELU, whose forward is taken as a post-op), and then one
  step of the optimiser (SGD with momentum, PyTorch's fused form) over the model's parameters; the
  gradients of scales, norm affines and StarReLU's scale and bias are left out. ``timm best /
  floor_passes`` bounds what any implementation built from PyTorch's CPU primitives (oneDNN convolutions
  with the post-ops PyTorch exposes, ATen's kernels) can gain over timm; a hand-written fused CPU kernel
  is not bound by it, the floor above still is.

Passes: ``inference`` (eval mode, ``torch.inference_mode``) for every model, and ``train`` (a training
step: forward, cross-entropy, backward, SGD with momentum; eager variants, ``--train-compile`` adds the
compiled ones) for ``--train-models``. Peak memory of a training step is measured for the eager
variants, each in a fresh process: the peak resident set (``VmHWM``) minus the resident set after
building the model, optimiser and batch, i.e. what the steps themselves took at their peak.

Beside the ratio of medians (``vs_timm_best``), each row has ``vs_timm_best_paired``: the median over rounds of
timm's best layout's time over the variant's in the same round (two calls seconds apart), which a load swing
lasting some rounds moves less; the console shows it as ``paired``.

GEMM-peak share: img/s x FLOPs per image / the machine's fp32 GEMM rate, where the FLOPs are twice the
multiply-accumulates of every convolution, linear map, matrix product and attention product
(``torch.utils.flop_counter`` on the plain composition, batch 1) and the GEMM rate is the best of the
2048^3 ``torch.mm`` calls timed in the same rounds. A training step counts 3x the forward FLOPs.

At the end the markdown tables of both passes are printed and written next to the JSON (``cpu.md``).

Usage::

    python benchmarks/bench_cpu.py                                   # everything -> results/cpu.json
    python benchmarks/bench_cpu.py --quick --batch 2 --output /tmp/smoke.json   # smoke test, minutes
    python benchmarks/bench_cpu.py --models convformer_s18 --no-compile --no-memory --output /tmp/c.json
    python benchmarks/bench_cpu.py --models poolformer_s12 convformer_s18 --no-inference --update
        # re-measure the training rows only, keeping results/cpu.json's others (its settings list each update)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_models  # noqa: E402

import metaformer  # noqa: E402
from metaformer.files import write_text  # noqa: E402

INFERENCE = ("timm_nchw", "timm_cl", "timm_compiled", "timm_compiled_cl", "ours", "ours_optimized", "floor",
             "floor_passes", "ours_compiled")
TRAIN = ("timm_nchw", "timm_cl", "timm_compiled", "timm_compiled_cl", "ours", "ours_compiled", "floor",
         "floor_passes")
TRAIN_MODELS = ("poolformer_s12", "convformer_s18")
GEMM_N = 2048


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(cpu_models.MODELS), choices=cpu_models.MODELS)
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--size", type=int, default=224, help="image side (default 224)")
    p.add_argument("--reps", type=int, default=11, help="interleaved inference rounds (median reported)")
    p.add_argument("--train-reps", type=int, default=5, help="interleaved training rounds (0: no training)")
    p.add_argument("--train-models", nargs="*", default=list(TRAIN_MODELS), choices=cpu_models.MODELS,
                   help="models with a training pass (default: poolformer_s12 convformer_s18)")
    p.add_argument("--train-compile", action="store_true", help="also time compiled training steps")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 3 inference rounds, 2 training rounds (unless given), figures are noise")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
    p.add_argument("--no-memory", action="store_true", help="leave out the training peak-memory processes")
    p.add_argument("--no-inference", action="store_true", help="leave out the inference pass (training only)")
    p.add_argument("--update", action="store_true",
                   help="replace only the rows this run measures in an existing --output (same batch and size), "
                        "keeping the others; the file records each update's settings")
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "cpu.json",
                   help="JSON results file (default benchmarks/results/cpu.json)")
    args = p.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        args.reps = args.reps if "--reps" in given else 3
        args.train_reps = args.train_reps if "--train-reps" in given else 2
    if args.batch < 1 or args.size < 32 or args.reps < 1 or args.train_reps < 0:
        p.error("--batch and --reps must be >= 1, --size >= 32, --train-reps >= 0")
    if args.no_inference and (args.train_reps <= 0 or not set(args.models) & set(args.train_models)):
        p.error("--no-inference leaves nothing to run: give --train-reps >= 1 and a model of --train-models")
    if args.update:
        if not args.output.is_file():
            p.error(f"--update needs an existing results file; {args.output} does not exist")
        try:
            old = json.loads(args.output.read_text())["settings"]
        except (OSError, ValueError, KeyError) as err:
            p.error(f"--update: could not read the settings of {args.output} ({err}); it is not a results file "
                    "written by this script")
        if (old["batch"], old["size"]) != (args.batch, args.size):
            p.error(f"--update: {args.output} was measured at batch {old['batch']}, size {old['size']}; "
                    f"run with --batch {old['batch']} --size {old['size']} or write another --output")
    return args


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_capability() -> str:
    """The widest vector instruction set PyTorch's CPU kernels use here ("AVX512", "AVX2", ...): machines of
    one model name differ in it, and the figures with them."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # torch < 2.1
        return "unknown"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_pass(name: str, train: bool, variants, args, gemm_times: list) -> dict:
    """Median seconds per call of each variant, interleaved; the GEMM is timed in the same rounds."""
    calls = {}
    for v in variants:
        torch.manual_seed(0)
        calls[v], _ = cpu_models.make_variant(name, v, train, args.batch, args.size)
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    reps = args.train_reps if train else args.reps
    times = {v: [] for v in calls}
    ctx = torch.enable_grad if train else torch.inference_mode
    with ctx():
        for v, fn in calls.items():  # warm-up: compiles, oneDNN primitive caches, allocator
            t0 = time.perf_counter()
            fn()
            fn()
            print(f"  warm-up {v}: {time.perf_counter() - t0:.1f} s", flush=True)
        order = list(calls)
        for r in range(reps):
            gemm_times.append(_timed(lambda: torch.mm(a, b)))
            for v in order[r % len(order):] + order[:r % len(order)]:
                times[v].append(_timed(calls[v]))
    return {v: ts for v, ts in times.items()}


def summarise(name, pass_name, times, flops, peak, batch, memory) -> list:
    """One row per variant: medians, img/s, ratios to timm's best eager layout and compiled, GEMM-peak share.

    ``vs_timm_best_paired`` is the median over rounds of timm's best layout's time in that round over the
    variant's: each ratio compares two calls seconds apart, so a load swing that lasts some rounds moves it
    less than it moves a ratio of medians (on a noisy host the two can differ; quote both)."""
    rows = []
    med = {v: statistics.median(ts) for v, ts in times.items()}
    best_layout = min(("timm_nchw", "timm_cl"), key=lambda v: med[v])
    best_timm = med[best_layout]
    compiled = [med[v] for v in ("timm_compiled", "timm_compiled_cl") if v in med]
    factor = 3 if pass_name == "train" else 1
    for v, m in med.items():
        ips = batch / m
        paired = statistics.median(t / u for t, u in zip(times[best_layout], times[v]))
        row = {"model": name, "pass": pass_name, "variant": v, "img_per_s": ips, "median_ms": m * 1e3,
               "min_ms": min(times[v]) * 1e3, "vs_timm_best": best_timm / m, "vs_timm_best_paired": paired,
               "gemm_peak_share": ips * factor * flops / peak}
        if compiled:
            row["vs_timm_compiled"] = min(compiled) / m
        if v in memory:
            row.update(memory[v])
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)  # before the run, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    loads = {"start": os.getloadavg()}
    gemm_times: list = []
    rows = []
    flops = {}
    for name in args.models:
        flops[name] = cpu_models.flops_per_image(name, args.size)
        for train, variants in ((False, INFERENCE), (True, TRAIN)):
            if train and (args.train_reps <= 0 or name not in args.train_models) or not train and args.no_inference:
                continue
            variants = [v for v in variants if "compiled" not in v or not (args.no_compile
                                                                        or (train and not args.train_compile))]
            pass_name = "train" if train else "inference"
            print(f"{name} {pass_name} (load {_fmt(os.getloadavg())})", flush=True)
            times = run_pass(name, train, variants, args, gemm_times)
            memory = {}
            if train and not args.no_memory:
                for v in (v for v in variants if "compiled" not in v and not v.startswith("floor")):
                    memory[v] = cpu_models.peak_memory_subprocess(name, v, args.batch, args.size,
                                                                  threads=args.threads)
            peak = 2 * GEMM_N ** 3 / min(gemm_times)
            new = summarise(name, pass_name, times, flops[name], peak, args.batch, memory)
            rows += new
            loads[f"{name} {pass_name}"] = os.getloadavg()
            _print(new)
    peak = 2 * GEMM_N ** 3 / min(gemm_times)
    results = {
        "machine": {"cpu": _cpu_name(), "cpu_capability": _cpu_capability(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "timm": timm.__version__, "metaformer": metaformer.__version__,
                    "python": platform.python_version(), "loadavg_1_5_15": loads},
        "settings": {"batch": args.batch, "size": args.size, "dtype": "float32", "reps": args.reps,
                     "train_reps": args.train_reps, "gemm_n": GEMM_N,
                     "gemm_peak_gflops_best": peak / 1e9,
                     "gemm_peak_gflops_median": 2 * GEMM_N ** 3 / statistics.median(gemm_times) / 1e9,
                     # glibc allocator settings in force (see bench_cpu_allocator.py): they move timm's figures most
                     "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
                     "ld_preload": os.environ.get("LD_PRELOAD", "")},
        "flops_per_image": flops,
        "rows": rows,
    }
    if args.update:
        results = _updated(json.loads(args.output.read_text()), results)
        rows = results["rows"]
    table = markdown(rows)
    print("\n" + table)
    write_text(args.output, json.dumps(results, indent=2) + "\n")
    write_text(args.output.with_suffix(".md"), table)
    print(f"\nfp32 GEMM peak {peak / 1e9:.0f} GFLOP/s; wrote {args.output} and {args.output.with_suffix('.md')}")
    return results


def _updated(old: dict, new: dict) -> dict:
    """``old`` results with the rows ``new`` measured replaced (and new ones added), in ``old``'s order;
    ``new``'s machine and settings are recorded under ``settings["updates"]``."""
    fresh = {(r["model"], r["pass"]) for r in new["rows"]}
    rows, placed = [], set()
    for r in old["rows"]:
        key = (r["model"], r["pass"])
        if key not in fresh:
            rows.append(r)
        elif key not in placed:
            rows += [n for n in new["rows"] if (n["model"], n["pass"]) == key]
            placed.add(key)
    rows += [n for n in new["rows"] if (n["model"], n["pass"]) not in placed]
    env = new["settings"]["malloc_env"]
    update = {"rows": sorted(f"{m} {p}" for m, p in fresh), "metaformer": new["machine"]["metaformer"],
              "gemm_peak_gflops_best": new["settings"]["gemm_peak_gflops_best"],
              "malloc_env": " ".join(f"{k}={v}" for k, v in env.items()) or "glibc defaults",
              "machine": new["machine"], "settings": new["settings"]}
    settings = {**old["settings"], "updates": old["settings"].get("updates", []) + [update]}
    return {**old, "settings": settings, "flops_per_image": {**old["flops_per_image"], **new["flops_per_image"]},
            "rows": rows}


def _print(rows) -> None:
    print(f"  {'variant':<16}{'ms':>9}{'img/s':>9}{'vs timm best':>14}{'paired':>9}{'vs compiled':>13}"
          f"{'GEMM peak':>11}{'train MiB':>11}")
    for r in rows:
        comp = f"{r['vs_timm_compiled']:.2f}x" if "vs_timm_compiled" in r else "-"
        mem = f"{r['train_peak_mib']:.0f}" if "train_peak_mib" in r else "-"
        print(f"  {r['variant']:<16}{r['median_ms']:>9.0f}{r['img_per_s']:>9.2f}{r['vs_timm_best']:>13.2f}x"
              f"{r['vs_timm_best_paired']:>8.2f}x{comp:>13}{100 * r['gemm_peak_share']:>10.1f}%{mem:>11}", flush=True)


def markdown(rows) -> str:
    """The inference and training tables (img/s, medians) in markdown."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["pass"]), {})[r["variant"]] = r
    ips = lambda v: f"{v['img_per_s']:.1f}" if v else "-"  # noqa: E731
    lines = ["| model | timm NCHW | timm channels_last | timm compiled (best layout) | ours default | "
             "ours optimize_for_inference | ours compiled | ours / timm best eager | ours / timm compiled | "
             "GEMM-peak share (ours) | conv/linear/attention floor: share of ours, bound over timm | "
             "floor with the separate passes: share of ours, bound over timm |", "|---" * 12 + "|"]
    for (model, pass_name), v in by.items():
        if pass_name != "inference":
            continue
        comp = [v[k] for k in ("timm_compiled", "timm_compiled_cl") if k in v]
        best_comp = max(comp, key=lambda r: r["img_per_s"]) if comp else None
        ours = v["ours"]
        vs_comp = f"{ours['vs_timm_compiled']:.2f}x" if "vs_timm_compiled" in ours else "-"
        lines.append(f"| {model} | {ips(v['timm_nchw'])} | {ips(v['timm_cl'])} | {ips(best_comp)} | {ips(ours)} | "
                     f"{ips(v.get('ours_optimized'))} | {ips(v.get('ours_compiled'))} | "
                     f"{ours['vs_timm_best']:.2f}x | {vs_comp} | {100 * ours['gemm_peak_share']:.0f}% | {_floor(v)} | "
                     f"{_floor(v, 'floor_passes')} |")
    train = [(m, v) for (m, p), v in by.items() if p == "train"]
    if train:
        lines += ["", "| training step | timm best eager img/s | ours img/s | ours / timm | timm peak MiB | "
                  "ours peak MiB | conv/linear/attention floor: share of ours, bound over timm | "
                  "floor with the separate passes and the optimiser: share of ours, bound over timm |",
                  "|---" * 8 + "|"]
        for model, v in train:
            timm_best = max((v[k] for k in ("timm_nchw", "timm_cl")), key=lambda r: r["img_per_s"])
            mem = lambda r: f"{r['train_peak_mib']:.0f}" if "train_peak_mib" in r else "-"  # noqa: E731
            lines.append(f"| {model} ({timm_best['variant']}) | {ips(timm_best)} | {ips(v['ours'])} | "
                         f"{v['ours']['vs_timm_best']:.2f}x | {mem(timm_best)} | {mem(v['ours'])} | {_floor(v)} | "
                         f"{_floor(v, 'floor_passes')} |")
    return "\n".join(lines) + "\n"


def _floor(v: dict, variant: str = "floor") -> str:
    """A floor's share of our time and its bound over timm's best eager (``-`` if not measured)."""
    if variant not in v:
        return "-"
    return f"{100 * v[variant]['median_ms'] / v['ours']['median_ms']:.0f}%, {v[variant]['vs_timm_best']:.2f}x"


def _fmt(load) -> str:
    return "/".join(f"{v:.2f}" for v in load)


if __name__ == "__main__":
    main()
