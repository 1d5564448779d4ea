"""Shared pieces of the command line: errors, model loading, data, evaluation and small helpers."""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

__all__ = ["CLIError", "add_model_args", "add_data_config_args", "add_device_args", "parse_model_kwargs",
           "resolve_device", "autocast", "LoadedModel", "load_model", "is_training_checkpoint",
           "read_training_checkpoint", "data_config", "eval_transform", "image_folder", "class_label_fn",
           "dataset_targets_for", "evaluate", "atomic_save", "atomic_write_text", "log", "warn", "format_count",
           "TRAINING_CHECKPOINT_FORMAT"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TRAINING_CHECKPOINT_FORMAT = "metaformer-train/1"


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


def parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """Parses ``["mlp_ratio=2", "token_mixer=identity"]`` into a dict of Python values.

    Raises:
        CLIError: for an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--model-kwargs: expected KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = _literal(value.strip())
    return out


# ----------------------------------------------------------------------------------------- device
def resolve_device(name: str | None) -> torch.device:
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


def autocast(device: torch.device, enabled: bool, dtype: str = "bfloat16"):
    """``torch.autocast`` for the device when ``enabled``, else a no-op context."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


# ----------------------------------------------------------------------------------------- models
class LoadedModel:
    """A model built for evaluation plus what the weights file said about it.

    Attributes:
        model: The model, on the CPU, in eval mode.
        name: Model name as built.
        weights: Human-readable description of the weights (``"random init"``, a path, a tag).
        class_names: Class names stored by ``metaformer train``, or None.
        data_config: Preprocessing stored by ``metaformer train`` (eval transform), or None.
    """

    def __init__(self, model: nn.Module, name: str, weights: str, class_names: list[str] | None = None,
                 data_config: dict[str, Any] | None = None):
        self.model = model
        self.name = name
        self.weights = weights
        self.class_names = class_names
        self.data_config = data_config


def is_training_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a checkpoint written by ``metaformer train``."""
    return isinstance(obj, dict) and obj.get("format") == TRAINING_CHECKPOINT_FORMAT and "model" in obj


def read_training_checkpoint(path: str) -> dict[str, Any] | None:
    """Reads ``path`` and returns it if it is a ``metaformer train`` checkpoint, else None.

    Raises:
        FileNotFoundError / metaformer.CheckpointError: for a missing or unreadable file.
    """
    if path.endswith(".safetensors"):
        return None
    from ..weights import load_torch_file

    obj = load_torch_file(path)
    return obj if is_training_checkpoint(obj) else None


def _check_same_model(requested: str | None, stored: str, path: str) -> None:
    from ..weights import CheckpointError

    if requested and requested.partition(".")[0] != stored.partition(".")[0]:
        raise CheckpointError(f"{path} was trained as {stored}, not {requested}; pass --model {stored} "
                              f"(or leave --model out)")


def load_model(args: argparse.Namespace, *, use_ema: bool | None = None) -> LoadedModel:
    """Builds the model of ``--model`` with the weights of ``--pretrained`` or ``--checkpoint``.

    A checkpoint written by ``metaformer train`` brings its own model name, architecture overrides,
    number of classes, class names and evaluation preprocessing. Other checkpoints are state dicts
    loaded strictly, with ``num_classes`` read from their classifier.

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
    from ..weights import checkpoint_num_classes, load_state_dict_into, read_checkpoint

    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.pretrained and args.checkpoint:
        raise CLIError("pass either --pretrained or --checkpoint, not both")
    if args.num_classes is not None:
        if args.num_classes < 1:
            raise CLIError(f"--num-classes must be >= 1, got {args.num_classes}")
        kwargs["num_classes"] = args.num_classes

    if args.checkpoint:
        path = os.fspath(args.checkpoint)
        ckpt = read_training_checkpoint(path)
        if ckpt is not None:
            name = ckpt["model_name"]
            _check_same_model(args.model, name, path)
            stored = dict(ckpt.get("model_kwargs") or {})
            stored["num_classes"] = ckpt["num_classes"]
            if args.num_classes is not None and args.num_classes != ckpt["num_classes"]:
                raise CLIError(f"--num-classes {args.num_classes}: {path} has {ckpt['num_classes']} classes")
            model = create(name.partition(".")[0], **{**stored, **{k: v for k, v in kwargs.items()
                                                                   if k != "num_classes"}})
            which = ckpt.get("eval_weights", "model") if use_ema is None else ("model_ema" if use_ema else "model")
            if which == "model_ema" and not ckpt.get("model_ema"):
                raise CLIError(f"{path} holds no EMA weights (train with --model-ema)")
            load_state_dict_into(model, ckpt[which], "metaformer", source=f"checkpoint {path}")
            weights = f"{path} (epoch {ckpt.get('epoch')}, {'EMA' if which == 'model_ema' else 'model'} weights)"
            return LoadedModel(model.eval(), name, weights, ckpt.get("class_names"), ckpt.get("data_config"))
        if not args.model:
            raise CLIError(f"--model is required: {path} is a plain state dict that does not name its model")
        state_dict = read_checkpoint(path)
        classes = checkpoint_num_classes(state_dict)
        if classes is not None:
            kwargs.setdefault("num_classes", classes)
        model = create(args.model.partition(".")[0], **kwargs)
        load_state_dict_into(model, state_dict, source=f"checkpoint {path}")
        return LoadedModel(model.eval(), args.model, path)

    if not args.model:
        raise CLIError("--model is required (see `metaformer list`)")
    model = create(args.model, pretrained=args.pretrained, **kwargs)
    if args.pretrained:
        cfg = model.pretrained_cfg
        weights = f"{cfg.get('architecture')}.{cfg.get('tag')} ({cfg.get('source')})"
    else:
        weights = "random init (no --pretrained or --checkpoint)"
    return LoadedModel(model.eval(), args.model, weights)


# ----------------------------------------------------------------------------------------- data
def data_config(model: nn.Module, args: argparse.Namespace | None = None,
                base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The evaluation preprocessing: the model's ``pretrained_cfg`` (or ``base``), then the options.

    Returns:
        A dict with ``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std``.
    """
    from timm.data import resolve_data_config

    cfg = dict(base) if base else resolve_data_config({}, model=model)
    cfg.setdefault("crop_mode", "center")
    if args is not None:
        if getattr(args, "img_size", None):
            if args.img_size < 8:
                raise CLIError(f"--img-size must be at least 8, got {args.img_size}")
            cfg["input_size"] = (cfg["input_size"][0], args.img_size, args.img_size)
        if getattr(args, "crop_pct", None) is not None:
            if not 0 < args.crop_pct <= 1:
                raise CLIError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
            cfg["crop_pct"] = args.crop_pct
        for key in ("interpolation", "mean", "std"):
            if getattr(args, key, None):
                cfg[key] = tuple(getattr(args, key)) if key != "interpolation" else getattr(args, key)
    cfg["input_size"] = tuple(cfg["input_size"])
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return {k: cfg[k] for k in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")}


def eval_transform(cfg: dict[str, Any]):
    """timm's evaluation transform (resize, center crop, normalise) for a data config."""
    from timm.data import create_transform

    return create_transform(**cfg, is_training=False)


def _load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise OSError(f"cannot read image {path}: not an image, or a corrupt one") from None
    except Exception as e:  # truncated, unreadable
        raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def image_folder(root: str, transform=None, what: str = "data"):
    """A torchvision ``ImageFolder`` over ``root`` with checks that give one-line errors.

    Raises:
        CLIError: if ``root`` is missing, is not a folder, has no class folders, or a class folder
            has no images.
    """
    from torchvision.datasets import ImageFolder

    if not os.path.exists(root):
        raise CLIError(f"{what} folder not found: {root}")
    if not os.path.isdir(root):
        raise CLIError(f"{what} is not a folder: {root} (expected an ImageFolder: ROOT/CLASS/IMAGE)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise CLIError(f"{what} folder {root} has no class sub-folders (expected ROOT/CLASS/IMAGE)")
    empty = [c for c in classes if not _has_image(os.path.join(root, c))]
    if empty:
        raise CLIError(f"class folder(s) with no images in {root}: {', '.join(empty[:5])}"
                       f"{' ...' if len(empty) > 5 else ''} (supported: {', '.join(IMG_EXTENSIONS)})")
    return ImageFolder(root, transform=transform, loader=_load_image)


def _has_image(folder: str) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def class_label_fn(num_classes: int, class_names: Sequence[str] | None = None):
    """A function from class index to a readable label for predictions.

    Uses the stored class names of a training checkpoint, else timm's ImageNet-1k / 22k descriptions
    when the classifier has 1000 / 21841 outputs, else ``"class <i>"``.
    """
    if class_names and len(class_names) == num_classes:
        return lambda i: class_names[i]
    subset = {1000: "imagenet-1k", 21841: "imagenet-22k", 21843: "imagenet-22k"}.get(num_classes)
    if subset:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo(subset)
            return info.index_to_description
        except Exception:  # older timm without the metadata files
            pass
    return lambda i: f"class {i}"


def dataset_targets_for(dataset, num_classes: int, class_names: Sequence[str] | None, root: str):
    """Maps a dataset's folder labels to the model's class indices.

    - With stored ``class_names`` (a training checkpoint): folders are matched by name.
    - With a 1000-class model and ImageNet synset folder names (n01440764...): matched by synset, so
      a subset of ImageNet's classes validates correctly.
    - Otherwise folder ``i`` is class ``i``, and there must not be more folders than classes.

    Returns:
        A target_transform (or None when the identity fits).

    Raises:
        CLIError: when the folders cannot be matched to the model's classes.
    """
    folders = list(dataset.classes)
    if class_names:
        if folders == list(class_names):
            return None
        index = {c: i for i, c in enumerate(class_names)}
        unknown = [c for c in folders if c not in index]
        if unknown:
            raise CLIError(f"{root}: class folder(s) {', '.join(unknown[:5])} are not among the "
                           f"{len(class_names)} classes of the checkpoint ({', '.join(list(class_names)[:5])} ...)")
        table = [index[c] for c in folders]
        return table.__getitem__
    if num_classes == 1000 and len(folders) != 1000:
        try:
            from timm.data import ImageNetInfo

            synsets = ImageNetInfo().label_names()
        except Exception:
            synsets = []
        if synsets and all(c in synsets for c in folders):
            index = {s: i for i, s in enumerate(synsets)}
            return [index[c] for c in folders].__getitem__
    if len(folders) > num_classes:
        raise CLIError(f"{root} has {len(folders)} class folders but the model has {num_classes} classes; "
                       f"pass the matching --num-classes/--checkpoint")
    return None


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, amp: bool = False, amp_dtype: str = "bfloat16",
             channels_last: bool = False, progress: bool = True, desc: str = "validate",
             distributed: bool = False) -> dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy of ``model`` over ``loader``.

    Sums are reduced over all ranks when ``distributed`` (each rank must see a disjoint shard), so the
    result is exactly that of one process over the whole set.

    Returns:
        ``{"top1", "top5", "loss", "images", "seconds"}``.
    """
    from tqdm import tqdm

    model.eval()
    num_classes = None
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct1, correct5, count
    start = time.perf_counter()
    # disable=None: a bar on a terminal only, not in log files
    bar = tqdm(loader, desc=desc, unit="batch", disable=None if progress else True, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0, leave=False)
    for images, target in bar:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp, amp_dtype):
            output = model(images)
        output = output.float()
        num_classes = output.shape[1]
        k = min(5, num_classes)
        top = output.topk(k, dim=1).indices
        hits = top.eq(target[:, None])
        sums[0] += nn.functional.cross_entropy(output, target, reduction="sum").double()
        sums[1] += hits[:, :1].sum()
        sums[2] += hits.sum()
        sums[3] += target.numel()
        if progress:
            bar.set_postfix(top1=f"{100 * sums[1].item() / max(sums[3].item(), 1):.2f}", refresh=False)
    if distributed:
        torch.distributed.all_reduce(sums)
    seconds = time.perf_counter() - start
    loss, c1, c5, n = sums.tolist()
    if n == 0:
        raise CLIError("no images to evaluate")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "images": int(n), "seconds": seconds}


# ----------------------------------------------------------------------------------------- files
def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, flush + fsync, then ``os.replace``.

    A crash (even ``kill -9``) at any moment leaves either the previous file or the new one, complete.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_text(text: str, path: str) -> None:
    """Writes a text file atomically (temporary file, fsync, ``os.replace``)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

