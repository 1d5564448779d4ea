"""``metaformer predict``: the top-k classes of some images."""

from __future__ import annotations

import argparse
import json
import os

import torch

from ..training import IMG_EXTENSIONS, class_label_fn, eval_transform, find_images, load_image
from .options import (
    CLIError,
    add_data_config_args,
    add_device_args,
    add_model_args,
    check_input_file,
    data_config_from_args,
    load_model,
    resolve_device,
    warn,
)

DESCRIPTION = """\
Classify images and print the top-k classes with their probabilities. Labels are ImageNet's class
names for 1000-class models (from timm), or the class folder names stored in a checkpoint written by
`metaformer train`.

  metaformer predict cat.jpg dog.png --model poolformer_s12 --pretrained
  metaformer predict digit.png --checkpoint runs/digits/best.pth --topk 3
  metaformer predict photos/ --model poolformer_s12 --pretrained   # every image under photos/
"""


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``predict`` sub-command."""
    p = sub.add_parser("predict", help="classify images (top-k labels)", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders: every image under them "
                   "(hidden folders skipped, each real folder once)")
    add_model_args(p)
    add_data_config_args(p)
    p.add_argument("-k", "--topk", type=int, default=5, metavar="K", help="classes to show per image (default: 5)")
    p.add_argument("-b", "--batch-size", type=int, default=32, metavar="N", help="batch size (default: 32)")
    add_device_args(p, amp_help="run under autocast (bfloat16 by default)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    p.set_defaults(func=run)
    return p


def _expand(paths: list[str]) -> list[str]:
    """The image files named, with the images under each folder named; checked before the model is built."""
    images = []
    for path in paths:
        if os.path.isdir(path):
            found = find_images(path)
            if not found:
                raise CLIError(f"{path} is a folder with no images (supported: {', '.join(IMG_EXTENSIONS)})")
            images += found
        elif os.path.isfile(path):
            images.append(path)
        else:
            check_input_file(path, "image")  # says what it is: missing, a link loop...
    return images


def run(args: argparse.Namespace) -> int:
    """Runs ``metaformer predict``; returns the exit status."""
    if args.topk < 1 or args.batch_size < 1:
        raise CLIError("--topk and --batch-size must be >= 1")
    images = _expand(args.images)
    device = resolve_device(args.device)
    loaded = load_model(args)
    if loaded.weights.startswith("random init"):
        warn("predicting with randomly initialised weights; pass --pretrained or --checkpoint PATH")
    model = loaded.model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    transform = eval_transform(data_config_from_args(model, args, base=loaded.data_config))
    label = class_label_fn(model.num_classes, loaded.class_names)
    k = min(args.topk, model.num_classes)

    for start in range(0, len(images), args.batch_size):
        paths = images[start:start + args.batch_size]
        batch = torch.stack([transform(load_image(p)) for p in paths]).to(device)
        if args.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if args.amp:
                with torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype)):
                    logits = model(batch)
            else:
                logits = model(batch)
        probs, idx = logits.float().softmax(dim=-1).topk(k, dim=-1)
        for path, p_row, i_row in zip(paths, probs.tolist(), idx.tolist()):
            preds = [{"index": i, "label": label(i), "prob": p} for p, i in zip(p_row, i_row)]
            if args.json:
                print(json.dumps({"image": path, "predictions": preds}), flush=True)
            else:
                print(path)
                for rank, pred in enumerate(preds, 1):
                    print(f"  {rank}. {pred['label']} ({pred['index']}): {100 * pred['prob']:.2f}%")
    return 0
