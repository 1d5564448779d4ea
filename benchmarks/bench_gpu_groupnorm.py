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
import sys
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

MODELS = ["poolformer_s12", "poolformerv2_s12", "identityformer_s12", "randformer_s12"]
POLICIES = ("aten", "inference", "always")
STAGES = ((64, 56), (128, 28), (320, 14), (512, 7))  # poolformer_s12's (channels, side) at 224x224


def parse_args(argv=None) -> argparse.Namespace:
    return policy_args(__doc__, "halves", MODELS, Path(__file__).parent / "results" / "gpu_groupnorm.json", argv)


def policy(name: str):
    """Runs the block with GroupNorm policy ``name`` (see the module's docstring)."""
    from metaformer.kernels import cuda_halves, folding

    pays = {"aten": lambda *a: False, "inference": folding.group_norm1_pays, "always": lambda *a: True}[name]
    return replaced(pays, (folding, "group_norm1_pays"), (cuda_halves, "group_norm1_pays"))


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
        r.update(time_cases(cases, args))
        r["layout_half_max_rel_diff"] = checked_rel_diff(layout_half(x), block.mlp_half(x),
                                                         f"{tuple(x.shape)} {dtype}: the layout-keeping half")
    r.update(fwd_bwd_ms(block, {"plain_half": block.mlp_half, "layout_half": layout_half}, x, args,
                        grad=torch.randn_like(x)))
    return r


def main(argv=None) -> int:
    first = ("halves", "poolformer_s12's MLP half per stage (ms)", halves)
    return policy_main(parse_args(argv), "gpu_groupnorm", first, policy, POLICIES)


if __name__ == "__main__":
    sys.exit(main())
