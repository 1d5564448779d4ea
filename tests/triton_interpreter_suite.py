"""The Triton kernels on CPU: ``python tests/triton_interpreter_suite.py GROUP...``.

Run by test_kernels_triton.py in subprocesses: the groups ``tiles``, ``precision`` and ``misc``
with ``TRITON_INTERPRET=1`` (it must be set before triton is imported), ``compile`` without. The interpreter runs every program in Python, so its cost is the number of
programs times the operations per program: the groups pick tile sizes (``triton_impl.configured``)
that make a few programs per launch while still running several pixel tiles, channel blocks,
statistics parts (and blocks per part) and backward splits; ``_covers`` asserts that they do.
Prints ``GROUP passed`` or ``GROUP FAILED`` (after the traceback) per group.
"""

from __future__ import annotations

import torch
from kernel_checks import EPS, check, check_large_mean, fused, inputs, oracle, ref
from triton_suite_common import compile_for_h100, run_groups

import metaformer.kernels as K
from metaformer.kernels import selfcheck
from metaformer.kernels import triton_impl as ti

# Small tiles for small images, big tiles for (2, 65, 57, 55): few programs, several of each kind.
SMALL = dict(tile=512, max_block_c=2, stats_block=512, max_stats_parts=2, bwd_iters=2, max_bwd_parts=8)
BIG = dict(tile=65536, max_block_c=128, stats_block=16384, max_stats_parts=4, bwd_iters=2, max_bwd_parts=8)
F32 = torch.float32


def _covers(shape, channels_last, **minimum):
    """Asserts that the current tile sizes split ``shape`` at least as much as ``minimum`` says."""
    sizes = ti.launch_sizes(shape, channels_last)
    short = {k: (sizes[k], v) for k, v in minimum.items() if sizes[k] < v}
    assert not short, f"{shape} channels_last={channels_last}: (got, wanted) {short}; all {sizes}"


def group_tiles() -> None:
    """Several pixel tiles, channel blocks, statistics parts and backward splits, partial ones included."""
    with ti.configured(**SMALL):
        _covers((1, 3, 40, 41), False, pixel_tiles=4, channel_blocks=3, stats_parts=2, stats_iters=5, bwd_splits=2)
        _covers((1, 3, 40, 41), True, pixel_tiles=7, channel_blocks=2, stats_parts=2, bwd_splits=4)
        check((1, 3, 40, 41), F32, False, True, True)
        check((1, 3, 40, 41), F32, True, True, True)
        _covers((2, 9, 13, 11), True, channel_blocks=5)
        check((2, 9, 13, 11), F32, True, True, False)
    with ti.configured(**BIG):
        _covers((2, 65, 57, 55), False, channel_blocks=5, stats_parts=4, stats_iters=4)
        _covers((2, 65, 57, 55), True, pixel_tiles=7, bwd_splits=4)
        check((2, 65, 57, 55), F32, False, True, True)
        check((2, 65, 57, 55), F32, True, False, True)


def group_precision() -> None:
    """x = offset + 3 randn against float64, as accurate as the plain composition in fp32."""
    with ti.configured(**BIG):
        check_large_mean((2, 65, 57, 55), 300.0, channels_last=False, ones_grad=True)
    with ti.configured(**SMALL):
        _covers((1, 8, 33, 31), True, stats_parts=2, bwd_splits=2)
        check_large_mean((1, 8, 33, 31), 3000.0, channels_last=True, ones_grad=False)
        check_large_mean((1, 8, 33, 31), 3000.0, channels_last=False, ones_grad=True)


def group_misc() -> None:
    """Default tile sizes on tiny tensors: shapes, pool sizes, dtypes, layouts, edge cases, self-check."""
    for i, shape in enumerate([(2, 5, 7, 9), (1, 3, 1, 1), (2, 3, 2, 3), (1, 4, 5, 4)]):
        for channels_last in (False, True):
            check(shape, F32, channels_last, *((True, True) if (i + channels_last) % 2 else (False, False)))
    for k in (1, 5, 7):
        check((2, 4, 7, 6), F32, k == 5, True, k != 1, k=k)
    check((2, 4, 7, 6), torch.bfloat16, True, True, True)
    check((2, 4, 7, 6), torch.float16, False, False, True)
    check((2, 3, 5, 4), torch.float64, False, True, True)
    check((2, 3, 5, 4), torch.float64, True, False, True, k=5)  # fp64: forward and gradients to 1e-10

    # a non-dense input is made contiguous; a transposed gradient is copied into x's layout
    x, w, _, _, gy = inputs((2, 4, 6, 10))
    xs = x[..., ::2]
    torch.testing.assert_close(fused(xs, w), ref(xs, w), rtol=1e-5, atol=1e-5)
    x, w, _, _, _ = inputs((2, 4, 6, 6), with_r=False)
    gy_t = torch.randn(2, 4, 6, 6).transpose(2, 3)
    leaves = [x.requires_grad_(True), w.requires_grad_(True)]
    got = torch.autograd.grad(fused(*leaves), leaves, gy_t)
    want = torch.autograd.grad(ref(*leaves), leaves, gy_t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # without anything to differentiate no autograd node is made; the result is the same
    x, w, r, s, _ = inputs((2, 5, 7, 9), with_r=True, with_s=True)
    with torch.no_grad():
        y = fused(x, w.requires_grad_(True), r, s)
    assert y.grad_fn is None
    torch.testing.assert_close(y, oracle(x, w.detach(), r, s), rtol=1e-5, atol=1e-5)

    # empty tensors: empty outputs, zero gradients, nothing launched
    for shape in [(0, 3, 4, 4), (2, 3, 0, 4)]:
        x = torch.randn(shape, requires_grad=True)
        w, s = torch.randn(3, requires_grad=True), torch.ones(shape[0], requires_grad=True)
        y = K.pool_mixer_residual(x, w, eps=EPS, sample_scale=s)
        assert y.shape == shape
        gx, gw, gs = torch.autograd.grad(y, (x, w, s), torch.ones(shape))
        assert gx.shape == shape and not gw.any() and not gs.any()

    # the self-check itself, with the real kernels, several tiles of everything
    with ti.configured(**SMALL):
        for dtype, cl in ((F32, True), (torch.bfloat16, False)):
            problem = selfcheck.self_check(ti.pool_mixer_residual_triton, K.pool_mixer_residual_torch, device="cpu",
                                           dtype=dtype, channels_last=cl, pool_size=3, has_r=True, has_s=cl,
                                           shape=(2, 3, 20, 21))
            assert problem is None, problem


def group_compile() -> None:
    """Compiles every kernel, with the arguments our launch code computes, for an H100 (sm_90) with
    Triton's real compiler (to PTX and, through ptxas, to a cubin): what the interpreter cannot
    check (types, constexpr specialisation of arguments equal to 1, lowering). Needs no GPU; runs
    without TRITON_INTERPRET."""
    from metaformer.kernels import triton_kernels as tk

    def drive():
        for shape, dtype, cl, k, has_r, has_s in [((2, 65, 57, 55), F32, False, 3, True, True),
                                                  ((2, 65, 57, 55), torch.bfloat16, True, 7, False, False),
                                                  ((1, 1, 1, 1), torch.float64, False, 5, True, True)]:
            x, w, r, s, gy = inputs(shape, dtype, cl, has_r, has_s)
            xx, _, mean, rstd = ti._forward(x, w, r, s, EPS, k)
            ti._backward(xx, mean, rstd, w, r, s, gy, k, (True, True, has_r, has_s))

    compile_for_h100(ti, tk, ("stats_kernel", "fwd_kernel", "bwd_reduce_kernel", "bwd_dx_kernel"), drive, 12)


GROUPS = {"tiles": group_tiles, "precision": group_precision, "misc": group_misc, "compile": group_compile}

if __name__ == "__main__":
    run_groups(GROUPS)
