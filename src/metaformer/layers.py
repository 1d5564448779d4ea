"""Building blocks shared by every MetaFormer: norms, activations, scales, MLPs, stem and heads.

Every layer works on NCHW tensors ``(B, C, H, W)``; the vector norms and heads work on pooled
``(B, C)`` features.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .tracing import group_norm

__all__ = [
    "GroupNorm1",
    "LayerNorm2d",
    "LayerNorm",
    "StarReLU",
    "SquaredReLU",
    "Scale",
    "Mlp",
    "Stem",
    "Downsample",
    "MlpHead",
    "ClassifierHead",
    "DropPath",
    "trunc_normal_",
]


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    """Fills ``tensor`` in place with the normal distribution ``N(mean, std**2)`` cut to ``[a, b]``; returns it.

    The release's initialiser (timm's ``trunc_normal_``), drawn the same way so that a seeded model gets the
    release's weights: one uniform draw between the normal CDF's values at ``a`` and ``b``, mapped back by
    the inverse CDF (``erfinv``), scaled, shifted and clamped. PyTorch's ``nn.init.trunc_normal_`` draws
    differently (rejection sampling, since 2.14), which gives other weights from the same seed.

    Args:
        tensor: The tensor to fill.
        mean: Mean of the normal distribution.
        std: Standard deviation of the normal distribution.
        a: Lower cut-off (an absolute value, not in units of ``std``).
        b: Upper cut-off.
    """

    def cdf(v: float) -> float:  # the standard normal CDF at (v - mean) / std
        return (1.0 + math.erf((v - mean) / std / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        tensor.uniform_(2 * cdf(a) - 1, 2 * cdf(b) - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        tensor.add_(mean)
        tensor.clamp_(min=a, max=b)
    return tensor


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample of the batch is dropped (zeroed) with probability
    ``drop_prob``, and the kept ones are scaled by ``1 / (1 - drop_prob)`` (with ``scale_by_keep``).

    The module the original release takes from timm (``timm.layers.DropPath``), with the same arguments and
    the same draw from the random stream: one Bernoulli tensor of shape ``(B, 1, ..., 1)`` per call, so a
    seeded run drops the same samples as the release. Written here so that building a model does not need
    timm imported (about 2.5 s of a command's start).

    Args:
        drop_prob: Probability of dropping a sample, in [0, 1].
        scale_by_keep: Divide the kept samples by the keep probability (the release does).
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.sample_factor(x)
        return x if factor is None else x * factor

    def sample_factor(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The factor this module multiplies ``x`` by, shape ``(B, 1, ..., 1)``: each sample's keep mask,
        divided by the keep probability (with ``scale_by_keep``); None where the module is the identity
        (evaluation, ``drop_prob`` 0). One draw from the random stream per call, in ``x``'s dtype; the fused
        paths (:mod:`metaformer.kernels`) call it to drop the same samples as this module."""
        if self.drop_prob == 0.0 or not self.training:
            return None
        keep = 1.0 - self.drop_prob
        shape: List[int] = [x.shape[0]] + [1] * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class _ChannelAffineNorm(nn.Module):
    """A norm of an NCHW tensor with a per-channel weight and an optional per-channel bias."""

    def __init__(self, num_channels: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, bias={self.bias is not None}"


class GroupNorm1(_ChannelAffineNorm):
    """GroupNorm with a single group: normalises over (C, H, W) of each sample.

    This is PoolFormer's norm (``nn.GroupNorm(1, C)``, eps 1e-5, with bias) and, with ``bias=False``
    and ``eps=1e-6``, the "modified LayerNorm" of the MetaFormer baselines.

    Args:
        num_channels: Number of channels C.
        eps: Added to the variance for numerical stability.
        bias: Whether to learn a per-channel bias (the per-channel weight is always learnt).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.group_norm, avoiding a crash of PyTorch < 2.14 (tracing.group_norm), also in TorchScript
        return group_norm(x, 1, self.weight, self.bias, self.eps)


class LayerNorm2d(_ChannelAffineNorm):
    """LayerNorm over the channel axis alone, at every spatial position of an NCHW tensor.

    Args:
        num_channels: Number of channels C.
        eps: Added to the variance for numerical stability.
        bias: Whether to learn a per-channel bias.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (self.num_channels,), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last axis, with an optional bias; used on pooled (B, C) features.

    Args:
        num_features: Size of the last axis.
        eps: Added to the variance for numerical stability.
        bias: Whether to learn a bias.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(num_features, eps=eps, bias=bias)


class StarReLU(nn.Module):
    """StarReLU: ``s * relu(x) ** 2 + b`` with learnable scalars s (init 1) and b (init 0).

    Args:
        scale_value: Initial value of s.
        bias_value: Initial value of b.
        inplace: Accepted for signature compatibility with ``nn.ReLU``; ignored.
    """

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0, inplace: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), float(scale_value)))
        self.bias = nn.Parameter(torch.full((1,), float(bias_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.relu(x) ** 2 + self.bias


class SquaredReLU(nn.Module):
    """Squared ReLU: ``relu(x) ** 2`` (no parameters).

    Args:
        inplace: Accepted for signature compatibility with ``nn.ReLU``; ignored.
    """

    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.square(torch.relu(x))


class Scale(nn.Module):
    """A learnable per-channel scale of an NCHW tensor (layer scale or res scale).

    Args:
        dim: Number of channels.
        init_value: Initial value of every entry.
    """

    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class Mlp(nn.Module):
    """The channel MLP of a MetaFormer block, as two 1x1 convolutions on an NCHW tensor.

    Args:
        dim: Input and output channels.
        hidden_dim: Hidden channels (``mlp_ratio * dim``).
        act_layer: Activation class (called with no arguments).
        bias: Whether the two convolutions have a bias (PoolFormer: yes; baselines: no).
        drop: Dropout after the activation and after the second convolution.
    """

    def __init__(self, dim: int, hidden_dim: int, act_layer=nn.GELU, bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))


class Stem(nn.Module):
    """The patch embedding: Conv2d(in_chans, dim, 7, stride 4, padding 2), then an optional norm.

    Args:
        in_chans: Input image channels.
        dim: Output channels.
        norm_layer: Optional norm class built as ``norm_layer(dim)``.
    """

    def __init__(self, in_chans: int, dim: int, norm_layer=None):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=2)
        self.norm = norm_layer(dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            # The same function, the norm as a fused kernel where it applies (see metaformer.kernels.dispatch).
            return kernels.stem_forward(self, x)
        return self.norm(self.conv(x))


class Downsample(nn.Module):
    """Downsampling between stages: an optional norm, then Conv2d(in, out, 3, stride 2, padding 1).

    Args:
        in_dim: Input channels.
        out_dim: Output channels.
        norm_layer: Optional norm class built as ``norm_layer(in_dim)`` (the baselines' pre-norm).
    """

    def __init__(self, in_dim: int, out_dim: int, norm_layer=None):
        super().__init__()
        self.norm = norm_layer(in_dim) if norm_layer else nn.Identity()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            # The same function, on a weight packed once where it applies (see metaformer.kernels.dispatch).
            return kernels.downsample_forward(self, x)
        return self.conv(self.norm(x))


class MlpHead(nn.Module):
    """The MLP classifier of ConvFormer and CAFormer: fc1 -> SquaredReLU -> LayerNorm -> dropout -> fc2.

    Args:
        dim: Input features.
        num_classes: Output classes.
        mlp_ratio: Hidden width as a multiple of ``dim``.
        act_layer: Activation class.
        norm_eps: Epsilon of the hidden LayerNorm (the original release uses PyTorch's default 1e-5).
        drop: Dropout before fc2.
    """

    def __init__(self, dim: int, num_classes: int, mlp_ratio: float = 4, act_layer=SquaredReLU,
                 norm_eps: float = 1e-5, drop: float = 0.0):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.norm = nn.LayerNorm(hidden, eps=norm_eps)
        self.head_drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.head_drop(self.norm(self.act(self.fc1(x)))))


class ClassifierHead(nn.Module):
    """Final norm, global average pooling and classifier.

    PoolFormer normalises the whole final map and then averages (``norm_first=True``); the baselines
    average first and normalise the pooled vector.

    Args:
        dim: Input channels.
        num_classes: Output classes; 0 makes ``fc`` an identity.
        norm_layer: Norm class built as ``norm_layer(dim)``: a map norm when ``norm_first``, a vector
            norm otherwise.
        norm_first: Normalise the (B, C, H, W) map before pooling instead of the pooled vector.
        mlp_head: Use :class:`MlpHead` instead of a single Linear.
        drop: Dropout on the pooled features (and inside the MLP head).
        global_pool: ``"avg"`` (global average pooling) or ``""`` (no pooling: the head returns the
            normalised map, which needs ``num_classes=0``; a vector norm then normalises each position's
            channels).
    """

    def __init__(self, dim: int, num_classes: int, norm_layer, norm_first: bool, mlp_head: bool = False,
                 drop: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        self.norm_first = norm_first
        self.mlp_head = mlp_head
        self.drop_rate = drop
        self.norm = norm_layer(dim)
        self.drop = nn.Dropout(drop)
        self.fc = self.make_fc(dim, num_classes)
        self.pool = True
        self.set_pool(global_pool, num_classes)

    def set_pool(self, global_pool: str, num_classes: int) -> None:
        """Switches global average pooling on (``"avg"``) or off (``""``, only without a classifier).

        Raises:
            ValueError: for another pooling type, or ``""`` with a classifier.
        """
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' (global average pooling) or '' (no pooling), "
                             f"got {global_pool!r}")
        if global_pool == "" and num_classes > 0:
            raise ValueError("global_pool='' (no pooling) returns feature maps, which a classifier cannot take; "
                             "use it with num_classes=0")
        self.pool = global_pool == "avg"

    @property
    def global_pool(self) -> str:
        """``"avg"`` or ``""`` (no pooling)."""
        return "avg" if self.pool else ""

    __jit_unused_properties__ = ["global_pool"]

    def make_fc(self, dim: int, num_classes: int) -> nn.Module:
        """Builds a fresh, initialised classifier for ``num_classes`` classes."""
        if num_classes <= 0:
            return nn.Identity()
        fc = MlpHead(dim, num_classes, drop=self.drop_rate) if self.mlp_head else nn.Linear(dim, num_classes)
        for m in fc.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        return fc

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.pool:  # feature maps, normalised (a vector norm over each position's channels)
            if self.norm_first:
                return self.norm(x)
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.norm_first:
            x = self.norm(x).mean((2, 3))
        else:
            x = self.norm(x.mean((2, 3)))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)
