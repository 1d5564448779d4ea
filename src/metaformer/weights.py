"""Checkpoint files and key layouts.

Every source layout is a declarative rename table (regular expression -> replacement, in
:mod:`metaformer.layouts`) applied by one strict converter, :func:`convert_state_dict`. Layouts:

- ``"metaformer"``: this library's own names (a superset of timm's);
- ``"timm"``: timm's ``metaformer.py`` names (MLP weights of attention stages are 2-D there);
- ``"original_v1"``: sail-sg/poolformer (``patch_embed``, a flat ``network.{k}`` list);
- ``"original_baselines"``: sail-sg/metaformer (``downsample_layers``, ``stages.{i}.{j}``);
- ``"transformers"``: Hugging Face transformers' PoolFormer (``poolformer.encoder...``, ``classifier``).

A tensor's name is all that matters: a frozen tensor that one implementation keeps as a parameter and
another as a buffer (RandFormer's random matrix) loads the same way.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .layouts import LAYOUTS, CheckpointError, detect_layout, layout_rules

__all__ = ["CheckpointError", "LAYOUTS", "detect_layout", "convert_state_dict", "read_checkpoint",
           "load_checkpoint", "load_state_dict_into", "load_torch_file", "summarize_names", "describe_misfit",
           "unwrap_state_dict", "checkpoint_num_classes"]

logger = logging.getLogger("metaformer")
Rules = List[Tuple[str, str]]


def _rename(key: str, rules: Rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _strip_ones(shape: Sequence[int]) -> Tuple[int, ...]:
    shape = tuple(shape)
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def summarize_names(names: Iterable[str], limit: int = 8) -> str:
    """Up to ``limit`` sorted names, comma-separated, and how many more there are (for error messages)."""
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def describe_misfit(*, missing: Sequence[str] = (), unexpected: Sequence[str] = (), mis_shaped: Sequence[str] = (),
                    mis_typed: Sequence[str] = (), non_finite: Sequence[str] = ()) -> str:
    """What keeps tensors from fitting a model, as one line (empty when everything fits)."""
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped),
                         ("of another dtype (not floating point: a quantized or damaged file?)", mis_typed),
                         ("holding NaN or infinite values", non_finite)):
        if names:
            parts.append(f"{label} {len(names)}: {summarize_names(names)}")
    return "; ".join(parts)


def convert_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module, layout: Optional[str] = None,
                       *, skip: Sequence[str] = (), allow_missing: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """Renames a state dict of any known layout to ``model``'s names, strictly.

    Tensors whose shapes differ only by trailing singleton axes (a Linear weight for a 1x1 conv) are
    reshaped; any other difference is an error.

    Args:
        state_dict: The source tensors.
        model: The :class:`~metaformer.MetaFormer` the tensors are for.
        layout: One of :data:`LAYOUTS`, or None to detect it.
        skip: Prefixes (in the model's names) of source tensors to drop (e.g. a replaced classifier).
        allow_missing: Prefixes of model tensors that may be absent (they keep their initialisation).

    Returns:
        A state dict with exactly the model's keys, minus allowed missing ones.

    Raises:
        CheckpointError: naming missing, unexpected, mis-shaped and mis-typed tensors (a non-floating
            tensor for a floating one: int8, bool, complex), and tensors holding NaN or infinity.
    """
    layout = layout or detect_layout(state_dict)
    rules = layout_rules(layout, model)
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    unexpected: List[str] = []
    mis_shaped: Dict[str, str] = {}  # model key -> description
    mis_typed: Dict[str, str] = {}
    non_finite: List[str] = []
    for key, value in state_dict.items():
        new = _rename(key, rules)
        if any(new.startswith(p) for p in skip):
            continue
        if new not in target:
            unexpected.append(key if key == new else f"{key} (as {new})")
            continue
        want = target[new].shape
        if value.shape != want:
            if _strip_ones(value.shape) != _strip_ones(want):
                mis_shaped[new] = f"{new}: checkpoint {tuple(value.shape)} vs model {tuple(want)}"
                continue
            value = value.reshape(want)
        if value.dtype != target[new].dtype and not (value.is_floating_point() and target[new].is_floating_point()):
            mis_typed[new] = f"{new}: checkpoint {value.dtype} vs model {target[new].dtype}"
            continue
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            non_finite.append(new)
        out[new] = value
    missing = [k for k in target if k not in out and k not in mis_shaped and k not in mis_typed
               and not any(k.startswith(p) for p in allow_missing)
               and not any(k.startswith(p) for p in skip)]
    problems = describe_misfit(missing=missing, unexpected=unexpected, mis_shaped=list(mis_shaped.values()),
                               mis_typed=list(mis_typed.values()), non_finite=non_finite)
    if problems:
        raise CheckpointError(f"checkpoint ({layout} layout) does not fit the model: {problems}")
    return out


def _unwrap(obj, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
            if key in obj and isinstance(obj[key], dict) and obj[key] and all(
                    isinstance(v, torch.Tensor) for v in obj[key].values()):
                obj = obj[key]
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}
    raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")


def unwrap_state_dict(obj, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The state dict inside an object read from a checkpoint file (see :func:`load_torch_file`).

    A wrapping dict (``{"state_dict": ...}``, ``{"model": ...}``) and DistributedDataParallel's
    ``module.`` prefix are removed, as :func:`read_checkpoint` does; this lets a caller that already
    read a file (to look at what else it holds) take its weights without reading it again.

    Raises:
        CheckpointError: naming ``source`` when ``obj`` holds no state dict.
    """
    return _unwrap(obj, source)


def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """Reads a state dict from a safetensors or PyTorch file (``.pth``, ``.pth.tar``, ``.bin``, ``.pt``).

    The format is recognised from the file's first bytes, whatever its suffix. PyTorch files are read
    with ``torch.load(weights_only=True)``: no pickled code runs. A wrapping dict (``{"state_dict": ...}``,
    ``{"model": ...}``) and DistributedDataParallel's ``module.`` prefix are removed.

    Raises:
        FileNotFoundError: if the file does not exist.
        CheckpointError: if it is a folder, a broken link, truncated, corrupt, or not a state dict.
    """
    path = os.fspath(path)
    _check_file(path)
    if not _is_safetensors(path):
        return _unwrap(load_torch_file(path), path)
    try:
        from safetensors.torch import load_file

        return dict(load_file(path, device="cpu"))
    except Exception as e:  # truncated file, bad header
        raise _unreadable(path, e) from e


def _is_safetensors(path: str) -> bool:
    """safetensors files start with an 8-byte header length and the JSON header's ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def load_torch_file(path: str):
    """Reads a PyTorch file with ``torch.load(weights_only=True)`` (no pickled code runs), whatever it holds.

    Raises:
        FileNotFoundError: if the file does not exist.
        CheckpointError: if it is truncated, corrupt, or holds anything but tensors and plain containers.
    """
    path = os.fspath(path)
    _check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad header, forbidden pickle global...
        raise _unreadable(path, e) from e


def _check_file(path: str) -> None:
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass the weights file inside it (a folder "
                              f"written by save_pretrained loads with metaformer.create(PATH))")
    if not os.path.exists(path):
        if os.path.islink(path):
            try:
                os.stat(path)
            except OSError as e:
                raise CheckpointError(f"{path} is a symbolic link that leads nowhere ({e.strerror}); point it at "
                                      f"the weights file") from None
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a regular file (a device, pipe or socket); pass a weights file")


def _unreadable(path: str, e: Exception) -> CheckpointError:
    text = str(e)
    # torch words it "Unsupported global: GLOBAL x.y" or, for a blocked module, "unsupported GLOBAL x.y"; before
    # 2.4, "Unsupported class x.y"
    found = re.search(r"(?:[Uu]nsupported (?:global: )?GLOBAL|Unsupported class) ([\w.]+)", text)
    if found:
        return CheckpointError(
            f"{path} holds a pickled Python object ({found.group(1)}), not only tensors; metaformer reads weights "
            f"without running pickled code, so it cannot load it. Save the tensors instead: "
            f"torch.save(model.state_dict(), path) or model.save_pretrained(folder)")
    # torch's own message would advise weights_only=False (running the file's code): keep only the detail.
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    detail = (found.group(1) if found else lines[0] if lines else type(e).__name__).split(". ")[0].strip().rstrip(".")
    return CheckpointError(f"could not read checkpoint {path} ({detail}): the file is not a PyTorch or "
                           f"safetensors file, or it is truncated or corrupt; download it again.")


_STEM_KEYS = {"original_v1": ("patch_embed.proj.weight",), "original_baselines": ("downsample_layers.0.conv.weight",),
              "transformers": ("poolformer.encoder.patch_embeddings.0.projection.weight",
                               "encoder.patch_embeddings.0.projection.weight")}


def load_state_dict_into(model: nn.Module, state_dict: Dict[str, torch.Tensor], layout: Optional[str] = None,
                         *, source: str = "checkpoint", replace_classifier: bool = False) -> None:
    """Loads a state dict of any known layout into a model, adapting what may be adapted.

    - A model with ``features_only`` takes the backbone; its feature norms start fresh when the
      checkpoint has none (reported through ``logging``).
    - With ``replace_classifier`` the checkpoint's classifier is dropped and the model's freshly
      initialised one kept (fine-tuning to another ``num_classes``).
    - A stem for a different ``in_chans`` is adapted as timm does (``adapt_input_conv``).

    Nothing is loaded unless everything fits: the model is unchanged when this raises.

    Raises:
        CheckpointError: naming the source and the tensors that do not fit.
    """
    try:
        layout = layout or detect_layout(state_dict)
        state_dict = dict(state_dict)
        skip: List[str] = []
        allow_missing: List[str] = []
        if getattr(model, "features_only", False):
            skip.append("head.")
            # a dense-prediction checkpoint's norms of stages this backbone does not return
            skip += [f"feature_norms.{i}." for i in range(len(model.stages)) if i not in model.out_indices]
            if not any("feature_norms." in k or re.match(r"^norm\d+\.", k) for k in state_dict):
                allow_missing.append("feature_norms.")
                logger.info("%s: the checkpoint has no per-stage feature norms; they start fresh", source)
        elif replace_classifier:
            skip.append("head.fc.")
            allow_missing.append("head.fc.")
        conv_key = next((k for k in _STEM_KEYS.get(layout, ("stem.conv.weight",)) if k in state_dict), None)
        if conv_key is not None and state_dict[conv_key].shape[1] != model.in_chans:
            from timm.models import adapt_input_conv

            state_dict[conv_key] = adapt_input_conv(model.in_chans, state_dict[conv_key])
        converted = convert_state_dict(state_dict, model, layout, skip=skip, allow_missing=allow_missing)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    model.load_state_dict(converted, strict=False)


def checkpoint_num_classes(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """Number of classes of the classifier in a state dict of any layout, or None if it has none."""
    for key in ("head.fc.fc2.weight", "head.fc2.weight", "head.fc.weight", "head.weight", "classifier.weight"):
        if key in state_dict and state_dict[key].dim() == 2:
            return int(state_dict[key].shape[0])
    return None


def load_checkpoint(model: nn.Module, path: str, layout: Optional[str] = None,
                    replace_classifier: bool = False) -> None:
    """Reads ``path`` and loads it into ``model`` strictly (see :func:`load_state_dict_into`).

    With ``replace_classifier``, a checkpoint whose classifier has another number of classes than the
    model leaves the model's fresh classifier in place (fine-tuning); otherwise everything must fit.
    """
    state_dict = read_checkpoint(path)
    classes = checkpoint_num_classes(state_dict)
    replace = replace_classifier and classes is not None and classes != getattr(model, "num_classes", None)
    load_state_dict_into(model, state_dict, layout, source=f"checkpoint {os.fspath(path)}",
                         replace_classifier=replace)
