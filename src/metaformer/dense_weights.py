"""Checkpoints of the dense-prediction models: a MetaFormer backbone plus a neck and heads, loaded strictly.

A dense checkpoint is split by top-level prefix. The backbone part may be in any layout that
:func:`metaformer.convert_state_dict` reads (the release's detection and segmentation checkpoints hold it
in the original PoolFormer layout, with the per-stage norms ``norm0``, ``norm2``, ``norm4``, ``norm6``);
the other parts must match the model's modules by name and shape. Nothing is loaded unless everything fits.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .weights import CheckpointError, describe_misfit, load_state_dict_into, read_checkpoint

__all__ = ["read_state", "split_by_prefix", "fit_parts", "load_parts"]

StateDict = Dict[str, torch.Tensor]


def read_state(checkpoint: Union[str, os.PathLike[str], StateDict], source: Optional[str]) -> Tuple[StateDict, str]:
    """A checkpoint given as a path (read strictly, without running pickled code) or a state dict, and its name."""
    if isinstance(checkpoint, dict):
        return checkpoint, source or "checkpoint"
    path = os.fspath(checkpoint)
    return read_checkpoint(path), source or f"checkpoint {path}"


def split_by_prefix(state_dict: StateDict, prefixes: Iterable[str]) -> Tuple[Dict[str, StateDict], StateDict]:
    """Splits ``state_dict`` into one dict per prefix (the prefix removed) and the keys matching none."""
    prefixes = list(prefixes)
    parts: Dict[str, StateDict] = {p: {} for p in prefixes}
    rest: StateDict = {}
    for key, value in state_dict.items():
        for p in prefixes:
            if key.startswith(p):
                parts[p][key[len(p):]] = value
                break
        else:
            rest[key] = value
    return parts, rest


def fit_parts(specs: Sequence[Tuple[nn.Module, StateDict, str, Sequence[str]]]) -> List[StateDict]:
    """Checks that each state dict has exactly its module's tensors (names and shapes) and returns them.

    Args:
        specs: ``(module, state_dict, what, skip)`` per part: the tensors named relative to ``module``;
            ``what`` names the part in errors (e.g. ``"neck."``); ``skip`` lists prefixes of tensors that
            are neither loaded nor required (a replaced classifier).

    Raises:
        CheckpointError: naming the missing, unexpected and mis-shaped tensors of every part.
    """
    fits: List[StateDict] = []
    missing: List[str] = []
    unexpected: List[str] = []
    mis_shaped: List[str] = []
    for module, state_dict, what, skip in specs:
        target = module.state_dict()
        out: StateDict = {}
        for key, value in state_dict.items():
            if any(key.startswith(p) for p in skip):
                continue
            if key not in target:
                unexpected.append(what + key)
            elif value.shape != target[key].shape:
                mis_shaped.append(f"{what}{key}: checkpoint {tuple(value.shape)} vs model "
                                  f"{tuple(target[key].shape)}")
            else:
                out[key] = value
        missing += [what + k for k in target if k not in state_dict and not any(k.startswith(p) for p in skip)]
        fits.append(out)
    problems = describe_misfit(missing=missing, unexpected=unexpected, mis_shaped=mis_shaped)
    if problems:
        raise CheckpointError(problems)
    return fits


def load_parts(backbone: nn.Module, backbone_state: StateDict, parts: Sequence[Tuple[nn.Module, StateDict]],
               source: str) -> None:
    """Loads a backbone (any known layout, via :func:`metaformer.weights.load_state_dict_into`) and
    parts already checked by :func:`fit_parts`, all or nothing: the parts are only loaded once the backbone has been.

    Raises:
        CheckpointError: naming ``source`` and what does not fit the backbone.
    """
    if not backbone_state:
        raise CheckpointError(f"{source}: the checkpoint has no backbone tensors (no key starts with 'backbone.')")
    load_state_dict_into(backbone, backbone_state, source=f"{source}, backbone")
    for module, state in parts:
        module.load_state_dict(state, strict=False)
