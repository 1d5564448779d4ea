"""Semantic segmentation with the release's Semantic FPN, trained and evaluated with metaformer.training.

The data is a folder of images and masks in mmsegmentation's layout::

    my_data/images/training/*.png      my_data/annotations/training/*.png
    my_data/images/validation/*.png    my_data/annotations/validation/*.png

(masks: one class index per pixel, 255 = ignored). Without a folder, the script writes one: scikit-learn's
handwritten digits pasted onto 32x32 canvases, the mask holding 0 for the background and 1, 2, ... for
the digits of ``--digits`` (two by default, learnable in a minute from scratch on a CPU).

The parts are those ``metaformer train-seg`` composes: ``create_segmenter`` (Semantic FPN on any
MetaFormer), ``SegRecipe`` (the release's AdamW and poly schedule, and its transforms),
``SegmentationLoss`` (mmsegmentation 0.19's cross-entropy), ``TrainState`` and ``train_one_epoch`` (the
loop), ``IterationBatchSampler`` (the batches of a stretch of iterations) and ``evaluate_segmentation``
(mIoU, pixel accuracy and mean accuracy, logits resized to the masks). It prints the mIoU after every
``--eval-interval`` iterations, next to the mIoU of predicting background everywhere (chance).

Run::

    python examples/segmentation.py                       # generated digits, from scratch, ~1 min on a CPU
    python examples/segmentation.py /data/ADEChallengeData2016 --num-classes 150 --reduce-zero-label \\
        --pretrained --crop-size 512 --scale 2048 512 --flip-prob 0.5 --photometric --lr 2e-4 --iters 40000 \\
        --eval-interval 4000
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import torch
from torch.utils.data import DataLoader

import metaformer
from metaformer.seg_data import SegmentationFolder
from metaformer.seg_metrics import SegmentationMetrics
from metaformer.training import (
    IterationBatchSampler,
    LoopSettings,
    SegmentationLoss,
    SegRecipe,
    TrainState,
    evaluate_segmentation,
    train_one_epoch,
)


def write_digits_segmentation(root: str, digits=(6, 7), n_train: int = 64, n_val: int = 16, canvas: int = 32,
                              digit_size: int = 28) -> str:
    """Writes sklearn's digits pasted onto noisy canvases, with their masks, in mmsegmentation's layout."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data, rng = load_digits(), np.random.default_rng(0)
    pool = [i for i in range(len(data.target)) if data.target[i] in digits]
    for split, count in (("training", n_train), ("validation", n_val)):
        for kind in ("images", "annotations"):
            os.makedirs(os.path.join(root, kind, split), exist_ok=True)
        for n in range(count):
            rgb = rng.uniform(200, 255, size=(canvas, canvas, 3))
            mask = np.zeros((canvas, canvas), dtype=np.uint8)
            i = pool[rng.integers(len(pool))]
            ink = np.asarray(Image.fromarray((data.images[i] * 16).astype(np.uint8)).resize(
                (digit_size, digit_size), Image.BICUBIC), dtype=np.float64) / 255
            y, x = rng.integers(0, canvas - digit_size + 1, size=2)
            region = rgb[y:y + digit_size, x:x + digit_size]
            region[:] = region * (1 - ink[..., None]) + 255 * rng.uniform(0.0, 0.5, size=3) * ink[..., None]
            mask[y:y + digit_size, x:x + digit_size][ink > 0.35] = 1 + list(digits).index(data.target[i])
            Image.fromarray(rgb.astype(np.uint8), "RGB").save(os.path.join(root, "images", split, f"{n:04d}.png"))
            Image.fromarray(mask, "L").save(os.path.join(root, "annotations", split, f"{n:04d}.png"))
    return root


def chance_miou(dataset: SegmentationFolder, num_classes: int) -> float:
    """mIoU (percent) of predicting the background (class 0) everywhere."""
    metrics = SegmentationMetrics(num_classes, dataset.ignore_index)
    for _, mask in dataset:
        metrics.update(torch.zeros_like(mask), mask)
    return 100 * metrics.compute()["mIoU"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", help="folder with images/ and annotations/ (default: generated digits)")
    parser.add_argument("--model", default="poolformer_s12", help="backbone name (default: %(default)s)")
    parser.add_argument("--pretrained", action="store_true", help="start the backbone from the ImageNet weights")
    parser.add_argument("--num-classes", type=int, help="classes of the masks (default: 1 + number of --digits)")
    parser.add_argument("--digits", type=int, nargs="+", default=[6, 7], help="digits of the generated set")
    parser.add_argument("--reduce-zero-label", action="store_true", help="label 0 is 'other' (ADE20K)")
    parser.add_argument("--crop-size", type=int, default=32, help="training crop (the release: 512)")
    parser.add_argument("--scale", type=int, nargs=2, default=[128, 32], help="resize to fit (the release: 2048 512)")
    parser.add_argument("--flip-prob", type=float, default=0.0,
                        help="horizontal flips (default: none, a mirrored digit is another shape; the release: 0.5)")
    parser.add_argument("--photometric", action="store_true", help="photometric distortion (the release's)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW lr (the release: 2e-4, from ImageNet weights)")
    parser.add_argument("--iters", type=int, default=60, help="training iterations (the release: 40000)")
    parser.add_argument("--eval-interval", type=int, default=20, help="iterations between evaluations")
    parser.add_argument("--batch-size", type=int, default=4, help="images per iteration")
    args = parser.parse_args(argv)

    data = args.data or write_digits_segmentation(tempfile.mkdtemp(prefix="digits_seg_"), tuple(args.digits))
    num_classes = args.num_classes or 1 + len(args.digits)
    recipe = SegRecipe(lr=args.lr, iters=args.iters, eval_interval=args.eval_interval, batch_size=args.batch_size,
                       crop_size=args.crop_size, scale=tuple(args.scale), flip_prob=args.flip_prob,
                       photometric=args.photometric, reduce_zero_label=args.reduce_zero_label)
    train_set = SegmentationFolder(data, "training", recipe.train_transform(), args.reduce_zero_label)
    val_set = SegmentationFolder(data, "validation", recipe.eval_transform(), args.reduce_zero_label)
    print(f"{data}: {len(train_set)} training and {len(val_set)} validation images, {num_classes} classes; "
          f"chance (all background) mIoU {chance_miou(val_set, num_classes):.1f}")

    torch.manual_seed(0)
    model = metaformer.create_segmenter(args.model, num_classes, pretrained=args.pretrained, drop_path_rate=0.0)
    optimizer = recipe.create_optimizer(model)
    state = TrainState(model, optimizer, recipe.create_scheduler(optimizer))
    settings = LoopSettings(device=torch.device("cpu"), epochs=1, sched_on_updates=True, progress=False)
    loss_fn = SegmentationLoss(num_classes)
    while state.num_updates < args.iters:
        first = state.num_updates
        last = min(first + args.eval_interval, args.iters)
        batches = IterationBatchSampler(len(train_set), args.batch_size, first, last - first, seed=0)
        result = train_one_epoch(state, DataLoader(train_set, batch_sampler=batches),
                                 dataclasses.replace(settings, desc=f"iter {first + 1}-{last}"), loss_fn)
        metrics = evaluate_segmentation(model, DataLoader(val_set, batch_size=1), torch.device("cpu"), num_classes,
                                        progress=False)
        state.record({"epoch": state.epoch + 1, "iter": last, "mIoU": metrics["mIoU"]}, metrics["mIoU"])
        per_class = ", ".join(f"{iou:.1f}" for iou in metrics["IoU"])
        print(f"iter {last:4d}  train loss {result.loss:.4f}  mIoU {metrics['mIoU']:.1f}  aAcc {metrics['aAcc']:.1f}  "
              f"mAcc {metrics['mAcc']:.1f}  (IoU per class: {per_class})")
    print(f"best mIoU {state.best_metric:.1f} after {state.history[state.best_epoch - 1]['iter']} iterations")


if __name__ == "__main__":
    main()
