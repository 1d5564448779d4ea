"""The one place where a block leaves its plain composition for fused paths.

:class:`~metaformer.MetaFormerBlock` is the plain maths (``mixer_half`` then ``mlp_half``); in eager
mode its ``forward`` hands itself to :func:`block_forward`, which picks, for each half, a fused path
when one computes exactly the same function, or the block's own half otherwise:

- token-mixer half:

  - :class:`~metaformer.mixers.Pooling` after a one-group :class:`~metaformer.layers.GroupNorm1`:
    :func:`~metaformer.kernels.pool_mixer_residual` (PyTorch or Triton, with autograd; on CPU in
    training, a written-out backward, :mod:`metaformer.kernels.autograd_halves`);
  - :class:`~metaformer.mixers.Identity` and :class:`~metaformer.mixers.RandomMixing`: the norm with the
    layer scale folded into its affine, then one addition or one batched product that adds the residual
    (standard ops, so also in training; :mod:`metaformer.kernels.torch_halves`);
  - :class:`~metaformer.mixers.SepConv`, :class:`~metaformer.mixers.Attention`: on CPU in fp32 where
    nothing needs a gradient, oneDNN primitives on folded weights (:mod:`metaformer.kernels.cpu_eval`);
    SepConv in training on CPU, its parts with the depthwise convolution's weight gradient taken one sample
    at a time (:mod:`metaformer.kernels.sepconv_train`);

- MLP half: on CPU in fp32, oneDNN primitives on folded weights where nothing needs a gradient, and in
  training an ``autograd.Function`` with a written-out backward that keeps only the tensors it reads
  (:mod:`metaformer.kernels.autograd_halves`);
- on CUDA (the baselines' halves): the channel LayerNorm and StarReLU as Triton kernels with autograd,
  the whole block with its residual update fused with ``norm2`` where it is all covered
  (:mod:`metaformer.kernels.cuda_halves`);
- on CPU a block with a fused half works in channels_last, where oneDNN, ATen's pooling and the channel
  LayerNorm are fastest; the layout then carries through the following layers (values are unchanged);
- on CPU in evaluation, a block of built-in parts whose MLP hidden tensor would outgrow the cache runs a
  few samples at a time (:func:`~metaformer.kernels.cpu_eval.chunk_rows`; every part treats each sample on
  its own, so the result is the same).

Nothing here runs under TorchScript (the block skips it), FX symbolic tracing, ``torch.jit.trace`` or
ONNX export, with the ``"reference"`` backend, or on CPU under autocast (whose bf16 convolutions the fp32
paths do not reproduce): those see the plain composition. Nor does it run for a block with a hook on one of
its parts (a forward or backward hook, a pruning or quantisation pre-hook, a ``forward`` replaced on the
instance) or while global module hooks are registered: the fused paths read the parts' weights without
calling them, so those hooks would not run, or would run on a slice of the batch. Nor under a ``torch.func``
transform or forward-mode AD, a dispatch mode such as ``FakeTensorMode`` or for a tensor subclass. Those
checks are :mod:`metaformer.kernels.guards` (:func:`~metaformer.kernels.guards.fast_paths_active`). Nor for
a half that a subclass of the block writes itself (its own ``mixer_half`` or ``mlp_half``): that half runs as
written. Under ``torch.compile`` only the standard-op paths run (pooling identity, identity and random
mixing).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from ..tracing import autocast_enabled

# The package defines these before it imports this module (at its end).
from . import autograd_halves, cpu_eval, cuda_halves, onednn, pool_mixer_residual, sepconv_train, torch_halves
from .folding import _blocks, _layers, _mixers, half_kind, norm_kind
from .guards import fast_paths_active, intercepted, module_hooked, parts_hooked, transformed

__all__ = ["block_forward", "downsample_forward", "fast_paths_active", "in_input_layout", "intercepted",
           "module_hooked", "parts_hooked", "pool_mixer_fusable", "stem_forward", "transformed"]


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of a :class:`~metaformer.MetaFormerBlock`, through fused paths where they apply."""
    own_mixer, own_mlp = _own_halves(block)
    if _plain(block, x, own_mixer, own_mlp):
        return block.mlp_half(block.mixer_half(x))
    if not (own_mixer or own_mlp or pool_mixer_fusable(block)) and cuda_halves.halves_apply(x):
        y = cuda_halves.ln_block(block, x)  # the baselines' whole block through the Triton kernels
        if y is not None:
            return y
    given = x
    converted = _cpu_converts(block, x)
    if converted:
        x = x.contiguous(memory_format=torch.channels_last)
    rows = None if own_mixer or own_mlp else _cpu_eval_chunk_rows(block, x)
    if rows is not None and _light_mixer(block):
        # a mixer half without a hidden tensor runs whole; the MLP half then writes over its output a few
        # samples at a time (no block output to allocate, no chunk to copy into it)
        mixed = _mixer_half(block, x)
        mixed = block.mixer_half(x) if mixed is None else mixed
        y = cpu_eval.in_place_chunks(functools.partial(_mlp_half_or_plain, block), mixed, rows)
    elif rows is not None:
        y = cpu_eval.in_chunks(functools.partial(_halves, block), x, rows)
    else:
        y = _halves(block, x, own_mixer, own_mlp)
    # a block called on its own returns the input's layout; in a model or stage its input is already
    # channels_last (working_layout), so nothing converts between blocks
    return in_input_layout(y, given) if converted else y


def _plain(block: nn.Module, x: torch.Tensor, own_mixer: bool, own_mlp: bool, hooks: bool = True) -> bool:
    """Whether :func:`block_forward` runs the block's plain composition: no fast path may run, CPU autocast
    (whose convolutions run in bf16/fp16), or both halves the subclass's own. Without ``hooks``, the parts' hooks
    are not asked (:func:`fast_paths_active` without the block)."""
    return (not fast_paths_active(x, block if hooks else None) or (x.device.type == "cpu" and _cpu_autocast())
            or (own_mixer and own_mlp))


def _cpu_converts(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether a block whose fast paths run computes ``x`` in channels_last: an NCHW-contiguous CPU input that
    a fused CPU half takes (the cheap tests first: a model's or stage's channels_last input answers at once)."""
    return x.device.type == "cpu" and nchw_contiguous(x) and _cpu_fused(block, x)


def _block_converts(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`block_forward` runs ``x`` in channels_last."""
    # While compiling, the parts' hooks are not asked (a layout changes no value; a hooked block runs its plain
    # composition in channels_last): this walk reaches a stage's blocks by another path than the stage's own call,
    # and PyTorch 2.4's Dynamo fails building its guards on a hook dict it has seen under two names.
    hooks = not torch.compiler.is_compiling()
    return _cpu_converts(block, x) and not _plain(block, x, *_own_halves(block), hooks=hooks)


def inference_block_fast(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether an :class:`~metaformer.inference_block.InferenceBlock`'s fast paths may run for ``x``: on CPU in
    eager mode (:func:`fast_paths_active`)."""
    # (compiling asked first: the hook check's walk is then not traced from converts_to_channels_last, see there)
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and fast_paths_active(x, block)


def inference_block_converts(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether an :class:`~metaformer.inference_block.InferenceBlock` runs ``x`` in channels_last: an
    NCHW-contiguous input of more than one channel where its fast paths run."""
    return nchw_contiguous(x) and inference_block_fast(block, x)


def converts_to_channels_last(module: nn.Module, x) -> bool:
    """Whether the first block of ``module`` (a block, a stage, or a sequence of blocks or stages) runs an
    NCHW input ``x`` in channels_last, the layout of the CPU fast paths.

    A model or stage then converts its input once, before its blocks, so that no block converts (a block
    or stage called on its own returns the input's layout, which would cost a copy at every block).
    """
    from ..inference_block import InferenceBlock

    MetaFormerBlock = _blocks().MetaFormerBlock
    if not isinstance(x, torch.Tensor) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False  # (a traced size compared with an int would warn; the blocks keep the layout there)
    stack = [module]
    while stack:
        m = stack.pop()
        if isinstance(m, MetaFormerBlock):
            return _block_converts(m, x)
        if isinstance(m, InferenceBlock):
            return inference_block_converts(m, x)
        if isinstance(m, nn.Sequential):
            stack.extend(reversed(list(m)))
        elif isinstance(getattr(m, "blocks", None), nn.Module):
            stack.append(m.blocks)
        else:
            return False  # another kind of module first: leave the layout to it
    return False


def downsample_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:class:`~metaformer.layers.Downsample`'s forward, ``conv(norm(x))``.

    On CUDA, for a channels_last map, a ``LayerNorm2d`` runs as the Triton LayerNorm kernel, written under
    autocast in the dtype the convolution casts to (see :func:`stem_forward`).

    On CPU in evaluation, for a channels_last map (a model's blocks give one; fp32, eager, nothing needs a
    gradient, no CPU autocast, no hook on the convolution) the convolution runs as a oneDNN primitive on a
    weight packed once (:func:`metaformer.kernels.cpu_eval.downsample_conv`); the same values to float32
    rounding, and the same channels_last result. (For an NCHW map the primitive's result would be
    channels_last where ``F.conv2d``'s is NCHW: that runs ``F.conv2d``.)
    """
    n = _edge_norm(module, x, module.conv)
    n = module.norm(x) if n is None else n
    y = _packed_conv(module, n, channels_last=True)
    return module.conv(n) if y is None else y


def stem_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:class:`~metaformer.layers.Stem`'s forward, ``norm(conv(x))``.

    On CUDA (the ``"auto"`` or ``"triton"`` backend, eager), for a channels_last map, a ``LayerNorm2d`` runs as
    the Triton LayerNorm kernel (:func:`metaformer.kernels.cuda_halves.edge_norm`): the values and the layout
    of the plain norm, to rounding, with autograd.

    On CPU in evaluation (as for :func:`downsample_forward`), before a ``LayerNorm2d`` the convolution runs as a
    oneDNN primitive on a weight packed once: its result is channels_last, as the plain norm's is (it works on
    the channels-last view); the same values to float32 rounding. (Without that norm the plain stem returns an
    NCHW input's layout, and ``F.conv2d`` runs.) convformer_s18 at batch 16: the stem 7.9 against 6.5 ms.
    """
    y = _packed_conv(module, x) if norm_kind(module.norm) == "ln" else None
    y = module.conv(x) if y is None else y
    n = _edge_norm(module, y)
    return module.norm(y) if n is None else n


def _packed_conv(module: nn.Module, x: torch.Tensor, channels_last: bool = False) -> Optional[torch.Tensor]:
    """``module.conv(x)`` (a stem's or a downsampling's) as a oneDNN primitive on a weight packed once
    (:func:`metaformer.kernels.cpu_eval.downsample_conv`; its result is channels_last), or None where that does
    not apply: fp32 on CPU in eager mode with nothing needing a gradient (:func:`onednn.onednn_usable`), an
    ``nn.Conv2d`` itself, the module's parts unhooked, no CPU autocast; with ``channels_last``, only for a
    channels_last ``x``."""
    conv = module.conv
    # (fast_paths_active first: it refuses what is not a real tensor, an FX proxy)
    if (type(conv) is nn.Conv2d and fast_paths_active(x, module) and x.dim() == 4
            and (not channels_last or cpu_eval.channels_last_only(x))
            and onednn.onednn_usable(x, (conv.weight, conv.bias)) and not _cpu_autocast()):
        return cpu_eval.downsample_conv(conv, module, x)
    return None


def _edge_norm(module: nn.Module, x: torch.Tensor, conv: Optional[nn.Module] = None) -> Optional[torch.Tensor]:
    """A stem's or a downsampling's ``module.norm(x)`` through the CUDA kernel, or None (the module's parts
    unhooked, see :func:`fast_paths_active`; ``conv``: the convolution that reads the result)."""
    # (the cheap tests first: a CPU tensor, or a module without a channel LayerNorm, PoolFormer v1's, stops here)
    if not cuda_halves.halves_apply(x) or norm_kind(module.norm) != "ln" or not fast_paths_active(x, module):
        return None
    return cuda_halves.edge_norm(module.norm, x, conv)


def working_layout(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` in the memory format ``module``'s first block computes in (channels_last where it converts
    an NCHW input on CPU, see :func:`converts_to_channels_last`), else ``x`` itself. Values are unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if converts_to_channels_last(module, x) else x


def in_input_layout(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y``, a map the model returns, in the memory format of the model's input ``x``.

    On CPU the blocks' fast paths work in channels_last, and the layout carries through the stages; a map
    returned to the caller (``forward_features``, ``forward_intermediates``, a backbone's features) goes
    back to contiguous NCHW where the input was, as the plain composition returns it. Values are unchanged;
    what works on the plain composition's output works on it (``y.view(len(y), -1)`` raises on a
    channels_last map). A channels_last input keeps channels_last maps. In eager mode and under
    ``torch.compile`` (whose blocks also convert the pooling and identity families); under FX symbolic tracing,
    ``torch.jit.trace`` and ONNX export the blocks keep the input's layout themselves, and ``y`` is returned.
    """
    if isinstance(x, torch.fx.Proxy) or isinstance(y, torch.fx.Proxy) or torch.jit.is_tracing() \
            or torch.onnx.is_in_onnx_export():
        return y
    if y.dim() != 4 or x.dim() != 4 or not x.is_contiguous():
        return y
    if torch.compiler.is_compiling():
        # A traced map's strides can differ from those the compiled kernels give it (a norm's output), and
        # `contiguous()` on a map traced as contiguous is dropped: copy, which the compiled graph keeps.
        return torch.clone(y, memory_format=torch.contiguous_format)
    return y if y.is_contiguous() else y.contiguous()


def _own_halves(block: nn.Module) -> tuple:
    """Whether ``block``'s class replaces ``mixer_half``, and ``mlp_half``: a subclass's half (an ablation)
    is its own maths, which the fused paths (built from the parts) do not know; it runs as written."""
    base, cls = _blocks().MetaFormerBlock, type(block)
    return cls.mixer_half is not base.mixer_half, cls.mlp_half is not base.mlp_half


def _halves(block: nn.Module, x: torch.Tensor, own_mixer: bool = False, own_mlp: bool = False) -> torch.Tensor:
    y = None if own_mixer else _mixer_half(block, x)
    x = block.mixer_half(x) if y is None else y
    if own_mlp:
        return block.mlp_half(x)
    # The mixer half's output is a new tensor that only this function holds (the fused paths' and the plain
    # ``mixer_half``'s, ``res_scale1(x) + ...``), not one of a subclass's half (which may return its input):
    # the MLP half may then write its result into it.
    y = _mlp_half(block, x, not own_mixer)
    return block.mlp_half(x) if y is None else y


def _light_mixer(block: nn.Module) -> bool:
    """Whether the block's token mixer is one whose half has no hidden tensor (pooling, identity, random mixing)."""
    mixers = _mixers()
    return type(block.token_mixer) in (mixers.Pooling, mixers.Identity, mixers.RandomMixing)


def _mlp_half_or_plain(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP half of ``x``, a temporary of the caller's that it may write its result into."""
    y = _mlp_half(block, x, True)
    return block.mlp_half(x) if y is None else y


def _cpu_eval_chunk_rows(block: nn.Module, x: torch.Tensor) -> Optional[int]:
    """Samples per chunk for a CPU evaluation of ``block`` on a batch too large for the cache, else None
    (:func:`metaformer.kernels.cpu_eval.block_chunk_rows`)."""
    if x.dim() != 4 or x.shape[0] < 2 or x.device.type != "cpu" or block.training or not onednn.onednn_ok(x) \
            or not _no_grad_needed(x, block):
        return None  # (a single sample is never split: asked first, as it is the latency case)
    return cpu_eval.block_chunk_rows(block, x)


def nchw_contiguous(x: torch.Tensor) -> bool:
    """A 4-D NCHW-contiguous tensor of more than one channel (one that channels_last would lay out otherwise)."""
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous()


def _cpu_fused(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether some half of ``block`` takes a fused CPU path for ``x`` (then channels_last pays)."""
    mixers = _mixers()
    if pool_mixer_fusable(block) or type(block.token_mixer) in (mixers.Identity, mixers.RandomMixing):
        return True
    return onednn.onednn_ok(x)


def _cpu_autocast() -> bool:
    """Whether CPU autocast is on: its convolutions run in bf16/fp16, which the oneDNN halves (fp32) do not."""
    return autocast_enabled("cpu")


def _no_grad_needed(x: torch.Tensor, *modules: nn.Module) -> bool:
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in modules
                                                           for p in m.parameters())):
        return False
    return True


def _mixer_half(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    if pool_mixer_fusable(block):
        return _fused_pool_half(block, x)
    draw = lambda: _drop_path_scale(block.drop_path1, block.training, x)  # noqa: E731
    mixers, mixer_type = _mixers(), type(block.token_mixer)
    if mixer_type is mixers.Identity:
        return torch_halves.identity_half(block, x, draw)
    if mixer_type is mixers.RandomMixing:
        return torch_halves.random_mixing_half(block, x, draw)
    if cuda_halves.halves_apply(x):
        return cuda_halves.ln_mixer_half(block, x)
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if _no_grad_needed(x, block.norm1, block.token_mixer, block.layer_scale1, block.res_scale1):
        if block.training or not onednn.onednn_ok(x):
            return None
        y = cpu_eval.sepconv_half(block, x)
        return cpu_eval.attention_half(block, x) if y is None else y
    # training: SepConv's depthwise weight gradient one sample at a time; other mixers' plain composition
    return sepconv_train.sepconv_half(block, x)


def _mlp_half(block: nn.Module, x: torch.Tensor, consume: bool = False) -> Optional[torch.Tensor]:
    if cuda_halves.halves_apply(x):
        return cuda_halves.starrelu_mlp_half(block, x)
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if _no_grad_needed(x, block.norm2, block.mlp, block.layer_scale2, block.res_scale2):
        if block.training or not onednn.onednn_ok(x):
            return None
        return cpu_eval.mlp_half(block, x, consume)
    return autograd_halves.mlp_half(block, x, lambda: _drop_path_scale(block.drop_path2, block.training, x))


def pool_mixer_fusable(block: nn.Module) -> bool:
    """Whether the block's token-mixer half is the pooling identity's case (Pooling after GroupNorm1)."""
    # The identity pool(GN(x)) - GN(x) = w * rstd * (pool(x) - x) needs count_include_pad=False pooling
    # (exactly our Pooling) after a one-group GroupNorm; a subclass of either may change the maths.
    return (type(block.token_mixer) is _mixers().Pooling
            and half_kind(block.norm1, block.drop_path1, block.layer_scale1, block.res_scale1) == "gn")


def _fused_pool_half(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    Scale = _layers().Scale
    weight = block.norm1.weight
    if type(block.layer_scale1) is Scale:
        weight = weight * block.layer_scale1.scale
    bias = block.norm1.bias
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        # The norm's bias cancels exactly (its true gradient is zero); keep it in the graph so that it
        # gets that zero gradient, as DistributedDataParallel expects of every parameter.
        weight = weight + 0.0 * bias
    res_scale = block.res_scale1.scale if type(block.res_scale1) is Scale else None
    sample_scale = _drop_path_scale(block.drop_path1, block.training, x)
    return pool_mixer_residual(x, weight, eps=block.norm1.eps, pool_size=block.token_mixer.pool_size,
                               res_scale=res_scale, sample_scale=None if sample_scale is None else sample_scale.view(-1))


def _drop_path_scale(drop_path: nn.Module, training: bool, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The (B, 1, 1, 1) factor of stochastic depth in training (keep mask / keep prob), or None: the
    block's own :meth:`~metaformer.layers.DropPath.sample_factor`, so that a seeded run takes the same
    samples as the plain composition."""
    return drop_path.sample_factor(x) if training and isinstance(drop_path, _layers().DropPath) else None
