"""The training checkpoint (``last.pth``, ``best.pth``) and the one way to build a model from a weights file.

A training checkpoint is one dict, readable with ``torch.load(path, weights_only=True)``: the
:class:`~metaformer.training.TrainState` (model, EMA, optimizer, scheduler, scaler, counters, best
metric, history, per-rank RNG states) plus a :class:`RunInfo` saying what was trained (model name and
overrides, classes, evaluation preprocessing, the options). :func:`load_model_file` reads such a file,
or a plain state dict in any layout of :mod:`metaformer.weights`, once, and returns the built model.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .state import TrainState

__all__ = ["TRAINING_CHECKPOINT_FORMAT", "RunInfo", "build_checkpoint", "is_training_checkpoint",
           "read_training_checkpoint", "run_differences", "LoadedModel", "load_model_file"]

TRAINING_CHECKPOINT_FORMAT = "metaformer-train/1"


@dataclass
class RunInfo:
    """What a training run trains, stored in each of its checkpoints.

    Attributes:
        model_name: The model's registered name.
        model_kwargs: Architecture overrides passed to ``metaformer.create``.
        num_classes: Classifier size.
        class_names: The class folder names, in class-index order.
        data_config: The evaluation preprocessing (see ``metaformer.training.data_config``).
        eval_metric: ``"top1"``, ``"top5"`` or ``"loss"``: what ranks the checkpoints.
        eval_weights: ``"model_ema"`` when the EMA is validated, else ``"model"``.
        world_size: Number of processes of the run.
        args: The run's options, as JSON-able values.
        task: ``"classification"`` (``metaformer train``) or ``"segmentation"`` (``metaformer train-seg``).
    """

    model_name: str
    model_kwargs: Dict[str, Any]
    num_classes: int
    class_names: List[str]
    data_config: Dict[str, Any]
    eval_metric: str = "top1"
    eval_weights: str = "model"
    world_size: int = 1
    args: Dict[str, Any] = field(default_factory=dict)
    task: str = "classification"


def build_checkpoint(state: TrainState, run: RunInfo, rng: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The training checkpoint of a run at the state's epoch (the one place its dict is shaped).

    Args:
        state: The run's state.
        run: What the run trains.
        rng: Every rank's RNG state, in rank order (default: this process's).

    Returns:
        ``format``, the fields of ``run``, the versions of metaformer and torch, the state's
        :meth:`~metaformer.training.TrainState.state_dict` and ``metrics`` (the last epoch's row).
    """
    from .. import __version__

    return {"format": TRAINING_CHECKPOINT_FORMAT, **asdict(run), "metaformer_version": __version__,
            "torch_version": str(torch.__version__), **state.state_dict(rng),
            "metrics": state.history[-1] if state.history else None}


def is_training_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a checkpoint written by ``metaformer train``."""
    return isinstance(obj, dict) and obj.get("format") == TRAINING_CHECKPOINT_FORMAT and "model" in obj


def read_training_checkpoint(path: str) -> Optional[Dict[str, Any]]:
    """Reads ``path`` and returns it if it is a ``metaformer train`` checkpoint, else None.

    Raises:
        FileNotFoundError / metaformer.CheckpointError: for a missing or unreadable file.
    """
    if os.fspath(path).endswith(".safetensors"):
        return None
    from ..weights import load_torch_file

    obj = load_torch_file(path)
    return obj if is_training_checkpoint(obj) else None


def run_differences(checkpoint: Dict[str, Any], run: RunInfo) -> List[str]:
    """What a training checkpoint says was trained that differs from ``run`` (for a resume to refuse).

    Compares the model (name without tag), the architecture overrides, the number of classes and the
    class names.

    Returns:
        One readable line per difference, e.g. ``"token_mixer: identity here, the variant's default in
        the checkpoint"``; empty when the checkpoint continues ``run``.
    """
    out = []
    task = checkpoint.get("task", "classification")
    if task != run.task:
        out.append(f"task: {run.task} here, {task} in the checkpoint")
    if checkpoint["model_name"].partition(".")[0] != run.model_name.partition(".")[0]:
        out.append(f"model: {run.model_name} here, {checkpoint['model_name']} in the checkpoint")
    stored = dict(checkpoint.get("model_kwargs") or {})
    default = "the variant's default"
    for key in sorted(set(stored) | set(run.model_kwargs)):
        here, there = run.model_kwargs.get(key, default), stored.get(key, default)
        if here != there:
            out.append(f"{key}: {here} here, {there} in the checkpoint")
    if checkpoint.get("num_classes") != run.num_classes:
        out.append(f"classes: {run.num_classes} here, {checkpoint.get('num_classes')} in the checkpoint")
    elif checkpoint.get("class_names") != run.class_names:
        out.append("class names: the class folders differ from those the checkpoint was trained on")
    return out


@dataclass
class LoadedModel:
    """A model built from a weights file, with what the file said about it.

    Attributes:
        model: The model, on the CPU, in eval mode.
        name: Model name as built.
        weights: Human-readable description of the weights (a path with epoch and EMA, a tag...).
        class_names: Class names stored by ``metaformer train``, or None.
        data_config: Evaluation preprocessing stored by ``metaformer train``, or None.
        checkpoint: The whole training checkpoint, or None for a plain state dict.
    """

    model: nn.Module
    name: str
    weights: str
    class_names: Optional[List[str]] = None
    data_config: Optional[Dict[str, Any]] = None
    checkpoint: Optional[Dict[str, Any]] = field(default=None, repr=False)


def load_model_file(path: str, name: Optional[str] = None, *, num_classes: Optional[int] = None,
                    model_kwargs: Optional[Dict[str, Any]] = None, use_ema: Optional[bool] = None) -> LoadedModel:
    """Builds the model of a weights file, reading the file once.

    A checkpoint written by ``metaformer train`` brings its own model name, architecture overrides,
    number of classes, class names and evaluation preprocessing. Any other file is a state dict
    (``.pth``, ``.pth.tar``, ``.bin``, ``.safetensors``) in one of the layouts of
    :mod:`metaformer.weights`, loaded strictly into ``name`` with ``num_classes`` read from its
    classifier.

    Args:
        path: The file.
        name: The model name; optional for a training checkpoint (which must then agree with it).
        num_classes: Classifier size (default: that of the file).
        model_kwargs: Architecture overrides for ``metaformer.create``.
        use_ema: For a training checkpoint: its EMA weights (True), its raw weights (False) or the
            weights its run validated (None).

    Returns:
        The model in eval mode on the CPU, with the file's metadata.

    Raises:
        FileNotFoundError / metaformer.CheckpointError: for a missing, unreadable or unfitting file.
        ValueError / TypeError: for a model name or overrides that do not match the file.
    """
    from ..weights import load_torch_file, read_checkpoint, unwrap_state_dict

    path = os.fspath(path)
    kwargs = dict(model_kwargs or {})
    if path.endswith(".safetensors"):
        state_dict = read_checkpoint(path)
    else:
        obj = load_torch_file(path)
        if is_training_checkpoint(obj):
            return _from_training_checkpoint(obj, path, name, num_classes, kwargs, use_ema)
        state_dict = unwrap_state_dict(obj, path)
    if not name:
        raise ValueError(f"the model name is required (--model): {path} is a plain state dict that does not "
                         f"name its model")
    return _from_state_dict(state_dict, path, name, num_classes, kwargs)


def _from_state_dict(state_dict, path: str, name: str, num_classes: Optional[int], kwargs) -> LoadedModel:
    from .. import create
    from ..weights import checkpoint_num_classes, load_state_dict_into

    classes = checkpoint_num_classes(state_dict) if num_classes is None else num_classes
    if classes is not None:
        kwargs["num_classes"] = classes
    model = create(name.partition(".")[0], **kwargs)
    load_state_dict_into(model, state_dict, source=f"checkpoint {path}")
    return LoadedModel(model.eval(), name, path)


def _from_training_checkpoint(ckpt, path: str, name: Optional[str], num_classes: Optional[int], kwargs,
                              use_ema: Optional[bool]) -> LoadedModel:
    from .. import create
    from ..weights import CheckpointError, load_state_dict_into

    stored_name = ckpt["model_name"]
    if ckpt.get("task", "classification") != "classification":
        raise CheckpointError(f"{path} is a {ckpt['task']} checkpoint (written by `metaformer train-seg`), not a "
                              f"classifier: evaluate it with `metaformer validate-seg`, or load it with "
                              f"metaformer.create_segmenter(name, checkpoint=PATH)")
    if name and name.partition(".")[0] != stored_name.partition(".")[0]:
        raise CheckpointError(f"{path} was trained as {stored_name}, not {name}; pass --model {stored_name} "
                              f"(or leave the model name out: the checkpoint names it)")
    if num_classes is not None and num_classes != ckpt["num_classes"]:
        raise ValueError(f"{num_classes} classes asked for, but {path} has {ckpt['num_classes']} classes")
    stored = dict(ckpt.get("model_kwargs") or {})
    stored["num_classes"] = ckpt["num_classes"]
    model = create(stored_name.partition(".")[0], **{**stored, **kwargs})
    which = ckpt.get("eval_weights", "model") if use_ema is None else ("model_ema" if use_ema else "model")
    if which == "model_ema" and not ckpt.get("model_ema"):
        raise ValueError(f"{path} holds no EMA weights (its run trained without --model-ema)")
    load_state_dict_into(model, ckpt[which], "metaformer", source=f"checkpoint {path}")
    weights = f"{path} (epoch {ckpt.get('epoch')}, {'EMA' if which == 'model_ema' else 'model'} weights)"
    return LoadedModel(model.eval(), stored_name, weights, ckpt.get("class_names"), ckpt.get("data_config"),
                       checkpoint=ckpt)
