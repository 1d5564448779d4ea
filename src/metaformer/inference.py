"""Inference-time folding: :func:`optimize_for_inference`.

In evaluation a MetaFormer block is a chain of linear per-channel maps around a few non-linear
steps, and most of the per-channel maps fold into their neighbouring convolutions::

    x = res_scale1 * x + ls1 * Mixer(Norm1(x))
    x = res_scale2 * x + ls2 * fc2(act(fc1(Norm2(x))))

- ``Norm2``'s per-channel affine (``gamma * x_hat + beta``, one-group GroupNorm or channel LayerNorm)
  folds into ``fc1``: ``fc1(gamma * x_hat + beta) = (W * gamma) x_hat + (W beta + b)``. Only the
  normalisation itself (per-sample or per-position statistics) stays.
- ``ls2`` folds into ``fc2``'s weight and bias.
- Pooling mixers: ``Norm1``'s weight times ``ls1`` becomes the single per-channel factor of the fused
  pooling kernel (``pool(N(x)) - N(x) = gamma * (pool(x_hat) - x_hat)``; the bias cancels).
- Other known mixers (:class:`~metaformer.mixers.SepConv`, :class:`~metaformer.mixers.Attention`):
  ``Norm1``'s affine folds into their first linear map (``pwconv1`` / ``qkv``) and ``ls1`` into
  their last one (``pwconv2`` / ``proj``).
- Res scales are not linear maps *between* two convolutions (they scale the residual stream, which the
  next norm reads), so they stay, as one fused multiply-add.

On CPU, in eager mode and without autograd, the folded MLP then runs as two oneDNN primitives:
``fc1`` with the GELU fused in, and ``fc2`` with the residual addition fused in. Under
``torch.compile``, ``torch.export``, ONNX export, on other devices or dtypes it runs the same folded
maths with standard PyTorch ops.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .blocks import MetaFormerBlock
from .kernels.onednn import mlp_residual_onednn, onednn_usable
from .kernels.torch_impl import avg_pool_same
from .layers import DropPath, GroupNorm1, LayerNorm2d, Mlp, Scale
from .mixers import Attention, Pooling, SepConv

__all__ = ["optimize_for_inference", "InferenceBlock", "is_inference_optimized"]

_NORMS = (GroupNorm1, LayerNorm2d)


def _normalise(kind: str, x: torch.Tensor, eps: float, channels: int) -> torch.Tensor:
    """The norm without its affine: ``"gn"`` one-group GroupNorm, ``"ln"`` channel LayerNorm."""
    if kind == "gn":
        return F.group_norm(x, 1, None, None, eps)
    # ``channels`` is a Python int (not x.shape[1]): the ONNX tracer cannot take a traced normalized_shape.
    y = F.layer_norm(x.permute(0, 2, 3, 1), (channels,), None, None, eps)
    return y.permute(0, 3, 1, 2)


def _norm_kind(norm: nn.Module) -> str | None:
    # Exact types only: a subclass may change the maths (as kernels.dispatch.pool_mixer_fusable does).
    if type(norm) is GroupNorm1:
        return "gn"
    if type(norm) is LayerNorm2d:
        return "ln"
    return None


def _scale_vector(module: nn.Module) -> torch.Tensor | None:
    """The (C,) vector of a :class:`Scale`, ``None`` for an identity; raises for anything else."""
    if type(module) is Scale:
        return module.scale.detach()
    if type(module) is nn.Identity:
        return None
    raise _CannotFold(f"scale module of type {type(module).__name__}")


class _CannotFold(Exception):
    """Internal: this block (or part) is not something optimize_for_inference knows how to fold."""


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def _fold_in(layer: nn.Module, gamma: torch.Tensor, beta: torch.Tensor | None) -> nn.Module:
    """A copy of ``layer`` (1x1 Conv2d or Linear over channels) computing ``layer(gamma * x + beta)``."""
    is_conv = isinstance(layer, nn.Conv2d)
    if is_conv and (layer.kernel_size != (1, 1) or layer.groups != 1 or layer.stride != (1, 1)
                    or layer.padding not in ((0, 0), "valid")):
        raise _CannotFold("a convolution that is not a plain 1x1")
    if not is_conv and type(layer) is not nn.Linear:
        raise _CannotFold(f"layer of type {type(layer).__name__}")
    w = _f64(layer.weight)
    w2 = w.reshape(w.shape[0], w.shape[1])
    bias = _f64(layer.bias)
    if beta is not None:
        extra = w2 @ _f64(beta)
        bias = extra if bias is None else bias + extra
    w = w * _f64(gamma).view(1, -1, *([1] * (w.dim() - 2)))
    return _rebuild(layer, w, bias)


def _fold_out(layer: nn.Module, scale: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` (Conv2d or Linear) computing ``scale[c] * layer(x)``."""
    if not isinstance(layer, (nn.Conv2d, nn.Linear)) or type(layer) not in (nn.Conv2d, nn.Linear):
        raise _CannotFold(f"layer of type {type(layer).__name__}")
    w = _f64(layer.weight)
    s = _f64(scale)
    w = w * s.view(-1, *([1] * (w.dim() - 1)))
    bias = None if layer.bias is None else _f64(layer.bias) * s
    return _rebuild(layer, w, bias)


def _rebuild(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    dtype, device = layer.weight.dtype, layer.weight.device
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, bias=bias is not None, padding_mode=layer.padding_mode,
                        device=device, dtype=dtype)
    else:
        new = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        new.weight.copy_(weight.to(dtype))
        if bias is not None:
            new.bias.copy_(bias.to(dtype))
    new.requires_grad_(False)
    return new


def _as_buffer(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(dtype).clone()


class InferenceBlock(nn.Module):
    """An evaluation-only, folded :class:`~metaformer.MetaFormerBlock` (built by :func:`optimize_for_inference`).

    Computes the same function as the block it was built from, to float32 rounding. Not meant to be
    constructed directly: use :meth:`from_block`.

    Attributes:
        mixer_mode: ``"pool_gn"`` (fused pooling kernel), ``"pool_ln"`` (pooling after a channel
            LayerNorm), ``"folded"`` (norm affine and layer scale folded into the mixer's linear maps)
            or ``"original"`` (the block's own mixer half, unchanged).
        mlp_mode: ``"folded"`` or ``"original"``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mixer_mode = "original"
        self.mlp_mode = "original"
        self.norm1_kind = self.norm2_kind = None
        self.eps1 = self.eps2 = 1e-5
        self.pool_size = 3
        self.channels = 0
        self.act_kind: str | None = None
        self.register_buffer("mix_weight", None)
        self.register_buffer("res_scale1", None)
        self.register_buffer("res_scale2", None)
        self.original_mixer_half: nn.Module | None = None
        self.original_mlp_half: nn.Module | None = None
        self.token_mixer: nn.Module | None = None
        self.fc1: nn.Module | None = None
        self.act: nn.Module | None = None
        self.fc2: nn.Module | None = None

    # ----------------------------------------------------------------- building
    @classmethod
    def from_block(cls, block: MetaFormerBlock) -> tuple[InferenceBlock, list[str]]:
        """Folds one block; returns the new block and the reasons for any half left unfolded."""
        self = cls()
        self.channels = int(block.norm1.weight.shape[0]) if hasattr(block.norm1, "weight") else 0
        skipped: list[str] = []
        dtype = block.norm1.weight.dtype if hasattr(block.norm1, "weight") else torch.float32
        try:
            self._fold_mixer_half(block, dtype)
        except _CannotFold as err:
            self.mixer_mode = "original"
            self.original_mixer_half = _MixerHalf(block)
            skipped.append(f"token-mixer half: {err}")
        try:
            self._fold_mlp_half(block, dtype)
        except _CannotFold as err:
            self.mlp_mode = "original"
            self.original_mlp_half = _MlpHalf(block)
            skipped.append(f"MLP half: {err}")
        self.requires_grad_(False)
        return self, skipped

    def _fold_mixer_half(self, block: MetaFormerBlock, dtype: torch.dtype) -> None:
        kind = _norm_kind(block.norm1)
        if kind is None:
            raise _CannotFold(f"norm1 of type {type(block.norm1).__name__} (not GroupNorm1 / LayerNorm2d)")
        if type(block.drop_path1) is not nn.Identity and not _is_drop_path(block.drop_path1):
            raise _CannotFold(f"drop_path1 of type {type(block.drop_path1).__name__}")
        ls1 = _scale_vector(block.layer_scale1)
        rs1 = _scale_vector(block.res_scale1)
        gamma = block.norm1.weight.detach()
        beta = None if block.norm1.bias is None else block.norm1.bias.detach()
        mixer = block.token_mixer
        self.norm1_kind, self.eps1 = kind, float(block.norm1.eps)
        if type(mixer) is Pooling:
            w = _f64(gamma) if ls1 is None else _f64(gamma) * _f64(ls1)
            self.mixer_mode = "pool_gn" if kind == "gn" else "pool_ln"
            self.pool_size = mixer.pool_size
            self.mix_weight = w.to(dtype)
            self.res_scale1 = _as_buffer(rs1, dtype)
            return
        mixer = copy.deepcopy(mixer)
        if type(mixer) is SepConv:
            mixer.pwconv1 = _fold_in(mixer.pwconv1, gamma, beta)
            if ls1 is not None:
                mixer.pwconv2 = _fold_out(mixer.pwconv2, ls1)
        elif type(mixer) is Attention:
            mixer.qkv = _fold_in(mixer.qkv, gamma, beta)
            if ls1 is not None:
                mixer.proj = _fold_out(mixer.proj, ls1)
        else:
            raise _CannotFold(f"token mixer of type {type(mixer).__name__} (its linear maps are unknown)")
        self.mixer_mode = "folded"
        self.token_mixer = mixer
        self.res_scale1 = _as_buffer(rs1, dtype)

    def _fold_mlp_half(self, block: MetaFormerBlock, dtype: torch.dtype) -> None:
        kind = _norm_kind(block.norm2)
        if kind is None:
            raise _CannotFold(f"norm2 of type {type(block.norm2).__name__} (not GroupNorm1 / LayerNorm2d)")
        if type(block.drop_path2) is not nn.Identity and not _is_drop_path(block.drop_path2):
            raise _CannotFold(f"drop_path2 of type {type(block.drop_path2).__name__}")
        mlp = block.mlp
        if type(mlp) is not Mlp:
            raise _CannotFold(f"mlp of type {type(mlp).__name__}")
        ls2 = _scale_vector(block.layer_scale2)
        rs2 = _scale_vector(block.res_scale2)
        beta = None if block.norm2.bias is None else block.norm2.bias.detach()
        self.norm2_kind, self.eps2 = kind, float(block.norm2.eps)
        self.fc1 = _fold_in(mlp.fc1, block.norm2.weight.detach(), beta)
        self.fc2 = _fold_out(mlp.fc2, ls2) if ls2 is not None else _rebuild(mlp.fc2, _f64(mlp.fc2.weight),
                                                                            _f64(mlp.fc2.bias))
        self.act = copy.deepcopy(mlp.act)
        if type(mlp.act) is nn.GELU:
            self.act_kind = "gelu_" + ("tanh" if mlp.act.approximate == "tanh" else "none")
        self.res_scale2 = _as_buffer(rs2, dtype)
        self.mlp_mode = "folded"

    # ------------------------------------------------------------------ running
    def _mixer_half(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.mixer_mode
        if mode == "pool_gn":
            return kernels.pool_mixer_residual(x, self.mix_weight, eps=self.eps1, pool_size=self.pool_size,
                                               res_scale=self.res_scale1)
        if mode == "original":
            return self.original_mixer_half(x)
        n = _normalise(self.norm1_kind, x, self.eps1, self.channels)
        if mode == "pool_ln":
            mix = (avg_pool_same(n, self.pool_size) - n) * self.mix_weight.view(1, -1, 1, 1)
        else:
            mix = self.token_mixer(n)
        if self.res_scale1 is None:
            return x + mix
        return torch.addcmul(mix, x, self.res_scale1.view(1, -1, 1, 1))

    def _mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp_mode == "original":
            return self.original_mlp_half(x)
        n = _normalise(self.norm2_kind, x, self.eps2, self.channels)
        res = x if self.res_scale2 is None else x * self.res_scale2.view(1, -1, 1, 1)
        if (self.act_kind is not None and self.fc1.weight.dtype == torch.float32
                and self.fc1.weight.device.type == "cpu" and onednn_usable(n)):
            y = mlp_residual_onednn(n, res, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                    self.act_kind[5:])
            if y is not None:
                return y
        return res + self.fc2(self.act(self.fc1(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mlp_half(self._mixer_half(x))

    def extra_repr(self) -> str:
        return f"mixer_mode={self.mixer_mode!r}, mlp_mode={self.mlp_mode!r}"


def _is_drop_path(m: nn.Module) -> bool:
    return type(m) is DropPath  # identity in eval


class _MixerHalf(nn.Module):
    """The unfolded token-mixer half of a block, exactly as the block computes it in eval."""

    def __init__(self, block: MetaFormerBlock):
        super().__init__()
        self.norm1, self.token_mixer = block.norm1, block.token_mixer
        self.layer_scale1, self.res_scale1 = block.layer_scale1, block.res_scale1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_scale1(x) + self.layer_scale1(self.token_mixer(self.norm1(x)))


class _MlpHalf(nn.Module):
    """The unfolded MLP half of a block, exactly as the block computes it in eval."""

    def __init__(self, block: MetaFormerBlock):
        super().__init__()
        self.norm2, self.mlp = block.norm2, block.mlp
        self.layer_scale2, self.res_scale2 = block.layer_scale2, block.res_scale2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_scale2(x) + self.layer_scale2(self.mlp(self.norm2(x)))


def _refuse_train(model: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            "this model was returned by metaformer.optimize_for_inference and is evaluation-only: its norms, "
            "layer scales and MLP weights are folded together, so it cannot be trained. Call .train() on the "
            "original model (optimize_for_inference leaves it untouched) and optimise it again after training."
        )
    return nn.Module.train(model, False)


def is_inference_optimized(model: nn.Module) -> bool:
    """Whether ``model`` was returned by :func:`optimize_for_inference`."""
    return bool(getattr(model, "_metaformer_inference_only", False))


def optimize_for_inference(model: nn.Module, *, strict: bool = False) -> nn.Module:
    """Returns an evaluation-only copy of a MetaFormer with the foldable maps folded.

    Every :class:`~metaformer.MetaFormerBlock` of the copy is replaced by an :class:`InferenceBlock`:
    the second norm's per-channel affine is folded into ``mlp.fc1``, layer scale 2 into ``mlp.fc2``,
    norm 1's weight and layer scale 1 into the fused pooling factor (pooling mixers) or into the mixer's
    first and last linear maps (``SepConv``, ``Attention``); on CPU the MLP runs as two oneDNN
    primitives with the activation and the residual addition fused in (see the module docstring). The
    copy computes the same function as ``model`` to float32 rounding. ``model`` itself is not modified.

    Parts that cannot be folded exactly, such as a block whose norm is a user-written class, a custom
    token mixer or scale module, are kept as they are (the result stays exact), unless ``strict=True``.

    Calling ``.train()`` on the result raises ``RuntimeError``; ``.eval()`` is allowed.

    Args:
        model: A MetaFormer (or any module containing MetaFormer blocks), in eval mode.
        strict: Refuse (``ValueError``) instead of keeping a part that cannot be folded.

    Returns:
        The folded copy, in eval mode, with ``requires_grad=False`` parameters.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        RuntimeError: If ``model`` (or any submodule) is in training mode.
        ValueError: With ``strict=True``, if some block part cannot be folded; the message lists them.

    Example:
        >>> model = metaformer.create("poolformer_s12", pretrained=True).eval()
        >>> fast = metaformer.optimize_for_inference(model)
        >>> with torch.inference_mode():
        ...     logits = fast(images)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        more = f" (and {len(training) - 3} more)" if len(training) > 3 else ""
        raise RuntimeError(
            f"optimize_for_inference needs a model in eval mode, but {', '.join(training[:3])}{more} "
            "is in training mode: folding bakes in evaluation-time behaviour (no dropout, no stochastic "
            "depth), so it would change a training model's results. Call model.eval() first."
        )
    out = copy.deepcopy(model)
    problems: list[str] = []
    for parent_name, parent in list(out.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, MetaFormerBlock):
                continue
            if type(child) is not MetaFormerBlock:
                problems.append(f"{_join(parent_name, child_name)}: block subclass {type(child).__name__}")
                continue
            new, skipped = InferenceBlock.from_block(child)
            problems.extend(f"{_join(parent_name, child_name)}: {why}" for why in skipped)
            setattr(parent, child_name, new)
    if strict and problems:
        raise ValueError(
            "optimize_for_inference(strict=True) cannot fold these parts exactly:\n  " + "\n  ".join(problems)
            + "\nUse the built-in norms (GroupNorm1, LayerNorm2d), mixers and Scale, or call with strict=False "
            "to keep those parts unfolded (the result stays exact)."
        )
    out.requires_grad_(False)
    nn.Module.train(out, False)
    out.inference_skipped = problems
    out._metaformer_inference_only = True
    out.train = functools.partial(_refuse_train, out)
    return out


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b
