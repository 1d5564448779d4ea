"""metaformer: MetaFormer building blocks, PoolFormer and the MetaFormer baselines, exact to the releases.

Quick start::

    import metaformer
    model = metaformer.create("poolformer_s24", pretrained=True).eval()
    print(metaformer.list_models())
"""

from .blocks import MetaFormerBlock, MetaFormerStage
from .detection import MetaFormerFPN, create_detector
from .factory import create
from .hub import PretrainedError
from .inference import optimize_for_inference
from .kernels import get_backend, set_backend
from .layers import GroupNorm1, LayerNorm, LayerNorm2d, Scale, SquaredReLU, StarReLU
from .mixers import Attention, Identity, Pooling, RandomMixing, SepConv, SpatialMLP, TokenMixer
from .model import FeatureInfo, MetaFormer
from .seg_data import SegEvalTransform, SegmentationFolder, SegTrainTransform
from .seg_metrics import SegmentationMetrics
from .segmentation import SemanticFPN, create_segmenter
from .timm_registry import register_timm_models
from .weights import CheckpointError, convert_state_dict, load_checkpoint, read_checkpoint
from .zoo import VARIANTS, get_variant, list_models

__version__ = "0.1.0"

__all__ = [
    "create",
    "list_models",
    "get_variant",
    "VARIANTS",
    "MetaFormer",
    "MetaFormerBlock",
    "MetaFormerStage",
    "FeatureInfo",
    "TokenMixer",
    "Pooling",
    "Identity",
    "Attention",
    "SpatialMLP",
    "SepConv",
    "RandomMixing",
    "GroupNorm1",
    "LayerNorm2d",
    "LayerNorm",
    "StarReLU",
    "SquaredReLU",
    "Scale",
    "set_backend",
    "optimize_for_inference",
    "get_backend",
    "load_checkpoint",
    "read_checkpoint",
    "convert_state_dict",
    "CheckpointError",
    "PretrainedError",
    "create_segmenter",
    "SemanticFPN",
    "create_detector",
    "MetaFormerFPN",
    "SegmentationFolder",
    "SegTrainTransform",
    "SegEvalTransform",
    "SegmentationMetrics",
    "register_timm_models",
    "__version__",
]
