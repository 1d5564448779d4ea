"""``metaformer validate-seg``: mIoU, pixel accuracy and mean accuracy of a segmenter on images + masks."""

from __future__ import annotations

import argparse
import math
import os

import torch

from ..training import SegRecipe, evaluate_segmentation, load_segmenter_file
from .options import (
    CLIError,
    add_device_args,
    add_results_args,
    add_workers_arg,
    check_input_file,
    check_results_file,
    log,
    parse_model_kwargs,
    resolve_device,
    write_results,
)
from .train_seg_run import find_split

DESCRIPTION = """\
Evaluate a Semantic FPN segmenter on a folder of images and masks (DATA/images/validation +
DATA/annotations/validation, DATA/val/images + DATA/val/masks, or --split NAME) as the release
evaluates (mmsegmentation's single-scale test): each image resized to fit --scale, then to multiples of
--size-divisor; logits resized back to the mask. Prints mIoU, aAcc (pixel accuracy) and mAcc, in percent.

The weights: a checkpoint written by train-seg (it brings its model, classes and preprocessing), or a
whole segmenter's state dict, such as the release's mmsegmentation checkpoints, with --model:
  metaformer validate-seg /path/to/ADEChallengeData2016 --model poolformer_s12 \\
      --checkpoint fpn_poolformer_s12_ade20k_40k.pth --reduce-zero-label
"""

_R = SegRecipe()


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``validate-seg`` sub-command."""
    p = sub.add_parser("validate-seg", help="evaluate mIoU of a segmenter on images + masks", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="data root holding the image and mask folders (see above)")
    p.add_argument("--split", metavar="NAME", help="split to evaluate (default: validation, else val)")
    m = p.add_argument_group("model")
    m.add_argument("-m", "--model", metavar="NAME", help="backbone name; optional with a train-seg checkpoint")
    m.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a train-seg checkpoint, or a Semantic FPN state dict (the release's mmsegmentation files)")
    m.add_argument("--num-classes", type=int, metavar="K", help="number of classes (default: that of the weights)")
    m.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="arguments of metaformer.create_segmenter for a plain state dict (fpn_channels=...)")
    d = p.add_argument_group("data (default: the train-seg checkpoint's, else the release's ADE20K settings)")
    d.add_argument("--reduce-zero-label", action="store_true", default=None,
                   help="label 0 means 'other' and is ignored, labels 1..K become 0..K-1 (ADE20K's masks)")
    d.add_argument("--ignore-index", type=int, metavar="L", help="mask label left out (default: 255)")
    d.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="images are resized to fit LONG x SHORT (default: 2048 512)")
    d.add_argument("--size-divisor", type=int, metavar="D", help="then to multiples of D (default: 32)")
    add_workers_arg(d)
    add_device_args(p, amp_help="evaluate under autocast (bfloat16 by default)")
    add_results_args(p, what="the results (with per-class IoU)")
    p.set_defaults(func=run)
    return p


def _recipe(args: argparse.Namespace, stored) -> SegRecipe:
    """The evaluation settings: the options, else the checkpoint's, else the release's."""
    stored = dict(stored or {})
    values = {}
    for key in ("scale", "size_divisor", "ignore_index", "reduce_zero_label", "mean", "std"):
        value = getattr(args, key, None)
        value = stored.get(key) if value is None else value
        if value is not None:
            values[key] = tuple(value) if isinstance(value, list) else value
    recipe = SegRecipe(**values)
    if min(recipe.scale) < 32 or recipe.size_divisor < 1:
        raise CLIError("--scale sides must be at least 32 and --size-divisor at least 1")
    return recipe


def run(args: argparse.Namespace) -> int:
    """Runs ``metaformer validate-seg``; returns the exit status."""
    from ..seg_data import SegmentationFolder

    split = find_split(args.data, args.split, ("validation", "val"), "--split")
    check_input_file(args.checkpoint, "--checkpoint")
    check_results_file(args)
    if args.num_classes is not None and args.num_classes < 1:
        raise CLIError(f"--num-classes must be >= 1, got {args.num_classes}")
    device = resolve_device(args.device)

    loaded = load_segmenter_file(args.checkpoint, args.model, num_classes=args.num_classes,
                                 model_kwargs=parse_model_kwargs(args.model_kwargs))
    model, num_classes = loaded.model, loaded.model.num_classes
    recipe = _recipe(args, loaded.data_config)
    if recipe.ignore_index < num_classes:
        raise CLIError(f"--ignore-index {recipe.ignore_index} is one of the {num_classes} classes")
    dataset = SegmentationFolder(args.data, split, recipe.eval_transform(), reduce_zero_label=recipe.reduce_zero_label,
                                 ignore_index=recipe.ignore_index)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    params = sum(p.numel() for p in model.parameters())
    log(f"validate-seg Semantic FPN on {loaded.name} ({params:,} params, weights: {loaded.weights}) on "
        f"{dataset.image_dir}: {len(dataset)} images, {num_classes} classes, resized to fit {recipe.scale[0]}x"
        f"{recipe.scale[1]} then to multiples of {recipe.size_divisor}, reduce_zero_label "
        f"{recipe.reduce_zero_label}, device {device}")
    metrics = evaluate_segmentation(model, loader, device, num_classes, ignore_index=recipe.ignore_index, amp=args.amp,
                                    amp_dtype=args.amp_dtype, channels_last=args.channels_last,
                                    progress=not args.no_progress)
    results = {
        "model": loaded.name,
        "checkpoint": args.checkpoint,
        "weights": loaded.weights,
        "mIoU": round(metrics["mIoU"], 4),
        "aAcc": round(metrics["aAcc"], 4),
        "mAcc": round(metrics["mAcc"], 4),
        "IoU": [None if math.isnan(v) else round(v, 4) for v in metrics["IoU"]],
        "images": metrics["images"],
        "img_per_sec": round(metrics["images"] / max(metrics["seconds"], 1e-9), 2),
        "param_count": params,
        "num_classes": num_classes,
        "scale": list(recipe.scale),
        "size_divisor": recipe.size_divisor,
        "reduce_zero_label": recipe.reduce_zero_label,
        "amp": args.amp and args.amp_dtype,
        "device": str(device),
        "data": os.path.abspath(dataset.image_dir),
    }
    log(f"mIoU {results['mIoU']:.2f}  aAcc {results['aAcc']:.2f}  mAcc {results['mAcc']:.2f}  "
        f"({results['images']} images, {results['img_per_sec']:.1f} img/s)")
    write_results(args, results)
    return 0
