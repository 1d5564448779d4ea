"""What the commands share: errors and messages, option groups, and turning options into a device, a model
and a data config."""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..training import LoadedModel, data_config, load_model_file

__all__ = ["CLIError", "log", "warn", "format_count", "add_model_args", "add_data_config_args",
           "add_device_args", "parse_model_kwargs", "resolve_device", "data_config_from_args", "load_model"]


class CLIError(Exception):
    """A user's mistake, reported as ``metaformer: error: <message>`` without a traceback."""


# ----------------------------------------------------------------------------------------- output
def log(message: str) -> None:
    """Prints a progress message on stdout, flushed (logs are often read while a job runs)."""
    print(message, flush=True)


def warn(message: str) -> None:
    """Prints ``metaformer: warning: <message>`` on stderr."""
    print(f"metaformer: warning: {message}", file=sys.stderr, flush=True)


def format_count(n: float) -> str:
    """``11915176`` -> ``"11.92M"``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


# ----------------------------------------------------------------------------------------- options
def add_model_args(parser: argparse.ArgumentParser, *, model_required: bool = False) -> None:
    """``--model``, ``--pretrained``, ``--checkpoint``, ``--num-classes`` and ``--model-kwargs``."""
    group = parser.add_argument_group("model")
    group.add_argument("-m", "--model", required=model_required, metavar="NAME",
                       help="model name, optionally with a weights tag (poolformer_s12.sail_in1k); "
                            "see `metaformer list`" + ("" if model_required else
                                                       "; optional with a checkpoint written by `metaformer train`"))
    group.add_argument("--pretrained", action="store_true",
                       help="use the released weights of the model (downloaded once, then cached)")
    group.add_argument("--checkpoint", metavar="PATH",
                       help="weights file: a checkpoint written by `metaformer train`, or a state dict "
                            "(.pth, .pth.tar, .safetensors) in the original, timm or metaformer layout")
    group.add_argument("--num-classes", type=int, metavar="K",
                       help="classifier size (default: that of the weights, or 1000)")
    group.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                       help="architecture overrides passed to metaformer.create, e.g. mlp_ratio=2 "
                            "token_mixer=identity drop_rate=0.1 (values are Python literals or names)")


def add_data_config_args(parser: argparse.ArgumentParser) -> None:
    """``--img-size``, ``--crop-pct``, ``--interpolation``, ``--mean``, ``--std``."""
    group = parser.add_argument_group("preprocessing (default: the model's own pretrained_cfg)")
    group.add_argument("--img-size", type=int, metavar="S", help="input resolution (square)")
    group.add_argument("--crop-pct", type=float, metavar="P",
                       help="center-crop fraction: resize the short side to S / P, then crop S")
    group.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"),
                       help="resize interpolation")
    group.add_argument("--mean", type=float, nargs=3, metavar="M", help="normalisation mean per channel")
    group.add_argument("--std", type=float, nargs=3, metavar="S", help="normalisation std per channel")


def add_device_args(parser: argparse.ArgumentParser, *, amp_help: str = "mixed precision (torch.amp)") -> None:
    """``--device``, ``--amp``, ``--amp-dtype``, ``--channels-last``."""
    group = parser.add_argument_group("device")
    group.add_argument("--device", metavar="D", help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--amp", action="store_true", help=amp_help)
    group.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16",
                       help="autocast dtype with --amp (float16 uses a GradScaler when training)")
    group.add_argument("--channels-last", action="store_true", help="use the channels_last memory format")


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare name: "identity", "gelu"


def parse_model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """Parses ``["mlp_ratio=2", "token_mixer=identity"]`` into a dict of Python values.

    Raises:
        CLIError: for an item without ``=``.
    """
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--model-kwargs: expected KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = _literal(value.strip())
    return out


# ----------------------------------------------------------------------------------------- device
def resolve_device(name: Optional[str]) -> torch.device:
    """The ``--device`` argument as a device, checked to exist.

    Raises:
        CLIError: for an unknown or unavailable device.
    """
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name}: MPS is not available on this machine")
    return device


# ----------------------------------------------------------------------------------------- model and data
def data_config_from_args(model: nn.Module, args: argparse.Namespace,
                          base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The evaluation preprocessing of ``model`` (or ``base``) with the preprocessing options applied.

    Raises:
        CLIError: for an input size or crop fraction out of range.
    """
    img_size = getattr(args, "img_size", None)
    if img_size and img_size < 8:
        raise CLIError(f"--img-size must be at least 8, got {img_size}")
    crop_pct = getattr(args, "crop_pct", None)
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise CLIError(f"--crop-pct must be in (0, 1], got {crop_pct}")
    return data_config(model, base, img_size=img_size, crop_pct=crop_pct,
                       interpolation=getattr(args, "interpolation", None), mean=getattr(args, "mean", None),
                       std=getattr(args, "std", None))


def load_model(args: argparse.Namespace, *, use_ema: Optional[bool] = None) -> LoadedModel:
    """Builds the model of ``--model`` with the weights of ``--pretrained`` or ``--checkpoint``.

    A checkpoint file is read once by :func:`metaformer.training.load_model_file` (a training
    checkpoint brings its model, classes and preprocessing).

    Args:
        args: Parsed options with ``model``, ``pretrained``, ``checkpoint``, ``num_classes`` and
            ``model_kwargs``.
        use_ema: For a training checkpoint: take the EMA weights (True), the raw weights (False) or the
            weights the training run validated (None).

    Raises:
        CLIError, ValueError, TypeError, FileNotFoundError, metaformer.CheckpointError,
        metaformer.PretrainedError: for any mistake in the options or the weights.
    """
    from .. import create

    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.pretrained and args.checkpoint:
        raise CLIError("pass either --pretrained or --checkpoint, not both")
    num_classes = args.num_classes if args.num_classes is not None else kwargs.pop("num_classes", None)
    kwargs.pop("num_classes", None)
    if num_classes is not None and num_classes < 1:
        raise CLIError(f"--num-classes must be >= 1, got {num_classes}")
    if args.checkpoint:
        return load_model_file(args.checkpoint, args.model, num_classes=num_classes, model_kwargs=kwargs,
                               use_ema=use_ema)
    if not args.model:
        raise CLIError("--model is required (see `metaformer list`)")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = create(args.model, pretrained=args.pretrained, **kwargs)
    if args.pretrained:
        cfg = model.pretrained_cfg
        weights = f"{cfg.get('architecture')}.{cfg.get('tag')} ({cfg.get('source')})"
    else:
        weights = "random init (no --pretrained or --checkpoint)"
    return LoadedModel(model.eval(), args.model, weights)
