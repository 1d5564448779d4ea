"""Clean-room reference implementations of the two original model releases.

Written from the PoolFormer v1 release (``original_v1``: arXiv 2111.11418,
github.com/sail-sg/poolformer) and the MetaFormer baselines release (``original_baselines``:
arXiv 2210.13452, github.com/sail-sg/metaformer).
They reproduce the original checkpoints' key layout and forward semantics (eval mode) and serve
as the "original side" of parity tests. They do not import the ``metaformer`` package.
"""

import torch
from torch import nn

__all__ = ["save_original"]


def save_original(model: nn.Module, path) -> None:
    """Save ``model.state_dict()`` as a plain state dict (like the original release files)."""
    torch.save(model.state_dict(), path)
