"""The key layouts of MetaFormer checkpoints, as declarative rename tables.

Each layout is a list of ``(regular expression, replacement)`` rules applied in order to every key
(:func:`layout_rules`); :func:`metaformer.weights.convert_state_dict` applies them and checks the
result strictly against the model. :func:`detect_layout` recognises a layout from its keys.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

__all__ = ["CheckpointError", "LAYOUTS", "detect_layout", "layout_rules"]

LAYOUTS = ("metaformer", "timm", "original_v1", "original_baselines", "transformers")
Rules = List[Tuple[str, str]]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def detect_layout(state_dict: Dict[str, torch.Tensor]) -> str:
    """Guesses the key layout of a state dict from its keys.

    Raises:
        CheckpointError: if no known layout matches.
    """
    keys = set(state_dict)
    if "patch_embed.proj.weight" in keys or any(k.startswith("network.") for k in keys):
        return "original_v1"
    if any(k.startswith(("poolformer.encoder.", "encoder.patch_embeddings.", "encoder.block.")) for k in keys):
        return "transformers"
    if "downsample_layers.0.conv.weight" in keys:
        return "original_baselines"
    if "stem.conv.weight" in keys:
        return "metaformer"
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(f"unrecognised checkpoint layout (first keys: {sample}); expected one of {LAYOUTS}")


_BASELINE_RULES: Rules = [
    (r"^downsample_layers\.0\.conv\.", "stem.conv."),
    (r"^downsample_layers\.0\.post_norm\.", "stem.norm."),
    (r"^downsample_layers\.(\d+)\.pre_norm\.", r"stages.\1.downsample.norm."),
    (r"^downsample_layers\.(\d+)\.conv\.", r"stages.\1.downsample.conv."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
    (r"^head\.(fc1|norm|fc2)\.", r"head.fc.\1."),
    (r"^norm(\d+)\.", r"feature_norms.\1."),  # per-stage norms of a dense backbone (ConvNeXt's convention)
    (r"^norm\.", "head.norm."),  # after the head rules, which would otherwise rename its result again
]


def _v1_rules(model: nn.Module) -> Rules:
    """The release's flat ``network`` list: stage, downsample, stage, ... with position embeddings as
    their own entries, so the indices depend on the architecture."""
    rules: Rules = [(r"^patch_embed\.proj\.", "stem.conv."), (r"\.layer_scale_([12])$", r".layer_scale\1.scale")]
    k = 0
    n = len(model.stages)
    for i, stage in enumerate(model.stages):
        if stage.pos_embed is not None:
            rules.append((rf"^network\.{k}\.pos_embed$", f"stages.{i}.pos_embed"))
            k += 1
        rules.append((rf"^network\.{k}\.(\d+)\.", rf"stages.{i}.blocks.\1."))
        rules.append((rf"^norm{k}\.", f"feature_norms.{i}."))
        k += 1
        if i < n - 1:
            rules.append((rf"^network\.{k}\.proj\.", f"stages.{i + 1}.downsample.conv."))
            k += 1
    rules += [(r"^head\.", "head.fc."), (r"^norm\.", "head.norm.")]  # this order: rules apply in sequence
    return rules


# Hugging Face transformers' PoolFormer (PoolFormerForImageClassification; PoolFormerModel's keys have no
# "poolformer." prefix). Its encoder.patch_embeddings.{i} is the stem (i = 0) or the downsampling before
# stage i; before_norm/after_norm are norm1/norm2, output.conv1/conv2 the MLP; the head is its top-level
# "norm" (a one-group GroupNorm on the final map, applied before the mean as in the release) and
# "classifier".
_TRANSFORMERS_RULES: Rules = [
    (r"^poolformer\.", ""),
    (r"^encoder\.patch_embeddings\.0\.projection\.", "stem.conv."),
    (r"^encoder\.patch_embeddings\.(\d+)\.projection\.", r"stages.\1.downsample.conv."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.before_norm\.", r"stages.\1.blocks.\2.norm1."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.after_norm\.", r"stages.\1.blocks.\2.norm2."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.output\.conv([12])\.", r"stages.\1.blocks.\2.mlp.fc\3."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.layer_scale_([12])$", r"stages.\1.blocks.\2.layer_scale\3.scale"),
    (r"^norm\.", "head.norm."),
    (r"^classifier\.", "head.fc."),
]


def layout_rules(layout: str, model: nn.Module) -> Rules:
    """The rename rules of ``layout`` for ``model`` (the v1 release's depend on the architecture).

    Raises:
        CheckpointError: for an unknown layout.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "original_v1":
        return _v1_rules(model)
    return {"metaformer": [], "timm": [], "original_baselines": _BASELINE_RULES,
            "transformers": _TRANSFORMERS_RULES}[layout]
