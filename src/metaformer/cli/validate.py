"""``metaformer validate``: top-1 / top-5 / loss of a model on an ImageFolder."""

from __future__ import annotations

import argparse
import os

import torch

from ..training import dataset_targets_for, eval_transform, evaluate, image_folder
from .options import (
    CLIError,
    add_data_config_args,
    add_device_args,
    add_model_args,
    add_results_args,
    add_workers_arg,
    check_results_file,
    data_config_from_args,
    load_model,
    log,
    resolve_device,
    warn,
    write_results,
)

DESCRIPTION = """\
Evaluate a model on an ImageFolder (DATA/val if it exists, else DATA) with the model's own
evaluation transform (resize the short side to S / crop_pct, center-crop S, normalise): prints
top-1, top-5 and the mean cross-entropy, and optionally writes them as JSON.

The release's evaluation, in this form:
  metaformer validate /path/to/imagenet --model poolformer_s12 --pretrained -b 128
  metaformer validate /path/to/imagenet --model poolformer_s12 --checkpoint poolformer_s12.pth.tar -b 128
"""


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``validate`` sub-command."""
    p = sub.add_parser("validate", help="evaluate top-1/top-5 on an ImageFolder", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="ImageFolder root (DATA/CLASS/IMAGE); DATA/val is used if present")
    p.add_argument("--split", default="val", help="sub-folder of DATA to use when it exists (default: val)")
    add_model_args(p)
    p.add_argument("--use-ema", dest="use_ema", action="store_true", default=None,
                   help="training checkpoint: evaluate its EMA weights (default: the weights its run validated)")
    p.add_argument("--no-ema", dest="use_ema", action="store_false",
                   help="training checkpoint: evaluate its raw (non-EMA) weights")
    add_data_config_args(p)
    p.add_argument("-b", "--batch-size", type=int, default=128, metavar="N", help="batch size (default: 128)")
    add_workers_arg(p)
    add_device_args(p, amp_help="evaluate under autocast (bfloat16 by default)")
    add_results_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs ``metaformer validate``; returns the exit status."""
    if args.batch_size < 1:
        raise CLIError("--batch-size must be >= 1")
    root = args.data
    if os.path.isdir(os.path.join(root, args.split)):
        root = os.path.join(root, args.split)
    if not os.path.isdir(root):  # before the (slow) model build, and before its random-weights warning
        raise CLIError(f"validation data folder not found: {root}")
    check_results_file(args)
    device = resolve_device(args.device)

    loaded = load_model(args, use_ema=args.use_ema)
    model = loaded.model
    if loaded.weights.startswith("random init"):
        warn("evaluating randomly initialised weights; pass --pretrained or --checkpoint PATH")
    cfg = data_config_from_args(model, args, base=loaded.data_config)
    dataset = image_folder(root, eval_transform(cfg), what="validation data")
    dataset.target_transform = dataset_targets_for(dataset, model.num_classes, loaded.class_names, root)

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=False)
    params = sum(p.numel() for p in model.parameters())
    log(f"validate {loaded.name} ({params:,} params, weights: {loaded.weights}) on {root}: {len(dataset)} images, "
        f"{len(dataset.classes)} classes, input {cfg['input_size'][1]}x{cfg['input_size'][2]}, "
        f"crop_pct {cfg['crop_pct']}, {cfg['interpolation']}, device {device}")
    metrics = evaluate(model, loader, device, amp=args.amp, amp_dtype=args.amp_dtype,
                       channels_last=args.channels_last, progress=not args.no_progress)
    results = {
        "model": loaded.name,
        "checkpoint": args.checkpoint,
        "pretrained": bool(args.pretrained),
        "weights": loaded.weights,
        "top1": round(metrics["top1"], 4),
        "top1_err": round(100 - metrics["top1"], 4),
        "top5": round(metrics["top5"], 4),
        "top5_err": round(100 - metrics["top5"], 4),
        "loss": round(metrics["loss"], 6),
        "images": metrics["images"],
        "img_per_sec": round(metrics["images"] / max(metrics["seconds"], 1e-9), 2),
        "param_count": params,
        "num_classes": model.num_classes,
        "img_size": cfg["input_size"][-1],
        "crop_pct": cfg["crop_pct"],
        "interpolation": cfg["interpolation"],
        "batch_size": args.batch_size,
        "amp": args.amp and args.amp_dtype,
        "device": str(device),
        "data": os.path.abspath(root),
    }
    log(f"top1 {results['top1']:.3f}  top5 {results['top5']:.3f}  loss {results['loss']:.4f}  "
        f"({results['images']} images, {results['img_per_sec']:.1f} img/s)")
    write_results(args, results)
    return 0
