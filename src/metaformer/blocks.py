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
from .mixers import Pooling

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

    When the mixer is :class:`~metaformer.mixers.Pooling` and norm1 a one-group GroupNorm, the mixer
    half runs as one fused operation (see :func:`metaformer.set_backend`); the result is the same.
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
        # The pooling identity needs count_include_pad=False pooling (exactly our Pooling) after a
        # one-group GroupNorm; a subclass of either may change the maths, so match types exactly.
        self.fusable = type(self.token_mixer) is Pooling and type(self.norm1) is GroupNorm1

    def _fused_mixer_half(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.norm1.weight
        if isinstance(self.layer_scale1, Scale):
            weight = weight * self.layer_scale1.scale
        if self.norm1.bias is not None and self.norm1.bias.requires_grad and torch.is_grad_enabled():
            # The norm's bias cancels exactly (its true gradient is zero); keep it in the graph so that
            # it gets that zero gradient, as DistributedDataParallel expects of every parameter.
            weight = weight + 0.0 * self.norm1.bias
        res_scale = self.res_scale1.scale if isinstance(self.res_scale1, Scale) else None
        sample_scale = None
        if self.training and self.drop_path_rate > 0:
            keep = 1.0 - self.drop_path_rate
            sample_scale = x.new_empty(x.shape[0], dtype=torch.float32).bernoulli_(keep).div_(keep)
        return kernels.pool_mixer_residual(x, weight, eps=self.norm1.eps, pool_size=self.token_mixer.pool_size,
                                           res_scale=res_scale, sample_scale=sample_scale)

    def _onednn_mlp_half(self, x: torch.Tensor) -> torch.Tensor | None:
        """Eval-mode CPU MLP half as two oneDNN primitives (GELU and residual add fused), else None."""
        mlp, ls, rs = self.mlp, self.layer_scale2, self.res_scale2
        if (self.training or type(mlp) is not Mlp or type(mlp.act) is not nn.GELU or not kernels.onednn_mlp_usable(x)
                or type(ls) not in (Scale, nn.Identity) or type(rs) not in (Scale, nn.Identity)
                or kernels.get_backend() == "reference"):
            return None
        w2, b2 = mlp.fc2.weight, mlp.fc2.bias
        if type(ls) is Scale:  # fold layer scale 2 into fc2 (a few KB of weights per call)
            w2 = w2 * ls.scale.view(-1, 1, 1, 1)
            b2 = None if b2 is None else b2 * ls.scale
        res = x if type(rs) is nn.Identity else rs(x)
        try:
            return kernels.mlp_residual_onednn(self.norm2(x), res, mlp.fc1.weight, mlp.fc1.bias, w2, b2,
                                               mlp.act.approximate)
        except (RuntimeError, TypeError):  # a private oneDNN op of another torch build: use the plain path
            return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fusable and kernels.get_backend() != "reference":
            x = self._fused_mixer_half(x)
        else:
            x = self.res_scale1(x) + self.layer_scale1(self.drop_path1(self.token_mixer(self.norm1(x))))
        y = self._onednn_mlp_half(x)
        if y is not None:
            return y
        return self.res_scale2(x) + self.layer_scale2(self.drop_path2(self.mlp(self.norm2(x))))


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
    """

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
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return self.blocks(x)
