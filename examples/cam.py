"""Grad-CAM on a MetaFormer: which regions of an image drive a class score.

Grad-CAM weighs the feature maps of one stage (by default the last one) by the spatial mean of the
class score's gradient with respect to them, sums over channels, keeps the positive part and
upsamples the result to the image. This script computes it with two hooks on
``model.stages[stage]`` and writes the map as a heatmap over the image to a PNG (``--output``; all or
nothing, and an existing file only with ``--overwrite``).

The image is ``--image`` if given, else one of scikit-learn's handwritten digits upscaled to the
input size (so the script needs no download). The weights come from ``--pretrained`` (ImageNet),
``--from-pretrained DIR`` (a model saved by ``save_pretrained``, e.g. by
``examples/finetune_folder.py --save DIR``) or, by default, a random initialisation: the map is then
well-formed but meaningless, which is enough to show the mechanics.

Run::

    python examples/cam.py --output cam.png
    python examples/cam.py --pretrained --image dog.jpg --output cam.png
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import metaformer
from metaformer.files import atomic_write


def grad_cam(model: metaformer.MetaFormer, x: torch.Tensor, target: int | None = None,
             stage: int = -1) -> tuple[torch.Tensor, int]:
    """Grad-CAM of one image.

    Args:
        model: A classifier (not ``features_only``).
        x: A ``(1, C, H, W)`` normalised image.
        target: Class to explain; default the predicted one.
        stage: Index of the stage whose output is explained.

    Returns:
        The ``(H, W)`` map scaled to [0, 1], and the explained class.
    """
    saved = {}
    layer = model.stages[stage]
    forward_hook = layer.register_forward_hook(lambda m, i, out: saved.update(act=out))
    backward_hook = layer.register_full_backward_hook(lambda m, gin, gout: saved.update(grad=gout[0]))
    try:
        model.eval()
        model.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)  # the full backward hook needs a graph through the input
        logits = model(x)
        target = int(logits.argmax(1)) if target is None else target
        logits[0, target].backward()
    finally:
        forward_hook.remove()
        backward_hook.remove()
    weights = saved["grad"].mean(dim=(2, 3), keepdim=True)          # (1, C, 1, 1)
    cam = F.relu((weights * saved["act"]).sum(dim=1, keepdim=True))  # (1, 1, h, w)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0].detach()
    cam = cam - cam.min()
    return cam / cam.max() if cam.max() > 0 else cam, target


def jet(values: np.ndarray) -> np.ndarray:
    """Maps values in [0, 1] to RGB uint8 colours with the classic 'jet' colormap."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def overlay(image: Image.Image, cam: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """Blends a heatmap of ``cam`` over ``image`` (resized to the map's size)."""
    heat = Image.fromarray(jet(cam.numpy()))
    return Image.blend(image.convert("RGB").resize(heat.size, Image.BICUBIC), heat, alpha)


def digit_image(size: int, index: int = 0) -> Image.Image:
    """One of scikit-learn's 8x8 digits, upscaled to ``size`` and converted to RGB."""
    from sklearn.datasets import load_digits

    pixels = (load_digits().images[index] * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")


def main(argv=None) -> str:
    """Computes the Grad-CAM of one image and writes the overlay; returns the output path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="poolformer_s12")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="released ImageNet weights")
    weights.add_argument("--from-pretrained", metavar="DIR", help="a folder or Hub repo written by save_pretrained")
    parser.add_argument("--image", help="image file (default: a digit from scikit-learn)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--stage", type=int, default=-1, help="stage whose output is explained")
    parser.add_argument("--target", type=int, default=None, help="class to explain (default: the predicted one)")
    parser.add_argument("--output", default="cam.png", help="the PNG (or other image file) to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    image_format = Image.registered_extensions().get(os.path.splitext(args.output)[1].lower())
    if image_format is None:
        parser.error(f"--output {args.output}: the name must end in an image extension such as .png or .jpg")
    if os.path.lexists(args.output) and not args.overwrite:
        parser.error(f"--output {args.output} already exists; pass --overwrite to replace it, or choose another name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        parser.error(f"--output {args.output}: its folder does not exist; create it first")
    torch.manual_seed(0)

    if args.from_pretrained:
        model = metaformer.MetaFormer.from_pretrained(args.from_pretrained)
    else:
        model = metaformer.create(args.model, pretrained=args.pretrained)
    cfg = model.pretrained_cfg
    image = Image.open(args.image).convert("RGB") if args.image else digit_image(args.image_size)
    image = image.resize((args.image_size, args.image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]

    cam, target = grad_cam(model, x.unsqueeze(0), args.target, args.stage)
    heatmap = overlay(image, cam)
    atomic_write(args.output, lambda tmp: heatmap.save(tmp, format=image_format))  # all or nothing
    print(f"Grad-CAM of class {target} on stage {args.stage % len(model.stages) + 1} of {len(model.stages)} "
          f"({model.dims[args.stage]} channels) "
          f"written to {args.output}")
    return args.output


if __name__ == "__main__":
    main()
