"""The run of ``metaformer train-seg`` (its options are declared in :mod:`metaformer.cli.train_seg`).

It composes :mod:`metaformer.training` as ``metaformer train`` does, with the segmentation parts: a
:class:`~metaformer.training.SegRecipe` builds the optimizer, the poly schedule and the transforms; a
:class:`~metaformer.training.TrainState` holds what the run changes; ``train_one_epoch`` runs each
stretch of ``--eval-interval`` iterations (an "epoch" of the state: its batches come from an
:class:`~metaformer.training.IterationBatchSampler`, so a resumed run draws the same ones) and
``evaluate_segmentation`` measures mIoU after it; the run folder (lock, refusal to overwrite, save order,
resume checks) is the one of ``metaformer train`` (:mod:`metaformer.cli.train_folder`).

Files under ``--output``: ``last.pth`` (every evaluation) and ``best.pth`` (each new best), written
atomically; ``metrics.csv`` (one row per evaluation); ``args.json``; ``metrics.png`` at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, Optional, Tuple

import torch

from ..files import WriteError, write_text
from ..training import (
    SEG_CSV_FIELDS,
    SEGMENTATION_TASK,
    Distributed,
    IterationBatchSampler,
    LoopSettings,
    RunFolder,
    RunInfo,
    SegmentationLoss,
    SegRecipe,
    TrainState,
    build_checkpoint,
    evaluate_segmentation,
    plot_history,
    rng_state,
    seed_all,
    train_one_epoch,
    write_metrics_csv,
)
from .hub_access import go_offline_if_unreachable
from .options import CLIError, Interrupted, check_input_file, log, parse_model_kwargs, warn
from .train_folder import check_resume, prepare_output, read_resume, reconcile_best

_RESERVED = ("num_classes", "drop_path_rate", "features_only", "pretrained", "checkpoint")


def _jsonable_args(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in vars(args).items() if not callable(v)}


def _has_split(root: str, split: str) -> bool:
    layouts = ((("images", split), ("annotations", split)), ((split, "images"), (split, "masks")))
    return any(os.path.isdir(os.path.join(root, *i)) and os.path.isdir(os.path.join(root, *m)) for i, m in layouts)


def _flat_layout(root: str) -> bool:
    return os.path.isdir(os.path.join(root, "images")) and any(
        os.path.isdir(os.path.join(root, m)) for m in ("masks", "annotations"))


def find_split(root: str, asked: Optional[str], candidates: Tuple[str, ...], flag: str,
               required: bool = True) -> Optional[str]:
    """The split of a segmentation folder to use: ``asked``, else the first of ``candidates`` that exists,
    else None (a required split: the folder's own ``images`` and ``masks``; an optional one: no such split).

    Raises:
        CLIError: for a missing folder, a missing ``asked`` split, or no data at all for a required split.
    """
    if not os.path.isdir(root):
        raise CLIError(f"data folder not found: {root}")
    if asked:
        if not _has_split(root, asked):
            raise CLIError(f"{flag} {asked}: no {root}/images/{asked} + {root}/annotations/{asked} (nor "
                           f"{root}/{asked}/images + {root}/{asked}/masks)")
        return asked
    found = next((s for s in candidates if _has_split(root, s)), None)
    if found is None and required and not _flat_layout(root):
        raise CLIError(f"no segmentation data in {root}: expected {root}/images/{candidates[0]} + "
                       f"{root}/annotations/{candidates[0]} (mmsegmentation's layout), {root}/{candidates[-1]}/images + "
                       f"{root}/{candidates[-1]}/masks, or {root}/images + {root}/masks")
    return found


def _datasets(args, recipe: SegRecipe, train_split, val_split):
    from ..seg_data import SegmentationFolder

    common = dict(reduce_zero_label=args.reduce_zero_label, ignore_index=args.ignore_index)
    train_set = SegmentationFolder(args.data, train_split, recipe.train_transform(), **common)
    val_set = SegmentationFolder(args.data, val_split, recipe.eval_transform(), **common) if val_split else None
    return train_set, val_set


def _build_model(args, model_kwargs: Dict[str, Any], drop_path: float, device: torch.device, dist: Distributed):
    from ..segmentation import convert_sync_batchnorm, create_segmenter

    if args.pretrained:
        go_offline_if_unreachable(args.model)
    model = create_segmenter(args.model, args.num_classes, pretrained=args.pretrained, checkpoint=args.checkpoint,
                             drop_path_rate=drop_path, **model_kwargs)
    model.to(device)
    if dist.enabled and device.type == "cuda":
        model = convert_sync_batchnorm(model)  # the release's SyncBN; on CPU each process keeps its BatchNorm
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def train_segmentation(args: argparse.Namespace, dist: Distributed) -> int:
    """Trains as the parsed options say, as one rank of ``dist``; returns the exit status."""
    base_name = args.model.partition(".")[0]
    output = dist.broadcast(args.output or os.path.join(
        "output", "train-seg", f"{time.strftime('%Y%m%d-%H%M%S')}-{base_name}"))
    folder = prepare_output(args, output) if dist.main else RunFolder(output)
    try:
        return _train(args, dist, folder)
    finally:
        folder.unlock()


def _train(args: argparse.Namespace, dist: Distributed, folder: RunFolder) -> int:
    from .. import get_variant

    device, output = dist.device, folder.path
    seed_all(args.seed + dist.rank)
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    for key in _RESERVED:
        if key in model_kwargs:
            raise CLIError(f"--model-kwargs {key}: use the option of its own (--num-classes, --drop-path, "
                           f"--pretrained, --checkpoint)" if key != "features_only" else
                           "--model-kwargs features_only: the segmenter's backbone is always features_only")
    variant = get_variant(args.model.partition(".")[0])
    if args.checkpoint:
        check_input_file(args.checkpoint, "--checkpoint")
    resume_path, resume = read_resume(args, folder, dist)
    train_split = find_split(args.data, args.train_split, ("training", "train"), "--train-split")
    val_split = find_split(args.data, args.val_split, ("validation", "val"), "--val-split", required=False)
    recipe = SegRecipe.from_namespace(args)
    run_info = RunInfo(model_name=args.model, model_kwargs=model_kwargs, num_classes=args.num_classes,
                       class_names=[], data_config=recipe.data_config(), eval_metric=args.eval_metric,
                       world_size=dist.world_size, args=_jsonable_args(args), task=SEGMENTATION_TASK)
    if resume is not None:
        check_resume(resume_path, resume, run_info)
        reconcile_best(folder, resume, args, dist)
    train_set, val_set = _datasets(args, recipe, train_split, val_split)
    if val_set is None and dist.main:
        warn(f"no validation split in {args.data} (validation or val, or --val-split): best.pth is not written")
    drop_path = variant.drop_path if args.drop_path is None else args.drop_path
    model = _build_model(args, model_kwargs, drop_path, device, dist)

    optimizer = recipe.create_optimizer(model)
    scaler = torch.amp.GradScaler(device.type) if args.amp and args.amp_dtype == "float16" else None
    state = TrainState(model, optimizer, recipe.create_scheduler(optimizer), scaler)
    if resume is not None:
        _resume(args, state, resume, resume_path, dist)
    forward = dist.wrap(model)
    val_loader = None
    if val_set is not None:  # batch 1: images keep their own (aligned) sizes, as the release evaluates
        shard = list(range(dist.rank, len(val_set), dist.world_size))
        val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, shard), batch_size=1,
                                                 num_workers=args.workers, pin_memory=device.type == "cuda")

    global_batch = args.batch_size * dist.world_size * args.grad_accum_steps
    if dist.main:
        write_text(os.path.join(output, "args.json"), json.dumps(_jsonable_args(args), indent=2) + "\n")
        params = sum(p.numel() for p in model.parameters())
        log(f"train-seg Semantic FPN on {args.model} ({params:,} params, drop path {drop_path}), {args.num_classes} "
            f"classes; training: {train_set.image_dir} ({len(train_set)} images); validation: "
            f"{val_set.image_dir if val_set is not None else 'none'} ({len(val_set) if val_set is not None else 0} "
            f"images)")
        log(f"{args.iters} iterations, evaluated every {args.eval_interval}; {dist.world_size} process(es) on {device}, "
            f"{args.batch_size} images per process (global batch {global_batch}), crop {args.crop_size}; AdamW lr "
            f"{args.lr:.3g} weight decay {args.weight_decay:.3g}, poly schedule (power {args.power}) down to "
            f"{args.min_lr:.3g}; amp {args.amp_dtype if args.amp else 'off'}; output {output}")
    if state.num_updates >= args.iters and dist.main:
        log(f"nothing to do: {state.num_updates} iteration(s) done of --iters {args.iters}")

    settings = LoopSettings(device=device, epochs=math.ceil(args.iters / args.eval_interval),
                            grad_accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad, amp=args.amp,
                            amp_dtype=args.amp_dtype, channels_last=args.channels_last, sched_on_updates=True,
                            progress=not args.no_progress and dist.main)
    loss_fn = SegmentationLoss(args.num_classes, args.ignore_index)
    saved = state.num_updates
    try:
        while state.num_updates < args.iters:
            first, t0 = state.num_updates, time.perf_counter()
            last = min((first // args.eval_interval + 1) * args.eval_interval, args.iters)
            accum = args.grad_accum_steps
            sampler = IterationBatchSampler(len(train_set), args.batch_size, first * accum, (last - first) * accum,
                                            rank=dist.rank, world_size=dist.world_size, seed=args.seed)
            loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers,
                                                 pin_memory=device.type == "cuda")
            result = train_one_epoch(state, loader, dataclasses.replace(settings, desc=f"iter {first + 1}-{last}/"
                                                                        f"{args.iters}"),
                                     loss_fn, forward=forward, dist=dist)
            row: Dict[str, Any] = {"epoch": state.epoch + 1, "iter": last, "train_loss": result.loss, "mIoU": None,
                                   "aAcc": None, "mAcc": None, "lr": recipe.learning_rate_at(last - 1),
                                   "train_images": result.images}
            metric = None
            if val_loader is not None:
                metric = _validate(args, state, val_loader, row, device, dist, settings.progress)
            row["time"] = time.perf_counter() - t0
            is_best = state.record(row, metric)
            rng = dist.gather(rng_state())
            if dist.main:
                folder.save(build_checkpoint(state, run_info, rng), is_best)
                saved = state.num_updates
                write_metrics_csv(state.history, folder.csv, fields=SEG_CSV_FIELDS)
                val_text = (f"  mIoU {row['mIoU']:.2f}  aAcc {row['aAcc']:.2f}  mAcc {row['mAcc']:.2f}"
                            if row["mIoU"] is not None else "")
                log(f"iter {last}/{args.iters}  train_loss {result.loss:.4f}{val_text}  lr {row['lr']:.3g}  "
                    f"{row['time']:.1f}s{'  *best*' if is_best else ''}")
            dist.barrier()
    except KeyboardInterrupt:
        where = (f"{folder.last} holds iteration {saved}: continue with the same command and --resume auto"
                 if saved else "no evaluation interval was completed")
        raise Interrupted(where) from None
    except WriteError as e:
        raise WriteError(e.errno, f"{e.strerror}; {folder.last} holds iteration {saved}: once there is room, "
                                  f"continue with the same command and --resume auto") from None

    if dist.main:
        _finish(args, state, output)
    return 0


def _resume(args, state: TrainState, resume: Dict[str, Any], path: str, dist: Distributed) -> None:
    """Restores the state; a poly schedule for another --iters is rebuilt and moved to the resumed iteration."""
    old_iters = (resume.get("args") or {}).get("iters", args.iters)
    rebuild = old_iters != args.iters
    notes = state.load_state_dict(resume, rank=dist.rank, world_size=dist.world_size, load_scheduler=not rebuild)
    if rebuild:
        state.scheduler.step_update(num_updates=state.num_updates)
    if dist.main:
        for note in notes:
            warn(f"--resume: {note}")
        best = "none yet" if state.best_metric is None else f"{state.best_metric:.2f}"
        log(f"resumed from {path}: {state.num_updates} iteration(s) done, best {args.eval_metric} {best}")
        if rebuild:
            log(f"--iters {args.iters} (the run had {old_iters}): the poly schedule is rebuilt for {args.iters} "
                f"iterations and continues at iteration {state.num_updates + 1}")


def _validate(args, state: TrainState, val_loader, row: Dict[str, Any], device, dist: Distributed, progress):
    """Evaluates the model, fills ``row``, and returns the metric that ranks checkpoints.

    Under DDP without SyncBatchNorm (CPU) each process's BatchNorm statistics took its own last batch:
    rank 0's, those the checkpoint saves, are given to every rank first, so the ranks evaluate one model.
    """
    if dist.enabled:
        for buffer in state.model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    metrics = evaluate_segmentation(state.model, val_loader, device, args.num_classes, ignore_index=args.ignore_index,
                                    amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last,
                                    progress=progress, desc=f"val {state.num_updates}", distributed=dist.enabled)
    row.update(mIoU=metrics["mIoU"], aAcc=metrics["aAcc"], mAcc=metrics["mAcc"], val_images=metrics["images"])
    return metrics[args.eval_metric]


def _finish(args, state: TrainState, output: str) -> None:
    if state.history and not args.no_plot:
        png = os.path.join(output, "metrics.png")
        if plot_history(state.history, png, title=f"Semantic FPN {args.model} on {args.data}", x="iter",
                        curves=(("mIoU", "mIoU"), ("aAcc", "aAcc"), ("mAcc", "mAcc")), ylabel="percent"):
            log(f"plot written to {png}")
        else:
            warn("matplotlib is not installed, skipping the metrics plot (pip install 'metaformer[plot]')")
    if state.best_metric is not None:
        best = next(r for r in state.history if r["epoch"] == state.best_epoch)
        log(f"best {args.eval_metric} {state.best_metric:.2f} at iteration {best['iter']}; checkpoints in {output}")
    else:
        log(f"done; checkpoint in {os.path.join(output, 'last.pth')}")
