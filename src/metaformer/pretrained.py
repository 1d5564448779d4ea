"""Released weights as data: one typed record per ``name.tag`` and the one shape of ``model.pretrained_cfg``.

A :class:`PretrainedCfg` says where one set of released weights lives (a Hugging Face Hub repo or a
URL), in which key layout, and how images are preprocessed for it. :func:`make_pretrained_cfg` turns
a record (or none, for random weights) into the ``pretrained_cfg`` dict that models carry, that timm's
``resolve_data_config`` reads and that ``save_pretrained`` writes; the command line, the Hub code and
the docs all read that one dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

__all__ = ["PretrainedCfg", "IMAGENET_MEAN", "IMAGENET_STD", "make_pretrained_cfg", "normalize_pretrained_cfg"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedCfg:
    """Where one set of released weights lives and how to preprocess for it.

    Attributes:
        architecture: The model name.
        tag: The tag after the dot in ``name.tag``.
        layout: Key layout of the file: ``"timm"``, ``"original_v1"``, ``"original_baselines"`` or
            ``"transformers"``.
        hf_hub_id: Hugging Face Hub repo holding the file, or None.
        hf_filename: File in that repo.
        url: Direct URL (downloaded through torch.hub's cache), used when there is no Hub repo.
        num_classes: Classes of the released classifier.
        input_size: (C, H, W) the weights were trained/evaluated at.
        crop_pct: Center-crop fraction of the evaluation transform.
        interpolation: Resize interpolation of the evaluation transform.
        mean: Normalisation mean per channel.
        std: Normalisation standard deviation per channel.
    """

    architecture: str
    tag: str
    layout: str
    hf_hub_id: Optional[str] = None
    hf_filename: str = "model.safetensors"
    url: Optional[str] = None
    num_classes: int = 1000
    input_size: Tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    @property
    def key(self) -> str:
        """``name.tag``."""
        return f"{self.architecture}.{self.tag}"

    @property
    def location(self) -> str:
        """A human-readable address of the file."""
        return f"hf-hub:{self.hf_hub_id}/{self.hf_filename}" if self.hf_hub_id else str(self.url)


def make_pretrained_cfg(architecture: str, record: Optional[PretrainedCfg], *, crop_pct: float, in_chans: int,
                        num_classes: int, fixed_input_size: bool, classifier: str = "head.fc") -> Dict[str, Any]:
    """The ``pretrained_cfg`` dict of a built model.

    Args:
        architecture: The model name.
        record: The released weights the model was built for, or None (random weights: the
            variant's evaluation settings at 224x224).
        crop_pct: The variant's crop fraction, used without a record.
        in_chans: The model's input channels.
        num_classes: The model's classes.
        fixed_input_size: Whether the model takes only its training size.
        classifier: The final classifier layer (``"head.fc.fc2"`` for the MLP heads), as timm names it.
    """
    size = record.input_size if record is not None else (3, 224, 224)
    return {
        "architecture": architecture,
        "tag": record.tag if record is not None else None,
        "source": record.location if record is not None else None,
        "input_size": (in_chans,) + tuple(size[1:]),
        "pool_size": (size[1] // 32, size[2] // 32),  # the final map at input_size (timm's key)
        "crop_pct": record.crop_pct if record is not None else crop_pct,
        "interpolation": record.interpolation if record is not None else "bicubic",
        "mean": record.mean if record is not None else IMAGENET_MEAN,
        "std": record.std if record is not None else IMAGENET_STD,
        "num_classes": num_classes,
        "classifier": classifier,
        "first_conv": "stem.conv",
        "fixed_input_size": fixed_input_size,
    }


def normalize_pretrained_cfg(cfg: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """A ``pretrained_cfg`` read back from JSON: sequences as tuples, as :func:`make_pretrained_cfg` gives them."""
    cfg = dict(cfg or {})
    for key in ("input_size", "pool_size", "mean", "std"):
        if isinstance(cfg.get(key), list):
            cfg[key] = tuple(cfg[key])
    return cfg
