"""The one-group GroupNorm on CUDA: ATen's (which returns a channels_last input's result in NCHW) against
the layout-keeping form the library runs in inference (``metaformer.kernels.folding.group_norm1``).

    PYTHONPATH=src python benchmarks/bench_gpu_groupnorm.py --output benchmarks/results/h100/gpu_groupnorm.json
    PYTHONPATH=src python benchmarks/bench_gpu_groupnorm.py --smoke --output /tmp/gn.json   # the plumbing, on CPU

Two parts, each skippable:

1. ``halves``: poolformer_s12's MLP half (GroupNorm, fc1, GELU, fc2, layer scale, residual) at each stage's
   shape, bf16 autocast, a channels_last input in fp32 (the residual stream's dtype) and in bf16: the plain
   half and each of its operations, the same half with ``group_norm1`` (inference, and forward plus backward),
   and the memory format ATen's GroupNorm returns.
2. ``models``: the GroupNorm families whole (poolformer_s12, poolformerv2_s12, identityformer_s12,
   randformer_s12; channels_last, bf16 autocast), inference and a training step (SGD), under three policies
   measured in interleaved rounds: ``aten`` (ATen's GroupNorm everywhere: the code before the change),
   ``inference`` (``group_norm1`` where autograd needs no graph: the library's default) and ``always``
   (``group_norm1`` in training too). A policy is set by replacing ``folding.group_norm1_pays`` (and the
   CUDA halves' reference to it) while it is measured. Before timing, each policy's logits are checked
   against ``aten``'s in fp32.

The machines these run on are shared: ``ours`` is launch-bound at batch 128 (the device waits for Python
part of the time), so a busy host slows it by tens of percent from one round to the next. The JSON keeps
every round; the summary gives the median and the best round of each policy, and ratios to ``aten``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import BenchmarkError, bench, header_lines, machine_info, write_json  # noqa: E402

MODELS = ["poolformer_s12", "poolformerv2_s12", "identityformer_s12", "randformer_s12"]
POLICIES = ("aten", "inference", "always")
STAGES = ((64, 56), (128, 28), (320, 14), (512, 7))  # poolformer_s12's (channels, side) at 224x224


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["halves", "models"], choices=["halves", "models"])
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three policies per model")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=150.0, help="halves: timed time per case")
    p.add_argument("--model-rep-ms", type=float, default=250.0, help="models: timed time per case and round")
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "gpu_groupnorm.json")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device: the plumbing only")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.rounds, args.warmup_ms, args.rep_ms, args.model_rep_ms = 2, 1, 1.0, 5.0, 5.0
    args.device = torch.device("cpu" if args.smoke else "cuda")
    return args


@contextmanager
def policy(name: str):
    """Runs the block with GroupNorm policy ``name`` (see the module's docstring)."""
    from metaformer.kernels import cuda_halves, folding

    default = folding.group_norm1_pays
    chosen = {"aten": lambda *a: False, "inference": default, "always": lambda *a: True}[name]
    folding.group_norm1_pays = cuda_halves.group_norm1_pays = chosen
    try:
        yield
    finally:
        folding.group_norm1_pays = cuda_halves.group_norm1_pays = default


def halves(args, results: dict, save) -> None:
    """Part 1: poolformer_s12's MLP half per stage."""
    import metaformer

    model = metaformer.create("poolformer_s12").to(args.device)
    blocks = {stage.blocks[0].norm2.num_channels: stage.blocks[0] for stage in model.stages}
    for channels, side in STAGES:
        side = max(1, round(side * args.size / 224))
        for dtype in (torch.float32, torch.bfloat16):
            key = f"{args.batch}x{channels}x{side}x{side} {str(dtype).replace('torch.', '')}"
            r = results["halves"][key] = half_case(args, blocks[channels], side, dtype)
            print(f"  {key:24} half {r['plain_half_ms']:.3f} -> {r['layout_half_ms']:.3f} ms (ATen norm "
                  f"{r['aten_norm_ms']:.3f}, layout norm {r['layout_norm_ms']:.3f}); fwd+bwd "
                  f"{r['plain_half_fwd_bwd_ms']:.3f} -> {r['layout_half_fwd_bwd_ms']:.3f} ms", flush=True)
            save()


def half_case(args, block, side: int, dtype: torch.dtype) -> dict:
    """One stage's MLP half and its operations, plain and with ``group_norm1``, on a channels_last input."""
    from metaformer.kernels.cuda_halves import _mlp_tail  # the CUDA MLP half after its norm
    from metaformer.kernels.folding import group_norm1

    norm, mlp = block.norm2, block.mlp
    x = torch.randn(args.batch, norm.num_channels, side, side, device=args.device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)

    def layout_half(t):
        return _mlp_tail(block, mlp, t, group_norm1(t, norm.weight, norm.bias, norm.eps, torch.bfloat16))

    r = {}
    with torch.inference_mode(), torch.autocast(args.device.type, torch.bfloat16):
        n = norm(x)
        h = mlp.fc1(n)
        g = mlp.act(h)
        y = mlp.fc2(g)
        xn = x.contiguous()
        r["aten_norm_channels_last_out"] = n.is_contiguous(memory_format=torch.channels_last)
        r["layout_norm_channels_last_out"] = group_norm1(x, norm.weight, norm.bias, norm.eps).is_contiguous(
            memory_format=torch.channels_last)
        cases = {"plain_half": lambda: block.mlp_half(x), "aten_norm": lambda: norm(x),
                 "aten_norm_nchw_input": lambda: norm(xn),
                 "layout_norm": lambda: group_norm1(x, norm.weight, norm.bias, norm.eps, torch.bfloat16),
                 "fc1": lambda: mlp.fc1(n), "act": lambda: mlp.act(h), "fc2": lambda: mlp.fc2(g),
                 "scales_residual": lambda: block.res_scale2(x) + block.layer_scale2(y),
                 "layout_half": lambda: layout_half(x)}
        for key, fn in cases.items():
            r[key + "_ms"] = bench(fn, args.device, args.warmup_ms, args.rep_ms)["median_ms"]
        want, got = block.mlp_half(x).float(), layout_half(x).float()
        r["layout_half_max_rel_diff"] = ((got - want).abs().max() / want.abs().max()).item()
    if r["layout_half_max_rel_diff"] > 2e-2:
        raise BenchmarkError(f"{tuple(x.shape)} {dtype}: the layout-keeping half differs from the plain one by "
                             f"{r['layout_half_max_rel_diff']:.3g} of its largest value")
    xg = x.detach().clone().requires_grad_(True)
    gy = torch.randn_like(x)

    def step(fn):
        def run():
            with torch.autocast(args.device.type, torch.bfloat16):
                out = fn(xg)
            out.backward(gy)
        return run

    block.train()
    try:
        r["plain_half_fwd_bwd_ms"] = bench(step(block.mlp_half), args.device, args.warmup_ms, args.rep_ms)["median_ms"]
        r["layout_half_fwd_bwd_ms"] = bench(step(layout_half), args.device, args.warmup_ms, args.rep_ms)["median_ms"]
    finally:
        block.eval()
    return r


def models(args, results: dict, save) -> None:
    """Part 2: whole models under the three policies, interleaved."""
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    x = x.contiguous(memory_format=torch.channels_last)
    for name in args.models:
        res = results["models"][name] = model_case(args, name, x)
        for p in POLICIES[1:]:
            r = res["speedup_vs_aten"][p]
            print(f"  {name:18} {p:9} vs aten: inference {r['inference']['median_ms']:.2f}x (best round "
                  f"{r['inference']['best_ms']:.2f}x), train {r['train_step']['median_ms']:.2f}x (best round "
                  f"{r['train_step']['best_ms']:.2f}x)", flush=True)
        save()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()


def model_case(args, name: str, x: torch.Tensor) -> dict:
    """One model under the three policies: the fp32 logits checked against ``aten``'s, then interleaved rounds."""
    import metaformer

    torch.manual_seed(0)
    model = metaformer.create(name).to(args.device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.eval()
    logits = {}
    with torch.inference_mode():
        for p in POLICIES:
            with policy(p):
                logits[p] = model(x).float()
    checks = {p: ((logits[p] - logits["aten"]).abs().max() / logits["aten"].abs().max()).item() for p in POLICIES}
    if max(checks.values()) > 1e-4:
        raise BenchmarkError(f"{name}: a policy's fp32 logits differ from ATen's GroupNorm's: {checks}")

    def infer():
        with torch.inference_mode(), torch.autocast(args.device.type, torch.bfloat16):
            model(x)

    def train():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device.type, torch.bfloat16):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        opt.step()

    rounds = {p: {"inference": [], "train_step": []} for p in POLICIES}
    for _ in range(args.rounds):
        for p in POLICIES:
            with policy(p):
                model.eval()
                rounds[p]["inference"].append(bench(infer, args.device, args.warmup_ms, args.model_rep_ms)["median_ms"])
                model.train()
                rounds[p]["train_step"].append(bench(train, args.device, args.warmup_ms, args.model_rep_ms)["median_ms"])
    summary = {p: {part: {"median_ms": statistics.median(v), "best_ms": min(v)} for part, v in d.items()}
               for p, d in rounds.items()}
    ratios = {p: {part: {stat: summary["aten"][part][stat] / summary[p][part][stat] for stat in ("median_ms", "best_ms")}
                  for part in ("inference", "train_step")} for p in POLICIES[1:]}
    return {"checks_rel_diff_vs_aten_fp32": checks, "rounds_ms": rounds, "summary": summary, "speedup_vs_aten": ratios}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU speed (use --smoke for the plumbing on CPU)", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = True
    info = machine_info() if args.device.type == "cuda" else {"device": "cpu (smoke)"}
    print("\n".join(header_lines(info)) if args.device.type == "cuda" else "smoke run on CPU", flush=True)
    results = {"kind": "gpu_groupnorm", "machine": info, "autocast": "bfloat16",
               "settings": {k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()},
               "halves": {}, "models": {}}

    def save():
        write_json(args.output, results)

    if "halves" in args.parts:
        print("\npoolformer_s12's MLP half per stage (ms)", flush=True)
        halves(args, results, save)
    if "models" in args.parts:
        print("\nwhole models, policies interleaved", flush=True)
        models(args, results, save)
    save()
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
