"""The folded, evaluation-only block that :func:`metaformer.optimize_for_inference` puts in place of each block.

The folds are those of :mod:`metaformer.kernels.folding`, computed once in float64; on CPU in fp32,
without autograd and outside tracing, both halves run the same oneDNN primitives as the default
evaluation path (:mod:`metaformer.kernels.cpu_eval`), on weights pre-packed once; elsewhere the same
folded maths runs as standard PyTorch ops.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from . import kernels
from .kernels import cpu_eval, dispatch, onednn, torch_halves
from .kernels.cache import derived
from .kernels.folding import Folded, act_kind, fold_in, fold_out, norm_kind, normalise
from .kernels.torch_impl import avg_pool_same
from .layers import DropPath, Mlp, Scale, SquaredReLU
from .mixers import Attention, Identity, Pooling, RandomMixing, SepConv

__all__ = ["InferenceBlock", "CannotFold"]

_ONEDNN_ACTS = ("gelu", "gelu_tanh", "relu", "square")


class CannotFold(Exception):
    """Internal: this block (or part) is not something optimize_for_inference knows how to fold."""


def _scale(module: nn.Module) -> Optional[torch.Tensor]:
    if type(module) is Scale:
        return module.scale.detach()
    if type(module) is nn.Identity:
        return None
    raise CannotFold(f"scale module of type {type(module).__name__}")


def _rebuild(layer: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """A frozen copy of a Conv2d / Linear ``layer`` with new (float64) weight and bias."""
    if type(layer) not in (nn.Conv2d, nn.Linear):
        raise CannotFold(f"layer of type {type(layer).__name__}")
    new = copy.deepcopy(layer)
    dtype = layer.weight.dtype
    new.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
    new.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
    return new


def _check_1x1(layer: nn.Module) -> None:
    if type(layer) is nn.Conv2d and (layer.kernel_size != (1, 1) or layer.groups != 1 or layer.stride != (1, 1)
                                     or layer.padding not in ((0, 0), "valid")):
        raise CannotFold("a convolution that is not a plain 1x1")


def _buffer(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(dtype).clone()


_LIGHT_MIXERS = ("pool_gn", "pool_ln", "identity", "random")  # mixer halves without a hidden tensor


class InferenceBlock(nn.Module):
    """An evaluation-only, folded :class:`~metaformer.MetaFormerBlock` (built by :func:`optimize_for_inference`).

    Computes the same function as the block it was built from, to float32 rounding. Build it with
    :meth:`from_block`.

    Attributes:
        mixer_mode: ``"pool_gn"`` (fused pooling kernel), ``"pool_ln"`` (pooling after a channel
            LayerNorm), ``"identity"`` and ``"random"`` (the norm with the layer scale in its affine),
            ``"folded"`` (SepConv / Attention: the norm's affine and the layer scale folded into the
            mixer's first and last linear maps) or ``"original"`` (the block's own half, unchanged).
        mlp_mode: ``"folded"`` (norm affine into fc1; layer scale and StarReLU's scale and bias into fc2)
            or ``"original"``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mixer_mode = "original"
        self.mlp_mode = "original"
        self.norm1_kind = self.norm2_kind = None
        self.eps1 = self.eps2 = 1e-5
        self.pool_size = 3
        self.act_kind: Optional[str] = None
        self.mixer_act: Optional[str] = None
        for name in ("mix_weight", "mix_bias", "res_scale1", "res_scale2"):
            self.register_buffer(name, None)
        self.original_mixer_half: Optional[nn.Module] = None
        self.original_mlp_half: Optional[nn.Module] = None
        self.token_mixer: Optional[nn.Module] = None
        self.fc1 = self.act = self.fc2 = None

    # ----------------------------------------------------------------- building
    @classmethod
    def from_block(cls, block: nn.Module) -> tuple:
        """Folds one block; returns the new block and the reasons for any half left unfolded."""
        self = cls()
        skipped = []
        dtype = block.norm1.weight.dtype if hasattr(block.norm1, "weight") else torch.float32
        try:
            self._fold_mixer_half(block, dtype)
        except CannotFold as err:
            self.mixer_mode, self.original_mixer_half = "original", _MixerHalf(block)
            skipped.append(f"token-mixer half: {err}")
        try:
            self._fold_mlp_half(block, dtype)
        except CannotFold as err:
            self.mlp_mode, self.original_mlp_half = "original", _MlpHalf(block)
            skipped.append(f"MLP half: {err}")
        self.requires_grad_(False)
        return self, skipped

    @staticmethod
    def _norm(norm: nn.Module, drop_path: nn.Module, which: str) -> str:
        kind = norm_kind(norm)
        if kind is None:
            raise CannotFold(f"{which} of type {type(norm).__name__} (not GroupNorm1 / LayerNorm2d)")
        if type(drop_path) not in (DropPath, nn.Identity):
            raise CannotFold(f"drop path of type {type(drop_path).__name__}")
        return kind

    def _fold_mixer_half(self, block: nn.Module, dtype: torch.dtype) -> None:
        kind = self._norm(block.norm1, block.drop_path1, "norm1")
        ls1, rs1 = _scale(block.layer_scale1), _scale(block.res_scale1)
        gamma, beta = block.norm1.weight.detach(), block.norm1.bias
        beta = None if beta is None else beta.detach()
        mixer = block.token_mixer
        self.norm1_kind, self.eps1 = kind, float(block.norm1.eps)
        self.res_scale1 = _buffer(rs1, dtype)
        f64 = torch.float64
        if type(mixer) is Pooling:
            w = gamma.to(f64) if ls1 is None else gamma.to(f64) * ls1.to(f64)
            self.mixer_mode, self.pool_size, self.mix_weight = f"pool_{kind}", mixer.pool_size, w.to(dtype)
            return
        if type(mixer) in (Identity, RandomMixing):
            w = gamma.to(f64) if ls1 is None else gamma.to(f64) * ls1.to(f64)
            b = None if beta is None else (beta.to(f64) if ls1 is None else beta.to(f64) * ls1.to(f64))
            self.mix_weight, self.mix_bias = w.to(dtype), _buffer(b, dtype)
            self.mixer_mode = "identity" if type(mixer) is Identity else "random"
            if type(mixer) is RandomMixing:
                self.token_mixer = copy.deepcopy(mixer).requires_grad_(False)
            return
        mixer = copy.deepcopy(mixer)
        if type(mixer) is SepConv:
            _check_1x1(mixer.pwconv1)
            mixer.pwconv1 = _rebuild(mixer.pwconv1, *fold_in(mixer.pwconv1.weight, mixer.pwconv1.bias, gamma, beta))
            mixer.pwconv2 = _rebuild(mixer.pwconv2, *fold_out(mixer.pwconv2.weight, mixer.pwconv2.bias, ls1))
            act = act_kind(mixer.act1)
            self.mixer_act = act if act is not None and type(mixer.act2) is nn.Identity else None
        elif type(mixer) is Attention:
            mixer.qkv = _rebuild(mixer.qkv, *fold_in(mixer.qkv.weight, mixer.qkv.bias, gamma, beta))
            mixer.proj = _rebuild(mixer.proj, *fold_out(mixer.proj.weight, mixer.proj.bias, ls1))
        else:
            raise CannotFold(f"token mixer of type {type(mixer).__name__} (its linear maps are unknown)")
        self.mixer_mode, self.token_mixer = "folded", mixer.requires_grad_(False)

    def _fold_mlp_half(self, block: nn.Module, dtype: torch.dtype) -> None:
        kind = self._norm(block.norm2, block.drop_path2, "norm2")
        mlp = block.mlp
        if type(mlp) is not Mlp:
            raise CannotFold(f"mlp of type {type(mlp).__name__}")
        _check_1x1(mlp.fc1)
        ls2, rs2 = _scale(block.layer_scale2), _scale(block.res_scale2)
        beta = None if block.norm2.bias is None else block.norm2.bias.detach()
        act = act_kind(mlp.act)
        star = (mlp.act.scale, mlp.act.bias) if act == "star" else None
        self.norm2_kind, self.eps2 = kind, float(block.norm2.eps)
        self.fc1 = _rebuild(mlp.fc1, *fold_in(mlp.fc1.weight, mlp.fc1.bias, block.norm2.weight.detach(), beta))
        self.fc2 = _rebuild(mlp.fc2, *fold_out(mlp.fc2.weight, mlp.fc2.bias, ls2, star))
        # StarReLU's s * relu(h)**2 + b: s and b now live in fc2, what remains is relu(h)**2.
        self.act_kind = "square" if act == "star" else act
        self.act = SquaredReLU() if act == "star" else copy.deepcopy(mlp.act)
        self.res_scale2 = _buffer(rs2, dtype)
        self.mlp_mode = "folded"

    # ------------------------------------------------------------------ running
    def _prepacked(self, tag: str, first: nn.Module, last: nn.Module, shape: tuple, extra=()) -> Folded:
        return derived(self, tag, [first.weight, first.bias, last.weight, last.bias],
                       lambda: cpu_eval.packed_pair(first.weight, first.bias, last.weight, last.bias, shape, extra),
                       shape=shape)

    def _mixer_half(self, x: torch.Tensor, fast: bool) -> torch.Tensor:
        mode = self.mixer_mode
        if mode == "original":
            return self.original_mixer_half(x)
        if mode == "pool_gn":
            return kernels.pool_mixer_residual(x, self.mix_weight, eps=self.eps1, pool_size=self.pool_size,
                                               res_scale=self.res_scale1)
        if mode == "identity":
            return torch_halves.identity_mix(x, self.norm1_kind, self.eps1, self.mix_weight, self.mix_bias,
                                             self.res_scale1)
        if mode == "random" and fast and x.is_contiguous(memory_format=torch.channels_last):
            return torch_halves.random_mix(x, self.norm1_kind, self.eps1, self.mix_weight, self.mix_bias,
                                           self.token_mixer.random_matrix, self.res_scale1)
        m = self.token_mixer
        if fast and type(m) is SepConv and self.mixer_act is not None and onednn.onednn_usable(x):
            k = m.dwconv.kernel_size[0]
            star = (float(m.act1.scale), m.act1.bias) if self.mixer_act == "star" else None
            mid_shape = cpu_eval.hidden_shape(x.shape, m.pwconv1.weight.shape[0])
            dw = derived(self, "dw", [m.dwconv.weight],
                         lambda: onednn.prepack(m.dwconv.weight, k // 2, m.dwconv.groups, mid_shape), shape=mid_shape)
            p = self._prepacked("sepconv", m.pwconv1, m.pwconv2, tuple(x.shape), (dw, m.dwconv.bias, star))
            y = cpu_eval.run_sepconv(x, self.norm1_kind, self.eps1, p, self.mixer_act, k, m.dwconv.groups,
                                     self.res_scale1)
            if y is not None:
                return y
        if fast and type(m) is Attention and onednn.onednn_usable(x):
            shape = tuple(x.shape)
            p = derived(self, "attention", [m.qkv.weight, m.qkv.bias, m.proj.weight, m.proj.bias],
                        lambda: cpu_eval.attention_weights(m.qkv.weight, m.qkv.bias, m.proj.weight, m.proj.bias,
                                                           shape), shape=shape)
            y = cpu_eval.run_attention(x, self.norm1_kind, self.eps1, p, m, self.res_scale1)
            if y is not None:
                return y
        if mode == "pool_ln":
            n = normalise(self.norm1_kind, x, self.eps1)
            mix = (avg_pool_same(n, self.pool_size) - n) * self.mix_weight.view(1, -1, 1, 1)
        elif mode == "random":
            mix = m(normalise(self.norm1_kind, x, self.eps1, self.mix_weight, self.mix_bias))
        else:
            mix = m(normalise(self.norm1_kind, x, self.eps1))
        return x + mix if self.res_scale1 is None else torch.addcmul(mix, x, self.res_scale1.view(1, -1, 1, 1))

    def _mlp_half(self, x: torch.Tensor, fast: bool, consume: bool = False) -> torch.Tensor:
        if self.mlp_mode == "original":
            return self.original_mlp_half(x)
        if fast and self.act_kind in _ONEDNN_ACTS and onednn.onednn_usable(x):
            p = self._prepacked("mlp", self.fc1, self.fc2, tuple(x.shape))
            y = cpu_eval.run_mlp(x, self.norm2_kind, self.eps2, p, self.act_kind, self.res_scale2, consume)
            if y is not None:
                return y
        res = x if self.res_scale2 is None else x * self.res_scale2.view(1, -1, 1, 1)
        return res + self.fc2(self.act(self.fc1(normalise(self.norm2_kind, x, self.eps2))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (a hooked part makes fast_paths_active false: the part is then called, so its hooks run)
        fast = dispatch.inference_block_fast(self, x)
        given = x
        converted = fast and dispatch.nchw_contiguous(x)
        if converted:
            x = x.contiguous(memory_format=torch.channels_last)
        if fast and self.mlp_mode == "folded" and self.mixer_mode != "original" and onednn.onednn_usable(x):
            # every part is a built-in one that treats each sample on its own: run cache-sized chunks
            rows = cpu_eval.chunk_rows(x, self.fc1.weight.shape[0])
            # (every mixer half returns a new tensor of its own, which the MLP half may then write into)
            if rows < x.shape[0] and self.mixer_mode in _LIGHT_MIXERS:
                # a mixer half without a hidden tensor runs whole; the MLP half writes over its output a few
                # samples at a time (no block output to allocate, no chunk to copy into it)
                y = cpu_eval.in_place_chunks(lambda part: self._mlp_half(part, True, True), self._mixer_half(x, True),
                                             rows)
            else:
                y = cpu_eval.in_chunks(lambda part: self._mlp_half(self._mixer_half(part, True), True, True), x,
                                       rows)
        else:
            y = self._mlp_half(self._mixer_half(x, fast), fast, fast)
        # on its own it returns the input's layout; in a model or stage its input is channels_last already
        return kernels.in_input_layout(y, given) if converted else y

    def extra_repr(self) -> str:
        return f"mixer_mode={self.mixer_mode!r}, mlp_mode={self.mlp_mode!r}"


class _MixerHalf(nn.Module):
    """The unfolded token-mixer half of a block, exactly as the block computes it in eval."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.token_mixer = block.norm1, block.token_mixer
        self.layer_scale1, self.res_scale1 = block.layer_scale1, block.res_scale1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_scale1(x) + self.layer_scale1(self.token_mixer(self.norm1(x)))


class _MlpHalf(nn.Module):
    """The unfolded MLP half of a block, exactly as the block computes it in eval."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm2, self.mlp = block.norm2, block.mlp
        self.layer_scale2, self.res_scale2 = block.layer_scale2, block.res_scale2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_scale2(x) + self.layer_scale2(self.mlp(self.norm2(x)))
