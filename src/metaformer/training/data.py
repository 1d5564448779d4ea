"""Image folders, class labels and the evaluation preprocessing of training, validation and prediction."""

from __future__ import annotations

import collections
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

__all__ = ["IMG_EXTENSIONS", "DataError", "data_config", "eval_transform", "load_image", "find_images", "image_folder",
           "split_folders", "class_label_fn", "dataset_targets_for"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CONFIG_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


class DataError(ValueError):
    """A data folder or image that cannot be used; the message says what was expected."""


def data_config(model: nn.Module, base: Optional[Dict[str, Any]] = None, *, img_size: Optional[int] = None,
                crop_pct: Optional[float] = None, interpolation: Optional[str] = None,
                mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """The evaluation preprocessing of a model: its ``pretrained_cfg`` (or ``base``), then the overrides.

    Args:
        model: The model, whose ``pretrained_cfg`` timm's ``resolve_data_config`` reads.
        base: A stored data config (that of a training checkpoint) to start from instead.
        img_size: Square input resolution.
        crop_pct: Center-crop fraction: resize the short side to ``img_size / crop_pct``, crop ``img_size``.
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.

    Returns:
        A dict with ``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std``.
    """
    from timm.data import resolve_data_config

    cfg = dict(base) if base else resolve_data_config({}, model=model)
    cfg.setdefault("crop_mode", "center")
    if img_size:
        cfg["input_size"] = (cfg["input_size"][0], img_size, img_size)
    if crop_pct is not None:
        cfg["crop_pct"] = crop_pct
    if interpolation:
        cfg["interpolation"] = interpolation
    if mean:
        cfg["mean"] = tuple(mean)
    if std:
        cfg["std"] = tuple(std)
    cfg["input_size"] = tuple(cfg["input_size"])
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return {k: cfg[k] for k in _CONFIG_KEYS}


def eval_transform(cfg: Dict[str, Any]):
    """timm's evaluation transform (resize, center crop, normalise) for a :func:`data_config`."""
    from timm.data import create_transform

    return create_transform(**cfg, is_training=False)


def load_image(path: str):
    """Reads an image file as an RGB ``PIL.Image``.

    An image of more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (Pillow's guard against decompression
    bombs: a small file that decodes to gigabytes) is refused, not only warned about; set the
    environment variable ``METAFORMER_MAX_IMAGE_PIXELS`` to raise the limit for genuine large images.

    Raises:
        OSError: naming the file when it is not an image, a truncated or unreadable one, or too large.
    """
    from PIL import Image, UnidentifiedImageError

    limit = os.environ.get("METAFORMER_MAX_IMAGE_PIXELS")
    if limit:
        Image.MAX_IMAGE_PIXELS = int(limit)  # Pillow's documented setting
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as f:
                img = Image.open(f)
                return img.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read image {path}: {e} If the image is genuine, raise the limit with the "
                      f"environment variable METAFORMER_MAX_IMAGE_PIXELS") from None
    except UnidentifiedImageError:
        raise OSError(f"cannot read image {path}: not an image, or a corrupt one") from None
    except Exception as e:  # truncated, unreadable
        raise OSError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _hidden(name: str) -> bool:
    return name.startswith(".")  # .ipynb_checkpoints, .DS_Store, macOS ._ files, .git


def find_images(folder: str, skip: Sequence[str] = ()) -> List[str]:
    """The image files under ``folder``, in the order torchvision's ``ImageFolder`` lists them.

    Symbolic links are followed, but each real directory is visited once (a link back to a parent
    adds nothing), and hidden files and folders (``.ipynb_checkpoints``...) are skipped.

    Args:
        folder: The folder to search.
        skip: Folders whose contents never count (e.g. the dataset root, for the walk of a class folder).

    Returns:
        The paths of the files with an image extension (:data:`IMG_EXTENSIONS`), sorted by folder then name.
    """
    seen = set()
    for path in (folder, *skip):
        try:
            st = os.stat(path)
            seen.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(dirs):
            try:
                st = os.stat(os.path.join(root, d))
            except OSError:  # a dangling link, or a link loop
                continue
            if not _hidden(d) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                kept.append(d)
        dirs[:] = kept
        found.append((root, sorted(f for f in files if not _hidden(f) and f.lower().endswith(IMG_EXTENSIONS))))
    return [os.path.join(root, f) for root, names in sorted(found) for f in names]


def _image_folder_class():
    from torchvision.datasets import ImageFolder

    class ImageFolderDataset(ImageFolder):
        """torchvision's ImageFolder without hidden class folders, each real directory listed once."""

        def find_classes(self, directory):
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not _hidden(e.name))
            return classes, {c: i for i, c in enumerate(classes)}

        @staticmethod
        def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, **kwargs):
            return [(path, class_to_idx[c]) for c in sorted(class_to_idx)
                    for path in find_images(os.path.join(directory, c), skip=(directory,))]

    return ImageFolderDataset


def image_folder(root: str, transform: Optional[Callable] = None, what: str = "data"):
    """A torchvision ``ImageFolder`` over ``root`` (``ROOT/CLASS/IMAGE``), checked first.

    Hidden folders (``.ipynb_checkpoints``...) are not classes and hidden files are not images; symbolic
    links are followed, each real directory once (see :func:`find_images`).

    Args:
        root: The folder.
        transform: Applied to each image.
        what: What the folder is, for the error messages (``"training data"``).

    Raises:
        DataError: if ``root`` is missing, is not a folder, has no class folders, or a class folder
            has no images.
    """
    if not os.path.exists(root):
        raise DataError(f"{what} folder not found: {root}")
    if not os.path.isdir(root):
        raise DataError(f"{what} is not a folder: {root} (expected an ImageFolder: ROOT/CLASS/IMAGE)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _hidden(e.name))
    if not classes:
        raise DataError(f"{what} folder {root} has no class sub-folders (expected ROOT/CLASS/IMAGE)")
    dataset = _image_folder_class()(root, transform=transform, loader=load_image)
    counts = collections.Counter(dataset.targets)
    empty = [c for i, c in enumerate(dataset.classes) if not counts[i]]
    if empty:
        raise DataError(f"class folder(s) with no images in {root}: {', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''} (supported: {', '.join(IMG_EXTENSIONS)})")
    return dataset


def split_folders(data: str, train_split: str = "train", val_split: str = "val",
                  val: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """The training and validation folders of a dataset root.

    Args:
        data: The root: ``DATA/train`` + ``DATA/val``, or ``DATA/CLASS/IMAGE``.
        train_split: Training sub-folder name.
        val_split: Validation sub-folder name.
        val: A validation folder elsewhere (overrides ``val_split``).

    Returns:
        ``(train_root, val_root)``: ``DATA/train_split`` when it exists, else ``DATA``; ``val``, or
        ``DATA/val_split`` next to an existing training split, else None.

    Raises:
        DataError: if ``data`` does not exist.
    """
    if not os.path.exists(data):
        raise DataError(f"data folder not found: {data}")
    train_root = os.path.join(data, train_split)
    has_train = os.path.isdir(train_root)
    if not has_train:
        train_root = data
    val_root = None
    if val:
        val_root = val
    elif has_train and os.path.isdir(os.path.join(data, val_split)):
        val_root = os.path.join(data, val_split)
    return train_root, val_root


def class_label_fn(num_classes: int, class_names: Optional[Sequence[str]] = None) -> Callable[[int], str]:
    """A function from class index to a readable label.

    Uses ``class_names`` (those stored by a training run) when there is one per class, else timm's
    ImageNet-1k / 22k descriptions when the classifier has 1000 / 21841 outputs, else ``"class <i>"``.
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


def dataset_targets_for(dataset, num_classes: int, class_names: Optional[Sequence[str]], root: str):
    """Maps a dataset's folder labels to the model's class indices.

    - With stored ``class_names`` (a training checkpoint): folders are matched by name.
    - With a 1000-class model and ImageNet synset folder names (n01440764...): matched by synset, so
      a subset of ImageNet's classes validates correctly.
    - Otherwise folder ``i`` is class ``i``, and there must not be more folders than classes.

    Returns:
        A ``target_transform`` for the dataset, or None when the identity fits.

    Raises:
        DataError: when the folders cannot be matched to the model's classes.
    """
    folders = list(dataset.classes)
    if class_names:
        if folders == list(class_names):
            return None
        index = {c: i for i, c in enumerate(class_names)}
        unknown = [c for c in folders if c not in index]
        if unknown:
            raise DataError(f"{root}: class folder(s) {', '.join(unknown[:5])} are not among the "
                            f"{len(class_names)} classes of the checkpoint ({', '.join(list(class_names)[:5])} ...)")
        return [index[c] for c in folders].__getitem__
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
        raise DataError(f"{root} has {len(folders)} class folders but the model has {num_classes} classes; "
                        f"pass the matching --num-classes/--checkpoint")
    return None
