"""The LayerNorm / StarReLU Triton kernels on CPU: ``python tests/triton_ln_suite.py GROUP...``.

Run by test_kernels_triton_ln.py in subprocesses: ``tiles``, ``misc`` and ``star`` with
``TRITON_INTERPRET=1`` (set before triton is imported), ``compile`` without. The interpreter runs
every program in Python, so the groups pick tile sizes (``triton_ln.configured``) that make few
programs while still running several position tiles (partial ones too), padded channel blocks and
several backward splits per sample; ``_covers`` asserts that they do. Every result is compared with
the float64 oracles of ln_checks.py. Prints ``GROUP passed`` or ``GROUP FAILED`` per group.
"""

from __future__ import annotations

import torch
from ln_checks import EPS, check_layernorm, check_residual, check_star, draw, ln_oracle, residual_oracle
from triton_suite_common import compile_for_h100, run_groups

import metaformer.kernels as K
from metaformer.kernels import baseline_checks
from metaformer.kernels import triton_ln as tl_

SMALL = dict(tile=64, nchw_min_positions=4, bwd_iters=2, ew_block=64, ew_bwd_iters=2)
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
CL = "channels_last"


def _covers(shape, channels_last, **minimum):
    sizes = tl_.launch_sizes(shape, channels_last)
    short = {k: (sizes[k], v) for k, v in minimum.items() if sizes[k] < v}
    assert not short, f"{shape} channels_last={channels_last}: (got, wanted) {short}; all {sizes}"


def group_tiles() -> None:
    """Several position tiles (the last partial), padded channels, several backward splits of several tiles."""
    with tl_.configured(**SMALL):
        for cl in (False, True):
            _covers((2, 5, 7, 9), cl, pos_tiles=7, bwd_splits=4, bwd_iters=2)
        check_residual((2, 5, 7, 9))                                               # NCHW, every scale, all grads
        check_residual((2, 5, 7, 9), layout=CL, present=("weight", "res_scale"))   # y NCHW beside x channels_last
        check_residual((2, 5, 7, 9), layout=CL, y_layout=CL, present=("bias", "layer_scale", "sample_scale"))
        check_layernorm((2, 5, 7, 9), layout=CL)
        check_layernorm((2, 5, 7, 9), weight=False, bias=False)
        # only some gradients: the backward kernel's other variants
        check_residual((2, 5, 7, 9), needs=[False, False, True, True, False, False, False])
        check_residual((2, 5, 7, 9), layout=CL, needs=[True, False, False, False, True, False, True])
        check_layernorm((2, 5, 7, 9), needs=[False, True, False])


def group_misc() -> None:
    """Default tile sizes: dtypes, promotion, out_dtype, odd shapes, gradients of one output, edge cases."""
    check_residual((2, 6, 3, 5), dtype=BF16, layout=CL)
    check_residual((2, 6, 3, 5), dtype=F16, present=("weight", "sample_scale"))
    check_residual((2, 6, 3, 5), dtype=F64, layout=CL)                       # forward and gradients to 1e-10
    check_residual((2, 6, 3, 5), dtype=BF16, param_dtype=F32)                # bf16 stream * fp32 scales: fp32 z
    check_residual((2, 6, 3, 5), dtype=F32, out_dtype=BF16, layout=CL)       # n written as the next conv casts it
    check_layernorm((1, 3, 1, 1))                                            # C = 3, one position
    check_layernorm((3, 1, 2, 3), layout=CL)                                 # one channel: n = bias
    check_layernorm((1, 300, 2, 2), dtype=F64)                               # 300 channels padded to 512
    check_layernorm((2, 7, 4, 3), dtype=BF16, out_dtype=F32)

    # gradients of z alone and of n alone (the other output's gradient is None in the backward)
    x, y, w, b, r, ls, s = draw((2, 4, 3, 3))
    for pick in (0, 1):
        leaves = [t.clone().requires_grad_(True) for t in (x, y, w, r)]
        wide = [t.detach().double().requires_grad_(True) for t in leaves]
        out = K.residual_layernorm(leaves[0], leaves[1], leaves[2], eps=EPS, res_scale=leaves[3])[pick]
        ref = residual_oracle(wide[0], wide[1], wide[2], None, wide[3])[pick]
        got = torch.autograd.grad(out.sum(), leaves, allow_unused=True)  # a broadcast gradient, strides 0
        want = torch.autograd.grad(ref.sum(), wide, allow_unused=True)
        for a, c in zip(got, want):
            assert (a is None) == (c is None)
            if a is not None:
                torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5)

    # a transposed gradient and a non-dense input; no autograd node without anything to differentiate
    x, _, w, *_ = draw((2, 4, 5, 5), present=("weight",))
    xs = x[..., ::2]
    torch.testing.assert_close(K.layernorm_channels(xs, w, eps=EPS), ln_oracle(xs.double(), w.double()).float(),
                               rtol=1e-5, atol=1e-5)
    xg, gt = x.clone().requires_grad_(True), torch.randn(2, 4, 5, 5).transpose(2, 3)
    got = torch.autograd.grad(K.layernorm_channels(xg, w, eps=EPS), xg, gt)[0]
    xw = x.double().requires_grad_(True)
    torch.testing.assert_close(got.double(), torch.autograd.grad(ln_oracle(xw, w.double()), xw, gt.double())[0],
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        z, n = K.residual_layernorm(x.requires_grad_(True), x, w, eps=EPS)
    assert z.grad_fn is None and n.grad_fn is None

    # fp32 inputs far from zero: as accurate as the fp64 oracle allows (two-pass statistics in registers)
    x, _, w, *_ = draw((2, 64, 4, 4), present=("weight",), offset=300.0)
    err = (K.layernorm_channels(x, w, eps=EPS).double() - ln_oracle(x.double(), w.double())).abs().max().item()
    plain = (ln_oracle(x, w).double() - ln_oracle(x.double(), w.double())).abs().max().item()
    assert err <= 4 * plain + 1e-5, (err, plain)

    # too many channels: raises when forced, falls back to the composition under auto
    wide = torch.empty(()).expand(1, 2 * tl_.get_config().max_block_c, 1, 1)
    assert "channels" in tl_.unsupported_reason(wide)
    try:
        K.layernorm_channels(wide, eps=EPS)
    except RuntimeError as e:
        assert "max_block_c" in str(e)
    else:
        raise AssertionError("no error for too many channels")

    # the self-checks, with the real kernels, as a GPU would run them on first use
    x, y, w, b, r, ls, s = draw((2, 20, 3, 3), layout=CL)
    problem = baseline_checks.check_ln((x, y, w, None, r, None, s), (F32, F32), (True, True, True, False, True,
                                       False, False), eps=EPS, n_dtype=F32, z_dtype=F32)
    assert problem is None, problem
    problem = baseline_checks.check_ln((x.to(BF16), w, b), (BF16,), (False, True, True), eps=EPS, n_dtype=BF16)
    assert problem is None, problem


def group_star() -> None:
    """StarReLU: several programs and backward steps, dtypes, layouts, promotion, non-dense and broadcast."""
    with tl_.configured(**SMALL):
        check_star((2, 3, 7, 11))
        check_star((2, 3, 7, 11), layout=CL, needs=[True, False, True])
        check_star((2, 3, 7, 11), needs=[False, True, False])
        check_star((3, 5, 4, 3), dtype=BF16, layout=CL)
        check_star((3, 5, 4, 3), dtype=BF16, param_dtype=F32)              # bf16 x, fp32 parameters: fp32 out
        check_star((3, 5, 4, 3), dtype=BF16, param_dtype=F32, out_dtype=BF16)
        check_star((3, 5, 4, 3), dtype=F16)
        check_star((2, 3, 5, 4), dtype=F64)
        check_star((37,))                                                  # any shape
        x = torch.randn(2, 3, 8, 9)[..., ::3].requires_grad_(True)        # non-dense: one copy
        s, b = torch.tensor([0.8], requires_grad=True), torch.tensor([0.1], requires_grad=True)
        y = K.star_relu(x, s, b)
        got = torch.autograd.grad(y.sum(), (x, s, b))                      # broadcast gradient
        xw, sw, bw = (t.detach().double().requires_grad_(True) for t in (x, s, b))
        want = torch.autograd.grad(star_oracle_sum(xw, sw, bw), (xw, sw, bw))
        for a, c in zip(got, want):
            torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert K.star_relu(x, s, b).grad_fn is None
        x = torch.randn(2, 3, 4, 5)
        problem = baseline_checks.check_star((x, s, b), (F32,), (True, True, True))
        assert problem is None, problem


def star_oracle_sum(x, s, b):
    from ln_checks import star_oracle

    return star_oracle(x, s, b).sum()


def group_compile() -> None:
    """Every kernel, with the arguments the launch code computes, compiled for an H100 (sm_90) by Triton's
    own compiler (PTX, then a cubin through ptxas): types, specialisation and lowering, which the
    interpreter cannot check. Needs no GPU; runs without TRITON_INTERPRET."""
    from metaformer.kernels import triton_ln_kernels as tk

    def drive():
        for shape, dtype, layout, present in [((128, 64, 56, 56), BF16, CL, ("weight", "res_scale", "sample_scale")),
                                              ((2, 320, 14, 14), F32, "contiguous", ("weight", "bias", "layer_scale")),
                                              ((1, 3, 1, 1), F64, CL, ())]:
            x, y, w, b, r, ls, s = draw(shape, dtype, layout, present)
            xd, yd, z, n = tl_._ln_forward(x, y, w, b, r, ls, s, EPS, dtype, dtype)
            has = tuple(t is not None for t in (w, b, r, ls, s))
            tl_._ln_backward((z, xd, yd, w, b, r, ls, s), z, n, EPS, (True, True, *has), (dtype, dtype))
            tl_._ln_forward(x, None, w, b, None, None, None, EPS, None, BF16)
            tl_._ln_backward((x, None, None, w, b, None, None, None), None, n, EPS, (True, False, *has[:2], False, False,
                                                                                  False), (dtype, None))
            one = torch.ones(1, dtype=dtype)
            tl_._star_forward(x, one, one, dtype)
            tl_._star_backward(x, one, x, (True, True, True))

    compile_for_h100(tl_, tk, ("ln_fwd_kernel", "ln_bwd_kernel", "star_relu_fwd_kernel", "star_relu_bwd_kernel"),
                     drive, 18)


GROUPS = {"tiles": group_tiles, "misc": group_misc, "star": group_star, "compile": group_compile}

if __name__ == "__main__":
    run_groups(GROUPS)
