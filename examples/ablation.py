"""Token-mixer ablation: the same network with different mixers, trained on the same real images.

The MetaFormer paper's central experiment swaps the token mixer of a fixed architecture and compares
accuracies. This script does that in miniature: it builds ``poolformer_s12`` once per mixer with
``metaformer.create(name, token_mixer=...)``, trains each one briefly on scikit-learn's handwritten
digits (8x8 images, upscaled), with the same seed, data order and optimiser, and prints the
validation accuracies side by side.

The mixers compared are the built-in ``"pooling"`` and ``"identity"`` and a custom mixer written
here in a few lines, ``ShiftMixer``, to show that any ``nn.Module`` class built as ``mixer(dim)`` that
maps ``(B, C, H, W)`` to the same shape plugs in. The default run is tiny (a few hundred images seen
per mixer), so the accuracies say more about the mechanics than about the mixers; raise ``--steps``
for a fairer comparison.

Run::

    python examples/ablation.py                      # pooling vs identity vs shift
    python examples/ablation.py --mixers pooling identity --steps 100
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import metaformer


class ShiftMixer(nn.Module):
    """A parameter-free custom mixer: each position takes its neighbours' values by shifting channels.

    A quarter of the channels moves one step in each of the four directions, like the shift operation
    of ShiftViT; ``- x`` removes the input, as PoolFormer's pooling mixer does, because the block's
    residual connection adds it back.
    """

    def __init__(self, dim: int, **kwargs):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 4
        up, down, left, right, rest = torch.split(x, [c, c, c, c, x.shape[1] - 4 * c], dim=1)
        shifted = torch.cat([torch.roll(up, 1, 2), torch.roll(down, -1, 2), torch.roll(left, 1, 3),
                             torch.roll(right, -1, 3), rest], dim=1)
        return shifted - x


MIXERS = {"pooling": "pooling", "identity": "identity", "shift": ShiftMixer}


def load_digits(image_size: int, seed: int = 0):
    """scikit-learn's 1,797 digits as normalised ``(N, 1, S, S)`` tensors, split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def train_one(mixer, args, train, val) -> dict:
    """Builds ``args.model`` with ``mixer`` in every stage, trains it, and returns its results."""
    torch.manual_seed(args.seed)  # same initialisation of the shared parts, same data order
    model = metaformer.create(args.model, token_mixer=mixer, num_classes=10, in_chans=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=max(args.steps, 1))
    x, y = train
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(len(x), (args.batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return dict(acc=evaluate(model, *val), loss=loss.item() if args.steps else float("nan"), params=params,
                seconds=seconds)


def main(argv=None) -> dict:
    """Trains one model per mixer and prints a comparison table; returns ``{mixer: results}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="poolformer_s12", help="registered model name")
    parser.add_argument("--mixers", nargs="+", default=["pooling", "identity", "shift"], choices=sorted(MIXERS))
    parser.add_argument("--steps", type=int, default=30, help="optimisation steps per mixer")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32, help="digits are upscaled from 8x8 to this")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, val = load_digits(args.image_size, args.seed)
    print(f"{args.model} on digits {args.image_size}x{args.image_size}: {len(train[0])} train / "
          f"{len(val[0])} val images, {args.steps} steps of {args.batch_size}")
    results = {}
    for name in args.mixers:
        results[name] = train_one(MIXERS[name], args, train, val)
        print(f"  trained {name:<9} in {results[name]['seconds']:.1f}s")

    print(f"\n{'mixer':<10} {'params':>12} {'final loss':>11} {'val acc':>8}")
    for name, r in results.items():
        print(f"{name:<10} {r['params']:>12,} {r['loss']:>11.3f} {r['acc']:>8.1%}")
    return results


if __name__ == "__main__":
    main()
