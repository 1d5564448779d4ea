"""The MetaFormer model: stem, four stages of generic blocks, and a classifier head (or feature maps)."""

# No `from __future__ import annotations` here: torch.fx copies forward's annotations into the code of
# a traced GraphModule, and TorchScript cannot read them back as strings (FX + TorchScript).

import copy
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import kernels
from .blocks import MetaFormerStage
from .components import describe_arguments, resolve_arguments
from .contract import TimmContractMixin
from .inputs import check_input
from .layers import ClassifierHead, GroupNorm1, Mlp, Stem, trunc_normal_
from .limits import check_arguments, per_stage
from .mixers import Pooling
from .saving import SavedModelMixin
from .tracing import is_eager

__all__ = ["MetaFormer", "FeatureInfo"]

ModuleFactory = Callable[..., nn.Module]


class FeatureInfo(list):
    """Per-stage feature descriptions, a list of dicts ``{num_chs, reduction, module}`` as in timm."""

    def channels(self) -> List[int]:
        """Channels of each returned feature map."""
        return [f["num_chs"] for f in self]

    def reduction(self) -> List[int]:
        """Stride of each returned feature map relative to the input."""
        return [f["reduction"] for f in self]


class MetaFormer(TimmContractMixin, nn.Module, SavedModelMixin, library_name="metaformer",
                 tags=["image-classification", "metaformer"], license="apache-2.0"):
    """A MetaFormer: PoolFormer, its hybrids and the MetaFormer baselines are all instances.

    Build the released models with :func:`metaformer.create`. ``save_pretrained(dir)``,
    ``push_to_hub(repo)`` (huggingface_hub's ``ModelHubMixin``) and ``MetaFormer.from_pretrained(repo_or_dir)``
    round-trip any model whose components are built in.

    It has timm's model contract (``forward_features``, ``forward_head``, ``forward_intermediates``,
    ``reset_classifier``, ``group_matcher``...: :class:`~metaformer.contract.TimmContractMixin`) and
    works under ``torch.jit.script``, ``torch.fx.symbolic_trace``, ``torch.compile``, ``torch.export``
    and ONNX export. A scripted classifier returns a tensor, a scripted ``features_only`` backbone a
    list of tensors.

    Args:
        depths: Blocks per stage.
        dims: Channels per stage.
        token_mixers: A mixer class or partial (every stage) or one per stage.
        norm_layers: Block norm class (every stage) or one per stage.
        act_layer: Activation class of the block MLPs.
        mlp_ratios: MLP hidden width as a multiple of the channels, one value or one per stage.
        mlp_bias: Whether the block MLPs have biases.
        layer_scale_init_values: Initial layer scale (None: no layer scale), one value or one per stage.
        res_scale_init_values: Initial res scale (None: none), one value or one per stage.
        stem_norm: Optional norm after the stem convolution.
        downsample_norm: Optional norm before each downsampling convolution.
        head_norm: Norm class of the head.
        head_norm_first: Normalise the final map before average pooling (PoolFormer) instead of the
            pooled vector (baselines).
        mlp_head: Use the baselines' MLP classifier instead of a Linear.
        pos_embed_sizes: Per stage, None or the (H, W) of a learnt position embedding.
        num_classes: Classes of the classifier; 0 gives pooled features.
        in_chans: Input image channels.
        drop_rate: Dropout inside the block MLPs.
        head_dropout: Dropout in the head.
        global_pool: ``"avg"``, or ``""`` for no pooling (with ``num_classes=0``: ``forward`` returns
            the normalised final map).
        drop_path_rate: Stochastic depth: block k of N gets ``drop_path_rate * k / (N - 1)``.
        init: ``"v1"`` (PoolFormer: truncated normal on Linear layers and MLP convs) or ``"baselines"``
            (truncated normal on every Conv2d and Linear).
        features_only: Build a backbone returning the stage maps, each through its own norm.
        out_indices: Stages returned when ``features_only``.
        feature_norm: Norm class of the returned feature maps (default: the stage's block norm).
    """

    __constants__ = ["features_only"]  # a constant in TorchScript: forward compiles one branch
    __jit_unused_properties__ = ["default_cfg"]

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 6, 2),
        dims: Sequence[int] = (64, 128, 320, 512),
        token_mixers: Union[ModuleFactory, Sequence[ModuleFactory]] = Pooling,
        norm_layers: Union[ModuleFactory, Sequence[ModuleFactory]] = GroupNorm1,
        act_layer: ModuleFactory = nn.GELU,
        mlp_ratios: Union[float, Sequence[float]] = 4.0,
        mlp_bias: bool = True,
        layer_scale_init_values: Union[Optional[float], Sequence[Optional[float]]] = 1e-5,
        res_scale_init_values: Union[Optional[float], Sequence[Optional[float]]] = None,
        stem_norm: Optional[ModuleFactory] = None,
        downsample_norm: Optional[ModuleFactory] = None,
        head_norm: ModuleFactory = GroupNorm1,
        head_norm_first: bool = True,
        mlp_head: bool = False,
        pos_embed_sizes: Optional[Sequence[Optional[Tuple[int, int]]]] = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        head_dropout: float = 0.0,
        global_pool: str = "avg",
        drop_path_rate: float = 0.0,
        init: str = "v1",
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        feature_norm: Optional[ModuleFactory] = None,
    ):
        super().__init__()
        self.config: Dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_arguments(self.config)
        n = len(depths)
        self.pretrained_cfg: Dict[str, Any] = {}
        self.depths, self.dims = list(depths), list(dims)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = dims[-1]
        self.head_hidden_size = dims[-1]  # pre-logits width: the pooled features, MLP heads included (as timm)
        self.features_only = features_only

        mixers = per_stage("token_mixers", token_mixers, n)
        norms = per_stage("norm_layers", norm_layers, n)
        ratios = per_stage("mlp_ratios", mlp_ratios, n)
        layer_scales = per_stage("layer_scale_init_values", layer_scale_init_values, n)
        res_scales = per_stage("res_scale_init_values", res_scale_init_values, n)
        pos_sizes = per_stage("pos_embed_sizes", pos_embed_sizes, n)
        total = sum(depths)
        rates = [drop_path_rate * k / (total - 1) if total > 1 else 0.0 for k in range(total)]

        self.stem = Stem(in_chans, dims[0], stem_norm)
        stages = []
        for i in range(n):
            start = sum(depths[:i])
            stages.append(MetaFormerStage(
                dims[i - 1] if i > 0 else dims[0], dims[i], depths[i], downsample=i > 0,
                downsample_norm=downsample_norm, pos_embed_size=pos_sizes[i],
                drop_path_rates=rates[start:start + depths[i]],
                token_mixer=mixers[i], norm_layer=norms[i], act_layer=act_layer, mlp_ratio=ratios[i],
                mlp_bias=mlp_bias, drop=drop_rate, layer_scale_init_value=layer_scales[i],
                res_scale_init_value=res_scales[i],
            ))
        self.stages = nn.Sequential(*stages)

        if features_only:
            self.out_indices = tuple(out_indices)
            self.feature_norms = nn.ModuleList(
                (feature_norm or norms[i])(dims[i]) if i in out_indices else nn.Identity() for i in range(n))
            self.head = None
            self.feature_info = FeatureInfo(
                dict(num_chs=dims[i], reduction=2 ** (i + 2), module=f"stages.{i}") for i in out_indices)
        else:
            self.out_indices = tuple(range(n))
            self.feature_norms = None
            self.head = ClassifierHead(dims[-1], num_classes, head_norm, head_norm_first, mlp_head, head_dropout,
                                       global_pool)
            self.feature_info = FeatureInfo(
                dict(num_chs=dims[i], reduction=2 ** (i + 2), module=f"stages.{i}") for i in range(n))
        self._init_weights(init)

    # ------------------------------------------------------------------ init
    def _init_weights(self, init: str) -> None:
        def normal_(m: nn.Module) -> None:
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                normal_(m)
            elif isinstance(m, nn.Conv2d) and init == "baselines":
                normal_(m)
            elif isinstance(m, Mlp):  # v1: the MLP convs; stem and downsampling keep PyTorch's init
                normal_(m.fc1)
                normal_(m.fc2)

    # ------------------------------------------------------------- checking
    def check_input(self, x: torch.Tensor) -> None:
        """Raises a clear error if ``x`` is not a batch this model can take.

        Checks the type, rank, channel count and dtype of ``x``, and that every stage with a fixed
        spatial size (position embedding, spatial MLP, random mixing) gets exactly that size.
        """
        check_input(self, x)

    def fixed_input_size_hint(self) -> str:
        """A human-readable description of the input size(s) the model accepts."""
        size = self.pretrained_cfg.get("input_size")
        return f"{size[1]}x{size[2]}" if size else "its training-size"

    # --------------------------------------------------------- architecture
    def describe(self) -> Dict[str, Any]:
        """The constructor arguments as JSON-able data, built-in components by name (``config.json``'s core).

        Raises:
            metaformer.components.UnserializableComponentError: if a component is not built in.
        """
        return describe_arguments(self.config)

    @classmethod
    def from_config(cls, arguments: Dict[str, Any]) -> "MetaFormer":
        """Builds a model from :meth:`describe` data (or any MetaFormer arguments, components by name).

        Raises:
            TypeError / ValueError: for unknown arguments or values of the wrong type or range.
        """
        if not isinstance(arguments, dict):
            raise TypeError(f"a MetaFormer config must be a dict of constructor arguments, got "
                            f"{type(arguments).__name__}")
        unknown = sorted(set(arguments) - set(inspect.signature(cls.__init__).parameters) - {"self"})
        if unknown:
            raise TypeError(f"unknown MetaFormer argument(s) {', '.join(unknown)}")
        return cls(**resolve_arguments(arguments))

    # ---------------------------------------------------------- the surface
    # In TorchScript, `features_only` is a constant: `forward` compiles only its own branch, so a scripted
    # classifier returns a Tensor and a scripted backbone a List[Tensor] (forward has no return annotation
    # for that reason: TorchScript infers it per model).
    def forward(self, x: torch.Tensor):
        """Logits (B, num_classes), or with ``features_only`` the list of normalised stage maps."""
        if not torch.jit.is_scripting():  # alone in its `if`: TorchScript then compiles nothing below it
            if is_eager(x):
                self.check_input(x)
        if self.features_only:
            return self.forward_backbone(x)
        return self.forward_head(self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages: returns the last stage's (B, C, H/32, W/32) map (in the input's memory format)."""
        y = self.stages(self._stem_map(x))
        if not torch.jit.is_scripting():  # alone in its `if`: TorchScript then compiles nothing below it
            y = kernels.in_input_layout(y, x)
        return y

    def _stem_map(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's map, in the layout the blocks compute in (converted once: channels_last on CPU)."""
        y = self.stem(x)
        if not torch.jit.is_scripting():  # alone in its `if`: TorchScript then compiles nothing below it
            y = kernels.working_layout(y, self.stages)
        return y

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Head on a feature map: norm and pooling (in the model's order), then the classifier.

        With ``pre_logits`` the pooled, normalised features (``head_hidden_size`` wide).
        """
        if self.head is None:
            raise RuntimeError("this model was built with features_only=True and has no head")
        return self.head(x, pre_logits=pre_logits)

    def forward_backbone(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The stage maps of ``out_indices``, each through its feature norm (``features_only`` models)."""
        if self.feature_norms is None:
            raise RuntimeError("forward_backbone needs a model built with features_only=True; use "
                               "forward_intermediates(x) for the stage maps of a classifier")
        last = self.out_indices[-1]
        image = x
        x = self._stem_map(x)
        feats: List[torch.Tensor] = []
        for i, (stage, norm) in enumerate(zip(self.stages, self.feature_norms)):
            if i <= last:  # stages after the last returned map do not run
                x = stage(x)
                if i in self.out_indices:
                    feats.append(norm(x))
        if not torch.jit.is_scripting():  # alone in its `if`: TorchScript then compiles nothing below it
            feats = [kernels.in_input_layout(f, image) for f in feats]  # in the input's memory format
        return feats

    def clone_config(self) -> Dict[str, Any]:
        """A copy of the constructor arguments that rebuild this architecture."""
        return copy.copy(self.config)
