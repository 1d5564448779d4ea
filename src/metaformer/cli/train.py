"""``metaformer train``: the release's ImageNet recipe on any ImageFolder, on one process or under torchrun.

The defaults are the recipe of the PoolFormer release (REFERENCE.md): AdamW, lr = 1e-3 x batch / 1024,
weight decay 0.05, cosine schedule with 5 warm-up epochs from 1e-6 down to 1e-5, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1,
random-resized-crop scale (0.08, 1), hflip 0.5, color jitter 0.4, random interpolation and the
variant's drop-path rate. Flags are named as in timm's ``train.py`` (which the release used).

Files under ``--output``: ``last.pth`` (every epoch) and ``best.pth`` (each new best), written
atomically; ``metrics.csv`` (one row per epoch); ``args.json``; ``metrics.png`` at the end.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .common import (
    TRAINING_CHECKPOINT_FORMAT,
    CLIError,
    add_data_config_args,
    add_device_args,
    atomic_save,
    atomic_write_text,
    autocast,
    data_config,
    dataset_targets_for,
    eval_transform,
    evaluate,
    image_folder,
    log,
    parse_model_kwargs,
    read_training_checkpoint,
    resolve_device,
    warn,
)

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

CSV_FIELDS = ["epoch", "train_loss", "val_loss", "top1", "top5", "lr", "time"]
EMA_FIELDS = ["raw_val_loss", "raw_top1", "raw_top5"]


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
    d.add_argument("-j", "--workers", type=int, default=4, metavar="N", help="data loading processes per rank")

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
    o.add_argument("--opt", default="adamw", help="timm optimizer name (default: adamw)")
    o.add_argument("--opt-eps", type=float, metavar="EPS", help="optimizer epsilon")
    o.add_argument("--opt-betas", type=float, nargs="+", metavar="BETA", help="optimizer betas")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    o.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    o.add_argument("--clip-grad", type=float, metavar="NORM", help="gradient clipping (default: none)")
    o.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"), help="clipping mode")
    o.add_argument("--lr", type=float, metavar="LR",
                   help="learning rate (default: --lr-base x global batch / --lr-base-size)")
    o.add_argument("--lr-base", type=float, default=1e-3, metavar="LR", help="lr at --lr-base-size (default: 1e-3)")
    o.add_argument("--lr-base-size", type=int, default=1024, metavar="N", help="batch of --lr-base (default: 1024)")
    o.add_argument("--sched", default="cosine", help="timm scheduler: cosine, step, multistep, plateau, "
                   "tanh, poly, none (default: cosine)")
    o.add_argument("--sched-on-updates", action="store_true", help="step the schedule every update, not every epoch")
    o.add_argument("--epochs", type=int, default=300, help="epochs (default: 300)")
    o.add_argument("--warmup-epochs", type=int, default=5, help="linear warm-up epochs (default: 5)")
    o.add_argument("--warmup-lr", type=float, default=1e-6, help="warm-up start lr (default: 1e-6)")
    o.add_argument("--min-lr", type=float, default=1e-5, help="lr floor of the schedule (default: 1e-5)")
    o.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at min lr after the schedule")
    o.add_argument("--decay-epochs", type=float, default=90, help="step schedule period (default: 90)")
    o.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], help="multistep epochs")
    o.add_argument("--decay-rate", type=float, default=0.1, help="step/multistep decay (default: 0.1)")

    a = p.add_argument_group("augmentation and regularisation")
    a.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="auto-augment policy, `none` disables "
                   "(default: rand-m9-mstd0.5-inc1)")
    a.add_argument("--reprob", type=float, default=0.25, help="random erasing probability (default: 0.25)")
    a.add_argument("--remode", default="pixel", help="random erasing mode (default: pixel)")
    a.add_argument("--recount", type=int, default=1, help="random erasing count (default: 1)")
    a.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (default: 0.08 1.0)")
    a.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], metavar=("MIN", "MAX"),
                   help="random-resized-crop aspect range (default: 3/4 4/3)")
    a.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (default: 0.5)")
    a.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability (default: 0)")
    a.add_argument("--color-jitter", type=float, default=0.4, help="color jitter (default: 0.4)")
    a.add_argument("--train-interpolation", default="random", help="training resize interpolation (default: random)")
    a.add_argument("--mixup", type=float, default=0.8, help="mixup alpha, 0 disables (default: 0.8)")
    a.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha, 0 disables (default: 1.0)")
    a.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    a.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    a.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"), help="mixup granularity")
    a.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    a.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (validated and "
                   "used for best.pth, as timm does)")
    a.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay (default: 0.9998)")

    r = p.add_argument_group("run")
    add_device_args(p, amp_help="mixed precision through torch.amp (bfloat16, or float16 with a GradScaler)")
    r.add_argument("--output", metavar="DIR", help="run folder (default: output/train/<time>-<model>)")
    r.add_argument("--resume", metavar="PATH", help="continue a run from a checkpoint written by train; "
                   "`auto` = OUTPUT/last.pth if it exists (else start fresh)")
    r.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"),
                   help="metric that picks best.pth (default: top1)")
    r.add_argument("--seed", type=int, default=42, help="random seed (rank r uses seed + r) (default: 42)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (epoch summaries only)")
    r.add_argument("--no-plot", action="store_true", help="do not draw metrics.png at the end")
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------ distributed
class _Dist:
    """The process group of a torchrun launch (or a single process)."""

    def __init__(self, device_arg: str | None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world_size > 1
        if self.enabled:
            import torch.distributed as dist

            device = resolve_device(device_arg) if device_arg else None
            use_cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
            if use_cuda:
                if torch.cuda.device_count() <= self.local_rank:
                    raise CLIError(f"local rank {self.local_rank} but only {torch.cuda.device_count()} CUDA devices")
                torch.cuda.set_device(self.local_rank)
                self.device = torch.device("cuda", self.local_rank)
            else:
                self.device = torch.device("cpu")
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        else:
            self.device = resolve_device(device_arg)

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that writes files and prints)."""
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums a list of floats over ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        """Leaves the process group."""
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------ RNG state
def _seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:
            warn("could not restore the CUDA RNG state (different GPU count); continuing")


# ------------------------------------------------------------------------------------ helpers
def _jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for k, v in vars(args).items():
        if callable(v):
            continue
        if isinstance(v, (list, tuple)):
            v = list(v)
        out[k] = v
    return out


def _data_roots(args: argparse.Namespace):
    data = args.data
    if not os.path.exists(data):
        raise CLIError(f"data folder not found: {data}")
    train_root = os.path.join(data, args.train_split)
    has_train = os.path.isdir(train_root)
    if not has_train:
        train_root = data
    val_root = None
    if args.val:
        val_root = args.val
    elif has_train and os.path.isdir(os.path.join(data, args.val_split)):
        val_root = os.path.join(data, args.val_split)
    return train_root, val_root


def _posterize(img, bits_to_keep, **__):
    """timm's posterize, but 0 bits gives a black image (as Pillow < 11 did) instead of raising."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize() -> None:
    # RandAugment's "inc1" PosterizeIncreasing keeps 4 - int(magnitude / 10 * 4) bits: 0 at magnitude 10,
    # which rand-m9-mstd0.5 draws a few percent of the time. Recent Pillow rejects 0 bits (ValueError)
    # where older versions returned a black image, so training would stop at a random step.
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize


def _train_transform(args, cfg):
    from timm.data import create_transform

    aa = None if str(args.aa).lower() in ("none", "", "false", "0") else args.aa
    if aa:
        _patch_posterize()
    return create_transform(
        cfg["input_size"], is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=aa, interpolation=args.train_interpolation,
        mean=cfg["mean"], std=cfg["std"], re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)


def _check_args(args: argparse.Namespace) -> None:
    checks = [
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.validation_batch_size is None or args.validation_batch_size >= 1, "--validation-batch-size must be >= 1"),
        (args.epochs >= 1, "--epochs must be >= 1"),
        (args.grad_accum_steps >= 1, "--grad-accum-steps must be >= 1"),
        (args.workers >= 0, "--workers must be >= 0"),
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
    for ok, message in checks:
        if not ok:
            raise CLIError(message)


def _write_csv(history: list[dict[str, Any]], path: str, ema: bool) -> None:
    fields = CSV_FIELDS + (EMA_FIELDS if ema else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(buf.getvalue(), path)


def plot_history(history: list[dict[str, Any]], path: str, title: str = "") -> bool:
    """Draws the loss and accuracy curves of a run into a PNG.

    Returns:
        False (with a warning) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn("matplotlib is not installed, skipping the metrics plot (pip install 'metaformer[plot]')")
        return False
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss")
    if any(r.get("val_loss") is not None for r in history):
        ax1.plot(epochs, [r.get("val_loss") for r in history], marker="o", label="val loss")
        ax2.plot(epochs, [r.get("top1") for r in history], marker="o", label="top-1")
        ax2.plot(epochs, [r.get("top5") for r in history], marker="o", label="top-5")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new < best if metric == "loss" else new > best


# ------------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace) -> int:
    """Runs ``metaformer train``; returns the exit status."""
    _check_args(args)
    dist = _Dist(args.device)
    try:
        return _train(args, dist)
    finally:
        dist.close()


def _train(args: argparse.Namespace, dist: _Dist) -> int:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from .. import __version__, create, get_variant

    device = dist.device
    _seed_all(args.seed + dist.rank)
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    for key in ("num_classes", "drop_path_rate", "drop_rate"):
        if key in model_kwargs:
            raise CLIError(f"--model-kwargs {key}: use --{key.replace('_rate', '').replace('_', '-')} instead")
    base_name = args.model.partition(".")[0]
    variant = get_variant(base_name)

    # ---- output and resume
    output = args.output or os.path.join("output", "train", f"{time.strftime('%Y%m%d-%H%M%S')}-{base_name}")
    output = dist.broadcast(output)
    resume_path = args.resume
    if resume_path == "auto":
        resume_path = os.path.join(output, "last.pth")
        if not os.path.isfile(resume_path):
            if dist.main:
                log(f"--resume auto: no {resume_path} yet, starting a new run")
            resume_path = None
    resume = None
    if resume_path:
        resume = read_training_checkpoint(resume_path)
        if resume is None:
            raise CLIError(f"--resume {resume_path}: not a checkpoint written by `metaformer train`")
        if resume["model_name"].partition(".")[0] != base_name:
            raise CLIError(f"--resume {resume_path}: the run trained {resume['model_name']}, not {args.model}")

    # ---- data
    train_root, val_root = _data_roots(args)
    train_probe = image_folder(train_root, what="training data")
    class_names = list(train_probe.classes)
    if resume is not None and resume.get("class_names") != class_names:
        raise CLIError(f"--resume: the checkpoint's classes differ from the class folders of {train_root}")
    num_classes = args.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise CLIError(f"--num-classes {num_classes} but {train_root} has {len(class_names)} class folders")
    if num_classes > len(class_names) and dist.main:
        warn(f"--num-classes {num_classes} > {len(class_names)} class folders; the extra outputs are never targets")

    # ---- model
    drop_path = variant.drop_path if args.drop_path is None else args.drop_path
    create_kwargs = dict(model_kwargs, num_classes=num_classes, drop_path_rate=drop_path, drop_rate=args.drop)
    model = create(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **create_kwargs)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    cfg = data_config(model, args)

    train_set = image_folder(train_root, _train_transform(args, cfg), what="training data")
    val_set = None
    if val_root is not None:
        val_set = image_folder(val_root, eval_transform(cfg), what="validation data")
        val_set.target_transform = dataset_targets_for(val_set, num_classes, class_names, val_root)
    elif args.val_fraction > 0:
        n = len(train_set)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_val = max(1, int(round(n * args.val_fraction)))
        val_set = torch.utils.data.Subset(image_folder(train_root, eval_transform(cfg)), sorted(perm[:n_val]))
        train_set = torch.utils.data.Subset(train_set, sorted(perm[n_val:]))
        val_root = f"{train_root} (held-out {args.val_fraction:.0%})"
    elif dist.main:
        warn("no validation data (no DATA/val, --val or --val-fraction): best.pth is not written")

    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    # ---- loaders
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.workers > 0)
    if len(loader) == 0:
        raise CLIError(f"{len(sampler)} training images per process is less than one batch of {args.batch_size}; "
                       f"lower -b")
    val_loader = None
    if val_set is not None:
        shard = list(range(dist.rank, len(val_set), dist.world_size))  # disjoint, no padding: exact metrics
        val_loader = DataLoader(torch.utils.data.Subset(val_set, shard),
                                batch_size=args.validation_batch_size or args.batch_size, shuffle=False,
                                num_workers=args.workers, pin_memory=device.type == "cuda",
                                persistent_workers=args.workers > 0)

    # ---- optimisation
    global_batch = args.batch_size * dist.world_size * args.grad_accum_steps
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / args.lr_base_size
    opt_kwargs = {}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **opt_kwargs)
    use_scaler = args.amp and args.amp_dtype == "float16"
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    updates_per_epoch = math.ceil(len(loader) / args.grad_accum_steps)
    scheduler = None
    if args.sched != "none":
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
            min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
            plateau_mode="min" if args.eval_metric == "loss" else "max",
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)
    ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=args.model_ema_decay)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        if args.batch_size % 2:
            raise CLIError("mixup/cutmix need an even --batch-size (or pass --mixup 0 --cutmix 0)")
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        train_loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()

    # ---- resume state
    start_epoch, num_updates, best, best_epoch = 0, 0, None, None
    history: list[dict[str, Any]] = []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None and resume.get("scheduler"):
            scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        if ema is not None:
            if resume.get("model_ema"):
                ema.module.load_state_dict(resume["model_ema"])
            elif dist.main:
                warn("--resume: the checkpoint has no EMA weights; the EMA restarts from the model")
        start_epoch = int(resume["epoch"])
        num_updates = int(resume.get("num_updates", 0))
        best, best_epoch = resume.get("best_metric"), resume.get("best_epoch")
        history = [r for r in resume.get("history", []) if r["epoch"] <= start_epoch]
        if dist.main:
            log(f"resumed from {resume_path}: {start_epoch} epoch(s) done, best {args.eval_metric} {best} "
                f"at epoch {best_epoch}")

    if dist.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    else:
        ddp_model = model

    # ---- files
    if dist.main:
        os.makedirs(output, exist_ok=True)
        atomic_write_text(json.dumps(_jsonable_args(args), indent=2) + "\n", os.path.join(output, "args.json"))
        params = sum(p.numel() for p in model.parameters())
        log(f"train {args.model} ({params:,} params, drop path {drop_path}) on {train_root}: {len(train_set)} "
            f"images, {len(class_names)} classes; validation: {val_root or 'none'} "
            f"({len(val_set) if val_set is not None else 0} images)")
        log(f"{args.epochs} epochs x {len(loader)} steps, {dist.world_size} process(es) on {device}, global batch "
            f"{global_batch}, {args.opt} lr {lr:.3g}, {args.sched} schedule, input {cfg['input_size'][-1]}px, "
            f"amp {args.amp_dtype if args.amp else 'off'}; output {output}")

    ckpt_base = {
        "format": TRAINING_CHECKPOINT_FORMAT, "model_name": args.model, "model_kwargs": model_kwargs,
        "num_classes": num_classes, "class_names": class_names, "data_config": cfg,
        "eval_weights": "model_ema" if ema is not None else "model", "eval_metric": args.eval_metric,
        "args": _jsonable_args(args), "world_size": dist.world_size, "metaformer_version": __version__,
        "torch_version": str(torch.__version__),
    }
    if resume is not None and resume.get("world_size", 1) == dist.world_size and resume.get("rng"):
        _set_rng_state(resume["rng"][dist.rank])
    elif resume is not None and dist.main:
        warn("--resume: the run had another number of processes; RNG states are not restored")

    if start_epoch >= args.epochs and dist.main:
        log(f"nothing to do: {start_epoch} epoch(s) done of --epochs {args.epochs}")

    progress = not args.no_progress and dist.main
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        ddp_model.train()
        train_loss, train_images, num_updates = _train_one_epoch(
            args, epoch, ddp_model, model, loader, optimizer, scheduler, scaler, ema, mixup, train_loss_fn,
            device, dist, num_updates, updates_per_epoch, progress)
        lr_now = optimizer.param_groups[0]["lr"]
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": None, "top1": None,
                               "top5": None, "lr": lr_now, "train_images": train_images}
        metric_value = None
        if val_loader is not None:
            raw = evaluate(model, val_loader, device, amp=args.amp, amp_dtype=args.amp_dtype,
                           channels_last=args.channels_last, progress=progress, desc=f"val {epoch + 1}",
                           distributed=dist.enabled)
            evald = raw
            if ema is not None:
                evald = evaluate(ema.module, val_loader, device, amp=args.amp, amp_dtype=args.amp_dtype,
                                 channels_last=args.channels_last, progress=progress, desc=f"val EMA {epoch + 1}",
                                 distributed=dist.enabled)
                row.update(raw_val_loss=raw["loss"], raw_top1=raw["top1"], raw_top5=raw["top5"])
            row.update(val_loss=evald["loss"], top1=evald["top1"], top5=evald["top5"], val_images=evald["images"])
            metric_value = evald[args.eval_metric]
        if scheduler is not None:
            scheduler.step(epoch + 1, metric_value)
        row["time"] = time.perf_counter() - t0
        history.append(row)
        is_best = metric_value is not None and _better(args.eval_metric, metric_value, best)
        if is_best:
            best, best_epoch = metric_value, epoch + 1

        rng = dist.gather(_rng_state())
        if dist.main:
            ckpt = dict(ckpt_base, model=model.state_dict(), model_ema=ema.module.state_dict() if ema else None,
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict() if scheduler else None,
                        scaler=scaler.state_dict() if scaler else None, epoch=epoch + 1, num_updates=num_updates,
                        best_metric=best, best_epoch=best_epoch, metrics=row, history=history, rng=rng)
            atomic_save(ckpt, os.path.join(output, "last.pth"))
            if is_best:
                atomic_save(ckpt, os.path.join(output, "best.pth"))
            _write_csv(history, os.path.join(output, "metrics.csv"), ema is not None)
            val_text = (f"  val_loss {row['val_loss']:.4f}  top1 {row['top1']:.3f}  top5 {row['top5']:.3f}"
                        if row["top1"] is not None else "")
            log(f"epoch {epoch + 1}/{args.epochs}  train_loss {train_loss:.4f}{val_text}  lr {lr_now:.3g}  "
                f"{row['time']:.1f}s{'  *best*' if is_best else ''}")
        if dist.enabled:
            torch.distributed.barrier()

    if dist.main:
        if history and not args.no_plot:
            if plot_history(history, os.path.join(output, "metrics.png"), title=f"{args.model} on {args.data}"):
                log(f"plot written to {os.path.join(output, 'metrics.png')}")
        if best is not None:
            log(f"best {args.eval_metric} {best:.3f} at epoch {best_epoch}; checkpoints in {output}")
        else:
            log(f"done; checkpoint in {os.path.join(output, 'last.pth')}")
    return 0


def _train_one_epoch(args, epoch, ddp_model, model, loader, optimizer, scheduler, scaler, ema, mixup, loss_fn,
                     device, dist, num_updates, updates_per_epoch, progress):
    from timm.utils import dispatch_clip_grad
    from tqdm import tqdm

    accum = args.grad_accum_steps
    total = len(loader)
    loss_sum, count = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
               disable=None if progress else True, file=sys.stderr, dynamic_ncols=True, mininterval=1.0, leave=False)
    for i, (images, target) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if mixup is not None:
            images, target = mixup(images, target)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last_micro = (i + 1) % accum == 0 or i + 1 == total
        sync = last_micro or not dist.enabled
        ctx = ddp_model.no_sync() if not sync else nullcontext()
        with ctx:
            with autocast(device, args.amp, args.amp_dtype):
                output = ddp_model(images)
                loss = loss_fn(output, target)
            if not torch.isfinite(loss):
                raise CLIError(f"the loss is {loss.item()} at epoch {epoch + 1}, step {i + 1}; lower --lr or use "
                               f"--clip-grad")
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.item() * images.shape[0]
        count += images.shape[0]
        if last_micro:
            if scaler is not None:
                if args.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
                scaler.step(optimizer)
                scaler.update()
            else:
                if args.clip_grad is not None:
                    dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if ema is not None:
                ema.update(model, step=num_updates)
            if scheduler is not None and args.sched_on_updates:
                scheduler.step_update(num_updates=num_updates)
        if progress:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    loss_sum, count = dist.all_reduce_sum([loss_sum, float(count)])
    return loss_sum / max(count, 1), int(count), num_updates

