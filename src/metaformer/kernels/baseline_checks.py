"""The self-checks of the LayerNorm / StarReLU kernels (run by ``baseline_ops`` through ``selfcheck.guarded``).

Each check runs the Triton kernels and the plain composition forward, and backward for the inputs
that require grad in the real call, on fixed inputs of the real call's configuration: its dtypes and
memory layouts, its channel count, which optional tensors are present, and the properties of the
other integer arguments that Triton specialises kernels on (equal to 1, divisible by 16), so that the
compiled variant checked is the one that will run; the positions (elements for StarReLU) span
several tiles and backward splits. The composition gets the same rounded inputs in fp32 (fp64 for fp64).
"""

from __future__ import annotations

import torch

from . import selfcheck
from .torch_ln import layernorm_channels_torch, residual_layernorm_torch, star_relu_torch

__all__ = ["check_ln", "check_star", "layout_name"]


def layout_name(t) -> str:
    """``"contiguous"``, ``"channels_last"`` or ``"strided"`` (None and non-4-D tensors: contiguous)."""
    if t is None or t.dim() != 4 or t.is_contiguous():
        return "contiguous"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else "strided"


def _count(real: int, target: int) -> int:
    """A count of at least ``target`` that Triton specialises like ``real`` (equal to 1, divisible by 16)."""
    if real == 1:
        return 1
    if real % 16 == 0:
        return -(-target // 16) * 16
    return target if target % 16 else target + 1


def _draw(g, shape, like, kind, layout="contiguous"):
    if like is None:
        return None
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    base = {"map": 1.5 * base + 0.5, "gain": 1 + 0.3 * base, "small": 0.3 * base, "positive": base.abs() + 0.5}[kind]
    t = base.to(device=like.device, dtype=like.dtype)
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def _run(fn, leaves, grads, grad_outputs):
    """{name: output or gradient} of ``fn(*leaves)`` (the gradients of the leaves flagged in ``grads``)."""
    leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(leaves, grads)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    got = {f"output {i}": o.detach() for i, o in enumerate(outs)}
    wanted = [(i, t) for i, t in enumerate(leaves) if t is not None and t.requires_grad]
    if wanted:
        gs = torch.autograd.grad(outs, [t for _, t in wanted], grad_outputs[:len(outs)], allow_unused=True)
        got.update({f"d input {i}": torch.zeros_like(t) if d is None else d for (i, t), d in zip(wanted, gs)})
    return got


def _compare(kernel, reference, leaves, grads, grad_outputs, dtypes) -> str | None:
    ref_dtype = torch.float64 if leaves[0].dtype == torch.float64 else torch.float32
    tol = max(selfcheck.TOLERANCES.get(d, 1e-4) for d in dtypes)
    device = leaves[0].device
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        got = _run(kernel, leaves, grads, grad_outputs)
        cast = [None if t is None else t.to(ref_dtype) for t in leaves]
        want = _run(reference, cast, grads, [g.to(ref_dtype) for g in grad_outputs])
    return selfcheck.compare_outputs(got, want, tol)


def check_ln(tensors, dtypes, grads, *, eps, n_dtype, z_dtype=None) -> str | None:
    """Self-check of ``layernorm_channels`` (``tensors`` = x, weight, bias) or ``residual_layernorm``
    (``z_dtype`` given; ``tensors`` = x, y, weight, bias, res_scale, layer_scale, sample_scale)."""
    from . import triton_ln

    x = tensors[0]
    C, hw = x.shape[1], x.shape[2] * x.shape[3]
    layout = layout_name(x)
    block_p = triton_ln.launch_sizes((1, C, 1 << 20, 1), layout == "channels_last")["block_p"]
    shape = (2, C, 1, _count(hw, (triton_ln.get_config().bwd_iters + 1) * block_p + 3))
    g = torch.Generator().manual_seed(1234)
    kinds = ("map", "map", "gain", "small", "gain", "small", "positive")
    if z_dtype is None:
        kinds = ("map", "gain", "small")
    leaves = [_draw(g, shape if k == "map" else (shape[0] if i == 6 else C,), t, k,
                    layout_name(t) if k == "map" else "contiguous") for i, (t, k) in enumerate(zip(tensors, kinds))]
    like_x = torch.empty(0, device=x.device)
    gn = _draw(g, shape, like_x.to(n_dtype), "map", layout)
    if z_dtype is None:
        return _compare(lambda *t: triton_ln.layernorm_triton(t[0], None, t[1], t[2], eps=eps, out_dtype=n_dtype),
                        lambda *t: layernorm_channels_torch(*t, eps=eps), leaves, grads, [gn],
                        [t.dtype for t in tensors if t is not None] + [n_dtype])
    gz = _draw(g, shape, like_x.to(z_dtype), "map", layout)

    def kernel(x, y, w, b, r, ls, s):
        return triton_ln.layernorm_triton(x, y, w, b, eps=eps, res_scale=r, layer_scale=ls, sample_scale=s,
                                          z_dtype=z_dtype, out_dtype=n_dtype)

    def reference(x, y, w, b, r, ls, s):
        return residual_layernorm_torch(x, y, w, b, eps=eps, res_scale=r, layer_scale=ls, sample_scale=s)

    return _compare(kernel, reference, leaves, grads, [gz, gn],
                    [t.dtype for t in tensors if t is not None] + [z_dtype, n_dtype])


def check_star(tensors, dtypes, grads) -> str | None:
    """Self-check of ``star_relu`` (``tensors`` = x, scale, bias; ``dtypes`` = the output's)."""
    from . import triton_ln

    x, scale, bias = tensors
    cfg = triton_ln.get_config()
    n = _count(x.numel(), 2 * cfg.ew_block * cfg.ew_bwd_iters + 37)
    g = torch.Generator().manual_seed(1234)
    leaves = [_draw(g, (n,), x, "map"), _draw(g, scale.shape, scale, "gain"), _draw(g, bias.shape, bias, "small")]
    gy = _draw(g, (n,), torch.empty(0, device=x.device, dtype=dtypes[0]), "map")
    return _compare(lambda x, s, b: triton_ln.star_relu_triton(x, s, b, out_dtype=dtypes[0]), star_relu_torch,
                    leaves, grads, [gy], [x.dtype, scale.dtype, bias.dtype, dtypes[0]])
