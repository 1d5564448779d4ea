"""``metaformer train``: the release's ImageNet recipe on any ImageFolder, on one process or under torchrun.

The recipe's defaults are those of :class:`metaformer.training.Recipe` (the PoolFormer release's:
AdamW, lr = 1e-3 x batch / 1024, weight decay 0.05, cosine schedule with 5 warm-up epochs from 1e-6
down to 1e-5, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8, cutmix 1.0, label
smoothing 0.1, random-resized-crop scale (0.08, 1), hflip 0.5, color jitter 0.4, random
interpolation) and the variant's drop-path rate. Flags are named as in timm's ``train.py`` (which the
release used). This module declares the options; :mod:`metaformer.cli.train_run` runs them.
"""

from __future__ import annotations

import argparse

from ..training import Recipe
from .options import add_data_config_args, add_device_args, add_workers_arg, refuse_failed, run_distributed

DESCRIPTION = """\
Train (or fine-tune) a model on an ImageFolder with the PoolFormer release's recipe as defaults.
Uses DATA/train and DATA/val when they exist (else DATA, with an optional --val-fraction held out).

One process by default; under torchrun it runs DistributedDataParallel (NCCL on GPUs, gloo on CPU).
The release's 8-GPU ImageNet training (batch 8 x 128 = 1024, lr 1e-3), in this form:
  torchrun --nproc_per_node 8 -m metaformer train /path/to/imagenet --model poolformer_s12 \\
      -b 128 --lr 1e-3 --drop-path 0.1 --amp --amp-dtype float16 --output runs/poolformer_s12
(drop path 0.1, 0.1, 0.2, 0.3, 0.4 for s12, s24, s36, m36, m48; the default is the variant's rate.)

Resume after an interruption with the same command plus --resume auto (or --resume PATH).
"""

_R = Recipe()  # the defaults of the recipe flags


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``train`` sub-command."""
    p = sub.add_parser("train", help="train or fine-tune on an ImageFolder (torchrun for several GPUs)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA", help="dataset root: DATA/train + DATA/val, or DATA/CLASS/IMAGE")
    d = p.add_argument_group("data")
    d.add_argument("--train-split", default="train", help="training sub-folder of DATA (default: train)")
    d.add_argument("--val-split", default="val", help="validation sub-folder of DATA (default: val)")
    d.add_argument("--val", metavar="DIR", help="validation ImageFolder elsewhere (overrides --val-split)")
    d.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="without a validation folder, hold out this fraction of DATA (default: 0, no validation)")
    add_workers_arg(d, per=" per rank")

    m = p.add_argument_group("model")
    m.add_argument("-m", "--model", required=True, metavar="NAME", help="model name (see `metaformer list`)")
    m.add_argument("--pretrained", action="store_true", help="start from the released weights (fine-tuning)")
    m.add_argument("--checkpoint", metavar="PATH", help="start from these weights (fine-tuning); the classifier "
                   "is replaced when --num-classes differs")
    m.add_argument("--num-classes", type=int, metavar="K", help="classifier size (default: number of class folders)")
    m.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="architecture overrides for metaformer.create (mlp_ratio=2 token_mixer=identity ...)")
    m.add_argument("--drop-path", type=float, metavar="RATE",
                   help="stochastic depth rate (default: the variant's: s12 0.1, s24 0.1, s36 0.2, m36 0.3, m48 0.4)")
    m.add_argument("--drop", type=float, default=0.0, metavar="RATE", help="dropout rate (default: 0)")
    m.add_argument("--grad-checkpointing", action="store_true", help="trade compute for activation memory")
    add_data_config_args(p)

    o = p.add_argument_group("optimizer and schedule")
    o.add_argument("-b", "--batch-size", type=int, default=128, metavar="N", help="batch size per process (default: 128)")
    o.add_argument("-vb", "--validation-batch-size", type=int, metavar="N", help="validation batch size (default: -b)")
    o.add_argument("--grad-accum-steps", type=int, default=1, metavar="N", help="accumulate N batches per update")
    o.add_argument("--opt", default=_R.opt, help="timm optimizer name (default: %(default)s)")
    o.add_argument("--opt-eps", type=float, metavar="EPS", help="optimizer epsilon")
    o.add_argument("--opt-betas", type=float, nargs="+", metavar="BETA", help="optimizer betas")
    o.add_argument("--momentum", type=float, default=_R.momentum, help="SGD momentum (default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=_R.weight_decay, help="weight decay (default: %(default)s)")
    o.add_argument("--clip-grad", type=float, metavar="NORM", help="gradient clipping (default: none)")
    o.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"), help="clipping mode")
    o.add_argument("--lr", type=float, metavar="LR",
                   help="learning rate (default: --lr-base x global batch / --lr-base-size)")
    o.add_argument("--lr-base", type=float, default=_R.lr_base, metavar="LR",
                   help="lr at --lr-base-size (default: %(default)s)")
    o.add_argument("--lr-base-size", type=int, default=_R.lr_base_size, metavar="N",
                   help="batch of --lr-base (default: %(default)s)")
    o.add_argument("--sched", default=_R.sched, help="timm scheduler: cosine, step, multistep, plateau, "
                   "tanh, poly, none (default: %(default)s)")
    o.add_argument("--sched-on-updates", action="store_true", help="step the schedule every update, not every epoch")
    o.add_argument("--epochs", type=int, default=_R.epochs, help="epochs (default: %(default)s)")
    o.add_argument("--warmup-epochs", type=int, default=_R.warmup_epochs,
                   help="linear warm-up epochs (default: %(default)s)")
    o.add_argument("--warmup-lr", type=float, default=_R.warmup_lr, help="warm-up start lr (default: %(default)s)")
    o.add_argument("--min-lr", type=float, default=_R.min_lr, help="lr floor of the schedule (default: %(default)s)")
    o.add_argument("--cooldown-epochs", type=int, default=_R.cooldown_epochs, help="epochs at min lr after the schedule")
    o.add_argument("--decay-epochs", type=float, default=_R.decay_epochs,
                   help="step schedule period (default: %(default)s)")
    o.add_argument("--decay-milestones", type=int, nargs="+", default=_R.decay_milestones, help="multistep epochs")
    o.add_argument("--decay-rate", type=float, default=_R.decay_rate,
                   help="step/multistep decay (default: %(default)s)")

    a = p.add_argument_group("augmentation and regularisation")
    a.add_argument("--aa", default=_R.aa, help="auto-augment policy, `none` disables (default: %(default)s)")
    a.add_argument("--reprob", type=float, default=_R.reprob, help="random erasing probability (default: %(default)s)")
    a.add_argument("--remode", default=_R.remode, help="random erasing mode (default: %(default)s)")
    a.add_argument("--recount", type=int, default=_R.recount, help="random erasing count (default: %(default)s)")
    a.add_argument("--scale", type=float, nargs=2, default=list(_R.scale), metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (default: 0.08 1.0)")
    a.add_argument("--ratio", type=float, nargs=2, default=list(_R.ratio), metavar=("MIN", "MAX"),
                   help="random-resized-crop aspect range (default: 3/4 4/3)")
    a.add_argument("--hflip", type=float, default=_R.hflip, help="horizontal flip probability (default: %(default)s)")
    a.add_argument("--vflip", type=float, default=_R.vflip, help="vertical flip probability (default: %(default)s)")
    a.add_argument("--color-jitter", type=float, default=_R.color_jitter, help="color jitter (default: %(default)s)")
    a.add_argument("--train-interpolation", default=_R.train_interpolation,
                   help="training resize interpolation (default: %(default)s)")
    a.add_argument("--mixup", type=float, default=_R.mixup, help="mixup alpha, 0 disables (default: %(default)s)")
    a.add_argument("--cutmix", type=float, default=_R.cutmix, help="cutmix alpha, 0 disables (default: %(default)s)")
    a.add_argument("--mixup-prob", type=float, default=_R.mixup_prob, help="probability of mixup or cutmix per batch")
    a.add_argument("--mixup-switch-prob", type=float, default=_R.mixup_switch_prob,
                   help="probability of cutmix when both are on")
    a.add_argument("--mixup-mode", default=_R.mixup_mode, choices=("batch", "pair", "elem"), help="mixup granularity")
    a.add_argument("--smoothing", type=float, default=_R.smoothing, help="label smoothing (default: %(default)s)")
    a.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (validated and "
                   "used for best.pth, as timm does)")
    a.add_argument("--model-ema-decay", type=float, default=_R.model_ema_decay, help="EMA decay (default: %(default)s)")

    r = p.add_argument_group("run")
    add_device_args(p, amp_help="mixed precision through torch.amp (bfloat16, or float16 with a GradScaler)")
    r.add_argument("--output", metavar="DIR", help="run folder (default: output/train/<time>-<model>)")
    r.add_argument("--resume", metavar="PATH", help="continue a run from a checkpoint written by train; "
                   "`auto` = OUTPUT/last.pth if it exists (else start fresh); a larger --epochs extends the "
                   "schedule")
    r.add_argument("--overwrite", action="store_true", help="start a new run in an --output that holds one, "
                   "removing its checkpoints, metrics.csv and plot (without it, such a folder is refused)")
    r.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"),
                   help="metric that picks best.pth (default: top1)")
    r.add_argument("--seed", type=int, default=42, help="random seed (rank r uses seed + r) (default: 42)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (epoch summaries only)")
    r.add_argument("--no-plot", action="store_true", help="do not draw metrics.png at the end")
    p.set_defaults(func=run)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Checks the options that need no file; raises :class:`CLIError` for the first one out of range."""
    checks = [
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.validation_batch_size is None or args.validation_batch_size >= 1, "--validation-batch-size must be >= 1"),
        (args.epochs >= 1, "--epochs must be >= 1"),
        (args.grad_accum_steps >= 1, "--grad-accum-steps must be >= 1"),
        (args.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
        (0 <= args.val_fraction < 1, "--val-fraction must be in [0, 1)"),
        (0 <= args.smoothing < 1, "--smoothing must be in [0, 1)"),
        (args.mixup >= 0 and args.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
        (0 <= args.reprob <= 1, "--reprob must be in [0, 1]"),
        (0 < args.scale[0] <= args.scale[1] <= 1, "--scale must be MIN MAX with 0 < MIN <= MAX <= 1"),
        (args.lr is None or args.lr > 0, "--lr must be > 0"),
        (args.drop_path is None or 0 <= args.drop_path < 1, "--drop-path must be in [0, 1)"),
        (not (args.pretrained and args.checkpoint), "pass either --pretrained or --checkpoint, not both"),
    ]
    refuse_failed(checks)


def run(args: argparse.Namespace) -> int:
    """Runs ``metaformer train``; returns the exit status."""
    from .train_run import train

    check_args(args)
    return run_distributed(args, train)
