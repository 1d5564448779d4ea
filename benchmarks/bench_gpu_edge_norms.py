"""The stem's and the downsampling's LayerNorm on CUDA: ATen's against the Triton LayerNorm kernel the library
runs there (``metaformer.kernels.cuda_halves.edge_norm``).

    PYTHONPATH=src python benchmarks/bench_gpu_edge_norms.py --output benchmarks/results/h100/gpu_edge_norms.json
    PYTHONPATH=src python benchmarks/bench_gpu_edge_norms.py --smoke --output /tmp/edges.json   # plumbing, on CPU

Every MetaFormer-baselines model has a ``LayerNorm2d`` after its stem's convolution and before each of its three
downsampling convolutions. ATen's LayerNorm over the channels of a channels_last map runs as
``vectorized_layer_norm_kernel`` on the (B, H, W, C) view, and under bf16 autocast it reads the stem
convolution's bf16 output through an fp32 copy and writes fp32 that the downsampling convolution copies to
bf16 again; in poolformerv2_s12's H100 profile these four norms took 1.42 ms of a 9.5 ms forward.

Two parts, each skippable:

1. ``modules``: convformer_s18's stem and its three downsamplings at batch 128 (channels_last, bf16
   autocast; the stem's input an fp32 image, the downsamplings' the fp32 residual stream): the module plain
   (``conv(norm(x))``, ``norm(conv(x))``) against its forward through the dispatch, in inference and forward
   plus backward, and the norm alone (ATen's, the kernel).
2. ``models``: whole models under two policies in interleaved rounds (``benchmarks/gpu_common.policy_rounds``):
   ``aten`` (``edge_norm`` replaced by a function that declines: the code before the change) and ``kernel``
   (the library's default). Each policy's fp32 logits are checked against ``aten``'s before timing.

The machines are shared and ours is launch-bound at batch 128: a busy host slows single rounds by tens of
percent. The JSON keeps every round; the summary gives medians, best rounds and ratios to ``aten``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (  # noqa: E402
    BenchmarkError,
    checked_rel_diff,
    fwd_bwd_ms,
    policy_args,
    policy_main,
    replaced,
    time_cases,
)

MODELS = ["poolformerv2_s12", "identityformer_s12", "randformer_s12", "convformer_s18", "caformer_s18"]
POLICIES = ("aten", "kernel")


def parse_args(argv=None) -> argparse.Namespace:
    return policy_args(__doc__, "modules", MODELS, Path(__file__).parent / "results" / "gpu_edge_norms.json", argv)


def policy(name: str):
    """Runs the stem and the downsamplings with policy ``name`` (see the module's docstring)."""
    from metaformer.kernels import cuda_halves

    return replaced({"aten": lambda *a, **k: None, "kernel": cuda_halves.edge_norm}[name], (cuda_halves, "edge_norm"))


def modules(args, results: dict, save) -> None:
    """Part 1: convformer_s18's stem and downsamplings."""
    import metaformer

    model = metaformer.create("convformer_s18").to(args.device).to(memory_format=torch.channels_last)
    side = args.size // 4
    cases = [("stem", model.stem, 3, args.size)]
    for i, stage in enumerate(model.stages[1:], 1):
        cases.append((f"downsample{i}", stage.downsample, stage.downsample.conv.in_channels, side))
        side = (side + 1) // 2
    for key, module, channels, s in cases:
        x = torch.randn(args.batch, channels, s, s, device=args.device).contiguous(memory_format=torch.channels_last)
        r = results["modules"][f"{key} {args.batch}x{channels}x{s}x{s}"] = module_case(args, key, module, x)
        print(f"  {key:12} {channels:4}x{s:<3} inference {r['plain_ms']:.3f} -> {r['forward_ms']:.3f} ms (norm "
              f"{r['aten_norm_ms']:.3f} -> {r['kernel_norm_ms']:.3f}); fwd+bwd {r['plain_fwd_bwd_ms']:.3f} -> "
              f"{r['forward_fwd_bwd_ms']:.3f} ms", flush=True)
        save()


def module_case(args, key: str, module, x: torch.Tensor) -> dict:
    """One module plain and through the dispatch (the kernel), with the norm alone, ATen's and the kernel's,
    under bf16 autocast."""
    from metaformer.kernels import cuda_halves, layernorm_channels

    stem = key == "stem"
    if stem:
        plain = lambda t: module.norm(module.conv(t))  # noqa: E731
    else:
        plain = lambda t: module.conv(module.norm(t))  # noqa: E731
    r = {}
    with torch.inference_mode(), torch.autocast(args.device.type, torch.bfloat16):
        y = module.conv(x) if stem else x  # the norm's input
        r["kernel_applies"] = cuda_halves.edge_norm(module.norm, y, None if stem else module.conv) is not None
        if args.device.type == "cuda" and not r["kernel_applies"]:
            raise BenchmarkError(f"{key}: the kernel does not apply to a {tuple(y.shape)} {y.dtype} map")
        cases = {"plain": lambda: plain(x), "forward": lambda: module(x), "aten_norm": lambda: module.norm(y)}
        if args.device.type == "cuda":
            out_dtype = None if stem else torch.bfloat16
            cases["kernel_norm"] = lambda: layernorm_channels(y, module.norm.weight, module.norm.bias,
                                                              eps=module.norm.eps, out_dtype=out_dtype)
        r.update(time_cases(cases, args))
        r.setdefault("kernel_norm_ms", float("nan"))
        r["max_rel_diff"] = checked_rel_diff(module(x), plain(x), f"{key}: the module's forward")
    r.update(fwd_bwd_ms(module, {"plain": plain, "forward": module}, x, args))
    return r


def main(argv=None) -> int:
    first = ("modules", "convformer_s18's stem and downsamplings (ms)", modules)
    return policy_main(parse_args(argv), "gpu_edge_norms", first, policy, POLICIES)


if __name__ == "__main__":
    sys.exit(main())
