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


def make_digits_segmentation(root: str, n_train: int = 40, n_val: int = 16, canvas: int = 64, digit_size: int = 24,
                             per_image: int = 2, seed: int = 0, digits=tuple(range(10))) -> str:
    """Writes a segmentation set of real images: sklearn's digits pasted onto larger canvases.

    Layout (mmsegmentation's): ``root/images/{training,validation}/NNNN.png`` (RGB, tinted dark ink on a
    noisy light background) and ``root/annotations/{training,validation}/NNNN.png`` (mode ``L``): 0 for the
    background, ``1 + digits.index(digit)`` where the digit's ink is (``1 + len(digits)`` classes: 11 for
    all ten digits). Digits are upscaled (bicubic) to ``digit_size`` and pasted at random places; a later
    digit covers an earlier one. Only the digits of ``digits`` are drawn.

    Returns:
        ``root``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    digits = list(digits)
    pool = [i for i in range(len(data.target)) if data.target[i] in digits]
    rng = np.random.default_rng(seed)
    for split, count in (("training", n_train), ("validation", n_val)):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
        for n in range(count):
            rgb = rng.uniform(200, 255, size=(canvas, canvas, 3))
            mask = np.zeros((canvas, canvas), dtype=np.uint8)
            for _ in range(per_image):
                i = pool[rng.integers(len(pool))]
                ink = np.asarray(Image.fromarray((data.images[i] * 16).astype(np.uint8)).resize(
                    (digit_size, digit_size), Image.BICUBIC), dtype=np.float64) / 255
                y, x = rng.integers(0, canvas - digit_size + 1, size=2)
                tint = rng.uniform(0.0, 0.5, size=3)
                region = rgb[y:y + digit_size, x:x + digit_size]
                region[:] = region * (1 - ink[..., None]) + 255 * tint * ink[..., None]
                mask[y:y + digit_size, x:x + digit_size][ink > 0.35] = 1 + digits.index(data.target[i])
            Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB").save(
                os.path.join(root, "images", split, f"{n:04d}.png"))
            Image.fromarray(mask, "L").save(os.path.join(root, "annotations", split, f"{n:04d}.png"))
    return root
