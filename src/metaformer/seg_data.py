"""Semantic segmentation data: a folder of images and masks, and the release's ADE20K transforms.

The release's recipe (sail-sg/poolformer ``segmentation/configs/_base_/datasets/ade20k.py``, mmsegmentation
0.19): for training, resize by a random ratio in [0.5, 2] of the scale (2048, 512) keeping the aspect
ratio, a random 512x512 crop in which no class covers more than 75% of the labelled pixels (10 tries),
a horizontal flip with probability 0.5, mmsegmentation's photometric distortion, ImageNet normalisation,
and padding to 512x512 (image 0, mask 255); for evaluation, resize to the scale (2048, 512) keeping the
aspect ratio, then to the next multiple of 32 (the release's ``AlignResize``), with the metrics computed on
the original masks (logits resized back). Images and masks are tensors here; resizing uses bilinear
(images) and nearest (masks) interpolation.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .zoo import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["SegmentationFolder", "SegTrainTransform", "SegEvalTransform", "photometric_distortion",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
Pair = Tuple[torch.Tensor, torch.Tensor]


def _layout(root: str, split: Optional[str]) -> Tuple[str, str]:
    tried = ([("images", split), ("annotations", split)], [(split, "images"), (split, "masks")]) if split else \
        ([("images",), ("masks",)], [("images",), ("annotations",)])
    for image_parts, mask_parts in tried:
        images, masks = os.path.join(root, *image_parts), os.path.join(root, *mask_parts)
        if os.path.isdir(images) and os.path.isdir(masks):
            return images, masks
    listed = " or ".join(f"{os.path.join(root, *i)} + {os.path.join(root, *m)}" for i, m in tried)
    raise FileNotFoundError(f"no segmentation data in {root}: expected image and mask folders {listed}")


class SegmentationFolder(Dataset):
    """Images and single-channel class-index masks, paired by relative path and stem.

    The folders are found under ``root``: ``images/SPLIT`` and ``annotations/SPLIT`` (mmsegmentation's
    and ADE20K's layout) or ``SPLIT/images`` and ``SPLIT/masks``; without a split, ``images`` and
    ``masks`` (or ``annotations``). Image ``images/.../x.jpg`` has mask ``.../x.png``; a mask holds class
    indices (PNG mode ``L``, ``P`` or ``I``), 255 for pixels to ignore.

    Args:
        root: The data folder.
        split: Sub-folder name (``"training"``, ``"validation"``, ``"train"``...), or None.
        transform: ``transform(image, mask) -> (image, mask)`` on tensors (image (3, H, W) float in
            [0, 255], mask (H, W) int64); default: ImageNet normalisation only.
        reduce_zero_label: Label 0 means "other" and is ignored, labels 1..K become 0..K-1 (ADE20K).
        ignore_index: The label of ignored pixels.

    Raises:
        FileNotFoundError: if the folders are missing or hold no images.
        ValueError: if images have no mask (the message names some).
    """

    def __init__(self, root: str, split: Optional[str] = None, transform: Optional[Callable[..., Pair]] = None,
                 reduce_zero_label: bool = False, ignore_index: int = 255):
        self.image_dir, self.mask_dir = _layout(os.fspath(root), split)
        self.transform, self.reduce_zero_label, self.ignore_index = transform, reduce_zero_label, ignore_index
        self.samples: List[Tuple[str, str]] = []
        missing = []
        for folder, _, files in sorted(os.walk(self.image_dir, followlinks=True)):
            for f in sorted(files):
                if not f.lower().endswith(IMAGE_EXTENSIONS) or f.startswith("."):
                    continue
                rel = os.path.relpath(os.path.join(folder, f), self.image_dir)
                mask = os.path.join(self.mask_dir, os.path.splitext(rel)[0] + ".png")
                (self.samples.append((os.path.join(folder, f), mask)) if os.path.isfile(mask)
                 else missing.append(mask))
        if missing:
            raise ValueError(f"{len(missing)} image(s) in {self.image_dir} have no mask, e.g. expected "
                             f"{', '.join(missing[:3])}")
        if not self.samples:
            raise FileNotFoundError(f"no images in {self.image_dir} (supported: {', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> Pair:
        """The raw pair: image (3, H, W) float32 in [0, 255] and mask (H, W) int64 (labels reduced)."""
        from PIL import Image

        image_path, mask_path = self.samples[index]
        try:
            with Image.open(image_path) as img:
                image = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)
            with Image.open(mask_path) as m:
                if m.mode not in ("L", "P", "I", "I;16"):
                    raise ValueError(f"mask {mask_path} has mode {m.mode}: masks must be single-channel class "
                                     f"indices (PNG mode L or P)")
                mask = torch.from_numpy(np.asarray(m, dtype=np.int64).copy())
        except (OSError, SyntaxError) as e:
            raise OSError(f"cannot read {image_path} or its mask: {type(e).__name__}: {e}") from None
        if mask.shape != image.shape[1:]:
            raise ValueError(f"mask {mask_path} is {tuple(mask.shape)} but its image is {tuple(image.shape[1:])}")
        if self.reduce_zero_label:
            mask = torch.where(mask == 0, self.ignore_index, mask - 1)
            mask[mask == self.ignore_index - 1] = self.ignore_index
        return image, mask

    def __getitem__(self, index: int) -> Pair:
        image, mask = self.read(index)
        if self.transform is None:
            return _normalize(image, IMAGENET_MEAN, IMAGENET_STD), mask
        return self.transform(image, mask)


def _normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1) * 255
    std_t = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1) * 255
    return (image - mean_t) / std_t


def _rescaled_size(h: int, w: int, scale: Sequence[int]) -> Tuple[int, int]:
    """mmcv's ``imrescale`` size: as large as fits in ``scale`` (long side, short side), keeping the ratio."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resize(image: torch.Tensor, mask: Optional[torch.Tensor], size: Tuple[int, int]):
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def scale_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiplies the HSV saturation of a (3, H, W) RGB image by ``factor`` (clipped to 1), keeping hue and
    value: each channel ``c`` becomes ``V - (V - c) * min(factor, V / (V - min))`` with ``V`` the maximum."""
    v, m = image.max(0).values, image.min(0).values
    limit = torch.where(v > m, v / (v - m).clamp(min=1e-6), torch.zeros_like(v))
    return v - (v - image) * torch.minimum(torch.full_like(v, factor), limit)


def photometric_distortion(image: torch.Tensor, brightness: float = 32, contrast: Tuple[float, float] = (0.5, 1.5),
                           saturation: Tuple[float, float] = (0.5, 1.5), hue: float = 18) -> torch.Tensor:
    """mmsegmentation's ``PhotoMetricDistortion`` on a (3, H, W) RGB image in [0, 255].

    Each step happens with probability 0.5: brightness shift in [-32, 32]; contrast factor in [0.5, 1.5]
    (before or after the colour steps, at random); saturation factor in [0.5, 1.5] and hue shift in
    [-18, 18] degrees of a 180-degree circle (OpenCV's 8-bit HSV), both in HSV space. Values are clipped to
    [0, 255] after each step.
    """
    from torchvision.transforms.v2.functional import adjust_hue

    def coin() -> bool:
        return bool(torch.randint(2, ()).item())

    if coin():
        image = (image + _uniform(-brightness, brightness)).clamp(0, 255)
    contrast_first = coin()
    if contrast_first and coin():
        image = (image * _uniform(*contrast)).clamp(0, 255)
    if coin():
        image = scale_saturation(image, _uniform(*saturation))
    if coin():
        shift = int(torch.randint(-int(hue), int(hue) + 1, ()).item())
        image = adjust_hue(image / 255, shift / 180) * 255
    if not contrast_first and coin():
        image = (image * _uniform(*contrast)).clamp(0, 255)
    return image


class SegTrainTransform:
    """The release's training transform (mmsegmentation's ADE20K pipeline) on an image and its mask.

    Args:
        crop_size: Side of the square crop (release: 512), or (height, width).
        scale: (long side, short side) the image is resized to fit before the random ratio (release:
            (2048, 512)).
        ratio_range: Range of the random resize ratio (release: (0.5, 2.0)).
        cat_max_ratio: Most a single class may cover of a crop's labelled pixels (10 tries; 1 disables).
        flip_prob: Probability of a horizontal flip.
        photometric: Apply :func:`photometric_distortion`.
        mean: Normalisation mean, in [0, 1] units.
        std: Normalisation std, in [0, 1] units.
        ignore_index: Label of ignored (and padded) pixels.
    """

    def __init__(self, crop_size: Union[int, Tuple[int, int]] = 512, scale: Tuple[int, int] = (2048, 512),
                 ratio_range: Tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, ignore_index: int = 255):
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.scale, self.ratio_range, self.cat_max_ratio = scale, ratio_range, cat_max_ratio
        self.flip_prob, self.photometric, self.mean, self.std = flip_prob, photometric, mean, std
        self.ignore_index = ignore_index

    def _crop_box(self, mask: torch.Tensor) -> Tuple[int, int, int, int]:
        h, w = mask.shape
        ch, cw = min(self.crop[0], h), min(self.crop[1], w)
        box = (0, 0, ch, cw)
        for _ in range(10 if self.cat_max_ratio < 1 else 1):
            top, left = int(torch.randint(h - ch + 1, ()).item()), int(torch.randint(w - cw + 1, ()).item())
            box = (top, left, ch, cw)
            labels = mask[top:top + ch, left:left + cw]
            _, counts = labels[labels != self.ignore_index].unique(return_counts=True)
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
        return box

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Pair:
        ratio = _uniform(*self.ratio_range)
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        image, mask = _resize(image, mask, _rescaled_size(*mask.shape, scale))
        top, left, ch, cw = self._crop_box(mask)
        image, mask = image[:, top:top + ch, left:left + cw], mask[top:top + ch, left:left + cw]
        if torch.rand(()).item() < self.flip_prob:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.photometric:
            image = photometric_distortion(image)
        image = _normalize(image, self.mean, self.std)
        pad_h, pad_w = self.crop[0] - image.shape[1], self.crop[1] - image.shape[2]
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image.contiguous(), mask.contiguous()


class SegEvalTransform:
    """The release's evaluation transform: resize the image to fit ``scale`` (keeping its ratio), then to
    the next multiple of ``size_divisor`` (``AlignResize``), and normalise; the mask keeps its size.

    Resize the logits to the mask's size (bilinear) before the argmax, as mmsegmentation does.

    Args:
        scale: (long side, short side) to fit (release: (2048, 512)).
        size_divisor: The image sides become multiples of it (release: 32).
        mean: Normalisation mean, in [0, 1] units.
        std: Normalisation std, in [0, 1] units.
    """

    def __init__(self, scale: Tuple[int, int] = (2048, 512), size_divisor: int = 32,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.scale, self.size_divisor, self.mean, self.std = scale, size_divisor, mean, std

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Pair:
        h, w = _rescaled_size(*image.shape[1:], self.scale)
        d = self.size_divisor
        image, _ = _resize(image, None, (-(-h // d) * d, -(-w // d) * d))
        return _normalize(image, self.mean, self.std), mask
