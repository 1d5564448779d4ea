"""How fast could any implementation of a model be on this CPU? The convolution and linear floor.

Every implementation of a MetaFormer runs the same convolutions and linear layers (the stem and
downsampling convolutions, the MLPs' 1x1 convolutions or linears, ConvFormer's depthwise 7x7,
attention's projections); a fused path can only remove what lies between them (norms, activations,
scales, residual adds, pooling, layout changes). This script records, with forward hooks, every
``nn.Conv2d`` and ``nn.Linear`` call of a model on the benchmark's batch, runs exactly those calls on
their own (same shapes and memory layout, oneDNN through PyTorch as in the models), and times that
sequence interleaved with timm's model (NCHW and channels_last, eager) and ours (the default):

- ``floor``: the sequence's median time: what a model would take if everything else cost nothing;
- ``bound = timm best eager / floor``: the largest speed-up over timm any implementation could reach
  on this machine with these convolutions (attention's two matrix products, the optimiser step and the
  loss are left out of the floor, so the bound is generous);
- for training, the sequence's forward and backward (input and weight gradients).

    PYTHONPATH=src python benchmarks/bound_cpu.py                  # all six families, ~10 minutes
    PYTHONPATH=src python benchmarks/bound_cpu.py --models convformer_s18 --train-only

Writes ``results/cpu_bound.json`` and prints a table with the issue's goals beside the bounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cpu_models  # noqa: E402

GOALS = {"inference": {"poolformer_s12": 1.3, "poolformerv2_s12": 1.3, "identityformer_s12": 1.3,
                       "randformer_s12": 1.3, "convformer_s18": 1.2, "caformer_s18": 1.2},
         "train": {"poolformer_s12": 1.2, "convformer_s18": 1.2}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(cpu_models.MODELS), choices=cpu_models.MODELS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=7, help="interleaved inference rounds (median)")
    p.add_argument("--train-reps", type=int, default=5, help="interleaved training rounds (0: none)")
    p.add_argument("--train-models", nargs="*", default=list(GOALS["train"]), choices=cpu_models.MODELS)
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--output", type=Path, default=HERE / "results" / "cpu_bound.json")
    args = p.parse_args(argv)
    if args.batch < 1 or args.size < 32 or args.reps < 1 or args.train_reps < 0:
        p.error("--batch and --reps must be >= 1, --size >= 32, --train-reps >= 0")
    return args


def record_calls(model: nn.Module, x: torch.Tensor) -> list:
    """(module, input shape, channels_last?) of every Conv2d / Linear call of one forward, in order."""
    calls, hooks = [], []

    def hook(module, inputs, _output):
        t = inputs[0]
        cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        calls.append((module, tuple(t.shape), cl))

    import metaformer.kernels as K

    for m in model.modules():
        if type(m) in (nn.Conv2d, nn.Linear):
            hooks.append(m.register_forward_hook(hook))
    before = K.get_backend()
    K.set_backend("reference")  # the plain composition calls every module (fast paths call oneDNN directly)
    try:
        with torch.no_grad():
            model(x)
    finally:
        K.set_backend(before)
        for h in hooks:
            h.remove()
    return calls


def floor_fn(calls: list, train: bool):
    """A callable running just the recorded convolutions / linears (forward, or forward and backward)."""
    inputs = []
    for _module, shape, cl in calls:
        t = torch.randn(shape)
        if cl:
            t = t.contiguous(memory_format=torch.channels_last)
        inputs.append(t.requires_grad_(train and bool(inputs)))  # the stem's input is the image: no gradient
    grads = None
    if train:
        with torch.no_grad():
            grads = [torch.randn_like(m(t)) for (m, _, _), t in zip(calls, inputs)]

    def run():
        if not train:
            with torch.inference_mode():
                for (m, _, _), t in zip(calls, inputs):
                    m(t)
            return
        for (m, _, _), t, g in zip(calls, inputs, grads):
            m(t).backward(g)
        for m, _, _ in calls:
            for p in m.parameters():
                p.grad = None

    return run


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, train: bool, args) -> dict:
    """Median seconds of timm NCHW, timm channels_last and the floor, interleaved."""
    torch.manual_seed(0)
    variants = {v: cpu_models.make_variant(name, v, train, args.batch, args.size)[0]
                for v in ("timm_nchw", "timm_cl", "ours")}
    model = cpu_models.ours(name).train(train).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    calls = record_calls(model, x)
    variants["floor"] = floor_fn(calls, train)
    ctx = torch.enable_grad if train else torch.inference_mode
    times = {v: [] for v in variants}
    reps = args.train_reps if train else args.reps
    with ctx():
        for fn in variants.values():
            fn()
            fn()
        order = list(variants)
        for r in range(reps):
            for v in order[r % len(order):] + order[:r % len(order)]:
                times[v].append(_timed(variants[v]))
    med = {v: statistics.median(ts) for v, ts in times.items()}
    best = min(("timm_nchw", "timm_cl"), key=med.get)
    goal = GOALS["train" if train else "inference"].get(name)
    return {"model": name, "pass": "train" if train else "inference", "calls": len(calls),
            "median_ms": {v: 1e3 * s for v, s in med.items()}, "timm_best": best,
            "floor_share_of_timm": med["floor"] / med[best], "bound_vs_timm": med[best] / med["floor"],
            "ours_vs_timm": med[best] / med["ours"], "floor_share_of_ours": med["floor"] / med["ours"],
            "goal": goal, "goal_within_bound": None if goal is None else med[best] / med["floor"] >= goal}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    rows = []
    out = {"kind": "cpu_bound", "settings": {k: str(v) for k, v in vars(args).items()},
           "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    passes = [(m, True) for m in args.models if m in args.train_models and args.train_reps]
    if not args.train_only:
        passes = [(m, False) for m in args.models] + passes
    for name, train in passes:
        print(f"{name} {'train' if train else 'inference'} ...", flush=True)
        row = measure(name, train, args)
        rows.append(row)
        ms = row["median_ms"]
        print(f"  timm NCHW {ms['timm_nchw']:.0f} ms, timm CL {ms['timm_cl']:.0f} ms, ours {ms['ours']:.0f} ms "
              f"({row['ours_vs_timm']:.2f}x), convolution/linear floor {ms['floor']:.0f} ms ({row['calls']} calls) = "
              f"{100 * row['floor_share_of_timm']:.0f}% of timm's best: bound {row['bound_vs_timm']:.2f}x "
              f"(goal {row['goal']})", flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(args.output)
    print("\n| model | pass | timm best eager ms | ours ms | ours / timm | conv/linear floor ms | floor share of timm "
          "| of ours | bound over timm | goal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["median_ms"]
        print(f"| {r['model']} | {r['pass']} | {ms[r['timm_best']]:.0f} ({r['timm_best']}) | {ms['ours']:.0f} | "
              f"{r['ours_vs_timm']:.2f}x | {ms['floor']:.0f} | {100 * r['floor_share_of_timm']:.0f}% | "
              f"{100 * r['floor_share_of_ours']:.0f}% | {r['bound_vs_timm']:.2f}x | {r['goal']} |")
    return out


if __name__ == "__main__":
    main()
