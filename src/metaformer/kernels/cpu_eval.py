"""Evaluation-mode halves of a block on CPU, as oneDNN primitives on folded, pre-packed weights.

Each function takes a :class:`~metaformer.MetaFormerBlock` and its input and returns the half's output,
or None when the half is not one it knows (the caller then runs the block's own half). The caller
(:mod:`metaformer.kernels.dispatch`) has checked that nothing needs a gradient and that the input is an
fp32 CPU tensor in eager mode. Every half computes the same function as the plain composition; the
folds are those of :mod:`metaformer.kernels.folding`:

- MLP half ``rs * x + ls * fc2(act(fc1(norm(x))))``: the norm without its affine (folded into fc1),
  fc1 with the activation fused (GELU, ReLU; for StarReLU and SquaredReLU a ReLU, then the square as one
  in-place pass, StarReLU's scale and bias and the layer scale folded into fc2), fc2 with the residual
  addition fused;
- SepConv half ``rs * x + ls * pw2(dw(act(pw1(norm(x)))))``: the same for ``pw1``, then StarReLU's
  ``s * r * r + b`` as one in-place pass (its bias cannot fold through the zero-padded depthwise
  convolution), the depthwise convolution as a oneDNN primitive, ``pw2`` with the residual fused;
- attention half: the norm's affine folded into ``qkv``, the layer scale into ``proj``, the tokens
  read straight from the channels_last memory (a view), ``proj`` with the residual addition fused.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..tracing import channels_last_only
from . import onednn
from .cache import derived
from .folding import (
    Folded,
    _layers,
    _mixers,
    act_kind,
    cast,
    fold_in,
    fold_out,
    half_kind,
    normalise,
    plain_1x1,
    plain_sepconv,
    scale_of,
)

__all__ = ["channels_last_only", "downsample_conv", "mlp_half", "sepconv_half", "attention_half", "run_mlp", "run_sepconv", "run_attention",
           "packed_pair", "attention_weights", "hidden_shape", "chunk_rows", "block_chunk_rows", "in_chunks",
           "in_place_chunks", "kept_block_bytes", "KEPT_BLOCK_BYTES"]

_RELU_FIRST = {"relu": "relu", "star": "relu", "square": "relu", "gelu": "gelu", "gelu_tanh": "gelu"}


def _star(act: nn.Module, kind: str):
    return (act.scale, act.bias) if kind == "star" else None


def hidden_shape(input_shape, channels: int) -> tuple:
    """The shape of a half's hidden tensor: ``input_shape`` with ``channels`` channels (what the weights
    after the first 1x1 convolution are packed for)."""
    return (input_shape[0], channels, *input_shape[2:])


def packed_pair(w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
                input_shape, extra: tuple = ()) -> Folded:
    """The two 1x1 weights of a half pre-packed for oneDNN: ``w1`` for inputs shaped ``input_shape``,
    ``w2`` for the hidden tensor between them (``w1.shape[0]`` channels).

    Packing ``w2`` for the wrong channel count makes oneDNN refuse the layout, and the unpacked weight
    is then reordered on every call.
    """
    return Folded(onednn.prepack(w1, 0, 1, input_shape), b1,
                  onednn.prepack(w2, 0, 1, hidden_shape(input_shape, w1.shape[0])), b2, extra)


# ------------------------------------------------------------------------------------------ MLP half
def _mlp_parts(block: nn.Module):
    mlp = block.mlp
    if type(mlp) is not _layers().Mlp or not (plain_1x1(mlp.fc1) and plain_1x1(mlp.fc2)):
        return None
    kind = half_kind(block.norm2, block.drop_path2, block.layer_scale2, block.res_scale2)
    act = act_kind(mlp.act)
    if kind is None or act is None:
        return None
    return kind, act


# A block on a large batch outgrows the last-level cache: its MLP's hidden tensor (4x the input) is written
# by fc1 and streamed back from memory by fc2. At the first stage (64 -> 256 channels at 56x56, batch 16:
# 51 MiB) whole blocks run faster a few samples at a time (interleaved, 2 cores, 32 MiB L3, stage-1 blocks:
# pooling v1 68 -> 48 ms, v2 72 -> 39, ConvFormer 95 -> 70; the MLP half alone 1.45x), at the second
# (26 MiB) pooling blocks gained 9-13% and ConvFormer's lost 3%, at the third (16 MiB) nothing was won.
# Chunking above 16 MiB into pieces of at most 16 MiB measured best of the rules tried on whole models
# (poolformer_s12 1.07x over 32/8 MiB, poolformerv2_s12 and convformer_s18 1.00x).
# Measured again later, what the chunks save is mostly page faults, not cache misses: under glibc's default
# settings a freed block above its mmap threshold goes back to the OS and the next forward faults it in again
# (docs/kernels.md, "Page faults and the allocator"). Whole models at batch 16, interleaved: in chunks
# 1.02-1.08x faster under the defaults, but 0.84-0.98x of the whole batch where freed memory is kept
# (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised). A probe of the allocator (fault counts of a freed
# and re-allocated block) answered differently with the order of its sizes, so the rule stays the defaults'.
# Pooling, identity and random-mixing blocks now chunk their MLP half alone, writing over the mixer half's
# output (in_place_chunks): with freed memory kept their chunks then cost nothing against the whole batch.
# Where the process was started with glibc settings that keep freed blocks (KEPT_BLOCK_BYTES, the settings
# docs/kernels.md recommends) the whole batch ran as fast or faster (interleaved per-round ratios, Xeon AVX-512,
# 2 cores, 31-41 rounds: chunks / whole 1.037-1.055 on convformer_s18, 0.98-1.02 on caformer_s18, 1.00 on
# poolformer_s12 and identityformer_s12), and under the defaults slower for all six families (whole / chunks
# 1.06-1.09): a block whose hidden tensor glibc would keep runs whole.
_CHUNK_ABOVE = 16 << 20
_CHUNK_BYTES = 16 << 20


def kept_block_bytes(environ: Mapping[str, str] = os.environ, platform: str = sys.platform) -> int:
    """The largest block that glibc's ``malloc`` keeps for reuse when it is freed, under the settings in
    ``environ`` (the process's environment at start, which glibc read): the smaller of the mmap threshold
    (larger blocks are mapped on their own and unmapped when freed) and the trim threshold (free memory above
    it at the top of the heap goes back to the system), from ``GLIBC_TUNABLES`` (``glibc.malloc.mmap_threshold``,
    ``glibc.malloc.trim_threshold``) or else ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``; 0 unless
    both are set (glibc's defaults adapt the thresholds and give large blocks back), and 0 off Linux. Other
    allocators (an ``LD_PRELOAD``-ed jemalloc or tcmalloc) are not recognised: 0."""
    if not platform.startswith("linux"):
        return 0
    tunables = {}
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        tunables[name.strip()] = value.strip()
    sizes = []
    for kind in ("mmap", "trim"):
        value = tunables.get(f"glibc.malloc.{kind}_threshold", environ.get(f"MALLOC_{kind.upper()}_THRESHOLD_"))
        try:
            sizes.append(int(value, 0) if value else 0)
        except ValueError:  # glibc would not take it either
            return 0
    return max(0, min(sizes))


# glibc reads its settings when the process starts; the environment at import is that one, in practice.
KEPT_BLOCK_BYTES = kept_block_bytes()


def chunk_rows(x: torch.Tensor, hidden: int) -> int:
    """How many samples of ``x`` a block whose MLP has ``hidden`` channels runs at a time in evaluation:
    the whole batch, or a divisor of it where the hidden tensor would not fit in cache (unless the process keeps
    freed blocks of that size, :data:`KEPT_BLOCK_BYTES`: then what the chunks saved, mostly the page faults of
    a fresh block, is not paid and the whole batch is faster)."""
    b, c = x.shape[0], x.shape[1]
    per_sample = hidden * (x[0].numel() // c) * x.element_size()
    if b < 2 or per_sample * b <= max(_CHUNK_ABOVE, KEPT_BLOCK_BYTES):
        return b
    rows = max(1, _CHUNK_BYTES // per_sample)
    while b % rows:
        rows -= 1
    return rows


def block_chunk_rows(block: nn.Module, x: torch.Tensor) -> Optional[int]:
    """Samples per chunk for evaluating ``block`` on ``x`` (see :func:`chunk_rows`), or None where the
    block runs whole: a batch that fits, or a block with a part that is not a built-in one (only those
    are known to treat every sample on its own)."""
    m = _mixers()
    if (x.dim() != 4 or type(block.mlp) is not _layers().Mlp
            or type(block.token_mixer) not in (m.Pooling, m.Identity, m.RandomMixing, m.SepConv, m.Attention)
            or half_kind(block.norm1, block.drop_path1, block.layer_scale1, block.res_scale1) is None
            or half_kind(block.norm2, block.drop_path2, block.layer_scale2, block.res_scale2) is None):
        return None
    rows = chunk_rows(x, block.mlp.fc1.weight.shape[0])
    return rows if rows < x.shape[0] else None


def in_chunks(fn, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``fn(x)`` computed ``rows`` samples at a time, for an ``fn`` that treats every sample on its own."""
    if rows >= x.shape[0]:
        return fn(x)
    out = None
    for i in range(0, x.shape[0], rows):
        y = fn(x[i:i + rows])
        if out is None:
            out = torch.empty((x.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device,
                              memory_format=_format_of(y))
        out[i:i + rows] = y
    return out


def in_place_chunks(fn, y: torch.Tensor, rows: int) -> torch.Tensor:
    """``fn`` applied to ``y`` ``rows`` samples at a time, each result written over its own slice of ``y``: for
    a ``y`` that only the caller holds (a block's mixer-half output) and an ``fn`` that treats every sample on
    its own and may write its result into its argument (the MLP half with ``consume``). No output is
    allocated and nothing is copied where ``fn`` writes in place."""
    for i in range(0, y.shape[0], rows):
        part = y[i:i + rows]
        out = fn(part)
        if out.data_ptr() != part.data_ptr() or out.stride() != part.stride():
            part.copy_(out)
    return y


def _format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if channels_last_only(t) else torch.contiguous_format


def _fold_mlp(block: nn.Module, act: str, shape) -> Folded:
    mlp, norm = block.mlp, block.norm2
    w1, b1 = fold_in(mlp.fc1.weight, mlp.fc1.bias, norm.weight, norm.bias)
    w2, b2 = fold_out(mlp.fc2.weight, mlp.fc2.bias, scale_of(block.layer_scale2), _star(mlp.act, act))
    like = mlp.fc1.weight
    return packed_pair(cast(w1, like), cast(b1, like), cast(w2, like), cast(b2, like), shape)


def mlp_half(block: nn.Module, x: torch.Tensor, consume: bool = False) -> Optional[torch.Tensor]:
    """The MLP half ``rs2 * x + ls2 * Mlp(norm2(x))`` in evaluation, or None if not fusable.

    With ``consume`` the caller hands ``x`` over (a temporary of its own that nothing else holds): the
    result is then written into ``x``'s memory (see :func:`run_mlp`).
    """
    parts = _mlp_parts(block)
    if parts is None:
        return None
    kind, act = parts
    mlp = block.mlp
    sources = [block.norm2.weight, block.norm2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
               *(_star(mlp.act, act) or ()), scale_of(block.layer_scale2)]
    shape = tuple(x.shape)
    p = derived(block, "mlp_half", sources, lambda: _fold_mlp(block, act, shape), shape=shape)
    return run_mlp(x, kind, block.norm2.eps, p, "square" if act == "star" else act, scale_of(block.res_scale2),
                   consume)


def run_mlp(x: torch.Tensor, kind: str, eps: float, p: Folded, act: str,
            res_scale: Optional[torch.Tensor], consume: bool = False) -> Optional[torch.Tensor]:
    """``res_scale * x + fc2(act(fc1(norm(x))))`` with the folded weights ``p`` (``act`` not StarReLU).

    fc2 adds its product into the residual in place where the residual is a temporary: ``res_scale * x``,
    or with ``consume`` (``x`` is the caller's temporary) ``x`` itself, which then holds the result. That
    saves allocating the output (one block-sized tensor per half; for a large one, faulting its pages in).
    """
    n = normalise(kind, x, eps)
    fused = "relu_square" if act == "square" else _RELU_FIRST[act]
    res = _residual(x, res_scale, consume)
    return onednn.mlp_residual_onednn(n, res, p.w1, p.b1, p.w2, p.b2, fused,
                                      "tanh" if act == "gelu_tanh" else "none", inplace=consume or res is not x)


def _residual(x: torch.Tensor, res_scale: Optional[torch.Tensor], consume: bool = False) -> torch.Tensor:
    """``res_scale * x``: ``x`` itself without a res scale, in ``x``'s memory where the caller hands ``x`` over
    (``consume``), a new tensor otherwise."""
    if res_scale is None:
        return x
    return x.mul_(res_scale.view(1, -1, 1, 1)) if consume else x * res_scale.view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------- SepConv half
def _sepconv_parts(block: nn.Module):
    mixer = block.token_mixer
    if type(mixer) is not _mixers().SepConv or not plain_sepconv(mixer):
        return None
    kind = half_kind(block.norm1, block.drop_path1, block.layer_scale1, block.res_scale1)
    act = act_kind(mixer.act1)
    if kind is None or act is None:
        return None
    return kind, act


def _fold_sepconv(block: nn.Module, act: str, x: torch.Tensor) -> Folded:
    m, norm = block.token_mixer, block.norm1
    w1, b1 = fold_in(m.pwconv1.weight, m.pwconv1.bias, norm.weight, norm.bias)
    w2, b2 = fold_out(m.pwconv2.weight, m.pwconv2.bias, scale_of(block.layer_scale1))
    like = m.pwconv1.weight
    k = m.dwconv.kernel_size[0]
    dw = onednn.prepack(m.dwconv.weight.detach().contiguous(), k // 2, m.dwconv.groups,
                        hidden_shape(x.shape, w1.shape[0]))
    star = (float(m.act1.scale), m.act1.bias.detach().clone()) if act == "star" else None
    return packed_pair(cast(w1, like), cast(b1, like), cast(w2, like), cast(b2, like), x.shape,
                       (dw, None if m.dwconv.bias is None else m.dwconv.bias.detach().clone(), star))


def sepconv_half(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The SepConv token-mixer half ``rs1 * x + ls1 * SepConv(norm1(x))`` in evaluation, or None."""
    parts = _sepconv_parts(block)
    if parts is None:
        return None
    kind, act = parts
    m = block.token_mixer
    sources = [block.norm1.weight, block.norm1.bias, m.pwconv1.weight, m.pwconv1.bias, m.dwconv.weight,
               m.dwconv.bias, m.pwconv2.weight, m.pwconv2.bias, *(_star(m.act1, act) or ()),
               scale_of(block.layer_scale1)]
    p = derived(block, "sepconv_half", sources, lambda: _fold_sepconv(block, act, x), shape=tuple(x.shape))
    return run_sepconv(x, kind, block.norm1.eps, p, act, m.dwconv.kernel_size[0], m.dwconv.groups,
                       scale_of(block.res_scale1))


def run_sepconv(x: torch.Tensor, kind: str, eps: float, p: Folded, act: str, kernel_size: int, groups: int,
                res_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``res_scale * x + pw2(dw(act(pw1(norm(x)))))`` with the folded weights ``p``.

    ``p.extra`` is ``(depthwise weight, depthwise bias, (s, b) of a StarReLU or None)``.
    """
    dw, dw_bias, star = p.extra
    n = normalise(kind, x, eps)
    h = onednn.conv(n, p.w1, p.b1, _RELU_FIRST[act], algorithm="tanh" if act == "gelu_tanh" else "none")
    if h is None:
        return None
    if star is not None:
        torch.addcmul(star[1], h, h, value=star[0], out=h)
    elif act == "square":
        h.square_()
    d = onednn.conv(h, dw, dw_bias, "none", padding=kernel_size // 2, groups=groups)
    if d is None:
        return None
    res = _residual(x, res_scale)
    return onednn.conv_add(d, res, p.w2, p.b2, inplace=res is not x)  # into res where it is a new tensor


# ------------------------------------------------------------------------------------- attention half
def _attention_parts(block: nn.Module):
    mixer = block.token_mixer
    if type(mixer) is not _mixers().Attention:
        return None
    return half_kind(block.norm1, block.drop_path1, block.layer_scale1, block.res_scale1)


def _fold_attention(block: nn.Module, shape: tuple) -> Folded:
    m, norm = block.token_mixer, block.norm1
    wq, bq = fold_in(m.qkv.weight, m.qkv.bias, norm.weight, norm.bias)
    wp, bp = fold_out(m.proj.weight, m.proj.bias, scale_of(block.layer_scale1))
    like = m.qkv.weight
    return attention_weights(cast(wq, like), cast(bq, like), cast(wp, like), cast(bp, like), shape)


def attention_weights(wq: torch.Tensor, bq: Optional[torch.Tensor], wp: torch.Tensor, bp: Optional[torch.Tensor],
                      shape: tuple) -> Folded:
    """``qkv`` and ``proj`` (linear weights) as 1x1 convolution weights packed for inputs shaped ``shape``:
    on channels_last maps the tokens are the map's own memory, and oneDNN measured 1.1-1.2x faster than
    ``F.linear`` for them (CAFormer's third stage, 2 cores)."""
    return packed_pair(wq.reshape(*wq.shape, 1, 1), bq, wp.reshape(*wp.shape, 1, 1), bp, shape)


def attention_half(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The attention token-mixer half ``rs1 * x + ls1 * Attention(norm1(x))`` in evaluation, or None."""
    kind = _attention_parts(block)
    if kind is None:
        return None
    m = block.token_mixer
    sources = [block.norm1.weight, block.norm1.bias, m.qkv.weight, m.qkv.bias, m.proj.weight, m.proj.bias,
               scale_of(block.layer_scale1)]
    shape = tuple(x.shape)
    p = derived(block, "attention_half", sources, lambda: _fold_attention(block, shape), shape=shape)
    return run_attention(x, kind, block.norm1.eps, p, m, scale_of(block.res_scale1))


def run_attention(x: torch.Tensor, kind: str, eps: float, p: Folded, mixer: nn.Module,
                  res_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``res_scale * x + proj(attention(qkv(norm(x))))`` with the weights ``p`` of
    :func:`attention_weights`, heads and scale from ``mixer``; None if oneDNN refuses."""
    h = x.shape[2]
    qkv = onednn.conv(normalise(kind, x, eps).contiguous(memory_format=torch.channels_last), p.w1, p.b1)
    if qkv is None:
        return None
    # qkv channels are ordered (3, heads, head_dim), as in the releases' Attention; a view of the map
    q, k, v = rearrange(qkv, "b (three nh d) h w -> three b nh (h w) d", three=3, nh=mixer.num_heads)
    out = rearrange(F.scaled_dot_product_attention(q, k, v, scale=mixer.sdpa_scale()), "b nh (h w) d -> b h w (nh d)",
                    h=h)
    res = _residual(x, res_scale)
    # (b, h, w, c) contiguous is a channels_last (b, c, h, w) map
    out = out.contiguous().permute(0, 3, 1, 2)
    return onednn.conv_add(out, res, p.w2, p.b2, inplace=res is not x)  # into res where it is a new tensor


# ------------------------------------------------------------------------------------------ downsampling
def downsample_conv(conv: nn.Conv2d, owner: nn.Module, n: torch.Tensor) -> Optional[torch.Tensor]:
    """``conv(n)``, a downsampling's ``nn.Conv2d`` on its (normalised) 4-D input or the stem's on the image, as a
    oneDNN primitive on a weight packed once per input shape (cached with ``owner``); None where it does not
    apply. The result is channels_last, also for an NCHW input.

    ``F.conv2d`` reorders the weight on every call (for a channels_last input, first into channels_last with a
    copy): at batch 1 that was 3% of a poolformer_s12 forward.
    """
    if (conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.groups != 1
            or conv.dilation != (1, 1) or conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1]):
        return None
    stride, padding, shape = conv.stride[0], conv.padding[0], tuple(n.shape)
    w = derived(owner, "downsample_conv", [conv.weight],
                lambda: onednn.prepack(conv.weight.detach(), padding, 1, shape, stride=stride), shape=shape)
    return onednn.conv(n, w, conv.bias, padding=padding, stride=stride)
