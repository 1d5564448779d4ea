"""Fine-tuning a MetaFormer on your own images, stored as a folder of class sub-folders.

The folder follows torchvision's ``ImageFolder`` convention, either split::

    my_data/train/<class>/*.png    my_data/val/<class>/*.png

or not (``my_data/<class>/*.png``; 20% is then held out for validation). Without a folder, the script
writes scikit-learn's handwritten digits (upscaled, as RGB PNG files) to a temporary folder in that
layout and uses it, so it runs anywhere.

The model comes from ``metaformer.create(name, pretrained=..., num_classes=K)``: with ``--pretrained``
the released ImageNet weights are downloaded (or read from the cache) and the classifier is replaced
by a fresh one for the K classes; without it the model starts from scratch, which is what the quick
default run does. Preprocessing uses the model's ``pretrained_cfg`` (mean, std, interpolation).
``--save DIR`` writes the result with ``save_pretrained`` so that ``MetaFormer.from_pretrained(DIR)``
(or ``examples/cam.py --from-pretrained DIR``) can load it back; a folder that already holds a saved
model is refused before training unless ``--overwrite`` is given.

Run::

    python examples/finetune_folder.py                              # digits, from scratch, ~1 min
    python examples/finetune_folder.py /data/flowers --pretrained --image-size 224 --epochs 10
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms

import metaformer


def write_digits_folder(root: str, image_size: int = 32) -> str:
    """Writes scikit-learn's digits as RGB PNGs under ``root/{train,val}/<digit>/``; returns ``root``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.images))
    split = int(0.8 * len(order))
    for rank, i in enumerate(order):
        subset = "train" if rank < split else "val"
        folder = os.path.join(root, subset, str(data.target[i]))
        os.makedirs(folder, exist_ok=True)
        pixels = (data.images[i] * (255.0 / 16.0)).astype("uint8")
        image = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BILINEAR).convert("RGB")
        image.save(os.path.join(folder, f"{i}.png"))
    return root


def make_datasets(folder: str, model: torch.nn.Module, image_size: int, seed: int = 0):
    """Train and validation datasets from ``folder``, preprocessed as the model's weights expect."""
    cfg = model.pretrained_cfg
    interpolation = transforms.InterpolationMode(cfg.get("interpolation", "bicubic"))
    normalize = transforms.Normalize(cfg["mean"], cfg["std"])
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.7, 1.0), interpolation=interpolation),
        transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([
        transforms.Resize(image_size, interpolation=interpolation), transforms.CenterCrop(image_size),
        transforms.ToTensor(), normalize])
    if os.path.isdir(os.path.join(folder, "train")):
        train = datasets.ImageFolder(os.path.join(folder, "train"), train_tf)
        val = datasets.ImageFolder(os.path.join(folder, "val"), eval_tf)
        if val.classes != train.classes:
            raise ValueError(f"{folder}: train and val have different classes ({train.classes} vs {val.classes})")
        return train, val
    full = datasets.ImageFolder(folder)
    n_val = max(1, len(full) // 5)
    train_idx, val_idx = random_split(range(len(full)), [len(full) - n_val, n_val],
                                      generator=torch.Generator().manual_seed(seed))
    train = torch.utils.data.Subset(datasets.ImageFolder(folder, train_tf), list(train_idx))
    val = torch.utils.data.Subset(datasets.ImageFolder(folder, eval_tf), list(val_idx))
    train.classes = val.classes = full.classes
    return train, val


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy over a loader."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    return correct / max(total, 1)


def count_classes(folder: str) -> int:
    """Number of class sub-folders (looking into ``train/`` when the folder is split)."""
    root = os.path.join(folder, "train") if os.path.isdir(os.path.join(folder, "train")) else folder
    return len(datasets.folder.find_classes(root)[0])


def main(argv=None) -> float:
    """Fine-tunes on the folder and prints per-epoch validation accuracy; returns the final accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", help="ImageFolder root (default: digits written to a temp dir)")
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--pretrained", action="store_true", help="start from the released ImageNet weights")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--save", metavar="DIR", help="save the fine-tuned model with save_pretrained")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already saved in --save")
    args = parser.parse_args(argv)
    if args.save and not args.overwrite and any(os.path.lexists(os.path.join(args.save, name))
                                                for name in ("config.json", "model.safetensors")):
        parser.error(f"--save {args.save} already holds a saved model; pass --overwrite to replace it, "
                     "or choose another folder")
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or write_digits_folder(tmp, args.image_size)
        num_classes = count_classes(folder)
        model = metaformer.create(args.model, pretrained=args.pretrained, num_classes=num_classes,
                                  drop_path_rate=args.drop_path)
        train, val = make_datasets(folder, model, args.image_size)
        print(f"{args.model} ({'pretrained' if args.pretrained else 'from scratch'}): {len(train)} train / "
              f"{len(val)} val images, {num_classes} classes from {args.folder or 'digits (generated)'}")
        train_loader = DataLoader(train, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True)
        val_loader = DataLoader(val, 256, num_workers=args.workers)

        steps_per_epoch = len(train_loader) if args.max_steps is None else min(args.max_steps, len(train_loader))
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                       total_steps=max(1, args.epochs * steps_per_epoch))
        acc = 0.0
        for epoch in range(args.epochs):
            model.train()
            start = time.perf_counter()
            for step, (images, labels) in enumerate(train_loader):
                if step == steps_per_epoch:
                    break
                loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            acc = evaluate(model, val_loader)
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, val acc {acc:.1%} "
                  f"({time.perf_counter() - start:.1f}s)")

    if args.save:
        model.pretrained_cfg["input_size"] = (3, args.image_size, args.image_size)
        model.save_pretrained(args.save)
        print(f"saved to {args.save}; load with metaformer.MetaFormer.from_pretrained({args.save!r})")
    return acc


if __name__ == "__main__":
    main()
