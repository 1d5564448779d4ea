"""The reusable parts of training: the state of a run, the epoch loop, the recipe, data, checkpoints, reports.

``metaformer train`` is these parts composed; a script of your own can compose them differently::

    from metaformer import create
    from metaformer.training import LoopSettings, Recipe, TrainState, evaluate, train_one_epoch

    model = create("poolformer_s12", num_classes=10)
    recipe = Recipe(epochs=10, warmup_epochs=1, mixup=0, cutmix=0)
    optimizer = recipe.create_optimizer(model, global_batch=64)
    state = TrainState(model, optimizer, recipe.create_scheduler(optimizer, len(loader)))
    settings = LoopSettings(device=torch.device("cpu"), epochs=recipe.epochs)
    while state.epoch < recipe.epochs:
        result = train_one_epoch(state, loader, settings, recipe.create_loss())
        metrics = evaluate(model, val_loader, settings.device)
        state.scheduler.step(state.epoch + 1)
        state.record({"epoch": state.epoch + 1, "train_loss": result.loss, **metrics}, metrics["top1"])
        torch.save(state.state_dict(), "state.pth")  # state.load_state_dict(...) continues exactly

Modules: :mod:`~metaformer.training.state` (``TrainState``), :mod:`~metaformer.training.loop`
(``train_one_epoch``, ``evaluate``), :mod:`~metaformer.training.recipe` (``Recipe``: the release's
optimizer, schedule, augmentation and losses through timm's factories),
:mod:`~metaformer.training.data` (image folders, labels, evaluation transform),
:mod:`~metaformer.training.checkpoint` (the training checkpoint and ``load_model_file``),
:mod:`~metaformer.training.distributed` (the torchrun process group),
:mod:`~metaformer.training.run_folder` (the run folder: lock, save order, repair on resume), :mod:`~metaformer.training.rng`
(seeding and exact RNG state), :mod:`~metaformer.training.reports` (metrics CSV and plot),
:mod:`~metaformer.training.segmentation` (``SegRecipe``, the loss and mIoU evaluation of ``metaformer train-seg``)
and :mod:`~metaformer.training.sampler` (``IterationBatchSampler``: batches of iteration-based runs).
"""

from .checkpoint import (
    TRAINING_CHECKPOINT_FORMAT,
    LoadedModel,
    RunInfo,
    build_checkpoint,
    is_training_checkpoint,
    load_model_file,
    read_training_checkpoint,
    run_differences,
)
from .data import (
    IMG_EXTENSIONS,
    DataError,
    class_label_fn,
    data_config,
    dataset_targets_for,
    eval_transform,
    find_images,
    image_folder,
    load_image,
    split_folders,
)
from .distributed import Distributed
from .loop import EpochResult, LoopSettings, NonFiniteLossError, autocast, evaluate, train_one_epoch
from .recipe import Recipe, fix_posterize, safe_posterize
from .reports import plot_history, write_metrics_csv
from .rng import rng_state, seed_all, set_rng_state
from .run_folder import RUN_FILES, RunFolder, RunLockedError
from .sampler import IterationBatchSampler
from .segmentation import (
    SEG_CSV_FIELDS,
    SEGMENTATION_TASK,
    SegmentationLoss,
    SegRecipe,
    evaluate_segmentation,
    load_segmenter_file,
)
from .state import TrainState

__all__ = [
    "TrainState",
    "LoopSettings",
    "EpochResult",
    "NonFiniteLossError",
    "train_one_epoch",
    "evaluate",
    "autocast",
    "Recipe",
    "safe_posterize",
    "fix_posterize",
    "Distributed",
    "seed_all",
    "rng_state",
    "set_rng_state",
    "DataError",
    "IMG_EXTENSIONS",
    "data_config",
    "eval_transform",
    "load_image",
    "find_images",
    "image_folder",
    "split_folders",
    "class_label_fn",
    "dataset_targets_for",
    "TRAINING_CHECKPOINT_FORMAT",
    "RunInfo",
    "build_checkpoint",
    "is_training_checkpoint",
    "read_training_checkpoint",
    "run_differences",
    "LoadedModel",
    "load_model_file",
    "write_metrics_csv",
    "plot_history",
    "RunFolder",
    "RunLockedError",
    "RUN_FILES",
    "IterationBatchSampler",
    "SegRecipe",
    "SegmentationLoss",
    "evaluate_segmentation",
    "load_segmenter_file",
    "SEGMENTATION_TASK",
    "SEG_CSV_FIELDS",
]
