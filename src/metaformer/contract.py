"""timm's model contract on a MetaFormer: intermediates, pruning, classifier, optimizer groups.

:class:`TimmContractMixin` gives :class:`~metaformer.MetaFormer` the members that timm's tools read
(``forward_intermediates``, ``prune_intermediate_layers``, ``reset_classifier``, ``get_classifier``,
``set_grad_checkpointing``, ``group_matcher``, ``no_weight_decay``, ``default_cfg``), with timm
1.0's signatures and return values. None of them is part of a scripted ``forward``.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from . import kernels
from .tracing import is_eager

__all__ = ["TimmContractMixin", "take_indices"]


def take_indices(num_stages: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """The stage indices ``indices`` selects, and the largest of them (timm's ``feature_take_indices``).

    Args:
        num_stages: Number of stages.
        indices: None (every stage), an int ``n`` (the last ``n`` stages) or a sequence of indices
            (negative ones count from the end).

    Raises:
        TypeError / ValueError: for anything else, or an index out of range.
    """
    if indices is None:
        indices = num_stages
    if isinstance(indices, numbers.Integral) and not isinstance(indices, bool):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices} asks for the last {indices} stages; this model has {num_stages} "
                             f"(give 1 to {num_stages}, or a list of stage indices)")
        taken = [num_stages - int(indices) + i for i in range(int(indices))]
    elif isinstance(indices, Sequence) and not isinstance(indices, str) and len(indices) > 0:
        taken = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"stage indices must be ints, got {i!r} in {indices!r}")
            idx = num_stages + int(i) if i < 0 else int(i)
            if not 0 <= idx < num_stages:
                raise ValueError(f"stage index {i} is out of range for a model of {num_stages} stages "
                                 f"(0 to {num_stages - 1}, or -{num_stages} to -1)")
            taken.append(idx)
    else:
        raise TypeError(f"indices must be None, an int (the last n stages) or a non-empty list of stage indices, "
                        f"got {indices!r}")
    return taken, max(taken)


class TimmContractMixin:
    """timm 1.0's model contract, on top of MetaFormer's ``stem``, ``stages``, ``head`` and ``feature_norms``."""

    # --------------------------------------------------------------------------------- intermediates
    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The stage outputs, timm's way: ``(final, intermediates)``, or the list alone.

        Args:
            x: Input images (B, C, H, W).
            indices: Stages to return: None (all), an int ``n`` (the last ``n``) or a list of indices.
            norm: Put each returned map through the norm that applies to it: a ``features_only``
                model's feature norm (so that ``forward`` equals the normed intermediates at
                ``out_indices``), or for the last stage of a model that normalises the whole map before
                pooling (PoolFormer v1), the head's norm. Maps no norm applies to are returned raw.
            stop_early: Stop after the last stage asked for (``final`` is then that stage's output).
            output_fmt: Only ``"NCHW"``.
            intermediates_only: Return only the list.

        Returns:
            ``(final, intermediates)``: ``final`` is what :meth:`forward_features` returns (the last
            stage's raw map) unless ``stop_early`` stops before it; or only ``intermediates``.

        Raises:
            ValueError / TypeError: for bad ``indices`` or ``output_fmt``, or a bad input (as ``forward``).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (MetaFormer maps are channels-first), got {output_fmt!r}")
        taken, max_index = take_indices(len(self.stages), indices)
        if is_eager(x):
            self.check_input(x)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        last = len(self.stages) - 1
        intermediates = []
        image = x
        x = self._stem_map(x)  # the stem, and the blocks' layout once (channels_last on CPU)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in taken:
                intermediates.append(self._intermediate_norm(i, x, last) if norm else x)
        # the maps in the input's memory format (the CPU fast paths work in channels_last)
        intermediates = [kernels.in_input_layout(t, image) for t in intermediates]
        x = kernels.in_input_layout(x, image)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def _intermediate_norm(self, i: int, x: torch.Tensor, last: int) -> torch.Tensor:
        if self.features_only:
            return self.feature_norms[i](x)
        if i == last and self.head.norm_first:
            return self.head.norm(x)
        return x

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Removes what the stages ``indices`` do not need: later stages, and optionally norm and head.

        After it, :meth:`forward_intermediates` with the same ``indices`` returns the same maps. A
        pruned model is for feature extraction: ``save_pretrained`` refuses it (its config describes
        the whole model); keep and save the unpruned one.

        Args:
            indices: As in :meth:`forward_intermediates`.
            prune_norm: Remove the head's norm (a ``features_only`` model keeps its feature norms).
            prune_head: Remove pooling and classifier (``num_classes`` 0, ``global_pool`` ``""``).

        Returns:
            The absolute indices of the kept stages that ``indices`` selects.
        """
        taken, max_index = take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        self.feature_info = type(self.feature_info)(
            f for f in self.feature_info if int(f["module"].split(".")[1]) <= max_index)
        if prune_end:
            self.num_features = self.head_hidden_size = self.dims[max_index]
        if self.features_only:
            self.feature_norms = self.feature_norms[:max_index + 1]
            self.out_indices = tuple(i for i in self.out_indices if i <= max_index)
        else:
            if prune_norm or prune_end:  # a norm of the last stage's width cannot take an earlier map
                self.head.norm = nn.Identity()
            if prune_head or prune_end:
                self._set_classifier(0, "")
        self._metaformer_pruned = True
        return taken

    # ------------------------------------------------------------------------------------ classifier
    def get_classifier(self) -> nn.Module:
        """The final classifier module (Linear, MLP head, or Identity with ``num_classes=0``).

        Raises:
            RuntimeError: for a ``features_only`` model, which has no head.
        """
        if self.head is None:
            raise RuntimeError("this model was built with features_only=True and has no classifier")
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replaces the classifier by a freshly initialised one (timm's signature).

        Args:
            num_classes: Classes; 0 leaves an identity (``forward`` returns the pooled features,
                ``head_hidden_size`` wide). Models with an MLP head get a fresh MLP head.
            global_pool: None (keep), ``"avg"``, or ``""`` (no pooling: ``forward`` returns the
                normalised final map; needs ``num_classes=0``).

        Raises:
            RuntimeError: for a ``features_only`` model, which has no head.
            ValueError: for a negative ``num_classes`` or an unknown ``global_pool``.
        """
        if self.head is None:
            raise RuntimeError("this model was built with features_only=True and has no classifier")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        self._set_classifier(num_classes, self.head.global_pool if global_pool is None else global_pool)

    def _set_classifier(self, num_classes: int, global_pool: str) -> None:
        self.head.set_pool(global_pool, num_classes)
        like = self.stem.conv.weight
        self.head.fc = self.head.make_fc(self.num_features, num_classes).to(device=like.device, dtype=like.dtype)
        self.head.fc.train(self.head.training)
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        self.config["global_pool"] = global_pool

    # ---------------------------------------------------------------------------------- training
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups by depth for timm's layer-wise learning-rate decay (``layer_decay=``).

        ``coarse``: one group per stage; otherwise one per block, a stage's downsampling and position
        embedding with its first block. The stem comes first; head and feature norms, matched by no
        rule, come last.
        """
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.(?:downsample|pos_embed)", (0,)),
            (r"^stages\.(\d+)\.blocks\.(\d+)", None),
        ])

    def no_weight_decay(self) -> Set[str]:
        """Names of parameters timm's optimizer factory keeps out of weight decay beyond biases and
        1-D tensors: the position embeddings."""
        return {f"stages.{i}.pos_embed" for i, stage in enumerate(self.stages) if stage.pos_embed is not None}

    @property
    def default_cfg(self) -> Dict[str, Any]:
        """Alias of ``pretrained_cfg`` (timm's older name)."""
        return self.pretrained_cfg

    def count_parameters(self, include_frozen: bool = True) -> int:
        """The number of weights: parameters, plus (``include_frozen``) the frozen matrices that are kept
        as buffers (RandFormer's random mixing), which the releases held as parameters and count."""
        total = sum(p.numel() for p in self.parameters())
        if include_frozen:
            total += sum(b.numel() for m in self.modules() for name, b in m.named_buffers(recurse=False)
                         if name in getattr(m, "frozen_weights", ()))
        return total
