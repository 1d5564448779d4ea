"""Token mixers: the part of a MetaFormer block that exchanges information between positions.

A token mixer is any ``nn.Module`` class (or ``functools.partial`` of one) built as ``mixer(dim, **kw)``
that maps a ``(B, C, H, W)`` tensor to a tensor of the same shape. A mixer that only works at one
spatial size declares it in the attribute ``spatial_size = (H, W)``; the model checks inputs against it.
"""

from __future__ import annotations

from typing import Optional, Protocol, Tuple, Union, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import StarReLU

__all__ = ["TokenMixer", "Pooling", "Identity", "Attention", "SpatialMLP", "SepConv", "RandomMixing",
           "check_mixer_output"]


@runtime_checkable
class TokenMixer(Protocol):
    """The protocol every token mixer follows.

    A mixer is constructed as ``mixer(dim, **kwargs)`` and called on a ``(B, C, H, W)`` tensor, returning
    a tensor of the same shape. Optional attribute ``spatial_size``: a fixed ``(H, W)`` the mixer needs
    (``None`` or absent when any size works).

    Example:
        >>> class ShiftMixer(nn.Module):
        ...     def __init__(self, dim, shift=1):
        ...         super().__init__()
        ...         self.shift = shift
        ...     def forward(self, x):
        ...         return torch.roll(x, self.shift, dims=-1) - x
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def check_mixer_output(mixer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Raises a clear error unless a mixer returned a tensor of its input's shape (no silent broadcasting).

    Raises:
        TypeError: if ``y`` is not a tensor.
        ValueError: if ``y``'s shape differs from ``x``'s.
    """
    name = type(mixer).__name__
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"token mixer {name} returned {type(y).__name__}; a token mixer maps a (B, C, H, W) tensor "
                        f"to a tensor of the same shape")
    if y.shape != x.shape:
        raise ValueError(f"token mixer {name} returned shape {tuple(y.shape)} for input {tuple(x.shape)}; a token "
                         f"mixer must return its input's shape (B, C, H, W) (the block adds it to the residual, "
                         f"so another shape would broadcast silently)")


def _pair(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"spatial_size must be an int or a pair (H, W), got {size!r}")
    return size


class Pooling(nn.Module):
    """PoolFormer's mixer: ``AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)(x) - x``.

    The ``- x`` is there because the block's residual already adds ``x``.

    Args:
        dim: Channels (unused; part of the mixer protocol).
        pool_size: Odd pooling window.
    """

    spatial_size = None

    def __init__(self, dim: Optional[int] = None, pool_size: int = 3, **kwargs):
        super().__init__()
        if isinstance(pool_size, bool) or not isinstance(pool_size, int):
            raise TypeError(f"pool_size must be an int, got {type(pool_size).__name__} {pool_size!r}")
        if pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(f"pool_size must be a positive odd integer (the output keeps the input size), "
                             f"got {pool_size}")
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.pool_size
        return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False) - x

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}"


class Identity(nn.Module):
    """The identity mixer of IdentityFormer and ``metaformer_id_s12``: returns its input.

    Args:
        dim: Channels (unused; part of the mixer protocol).
    """

    spatial_size = None

    def __init__(self, dim: Optional[int] = None, **kwargs):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of an NCHW tensor.

    PoolFormer's hybrids use ``proj_bias=True``; CAFormer uses ``proj_bias=False``. Both have a
    bias-free qkv projection and ``head_dim`` 32.

    Args:
        dim: Channels; must be divisible by ``head_dim``.
        head_dim: Channels per head.
        qkv_bias: Bias of the qkv projection.
        proj_bias: Bias of the output projection.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
    """

    spatial_size = None

    def __init__(self, dim: int, head_dim: int = 32, qkv_bias: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, **kwargs):
        super().__init__()
        if dim % head_dim != 0:
            raise ValueError(f"Attention: dim {dim} is not divisible by head_dim {head_dim}; "
                             f"choose a head_dim that divides it")
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.scale = head_dim ** -0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        # qkv channels are ordered (3, heads, head_dim), as in the releases' Attention
        qkv = self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=self.sdpa_scale())
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, h * w, c)))
        return out.transpose(1, 2).reshape(b, c, h, w)

    def sdpa_scale(self) -> Optional[float]:
        """The ``scale`` handed to ``F.scaled_dot_product_attention`` (here and in the CPU fast path, so that both
        round alike): None, SDPA's own default, where ``self.scale`` is ``head_dim ** -0.5`` (PyTorch 2.3's ONNX
        exporter fails on a given scale), else ``self.scale`` (a scale set by hand)."""
        return None if self.scale == self.head_dim ** -0.5 else self.scale


class SpatialMLP(nn.Module):
    """Mixing over the flattened spatial axis with learnt weights (the paper's spatial FC).

    With ``hidden_dim=None`` this is one bias-free ``Linear(N, N)`` over the ``N = H * W`` positions,
    exactly the release's SpatialFC. With a hidden width it is an MLP-Mixer-style token MLP,
    ``Linear(N, hidden) -> act -> Linear(hidden, N)`` (with biases).

    Args:
        dim: Channels (unused; part of the mixer protocol).
        spatial_size: The fixed (H, W) of the stage this mixer serves.
        hidden_dim: Hidden width of the token MLP, or None for a single linear map.
        act_layer: Activation of the token MLP.
    """

    def __init__(self, dim: Optional[int] = None, spatial_size: Union[int, Tuple[int, int]] = (14, 14),
                 hidden_dim: Optional[int] = None, act_layer=nn.GELU, **kwargs):
        super().__init__()
        self.spatial_size = _pair(spatial_size)
        n = self.spatial_size[0] * self.spatial_size[1]
        self.hidden_dim = hidden_dim
        if hidden_dim is None:
            self.fc = nn.Linear(n, n, bias=False)
        else:
            self.fc1 = nn.Linear(n, hidden_dim)
            self.act = act_layer()
            self.fc2 = nn.Linear(hidden_dim, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2)
        x = self.fc(x) if self.hidden_dim is None else self.fc2(self.act(self.fc1(x)))
        return x.view(b, c, h, w)

    def extra_repr(self) -> str:
        return f"spatial_size={self.spatial_size}, hidden_dim={self.hidden_dim}"


class SepConv(nn.Module):
    """ConvFormer's mixer, an inverted separable convolution: pw -> act -> depthwise k x k -> pw.

    Args:
        dim: Channels.
        expansion_ratio: Hidden channels as a multiple of ``dim``.
        act1_layer: Activation after the first pointwise convolution.
        act2_layer: Activation after the depthwise convolution.
        bias: Bias of the three convolutions.
        kernel_size: Depthwise kernel size (odd).
    """

    spatial_size = None

    def __init__(self, dim: int, expansion_ratio: float = 2, act1_layer=StarReLU, act2_layer=nn.Identity,
                 bias: bool = False, kernel_size: int = 7, **kwargs):
        super().__init__()
        mid = int(expansion_ratio * dim)
        self.pwconv1 = nn.Conv2d(dim, mid, 1, bias=bias)
        self.act1 = act1_layer()
        self.dwconv = nn.Conv2d(mid, mid, kernel_size, padding=kernel_size // 2, groups=mid, bias=bias)
        self.act2 = act2_layer()
        self.pwconv2 = nn.Conv2d(mid, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pwconv2(self.act2(self.dwconv(self.act1(self.pwconv1(x)))))


class RandomMixing(nn.Module):
    """RandFormer's mixer: a frozen random (N, N) matrix ``softmax(rand(N, N), -1)`` over the H*W axis.

    The matrix is a persistent buffer: it is saved and loaded with the weights (a loaded model must use
    the released matrix, not a fresh draw) but is no parameter, so optimizers, gradient checks and
    DistributedDataParallel see only trainable weights. The releases hold it as a frozen
    ``nn.Parameter``; their checkpoints (and metaformer 0.1 saves) name it the same and load into
    the buffer.

    Args:
        dim: Channels (unused; part of the mixer protocol).
        spatial_size: The fixed (H, W) of the stage this mixer serves (RandFormer: 14x14 and 7x7).
    """

    frozen_weights = ("random_matrix",)  # weights that are buffers (counted by MetaFormer.count_parameters)

    def __init__(self, dim: Optional[int] = None, spatial_size: Union[int, Tuple[int, int]] = (14, 14),
                 **kwargs):
        super().__init__()
        self.spatial_size = _pair(spatial_size)
        n = self.spatial_size[0] * self.spatial_size[1]
        self.register_buffer("random_matrix", torch.softmax(torch.rand(n, n), dim=-1), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return torch.matmul(x.flatten(2), self.random_matrix.t()).view(b, c, h, w)

    def extra_repr(self) -> str:
        return f"spatial_size={self.spatial_size}"
