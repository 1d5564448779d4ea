"""What the commands share: errors and messages, option groups, and turning options into a device, a model
and a data config."""

from __future__ import annotations

import argparse
import ast
import errno
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..files import write_text
from ..training import LoadedModel, data_config, load_model_file

__all__ = ["CLIError", "Interrupted", "log", "warn", "format_count", "add_model_args", "add_data_config_args",
           "add_device_args", "add_workers_arg", "image_size", "parse_model_kwargs", "resolve_device",
           "check_input_file", "check_output_file", "data_config_from_args", "load_model", "refuse_failed",
           "run_distributed", "add_results_args", "check_results_file", "write_results"]

MAX_IMG_SIZE = 4096  # 16x the released 224/384; METAFORMER_MAX_IMG_SIZE raises it


class CLIError(Exception):
    """A user's mistake, reported as ``metaformer: error: <message>`` without a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a word on what was kept: reported as ``metaformer: interrupted: <message>``."""


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


# ----------------------------------------------------------------------------------------- option types
def image_size(text: str) -> int:
    """argparse type of ``--img-size``: an int from 8 to 4096 (``METAFORMER_MAX_IMG_SIZE`` raises the limit)."""
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}") from None
    limit = int(os.environ.get("METAFORMER_MAX_IMG_SIZE") or MAX_IMG_SIZE)
    if size < 8:
        raise argparse.ArgumentTypeError(f"must be at least 8 pixels (the models downsample by 32; the released "
                                         f"weights take 224 or 384), got {size}")
    if size > limit:
        gib = 3 * size * size * 4 / 2**30
        raise argparse.ArgumentTypeError(
            f"{size} is larger than {limit}: one {size}x{size} image alone takes {gib:.3g} GiB as float32, before "
            f"the model's activations (the released weights take 224 or 384). If you mean it, set the "
            f"environment variable METAFORMER_MAX_IMG_SIZE={size}")
    return size


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use (containers, taskset)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """The default number of data-loading processes: 4, or fewer on a machine with fewer CPUs."""
    return min(4, _cpus())


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes, got {text!r}") from None
    limit = max(32, 4 * _cpus())
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 loads the data in the main process), got {n}")
    if n > limit:
        raise argparse.ArgumentTypeError(
            f"{n} data-loading processes on a machine with {_cpus()} CPUs would only exhaust memory (each one "
            f"holds a copy of the dataset's file list); use at most {limit}, usually no more than the CPUs")
    return n


def add_workers_arg(group, *, per: str = "") -> None:
    """``-j/--workers`` with a default that fits the machine (see :func:`default_workers`)."""
    group.add_argument("-j", "--workers", type=_workers, default=default_workers(), metavar="N",
                       help=f"data loading processes{per} (default: %(default)s: 4, or the CPUs available if fewer)")


def add_results_args(parser: argparse.ArgumentParser, *, what: str = "the results") -> None:
    """An evaluation's ``--results-file`` (checked before it starts), ``--overwrite`` and ``--no-progress``."""
    parser.add_argument("--results-file", metavar="F.json", help=f"write {what} as JSON to this file (checked "
                        "before the evaluation starts; an existing file needs --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --results-file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_results_file(args: argparse.Namespace) -> None:
    """Refuses an existing ``--results-file`` without ``--overwrite`` (before the evaluation starts)."""
    if args.results_file:
        check_output_file(args.results_file, "--results-file", args.overwrite)


def write_results(args: argparse.Namespace, results: dict) -> None:
    """Writes ``results`` as JSON to ``--results-file`` (all-or-nothing), when one was given."""
    if args.results_file:
        write_text(args.results_file, json.dumps(results, indent=2) + "\n")
        log(f"results written to {args.results_file}")


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
    group.add_argument("--img-size", type=image_size, metavar="S", help="input resolution (square, 8 to 4096)")
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


# ----------------------------------------------------------------------------------------- files
def check_input_file(path: str, flag: str) -> str:
    """Checks that ``path`` is a readable file before anything slow runs; returns it.

    Raises:
        CLIError: saying what ``path`` is instead: missing, a folder, a symbolic link loop or a dangling link.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        saved = os.path.isfile(os.path.join(path, "config.json"))
        hint = (" holding a model saved by save_pretrained: load it in Python with "
                "MetaFormer.from_pretrained(FOLDER)" if saved else "")
        raise CLIError(f"{flag} {path} is a folder, not a file{hint}; pass the weights file itself (.pth, "
                       f".pth.tar or .safetensors)")
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as e:
            what = "a symbolic link loop" if e.errno == errno.ELOOP else f"a symbolic link to nothing ({os.readlink(path)})"
            raise CLIError(f"{flag} {path} is {what}, not a file") from None
    if os.path.exists(path):
        raise CLIError(f"{flag} {path} is not a regular file")
    raise CLIError(f"{flag} file not found: {path}")


def check_output_file(path: str, flag: str, overwrite: bool = False) -> str:
    """Checks, before any work, that ``path`` can be written and would not replace a file unasked.

    Raises:
        CLIError: for a missing or unwritable folder, a folder at ``path``, or an existing file without
            ``overwrite``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"{flag}: folder does not exist: {folder}")
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{flag}: cannot write into {folder} (permission denied); choose another place")
    if os.path.lexists(path) and not overwrite:
        raise CLIError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another name")
    return path


# ----------------------------------------------------------------------------------------- model and data
def data_config_from_args(model: nn.Module, args: argparse.Namespace,
                          base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The evaluation preprocessing of ``model`` (or ``base``) with the preprocessing options applied.

    Raises:
        CLIError: for an input size or crop fraction out of range.
    """
    img_size = getattr(args, "img_size", None)
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
        check_input_file(args.checkpoint, "--checkpoint")
        return load_model_file(args.checkpoint, args.model, num_classes=num_classes, model_kwargs=kwargs,
                               use_ema=use_ema)
    if not args.model:
        raise CLIError("--model is required (see `metaformer list`)")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if args.pretrained:
        from .hub_access import go_offline_if_unreachable

        go_offline_if_unreachable(args.model)
    model = create(args.model, pretrained=args.pretrained, **kwargs)
    if args.pretrained:
        cfg = model.pretrained_cfg
        weights = f"{cfg.get('architecture')}.{cfg.get('tag')} ({cfg.get('source')})"
    else:
        weights = "random init (no --pretrained or --checkpoint)"
    return LoadedModel(model.eval(), args.model, weights)


def refuse_failed(checks) -> None:
    """Raises :class:`CLIError` with the message of the first ``(ok, message)`` pair whose ``ok`` is false."""
    for ok, message in checks:
        if not ok:
            raise CLIError(message)


def run_distributed(args: argparse.Namespace, entry) -> int:
    """``entry(args, dist)`` inside a :class:`~metaformer.training.Distributed` group closed on the way out."""
    from ..training import Distributed

    dist = Distributed(resolve_device(args.device) if args.device else None)
    try:
        return entry(args, dist)
    finally:
        dist.close()
