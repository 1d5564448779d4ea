"""Small real image data sets for end-to-end tests: scikit-learn's handwritten digits as an ImageFolder."""

from __future__ import annotations

import os

import numpy as np

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def make_digits_imagefolder(root: str, n_train: int = 400, n_val: int = 200, size: int = 32, seed: int = 0) -> str:
    """Writes sklearn's 8x8 digits as RGB PNGs: ``root/train/<name>/*.png`` and ``root/val/<name>/*.png``.

    Class folders are named by the digit's English name (``zero`` ... ``nine``, see :data:`DIGIT_NAMES`),
    so that printed labels are distinguishable from class indices.

    The images are shuffled with ``seed`` and split; each is upscaled to ``size`` x ``size`` (bicubic)
    and inverted to dark ink on white, with a per-image random tint so that the three channels differ.

    Args:
        root: Folder to create (existing files are kept).
        n_train: Training images (of 1797).
        n_val: Validation images.
        size: Side of the written images.
        seed: Shuffling seed.

    Returns:
        ``root``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    if n_train + n_val > len(images):
        raise ValueError(f"only {len(images)} digits, asked for {n_train} + {n_val}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    for split, idx in (("train", order[:n_train]), ("val", order[n_train:n_train + n_val])):
        for i in idx:
            folder = os.path.join(root, split, DIGIT_NAMES[labels[i]])
            os.makedirs(folder, exist_ok=True)
            ink = images[i] / 16.0  # 0..1
            tint = rng.uniform(0.0, 0.6, size=3)
            rgb = 255 * (1 - ink[..., None] * (1 - tint))  # dark, tinted ink on white
            img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").resize((size, size), Image.BICUBIC)
            img.save(os.path.join(folder, f"{i:04d}.png"))
    return root
