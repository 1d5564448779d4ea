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

from ..files import WriteError, write_text
from ..training import (
    Distributed,
    LoopSettings,
    Recipe,
    RunFolder,
    RunInfo,
    TrainState,
    build_checkpoint,
    dataset_targets_for,
    eval_transform,
    evaluate,
    image_folder,
    plot_history,
    rng_state,
    seed_all,
    split_folders,
    train_one_epoch,
    write_metrics_csv,
)
from .hub_access import go_offline_if_unreachable
from .options import (
    CLIError,
    Interrupted,
    check_input_file,
    data_config_from_args,
    log,
    parse_model_kwargs,
    warn,
)
from .train_folder import check_resume, prepare_output, read_resume, reconcile_best


def _jsonable_args(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in vars(args).items() if not callable(v)}


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
    base_name = args.model.partition(".")[0]
    output = dist.broadcast(args.output or os.path.join(
        "output", "train", f"{time.strftime('%Y%m%d-%H%M%S')}-{base_name}"))
    folder = prepare_output(args, output) if dist.main else RunFolder(output)
    try:
        return _train(args, dist, folder)
    finally:
        folder.unlock()


def _train(args: argparse.Namespace, dist: Distributed, folder: RunFolder) -> int:
    from .. import create, get_variant

    device, output = dist.device, folder.path
    seed_all(args.seed + dist.rank)
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    for key in ("num_classes", "drop_path_rate", "drop_rate"):
        if key in model_kwargs:
            raise CLIError(f"--model-kwargs {key}: use --{key.replace('_rate', '').replace('_', '-')} instead")
    variant = get_variant(args.model.partition(".")[0])
    if args.checkpoint:
        check_input_file(args.checkpoint, "--checkpoint")
    resume_path, resume = read_resume(args, folder, dist)

    # ---- data and model
    train_root, val_root = split_folders(args.data, args.train_split, args.val_split, args.val)
    class_names = list(image_folder(train_root, what="training data").classes)
    num_classes = args.num_classes or len(class_names)
    if num_classes < len(class_names):
        raise CLIError(f"--num-classes {num_classes} but {train_root} has {len(class_names)} class folders")
    run_info = RunInfo(model_name=args.model, model_kwargs=model_kwargs, num_classes=num_classes,
                       class_names=class_names, data_config={}, eval_metric=args.eval_metric,
                       world_size=dist.world_size, args=_jsonable_args(args))
    if resume is not None:
        check_resume(resume_path, resume, run_info)
        reconcile_best(folder, resume, args, dist)
    if num_classes > len(class_names) and dist.main:
        warn(f"--num-classes {num_classes} > {len(class_names)} class folders; the extra outputs are never targets")
    drop_path = variant.drop_path if args.drop_path is None else args.drop_path
    if args.pretrained:
        go_offline_if_unreachable(args.model)
    model = create(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **model_kwargs,
                   num_classes=num_classes, drop_path_rate=drop_path, drop_rate=args.drop)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    run_info.data_config = cfg = data_config_from_args(model, args)
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
    run_info.eval_weights = "model_ema" if state.ema is not None else "model"
    if resume is not None:
        _resume(args, state, resume, resume_path, updates_per_epoch, dist)
    forward = dist.wrap(model)

    if dist.main:
        write_text(os.path.join(output, "args.json"), json.dumps(_jsonable_args(args), indent=2) + "\n")
        params = sum(p.numel() for p in model.parameters())
        log(f"train {args.model} ({params:,} params, drop path {drop_path}) on {train_root}: {len(train_set)} "
            f"images, {len(class_names)} classes; validation: {val_root or 'none'} "
            f"({len(val_set) if val_set is not None else 0} images)")
        log(f"{args.epochs} epochs x {len(loader)} steps, {dist.world_size} process(es) on {device}, global batch "
            f"{global_batch}, {args.opt} lr {recipe.learning_rate(global_batch):.3g}, {args.sched} schedule, "
            f"input {cfg['input_size'][-1]}px, amp {args.amp_dtype if args.amp else 'off'}; output {output}")
        log(recipe.describe_schedule(global_batch, updates_per_epoch))
        too_long = recipe.warmup_warning(global_batch, updates_per_epoch)
        if too_long:
            warn(too_long)
    if state.epoch >= args.epochs and dist.main:
        log(f"nothing to do: {state.epoch} epoch(s) done of --epochs {args.epochs}")

    progress = not args.no_progress and dist.main
    settings = LoopSettings(device=device, epochs=args.epochs, grad_accum_steps=args.grad_accum_steps,
                            clip_grad=args.clip_grad, clip_mode=args.clip_mode, amp=args.amp,
                            amp_dtype=args.amp_dtype, channels_last=args.channels_last,
                            sched_on_updates=args.sched_on_updates, progress=progress)
    saved = state.epoch
    try:
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
                folder.save(build_checkpoint(state, run_info, rng), is_best)
                saved = state.epoch
                write_metrics_csv(state.history, folder.csv, ema=state.ema is not None)
                val_text = (f"  val_loss {row['val_loss']:.4f}  top1 {row['top1']:.3f}  top5 {row['top5']:.3f}"
                            if row["top1"] is not None else "")
                log(f"epoch {epoch + 1}/{args.epochs}  train_loss {result.loss:.4f}{val_text}  lr {row['lr']:.3g}  "
                    f"{row['time']:.1f}s{'  *best*' if is_best else ''}")
            dist.barrier()
    except KeyboardInterrupt:
        where = (f"{folder.last} holds epoch {saved}: continue with the same command and --resume auto"
                 if saved else "no epoch was completed")
        raise Interrupted(where) from None
    except WriteError as e:
        raise WriteError(e.errno, f"{e.strerror}; {folder.last} holds epoch {saved}: once there is room, "
                                  f"continue with the same command and --resume auto") from None

    if dist.main:
        _finish(args, state, output)
    return 0


def _resume(args, state: TrainState, resume: Dict[str, Any], path: str, updates_per_epoch: int,
            dist: Distributed) -> None:
    """Restores the state; a schedule for another number of epochs is rebuilt for --epochs, as timm does."""
    old_epochs = (resume.get("args") or {}).get("epochs", args.epochs)
    rebuild = state.scheduler is not None and old_epochs != args.epochs and args.sched != "plateau"
    notes = state.load_state_dict(resume, rank=dist.rank, world_size=dist.world_size, load_scheduler=not rebuild)
    if rebuild:  # timm's train.py: a fresh scheduler for the new length, stepped to the resumed epoch
        if args.sched_on_updates:
            state.scheduler.step_update(num_updates=state.num_updates)
        else:
            state.scheduler.step(state.epoch)
    if dist.main:
        for note in notes:
            warn(f"--resume: {note}")
        best = "none yet" if state.best_metric is None else f"{state.best_metric:.3f} at epoch {state.best_epoch}"
        log(f"resumed from {path}: {state.epoch} epoch(s) done, best {args.eval_metric} {best}")
        if rebuild:
            log(f"--epochs {args.epochs} (the run had {old_epochs}): the {args.sched} schedule is rebuilt for "
                f"{args.epochs} epochs and continues at epoch {state.epoch + 1}")


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
