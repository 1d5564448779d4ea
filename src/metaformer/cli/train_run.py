"""The run of ``metaformer train`` (its options are declared in :mod:`metaformer.cli.train`).

It composes :mod:`metaformer.training`: a :class:`~metaformer.training.Recipe` (whose defaults
are the release's recipe) builds the optimizer, schedule, augmentation and loss; a
:class:`~metaformer.training.TrainState` holds what the run changes; ``train_one_epoch`` and
``evaluate`` run the epochs; ``build_checkpoint`` shapes ``last.pth`` / ``best.pth``.

Files under ``--output``: ``last.pth`` (every epoch) and ``best.pth`` (each new best), written
atomically; ``metrics.csv`` (one row per epoch); ``args.json``; ``metrics.png`` at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Dict

import torch

from ..files import save_torch, write_text
from ..training import (
    Distributed,
    LoopSettings,
    Recipe,
    RunInfo,
    TrainState,
    build_checkpoint,
    dataset_targets_for,
    eval_transform,
    evaluate,
    image_folder,
    plot_history,
    read_training_checkpoint,
    rng_state,
    seed_all,
    split_folders,
    train_one_epoch,
    write_metrics_csv,
)
from .options import (
    CLIError,
    data_config_from_args,
    log,
    parse_model_kwargs,
    warn,
)


def _jsonable_args(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in vars(args).items() if not callable(v)}


def _read_resume(args: argparse.Namespace, output: str, base_name: str, dist: Distributed):
    path = args.resume
    if path == "auto":
        path = os.path.join(output, "last.pth")
        if not os.path.isfile(path):
            if dist.main:
                log(f"--resume auto: no {path} yet, starting a new run")
            return None, None
    if not path:
        return None, None
    resume = read_training_checkpoint(path)
    if resume is None:
        raise CLIError(f"--resume {path}: not a checkpoint written by `metaformer train`")
    if resume["model_name"].partition(".")[0] != base_name:
        raise CLIError(f"--resume {path}: the run trained {resume['model_name']}, not {args.model}")
    return path, resume


def _datasets(args, recipe: Recipe, cfg, train_root, val_root, class_names, num_classes, dist: Distributed):
    train_set = image_folder(train_root, recipe.train_transform(cfg), what="training data")
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
    return train_set, val_set, val_root


def _loaders(args, train_set, val_set, device: torch.device, dist: Distributed):
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=args.seed)
    common = dict(num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True, **common)
    if len(loader) == 0:
        raise CLIError(f"{len(sampler)} training images per process is less than one batch of {args.batch_size}; "
                       f"lower -b")
    val_loader = None
    if val_set is not None:
        shard = list(range(dist.rank, len(val_set), dist.world_size))  # disjoint, no padding: exact metrics
        val_loader = DataLoader(Subset(val_set, shard), batch_size=args.validation_batch_size or args.batch_size,
                                shuffle=False, **common)
    return sampler, loader, val_loader


def train(args: argparse.Namespace, dist: Distributed) -> int:
    """Trains as the parsed options say, as one rank of ``dist``; returns the exit status."""
    from .. import create, get_variant

    device = dist.device
    seed_all(args.seed + dist.rank)
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    for key in ("num_classes", "drop_path_rate", "drop_rate"):
        if key in model_kwargs:
            raise CLIError(f"--model-kwargs {key}: use --{key.replace('_rate', '').replace('_', '-')} instead")
    base_name = args.model.partition(".")[0]
    variant = get_variant(base_name)
    output = dist.broadcast(args.output or os.path.join(
        "output", "train", f"{time.strftime('%Y%m%d-%H%M%S')}-{base_name}"))
    resume_path, resume = _read_resume(args, output, base_name, dist)

    # ---- data and model
    train_root, val_root = split_folders(args.data, args.train_split, args.val_split, args.val)
    class_names = list(image_folder(train_root, what="training data").classes)
    if resume is not None and resume.get("class_names") != class_names:
        raise CLIError(f"--resume: the checkpoint's classes differ from the class folders of {train_root}")
    num_classes = args.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise CLIError(f"--num-classes {num_classes} but {train_root} has {len(class_names)} class folders")
    if num_classes > len(class_names) and dist.main:
        warn(f"--num-classes {num_classes} > {len(class_names)} class folders; the extra outputs are never targets")
    drop_path = variant.drop_path if args.drop_path is None else args.drop_path
    model = create(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **model_kwargs,
                   num_classes=num_classes, drop_path_rate=drop_path, drop_rate=args.drop)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    cfg = data_config_from_args(model, args)
    recipe = Recipe.from_namespace(args)
    train_set, val_set, val_root = _datasets(args, recipe, cfg, train_root, val_root, class_names, num_classes,
                                             dist)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    sampler, loader, val_loader = _loaders(args, train_set, val_set, device, dist)

    # ---- the state: optimisation, EMA, resume
    global_batch = args.batch_size * dist.world_size * args.grad_accum_steps
    optimizer = recipe.create_optimizer(model, global_batch)
    scaler = torch.amp.GradScaler(device.type) if args.amp and args.amp_dtype == "float16" else None
    updates_per_epoch = math.ceil(len(loader) / args.grad_accum_steps)
    scheduler = recipe.create_scheduler(optimizer, updates_per_epoch, lower_is_better=args.eval_metric == "loss")
    mixup = recipe.create_mixup(num_classes, args.batch_size)
    loss_fn = recipe.create_loss()
    state = TrainState(model, optimizer, scheduler, scaler, ema=recipe.create_ema(model))
    if resume is not None:
        notes = state.load_state_dict(resume, rank=dist.rank, world_size=dist.world_size)
        if dist.main:
            for note in notes:
                warn(f"--resume: {note}")
            log(f"resumed from {resume_path}: {state.epoch} epoch(s) done, best {args.eval_metric} "
                f"{state.best_metric} at epoch {state.best_epoch}")
    forward = dist.wrap(model)

    if dist.main:
        os.makedirs(output, exist_ok=True)
        write_text(os.path.join(output, "args.json"), json.dumps(_jsonable_args(args), indent=2) + "\n")
        params = sum(p.numel() for p in model.parameters())
        log(f"train {args.model} ({params:,} params, drop path {drop_path}) on {train_root}: {len(train_set)} "
            f"images, {len(class_names)} classes; validation: {val_root or 'none'} "
            f"({len(val_set) if val_set is not None else 0} images)")
        log(f"{args.epochs} epochs x {len(loader)} steps, {dist.world_size} process(es) on {device}, global batch "
            f"{global_batch}, {args.opt} lr {recipe.learning_rate(global_batch):.3g}, {args.sched} schedule, "
            f"input {cfg['input_size'][-1]}px, amp {args.amp_dtype if args.amp else 'off'}; output {output}")
    run_info = RunInfo(model_name=args.model, model_kwargs=model_kwargs, num_classes=num_classes,
                       class_names=class_names, data_config=cfg, eval_metric=args.eval_metric,
                       eval_weights="model_ema" if state.ema is not None else "model", world_size=dist.world_size,
                       args=_jsonable_args(args))
    if state.epoch >= args.epochs and dist.main:
        log(f"nothing to do: {state.epoch} epoch(s) done of --epochs {args.epochs}")

    progress = not args.no_progress and dist.main
    settings = LoopSettings(device=device, epochs=args.epochs, grad_accum_steps=args.grad_accum_steps,
                            clip_grad=args.clip_grad, clip_mode=args.clip_mode, amp=args.amp,
                            amp_dtype=args.amp_dtype, channels_last=args.channels_last,
                            sched_on_updates=args.sched_on_updates, progress=progress)
    while state.epoch < args.epochs:
        epoch, t0 = state.epoch, time.perf_counter()
        sampler.set_epoch(epoch)
        result = train_one_epoch(state, loader, settings, loss_fn, mixup=mixup, forward=forward, dist=dist)
        row: Dict[str, Any] = {"epoch": epoch + 1, "train_loss": result.loss, "val_loss": None, "top1": None,
                               "top5": None, "lr": optimizer.param_groups[0]["lr"], "train_images": result.images}
        metric = None
        if val_loader is not None:
            metric = _validate(args, state, val_loader, row, device, dist, progress)
        if scheduler is not None:
            scheduler.step(epoch + 1, metric)
        row["time"] = time.perf_counter() - t0
        is_best = state.record(row, metric, lower_is_better=args.eval_metric == "loss")
        rng = dist.gather(rng_state())
        if dist.main:
            _save(output, build_checkpoint(state, run_info, rng), is_best, state)
            val_text = (f"  val_loss {row['val_loss']:.4f}  top1 {row['top1']:.3f}  top5 {row['top5']:.3f}"
                        if row["top1"] is not None else "")
            log(f"epoch {epoch + 1}/{args.epochs}  train_loss {result.loss:.4f}{val_text}  lr {row['lr']:.3g}  "
                f"{row['time']:.1f}s{'  *best*' if is_best else ''}")
        dist.barrier()

    if dist.main:
        _finish(args, state, output)
    return 0


def _validate(args, state: TrainState, val_loader, row: Dict[str, Any], device, dist: Distributed, progress):
    """Validates the model (and its EMA), fills ``row``, and returns the metric that ranks checkpoints."""
    epoch = state.epoch + 1

    def run(model, desc):
        return evaluate(model, val_loader, device, amp=args.amp, amp_dtype=args.amp_dtype,
                        channels_last=args.channels_last, progress=progress, desc=desc, distributed=dist.enabled)

    raw = evaluated = run(state.model, f"val {epoch}")
    if state.ema is not None:
        evaluated = run(state.ema.module, f"val EMA {epoch}")
        row.update(raw_val_loss=raw["loss"], raw_top1=raw["top1"], raw_top5=raw["top5"])
    row.update(val_loss=evaluated["loss"], top1=evaluated["top1"], top5=evaluated["top5"],
               val_images=evaluated["images"])
    return evaluated[args.eval_metric]


def _save(output: str, ckpt: Dict[str, Any], is_best: bool, state: TrainState) -> None:
    save_torch(ckpt, os.path.join(output, "last.pth"))
    if is_best:
        save_torch(ckpt, os.path.join(output, "best.pth"))
    write_metrics_csv(state.history, os.path.join(output, "metrics.csv"), ema=state.ema is not None)


def _finish(args, state: TrainState, output: str) -> None:
    if state.history and not args.no_plot:
        png = os.path.join(output, "metrics.png")
        if plot_history(state.history, png, title=f"{args.model} on {args.data}"):
            log(f"plot written to {png}")
        else:
            warn("matplotlib is not installed, skipping the metrics plot (pip install 'metaformer[plot]')")
    if state.best_metric is not None:
        log(f"best {args.eval_metric} {state.best_metric:.3f} at epoch {state.best_epoch}; checkpoints in {output}")
    else:
        log(f"done; checkpoint in {os.path.join(output, 'last.pth')}")
