"""The random number generators of a training process: seeding, saving and restoring them exactly.

A resumed run draws the same augmentations, dropout masks and mixup pairs as an uninterrupted one only
if every generator it uses continues where it stopped: Python's ``random`` (timm's RandAugment),
NumPy's global generator (timm's mixup) and torch's CPU and CUDA generators.
"""

from __future__ import annotations

import random
import warnings
from typing import Any, Dict

import torch

__all__ = ["seed_all", "rng_state", "set_rng_state"]


def seed_all(seed: int) -> None:
    """Seeds Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device).

    Args:
        seed: The seed; NumPy takes it modulo 2**32.
    """
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """The state of every generator of this process, as plain containers and tensors.

    The result can be saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``.

    Returns:
        ``{"python", "numpy", "torch"}`` and ``"cuda"`` when CUDA has been initialised.
    """
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores the generators saved by :func:`rng_state`.

    A CUDA state saved with another number of devices cannot be restored: a ``RuntimeWarning`` says so
    and the CUDA generators keep their current state.
    """
    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:
            warnings.warn("could not restore the CUDA RNG state (different GPU count); continuing",
                          RuntimeWarning, stacklevel=2)
