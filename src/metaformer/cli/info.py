"""``metaformer info`` (one model in detail) and ``metaformer list`` (the registry)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from .options import CLIError, format_count, image_size, parse_model_kwargs

INFO_DESCRIPTION = """\
Show a model: parameters (compared with the release's count), MACs at its input size (counted with
torch.utils.flop_counter: FLOPs / 2 of the convolutions and matrix products, compared with the
release's table), feature channels and strides, a fixed input size if it has one, its released
weights (tags and locations) and their ImageNet top-1.

  metaformer info poolformer_s12
  metaformer info caformer_s18.sail_in1k_384 --json
"""


def add_parsers(sub) -> None:
    """Adds the ``info`` and ``list`` sub-commands."""
    p = sub.add_parser("info", help="parameters, MACs, features and weights of a model",
                       description=INFO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="model name, optionally with a weights tag")
    p.add_argument("--img-size", type=image_size, metavar="S", help="count MACs at this size (default: the model's)")
    p.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="architecture overrides for metaformer.create")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count (it runs one forward pass)")
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    p.set_defaults(func=run_info)

    p = sub.add_parser("list", help="list the registered models",
                       description="List the registered models (names matching a shell pattern), or with "
                                   "--pretrained every name.tag with released weights.")
    p.add_argument("pattern", nargs="?", default="*", metavar="PATTERN", help="shell pattern, e.g. 'poolformer*'")
    p.add_argument("--pretrained", action="store_true", help="list name.tag for every set of released weights")
    p.add_argument("-v", "--verbose", action="store_true", help="a table with params, MACs and top-1")
    p.set_defaults(func=run_list)


def count_macs(model: torch.nn.Module, input_size) -> int:
    """Multiply-accumulates of one forward pass at ``input_size`` (C, H, W): FLOPs / 2 as counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, linear layers, matrix products).

    The pass runs on a copy of the model on the ``meta`` device: nothing is computed, and the model
    takes its standard PyTorch path (fused CPU inference kernels would hide their convolutions from
    the counter).
    """
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta").eval()
    x = torch.empty(1, *input_size, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(x)
    return counter.get_total_flops() // 2


def model_info(name: str, img_size=None, model_kwargs=None, macs: bool = True) -> dict[str, Any]:
    """Everything ``metaformer info`` shows, as a dict.

    Raises:
        ValueError / TypeError: for an unknown model, tag or override.
    """
    from .. import create, get_variant

    base, _, tag = name.partition(".")
    variant = get_variant(base)
    if tag:
        variant.source(tag)  # raises a clear error for an unknown tag
    model = create(name, **(model_kwargs or {})).eval()
    cfg = model.pretrained_cfg
    params = sum(p.numel() for p in model.parameters())
    size = tuple(cfg["input_size"])
    fixed = bool(cfg.get("fixed_input_size"))
    if img_size:
        if fixed and img_size != size[-1]:
            raise CLIError(f"{name} has a fixed input size of {size[1]}x{size[2]}; --img-size {img_size} cannot run")
        size = (size[0], img_size, img_size)
    info: dict[str, Any] = {
        "model": name, "family": variant.family, "paper": variant.paper,
        "depths": list(variant.depths), "dims": list(variant.dims),
        "params": params, "release_params": variant.params, "params_match": params == variant.params,
        "input_size": list(size), "fixed_input_size": fixed,
        "release_macs_g_224": variant.macs, "release_top1": variant.top1, "crop_pct": cfg.get("crop_pct"),
        "interpolation": cfg.get("interpolation"), "drop_path": variant.drop_path,
        "feature_channels": model.feature_info.channels(), "feature_reductions": model.feature_info.reduction(),
        "num_classes": model.num_classes,
        "sources": [dict(tag=f"{variant.name}.{s.tag}", location=s.location, input_size=list(s.input_size),
                         num_classes=s.num_classes, crop_pct=s.crop_pct, layout=s.layout) for s in variant.sources],
    }
    if macs:
        info["macs"] = count_macs(model, size)
    return info


def run_info(args: argparse.Namespace) -> int:
    """Runs ``metaformer info``; returns the exit status."""
    info = model_info(args.name, args.img_size, parse_model_kwargs(args.model_kwargs), macs=not args.no_macs)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    lines = [f"{info['model']}  ({info['family']} family, {info['paper']} release)",
             f"  depths {info['depths']}  dims {info['dims']}"]
    match = "matches the release" if info["params_match"] else f"release: {info['release_params']:,}"
    lines.append(f"  parameters  {info['params']:,} ({format_count(info['params'])}; {match})")
    if "macs" in info:
        h, w = info["input_size"][1:]
        ref = ""
        if info["release_macs_g_224"]:
            ref = f"; release: {info['release_macs_g_224']}G at 224x224"
            if (h, w) == (224, 224):
                ref += f" ({info['macs'] / 1e9 / info['release_macs_g_224'] - 1:+.1%})"
        lines.append(f"  MACs        {info['macs'] / 1e9:.3f}G at {h}x{w}{ref}")
    lines.append(f"  input       {info['input_size'][1]}x{info['input_size'][2]}"
                 f"{' (fixed: the model only takes this size)' if info['fixed_input_size'] else ' (any size works)'}"
                 f", crop_pct {info['crop_pct']}, {info['interpolation']}")
    lines.append(f"  features    channels {info['feature_channels']}  strides {info['feature_reductions']}")
    lines.append(f"  drop path   {info['drop_path']} (recommended for training)")
    top1 = f"{info['release_top1']}" if info["release_top1"] is not None else "n/a"
    lines.append(f"  top-1       {top1} (ImageNet-1k, the release's)")
    if info["sources"]:
        lines.append("  weights:")
        for s in info["sources"]:
            size = "x".join(map(str, s["input_size"][1:]))
            lines.append(f"    {s['tag']:<44} {size:>7}  {s['num_classes']:>5} classes  {s['location']}")
    else:
        lines.append("  weights:    none released")
    print("\n".join(lines))
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Runs ``metaformer list``; returns the exit status."""
    from .. import get_variant, list_models

    names = list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        raise CLIError(f"no model matches {args.pattern!r} (run `metaformer list` for all)")
    if not args.verbose:
        print("\n".join(names))
        return 0
    print(f"{'model':<46} {'params':>9} {'MACs':>6} {'top-1':>6}")
    for n in names:
        v = get_variant(n.partition(".")[0])
        top1 = f"{v.top1:.1f}" if v.top1 is not None else "-"
        print(f"{n:<46} {format_count(v.params):>9} {v.macs:>5.1f}G {top1:>6}")
    return 0
