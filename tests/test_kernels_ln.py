"""Channel LayerNorm, the fused residual update and StarReLU (metaformer.kernels), on CPU.

The ``torch`` and ``reference`` backends against the float64 oracles of ln_checks.py, the dtype
rules, input validation, and the self-checks' ability to catch wrong kernels (the real kernels run
under Triton's interpreter in test_kernels_triton_ln.py and on GPUs in test_kernels_cuda_ln.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from ln_checks import EPS, check_layernorm, check_residual, check_star, draw

import metaformer.kernels as K
from metaformer.kernels import selfcheck, torch_ln
from metaformer.layers import LayerNorm2d, Scale, StarReLU

CL = "channels_last"


@pytest.fixture(params=["torch", "reference"])
def backend(request):
    before = K.get_backend()
    K.set_backend(request.param)
    yield request.param
    K.set_backend(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", CL])
def test_composition_backends_match_the_oracles(backend, dtype, layout):
    check_residual((2, 5, 7, 9), dtype, layout)
    check_residual((2, 5, 7, 9), dtype, layout, present=("weight",), needs=[True, True, False, False, False, False,
                                                                             False])
    check_layernorm((2, 5, 7, 9), dtype, layout)
    check_star((2, 5, 7, 9), dtype, layout)


def test_the_ops_are_the_model_layers(backend):
    """The entry points compute what LayerNorm2d, Scale + residual and StarReLU compute (eps 1e-6, no bias)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    norm, rs, act = LayerNorm2d(8, eps=1e-6, bias=False), Scale(8, 0.7), StarReLU(1.3, -0.2)
    with torch.no_grad():
        norm.weight.normal_()
    z, n = K.residual_layernorm(x, y, norm.weight, eps=norm.eps, res_scale=rs.scale)
    torch.testing.assert_close(z, rs(x) + y, rtol=0, atol=0)
    torch.testing.assert_close(n, norm(rs(x) + y), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(K.layernorm_channels(x, norm.weight, eps=norm.eps), norm(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(K.star_relu(x, act.scale, act.bias), act(x), rtol=0, atol=0)


def test_dtypes_follow_the_composition():
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    r = torch.ones(4)
    z, n = K.residual_layernorm(x, x, eps=EPS, res_scale=r)
    assert z.dtype == n.dtype == torch.float32  # a bf16 stream times an fp32 res scale is fp32, as in the model
    z, n = K.residual_layernorm(x, x, eps=EPS, sample_scale=torch.ones(2), out_dtype=torch.float16)
    assert z.dtype == torch.bfloat16 and n.dtype == torch.float16  # the drop-path factor does not promote
    assert K.star_relu(x, torch.ones(1), torch.zeros(1)).dtype == torch.float32  # StarReLU's fp32 parameters
    assert K.star_relu(x, torch.ones(()), torch.zeros(())).dtype == torch.bfloat16  # 0-dim scalars do not promote
    assert K.layernorm_channels(x, torch.ones(4), eps=EPS, out_dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize(("call", "match"), [
    (lambda: K.layernorm_channels(torch.randn(2, 3, 4), eps=EPS), r"x must be a floating \(B, C, H, W\)"),
    (lambda: K.layernorm_channels(torch.randn(2, 3, 4, 4), torch.ones(4), eps=EPS), r"weight must be .* \(3,\)"),
    (lambda: K.layernorm_channels(torch.ones(2, 3, 4, 4, dtype=torch.int64), eps=EPS), "floating"),
    (lambda: K.layernorm_channels(torch.randn(2, 3, 4, 4), eps=EPS, out_dtype=torch.int8), "out_dtype"),
    (lambda: K.residual_layernorm(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5), eps=EPS), "y must match"),
    (lambda: K.residual_layernorm(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), eps=EPS,
                                  sample_scale=torch.ones(3)), r"sample_scale must be .* \(2,\)"),
    (lambda: K.star_relu(torch.randn(3), torch.ones(2), torch.zeros(1)), "scale must be a one-element"),
    (lambda: K.star_relu(torch.randn(3), torch.ones(1), 0.0), "bias must be a one-element"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_auto_takes_the_composition_on_cpu():
    before = K.get_backend()
    try:
        K.set_backend("auto")
        x = torch.randn(2, 4, 3, 3)
        assert K.resolve_backend(x) == "torch"
        torch.testing.assert_close(K.layernorm_channels(x, eps=EPS), torch_ln.layernorm_channels_torch(x, eps=EPS))
        K.set_backend("triton")
        with pytest.raises(RuntimeError, match="needs a CUDA tensor|could not be imported"):
            K.star_relu(x, torch.ones(1), torch.zeros(1))
    finally:
        K.set_backend(before)


# ------------------------------------------------------------------ the self-checks catch wrong kernels
triton_ln = pytest.importorskip("metaformer.kernels.triton_ln", reason="triton is not installed")
from metaformer.kernels import baseline_checks  # noqa: E402


def _as_triton_ln(fn):
    """A stand-in for triton_ln.layernorm_triton built from the composition (fn perturbs it)."""
    def kernel(x, y=None, weight=None, bias=None, *, eps, res_scale=None, layer_scale=None, sample_scale=None,
               z_dtype=None, out_dtype):
        if y is None:
            return fn(torch_ln.layernorm_channels_torch(x, weight, bias, eps=eps, out_dtype=out_dtype))
        z, n = torch_ln.residual_layernorm_torch(x, y, weight, bias, eps=eps, res_scale=res_scale,
                                                 layer_scale=layer_scale, sample_scale=sample_scale, out_dtype=out_dtype)
        return z, fn(n)
    return kernel


def _wrong_gradient(n):
    return n + 1e-3 * (n - n.detach())  # right values, every gradient 0.1 % too large


@pytest.mark.parametrize(("fn", "problem"), [(lambda n: n, None), (lambda n: n * 1.001, "output 1"),
                                             (_wrong_gradient, "d input 0")], ids=["right", "forward", "backward"])
def test_ln_self_check_compares_outputs_and_gradients(monkeypatch, fn, problem):
    monkeypatch.setattr(triton_ln, "layernorm_triton", _as_triton_ln(fn))
    x, y, w, b, r, ls, s = draw((2, 24, 3, 3), layout=CL)
    got = baseline_checks.check_ln((x, y, w, b, r, ls, s), (torch.float32, torch.float32), (True,) * 7, eps=EPS,
                                   n_dtype=torch.float32, z_dtype=torch.float32)
    assert got is None if problem is None else problem in got
    plain = baseline_checks.check_ln((x, w, None), (torch.float32,), (True, True, False), eps=EPS,
                                     n_dtype=torch.float32)
    if problem is None:
        assert plain is None
    else:
        assert plain is not None and ("output 0" in plain or "d input 0" in plain)


def test_star_self_check_catches_a_wrong_backward(monkeypatch):
    def wrong(x, s, b, *, out_dtype):
        y = torch_ln.star_relu_torch(x, s, b, out_dtype=out_dtype)
        return y + 1e-3 * (y - y.detach())

    x, s, b = torch.randn(2, 3, 4, 4), torch.ones(1), torch.zeros(1)
    monkeypatch.setattr(triton_ln, "star_relu_triton", lambda x, s, b, *, out_dtype: torch_ln.star_relu_torch(x, s, b))
    assert baseline_checks.check_star((x, s, b), (torch.float32,), (True, True, True)) is None
    monkeypatch.setattr(triton_ln, "star_relu_triton", wrong)
    assert "d input 0" in baseline_checks.check_star((x, s, b), (torch.float32,), (True, True, True))
    assert baseline_checks.check_star((x, s, b), (torch.float32,), (False, False, False)) is None  # forward only


def test_guarded_policy_names_the_kernels():
    selfcheck.reset()
    try:
        kwargs = dict(forced=False, do_check=True, device="cpu", what="the Triton LayerNorm / StarReLU kernels",
                      description=lambda: "cpu layernorm_channels C=8")
        with pytest.warns(RuntimeWarning, match="LayerNorm / StarReLU kernels failed for cpu layernorm_channels C=8"):
            assert selfcheck.guarded("k1", call=lambda: 1, check=lambda: "output 0: wrong", **kwargs) is None
        assert selfcheck.guarded("k1", call=lambda: 1, check=lambda: None, **kwargs) is None  # stays off
        assert selfcheck.guarded("k2", call=lambda: 2, check=lambda: None, **kwargs) == 2
        with pytest.raises(RuntimeError, match="StarReLU kernels failed earlier for cpu layernorm_channels C=8"):
            selfcheck.guarded("k1", call=lambda: 1, check=lambda: None, **{**kwargs, "forced": True})
        described = []  # the description is built for messages only, not at every call
        kwargs["description"] = lambda: described.append(1) or "d"
        assert [selfcheck.guarded("k2", call=lambda: 2, check=lambda: None, **kwargs) for _ in range(3)] == [2] * 3
        assert described == []
    finally:
        selfcheck.reset()


def test_host_side_sizes_match_tritons_and_follow_the_configuration():
    """The launch code's own ceil-division and next power of two equal Triton's, and the cached launch sizes
    are fresh dicts that change with the tile configuration."""
    triton = pytest.importorskip("triton")
    from metaformer.kernels import tile_config, triton_impl, triton_ln

    for n in range(-3, 5000):
        assert tile_config.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 1000):
            assert tile_config.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    for family, small in ((triton_ln, dict(tile=64, bwd_iters=1)), (triton_impl, dict(tile=64, bwd_iters=1))):
        shape = (2, 24, 9, 11)
        default = family.launch_sizes(shape, True)
        default["block_p"] = -1  # the caller's copy: the next call is not affected
        assert family.launch_sizes(torch.Size(shape), True)["block_p"] > 0
        with family.configured(**small):
            changed = family.launch_sizes(shape, True)
        assert changed != family.launch_sizes(shape, True) == family.launch_sizes(shape, True, family.get_config())
        assert changed == family.launch_sizes(shape, True, dataclasses.replace(family.get_config(), **small))
