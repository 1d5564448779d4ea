"""``metaformer train-seg``: Semantic FPN on a folder of images and masks with the release's ADE20K recipe.

The defaults are those of :class:`metaformer.training.SegRecipe` (the PoolFormer release's, from
mmsegmentation 0.19: AdamW lr 2e-4, weight decay 1e-4, poly schedule with power 0.9 down to 0, 40k
iterations of 4 images per GPU on 8 GPUs, evaluation and checkpoints every 4k iterations, 512x512 crops
of images resized to fit (2048, 512) x [0.5, 2], flip, photometric distortion). This module declares the
options; :mod:`metaformer.cli.train_seg_run` runs them.
"""

from __future__ import annotations

import argparse

from ..training import SegRecipe
from .options import add_device_args, add_workers_arg, refuse_failed, run_distributed

DESCRIPTION = """\
Train a Semantic FPN segmenter (the PoolFormer release's ADE20K model) on any MetaFormer backbone, on a
folder of images and single-channel masks of class indices (255 = ignored):
  DATA/images/training/*.jpg + DATA/annotations/training/*.png   (mmsegmentation's and ADE20K's layout)
  DATA/train/images/*.jpg + DATA/train/masks/*.png               (or any --train-split / --val-split)
Validation (mIoU, pixel accuracy, mean accuracy) every --eval-interval iterations, when the validation
split exists.

One process by default; under torchrun it runs DistributedDataParallel (NCCL and SyncBatchNorm on GPUs,
gloo and per-process BatchNorm on CPU). The release's ADE20K training on 8 GPUs, in this form:
  torchrun --nproc_per_node 8 -m metaformer train-seg /path/to/ADEChallengeData2016 --model poolformer_s12 \\
      --pretrained --num-classes 150 --reduce-zero-label --drop-path 0.1 --output runs/fpn_poolformer_s12

Resume after an interruption with the same command plus --resume auto (or --resume PATH).
"""

_R = SegRecipe()  # the defaults of the recipe flags


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``train-seg`` sub-command."""
    p = sub.add_parser("train-seg", help="train a Semantic FPN segmenter on images + masks (torchrun for GPUs)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="data root holding the image and mask folders (see above)")
    d = p.add_argument_group("data")
    d.add_argument("--train-split", metavar="NAME", help="training split (default: training, else train)")
    d.add_argument("--val-split", metavar="NAME", help="validation split (default: validation, else val)")
    d.add_argument("--num-classes", type=int, required=True, metavar="K",
                   help="number of classes: mask labels 0..K-1 (150 for ADE20K)")
    d.add_argument("--reduce-zero-label", action="store_true",
                   help="label 0 means 'other' and is ignored, labels 1..K become 0..K-1 (ADE20K's masks)")
    d.add_argument("--ignore-index", type=int, default=_R.ignore_index, metavar="L",
                   help="mask label left out of the loss and metrics (default: %(default)s)")
    add_workers_arg(d, per=" per rank")

    m = p.add_argument_group("model")
    m.add_argument("-m", "--model", required=True, metavar="NAME", help="backbone name (see `metaformer list`)")
    m.add_argument("--pretrained", action="store_true", help="start the backbone from the released ImageNet "
                   "weights (the release's starting point)")
    m.add_argument("--checkpoint", metavar="PATH", help="start from a whole segmenter (a train-seg checkpoint or "
                   "the release's mmsegmentation file); its classifier is replaced when --num-classes differs")
    m.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="arguments of metaformer.create_segmenter: fpn_channels=256 head_channels=128 dropout=0.1 "
                        "and backbone overrides (mlp_ratio=2 ...)")
    m.add_argument("--drop-path", type=float, metavar="RATE",
                   help="backbone stochastic depth (default: the variant's; the release: s12 0.1, s24 0.1, "
                        "s36 0.2, m36 0.3, m48 0.4)")

    o = p.add_argument_group("optimizer and schedule (the release's recipe)")
    o.add_argument("-b", "--batch-size", type=int, default=_R.batch_size, metavar="N",
                   help="images per process and iteration (default: %(default)s; the release: 4 on each of 8 GPUs)")
    o.add_argument("--grad-accum-steps", type=int, default=1, metavar="N", help="accumulate N batches per iteration")
    o.add_argument("--lr", type=float, default=_R.lr, help="AdamW learning rate (default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=_R.weight_decay, help="AdamW weight decay (default: %(default)s)")
    o.add_argument("--power", type=float, default=_R.power, help="poly schedule power (default: %(default)s)")
    o.add_argument("--min-lr", type=float, default=_R.min_lr, help="lr at the end of the schedule (default: %(default)s)")
    o.add_argument("--iters", type=int, default=_R.iters, help="training iterations (default: %(default)s)")
    o.add_argument("--eval-interval", type=int, default=_R.eval_interval, metavar="N",
                   help="iterations between evaluations and checkpoints (default: %(default)s)")
    o.add_argument("--clip-grad", type=float, metavar="NORM", help="gradient clipping (default: none, as the release)")

    a = p.add_argument_group("augmentation and evaluation preprocessing")
    a.add_argument("--crop-size", type=int, default=_R.crop_size, metavar="S",
                   help="square training crop (default: %(default)s)")
    a.add_argument("--scale", type=int, nargs=2, default=list(_R.scale), metavar=("LONG", "SHORT"),
                   help="images are resized to fit LONG x SHORT (training: times the random ratio; evaluation: "
                        "then to multiples of --size-divisor) (default: 2048 512)")
    a.add_argument("--ratio-range", type=float, nargs=2, default=list(_R.ratio_range), metavar=("MIN", "MAX"),
                   help="random resize ratio of training (default: 0.5 2.0)")
    a.add_argument("--cat-max-ratio", type=float, default=_R.cat_max_ratio, metavar="R",
                   help="most one class may cover of a crop (10 tries; 1 disables) (default: %(default)s)")
    a.add_argument("--flip-prob", type=float, default=_R.flip_prob, help="horizontal flip probability (default: %(default)s)")
    a.add_argument("--no-photometric", dest="photometric", action="store_false",
                   help="no photometric distortion (brightness, contrast, saturation, hue)")
    a.add_argument("--size-divisor", type=int, default=_R.size_divisor, metavar="D",
                   help="evaluation images are resized to multiples of D (default: %(default)s)")

    r = p.add_argument_group("run")
    add_device_args(p, amp_help="mixed precision through torch.amp (bfloat16, or float16 with a GradScaler)")
    r.add_argument("--output", metavar="DIR", help="run folder (default: output/train-seg/<time>-<model>)")
    r.add_argument("--resume", metavar="PATH", help="continue a run from a checkpoint written by train-seg; "
                   "`auto` = OUTPUT/last.pth if it exists (else start fresh); a larger --iters extends the schedule")
    r.add_argument("--overwrite", action="store_true", help="start a new run in an --output that holds one, "
                   "removing its checkpoints, metrics.csv and plot (without it, such a folder is refused)")
    r.add_argument("--eval-metric", default="mIoU", choices=("mIoU", "aAcc", "mAcc"),
                   help="metric that picks best.pth (default: mIoU)")
    r.add_argument("--seed", type=int, default=42, help="random seed (rank r uses seed + r) (default: 42)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (summaries only)")
    r.add_argument("--no-plot", action="store_true", help="do not draw metrics.png at the end")
    p.set_defaults(func=run)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Checks the options that need no file; raises :class:`CLIError` for the first one out of range."""
    checks = [
        (args.num_classes >= 1, "--num-classes must be >= 1"),
        (0 <= args.ignore_index and args.ignore_index >= args.num_classes,
         f"--ignore-index must be >= --num-classes ({args.num_classes}), got {args.ignore_index}"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.grad_accum_steps >= 1, "--grad-accum-steps must be >= 1"),
        (args.lr > 0, "--lr must be > 0"),
        (0 <= args.min_lr <= args.lr, "--min-lr must be in [0, --lr]"),
        (args.weight_decay >= 0, "--weight-decay must be >= 0"),
        (args.power > 0, "--power must be > 0"),
        (args.iters >= 1, "--iters must be >= 1"),
        (args.eval_interval >= 1, "--eval-interval must be >= 1"),
        (args.crop_size >= 32, f"--crop-size must be at least 32 (the backbone's stride), got {args.crop_size}"),
        (min(args.scale) >= 32, "--scale sides must be at least 32"),
        (0 < args.ratio_range[0] <= args.ratio_range[1], "--ratio-range must be MIN MAX with 0 < MIN <= MAX"),
        (0 < args.cat_max_ratio <= 1, "--cat-max-ratio must be in (0, 1]"),
        (0 <= args.flip_prob <= 1, "--flip-prob must be in [0, 1]"),
        (args.size_divisor >= 1, "--size-divisor must be >= 1"),
        (args.drop_path is None or 0 <= args.drop_path < 1, "--drop-path must be in [0, 1)"),
        (not (args.pretrained and args.checkpoint), "pass either --pretrained or --checkpoint, not both"),
    ]
    refuse_failed(checks)


def run(args: argparse.Namespace) -> int:
    """Runs ``metaformer train-seg``; returns the exit status."""
    from .train_seg_run import train_segmentation

    check_args(args)
    return run_distributed(args, train_segmentation)
