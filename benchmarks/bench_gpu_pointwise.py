"""The 1x1 convolutions of the CUDA block halves: cuDNN's ``conv2d`` against a matrix product of the channels_last
map's (B, H, W, C) view (``F.linear``, cuBLAS), which the library runs (``metaformer.kernels.cuda_halves._pointwise``;
a ``SepConv`` mixer through ``_mix``).

    PYTHONPATH=src python benchmarks/bench_gpu_pointwise.py --output benchmarks/results/h100/gpu_pointwise.json
    PYTHONPATH=src python benchmarks/bench_gpu_pointwise.py --smoke --output /tmp/pw.json   # plumbing, on CPU

On the H100 of the fourth session cProfile gave cuDNN's ``conv2d`` about 100 us of host time per call, and
convformer_s18 makes 94 such calls per forward, 72 of them 1x1 (timm's MetaFormer runs those as ``nn.Linear`` on
(B, H, W, C)). Ours is launch-bound there, so the host's time is the eager time.

Two parts, each skippable:

1. ``layers``: convformer_s18's MLP ``fc1`` at each stage's shape (batch 128, channels_last, bf16 autocast, an
   fp32 input): the host's time per call (calls enqueued back to back, divided by their number), the GPU's
   time (``do_bench``) and forward plus backward, for the convolution and for the product.
2. ``models``: whole models under two policies in interleaved rounds (``benchmarks/gpu_common.policy_rounds``):
   ``conv`` (``_pointwise`` and ``_mix`` replaced by the modules' own calls: the code before the change) and
   ``linear`` (the library's default). Each policy's fp32 logits are checked against ``conv``'s first.

The JSON keeps every round; the summary gives medians, best rounds and ratios to ``conv``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (  # noqa: E402
    checked_rel_diff,
    fwd_bwd_ms,
    policy_args,
    policy_main,
    replaced,
    time_cases,
)

MODELS = ["convformer_s18", "caformer_s18", "poolformerv2_s12", "identityformer_s12", "poolformer_s12"]
POLICIES = ("conv", "linear")
STAGES = ((64, 56), (128, 28), (320, 14), (512, 7))  # convformer_s18's (channels, side) at 224x224


def parse_args(argv=None) -> argparse.Namespace:
    return policy_args(__doc__, "layers", MODELS, Path(__file__).parent / "results" / "gpu_pointwise.json", argv)


@contextlib.contextmanager
def policy(name: str):
    """Runs the block halves' 1x1 convolutions with policy ``name`` (see the module's docstring)."""
    from metaformer.kernels import cuda_halves

    if name == "linear":
        yield
        return
    with replaced(lambda conv, x: conv(x), (cuda_halves, "_pointwise")), \
            replaced(lambda mixer, n: mixer(n), (cuda_halves, "_mix")):
        yield


def host_us(fn, device: torch.device, calls: int = 50) -> float:
    """Microseconds of the host's time per call of ``fn``, the calls enqueued back to back after a sync."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / calls


def layers(args, results: dict, save) -> None:
    """Part 1: convformer_s18's MLP fc1 per stage, the convolution against the product."""
    import metaformer
    from metaformer.kernels import cuda_halves

    model = metaformer.create("convformer_s18").to(args.device)
    side_scale = args.size / 224
    for stage, (channels, side) in enumerate(STAGES):
        fc1 = model.stages[stage].blocks[0].mlp.fc1
        s = max(1, round(side * side_scale))
        x = torch.randn(args.batch, channels, s, s, device=args.device).contiguous(memory_format=torch.channels_last)
        fns = {"conv": lambda t, m=fc1: m(t), "linear": lambda t, m=fc1: cuda_halves._pointwise(m, t)}
        r = {}
        with torch.inference_mode(), torch.autocast(args.device.type, torch.bfloat16):
            for name, fn in fns.items():
                r[f"{name}_host_us"] = host_us(lambda f=fn, t=x: f(t), args.device)
            r.update(time_cases({name: (lambda f=fn, t=x: f(t)) for name, fn in fns.items()}, args))
            r["max_rel_diff"] = checked_rel_diff(fns["linear"](x), fns["conv"](x), f"stage {stage} fc1")
        r.update(fwd_bwd_ms(fc1, fns, x, args))
        results["layers"][f"stage{stage} {args.batch}x{channels}x{s}x{s} -> {fc1.out_channels}"] = r
        print(f"  stage {stage} {channels:4}x{s:<3} host {r['conv_host_us']:.0f} -> {r['linear_host_us']:.0f} us; GPU "
              f"{r['conv_ms']:.3f} -> {r['linear_ms']:.3f} ms; fwd+bwd {r['conv_fwd_bwd_ms']:.3f} -> "
              f"{r['linear_fwd_bwd_ms']:.3f} ms", flush=True)
        save()


def main(argv=None) -> int:
    first = ("layers", "convformer_s18's MLP fc1 per stage", layers)
    return policy_main(parse_args(argv), "gpu_pointwise", first, policy, POLICIES)


if __name__ == "__main__":
    sys.exit(main())
