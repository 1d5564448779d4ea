"""The generic MetaFormer block and stage.

    x = res_scale1(x) + layer_scale1(DropPath(TokenMixer(Norm1(x))))
    x = res_scale2(x) + layer_scale2(DropPath(Mlp(Norm2(x))))

PoolFormer uses layer scales and no res scales; the baselines use res scales in their last two stages
and no layer scales. Absent scales are identities.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels
from .layers import Downsample, DropPath, GroupNorm1, Mlp, Scale
from .mixers import Pooling, check_mixer_output
from .tracing import is_eager

__all__ = ["MetaFormerBlock", "MetaFormerStage"]


class MetaFormerBlock(nn.Module):
    """One MetaFormer block; every part is injectable.

    Args:
        dim: Channels.
        token_mixer: Mixer class (or partial) built as ``token_mixer(dim)``; see :class:`metaformer.TokenMixer`.
        norm_layer: Norm class built as ``norm_layer(dim)`` (used for norm1 and norm2).
        act_layer: Activation class of the MLP.
        mlp_ratio: Hidden width of the MLP as a multiple of ``dim``.
        mlp_bias: Whether the MLP's 1x1 convolutions have biases.
        drop: Dropout rate inside the MLP.
        drop_path: Stochastic-depth rate of this block.
        layer_scale_init_value: Initial layer scale, or None for no layer scale.
        res_scale_init_value: Initial res scale, or None for no res scale.

    ``forward`` is ``mlp_half(mixer_half(x))``. In eager mode the block hands itself to
    :func:`metaformer.kernels.block_forward`, which runs fused paths of the same function where they
    apply (pooling after a one-group GroupNorm, oneDNN MLPs in CPU inference); ``set_backend("reference")``
    turns them off. The result has the input's memory format (the CPU paths compute in channels_last and
    convert an NCHW input there and back; in a model or stage the input is channels_last already).
    """

    def __init__(self, dim: int, token_mixer: Callable[..., nn.Module] = Pooling,
                 norm_layer: Callable[..., nn.Module] = GroupNorm1, act_layer: Callable[..., nn.Module] = nn.GELU,
                 mlp_ratio: float = 4.0, mlp_bias: bool = True, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init_value: Optional[float] = 1e-5, res_scale_init_value: Optional[float] = None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = token_mixer(dim)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale1 = Scale(dim, layer_scale_init_value) if layer_scale_init_value is not None else nn.Identity()
        self.res_scale1 = Scale(dim, res_scale_init_value) if res_scale_init_value is not None else nn.Identity()

        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=act_layer, bias=mlp_bias, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale2 = Scale(dim, layer_scale_init_value) if layer_scale_init_value is not None else nn.Identity()
        self.res_scale2 = Scale(dim, res_scale_init_value) if res_scale_init_value is not None else nn.Identity()
        self.drop_path_rate = drop_path

    def mixer_half(self, x: torch.Tensor) -> torch.Tensor:
        """``res_scale1(x) + layer_scale1(DropPath(TokenMixer(Norm1(x))))``."""
        mixed = self.token_mixer(self.norm1(x))
        if not torch.jit.is_scripting():  # alone in its `if`: TorchScript then compiles nothing below it
            if is_eager(x):
                check_mixer_output(self.token_mixer, x, mixed)
        return self.res_scale1(x) + self.layer_scale1(self.drop_path1(mixed))

    def mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        """``res_scale2(x) + layer_scale2(DropPath(Mlp(Norm2(x))))``."""
        return self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            # Fused paths of the same function, where they apply (see metaformer.kernels.dispatch).
            return kernels.block_forward(self, x)
        return self.mlp_half(self.mixer_half(x))


class MetaFormerStage(nn.Module):
    """A stage: optional downsampling, optional learnt position embedding, then ``depth`` blocks.

    Args:
        in_dim: Channels of the stage input.
        dim: Channels of the stage.
        depth: Number of blocks.
        downsample: Downsample before the blocks (Conv2d 3x3 stride 2). Required when ``in_dim != dim``.
        downsample_norm: Optional norm class applied before the downsampling convolution.
        pos_embed_size: ``(H, W)`` of a zero-initialised position embedding added after the
            downsampling, or None.
        drop_path_rates: One stochastic-depth rate per block (default all zero).
        **block_kwargs: Passed to every :class:`MetaFormerBlock` (token_mixer, norm_layer, ...).

    The result has the memory format the downsampling gives its blocks: an NCHW input that the blocks would
    compute in channels_last (on CPU) is converted once before them, and the result converted back.
    """

    __jit_unused_properties__ = ["spatial_size"]  # Python-side information, not part of a scripted forward

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool = True, downsample_norm=None,
                 pos_embed_size: Optional[Tuple[int, int]] = None,
                 drop_path_rates: Optional[Sequence[float]] = None, **block_kwargs):
        super().__init__()
        if in_dim != dim and not downsample:
            raise ValueError(f"MetaFormerStage: in_dim {in_dim} != dim {dim} needs downsample=True")
        self.downsample = Downsample(in_dim, dim, downsample_norm) if downsample else nn.Identity()
        if pos_embed_size is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, dim, *pos_embed_size))
        else:
            self.pos_embed = None
        rates = list(drop_path_rates) if drop_path_rates is not None else [0.0] * depth
        if len(rates) != depth:
            raise ValueError(f"MetaFormerStage: got {len(rates)} drop_path_rates for depth {depth}")
        self.blocks = nn.Sequential(*[MetaFormerBlock(dim, drop_path=r, **block_kwargs) for r in rates])
        self.grad_checkpointing = False

    @property
    def spatial_size(self) -> Optional[Tuple[int, int]]:
        """The fixed (H, W) this stage's blocks need (after downsampling), or None if any size works."""
        if self.pos_embed is not None:
            return tuple(self.pos_embed.shape[-2:])
        for block in self.blocks:
            size = getattr(block.token_mixer, "spatial_size", None)
            if size is not None:
                return tuple(size)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if not torch.jit.is_scripting():
            # The CPU fast paths work in channels_last: the blocks get it once, and the stage returns the layout
            # the downsampling gave (in a model that is channels_last already, and nothing converts).
            given = x
            converted = kernels.converts_to_channels_last(self.blocks, x)
            if converted:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.grad_checkpointing and torch.is_grad_enabled():
                for block in self.blocks:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = self.blocks(x)
            return kernels.in_input_layout(x, given) if converted else x
        return self.blocks(x)
