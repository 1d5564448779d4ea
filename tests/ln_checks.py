"""Shared checks of the channel-LayerNorm / StarReLU entry points against oracles written here.

The oracles follow the definitions (mean and biased variance over the channels at each position;
``s * relu(x)^2 + b``), independently of the code under test, and run in float64 on the same rounded
inputs. Used by test_kernels_ln.py (torch and reference backends), the Triton-interpreter suite
(triton_ln_suite.py, in a subprocess) and test_kernels_cuda_ln.py.
"""

from __future__ import annotations

import torch

import metaformer.kernels as K

EPS = 1e-6
# largest error allowed, relative to the largest magnitude of each output / gradient
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
ALL = ("weight", "bias", "res_scale", "layer_scale", "sample_scale")


def ln_oracle(z, w=None, b=None, eps=EPS):
    mean = z.mean(1, keepdim=True)
    var = ((z - mean) ** 2).mean(1, keepdim=True)
    n = (z - mean) / torch.sqrt(var + eps)
    n = n if w is None else n * w.view(1, -1, 1, 1)
    return n if b is None else n + b.view(1, -1, 1, 1)


def residual_oracle(x, y, w=None, b=None, r=None, ls=None, s=None, eps=EPS):
    z = x if r is None else x * r.view(1, -1, 1, 1)
    f = y if s is None else y * s.view(-1, 1, 1, 1)
    z = z + (f if ls is None else f * ls.view(1, -1, 1, 1))
    return z, ln_oracle(z, w, b, eps)


def star_oracle(x, s, b):
    return s * torch.where(x > 0, x * x, torch.zeros_like(x)) + b


def draw(shape, dtype=torch.float32, layout="contiguous", present=ALL, seed=0, offset=0.5, device="cpu",
         param_dtype=None):
    """x, y, weight, bias, res_scale, layer_scale, sample_scale (None where not in ``present``); the
    vectors in ``param_dtype`` (default: ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]

    def t(n, kind):
        v = torch.randn(n, generator=g, dtype=torch.float64)
        v = {"map": 1.5 * v + offset, "gain": 1 + 0.3 * v, "small": 0.5 * v, "pos": v.abs() + 0.5}[kind]
        return v.to(device=device, dtype=dtype if kind == "map" else (param_dtype or dtype))

    x, y = t(shape, "map"), t(shape, "map") * 0.7
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    vec = {"weight": t(C, "gain"), "bias": t(C, "small"), "res_scale": t(C, "gain"), "layer_scale": t(C, "small"),
           "sample_scale": t(B, "pos")}
    return (x, y, *(vec[k] if k in present else None for k in ALL))


def differentiated(items, tensors, needs=None):
    """The items that belong to the tensors :func:`outputs` returns gradients of, in its order: those given
    and flagged in ``needs`` (default: every tensor given)."""
    needs = needs or [t is not None for t in tensors]
    return [item for item, t, n in zip(items, tensors, needs) if t is not None and n]


def outputs(fn, tensors, grad_outputs, needs=None):
    """(outputs, gradients of the tensors flagged in ``needs``; default: every tensor given)."""
    needs = needs or [t is not None for t in tensors]
    leaves = [None if t is None else t.detach().clone().requires_grad_(bool(n)) for t, n in zip(tensors, needs)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    wanted = differentiated(leaves, tensors, needs)
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs]) if wanted else ()
    assert [g.dtype for g in grads] == [t.dtype for t in wanted]
    return [o.detach() for o in outs], list(grads)


def assert_near(got, want, dtype, what="", magnitude=None):
    """Largest error within TOL[dtype] of the largest magnitude (elementwise assert_close semantics).

    ``magnitude``: the same quantity computed from absolute values (a sum's sum of |terms|), the scale
    of a reduction's rounding error when its terms cancel (default: ``want`` itself)."""
    want = want.double()
    ref = want if magnitude is None else magnitude.double()
    scale = max(ref.abs().max().item(), want.abs().max().item(), 1e-30) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=0, atol=TOL[dtype] * scale, msg=lambda m: f"{what}: {m}")


def residual_call(**kwargs):
    def fn(x, y, w, b, r, ls, s):
        return K.residual_layernorm(x, y, w, b, eps=EPS, res_scale=r, layer_scale=ls, sample_scale=s, **kwargs)
    return fn


def check_residual(shape, dtype=torch.float32, layout="contiguous", present=ALL, y_layout=None, needs=None,
                   seed=0, out_dtype=None, param_dtype=None, device="cpu"):
    """residual_layernorm forward and gradients against the float64 oracle on the same rounded inputs."""
    x, y, *vec = draw(shape, dtype, layout, present, seed, device=device, param_dtype=param_dtype)
    if y_layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    tensors = [x, y, *vec]
    g = torch.Generator().manual_seed(seed + 1)
    gz, gn = (torch.randn(shape, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    z_dtype = dtype if vec[2] is None and vec[3] is None else torch.promote_types(dtype, param_dtype or dtype)
    gz, gn = gz.to(z_dtype), gn.to(out_dtype or z_dtype)  # the oracle gets the same rounded gradients
    got_o, got_g = outputs(residual_call(out_dtype=out_dtype), tensors, [gz, gn], needs)
    assert got_o[0].dtype == z_dtype and got_o[1].dtype == (out_dtype or z_dtype)
    for o in got_o:  # the kernels keep x's layout (LayerNorm2d's composition returns channels_last memory)
        assert o.shape == x.shape and (K.get_backend() != "triton" or o.stride() == x.stride()), o.stride()
    wide = [None if t is None else t.double() for t in tensors]
    want_o, want_g = outputs(lambda *t: residual_oracle(*t), wide, [gz.double(), gn.double()], needs)
    tol = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else dtype
    for name, a, b in zip(("z", "n"), got_o, want_o):
        assert_near(a, b, tol, name)
    for i, (a, b) in enumerate(zip(got_g, want_g)):
        assert_near(a, b, tol, f"gradient {i}")


def check_layernorm(shape, dtype=torch.float32, layout="contiguous", weight=True, bias=True, needs=None, seed=0,
                    out_dtype=None, device="cpu"):
    """layernorm_channels forward and gradients against the float64 oracle."""
    x, _, w, b, *_ = draw(shape, dtype, layout, ("weight",) * weight + ("bias",) * bias, seed, device=device)
    gn = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    gn = gn.to(out_dtype or dtype)
    got_o, got_g = outputs(lambda x, w, b: K.layernorm_channels(x, w, b, eps=EPS, out_dtype=out_dtype), [x, w, b],
                           [gn], needs)
    assert got_o[0].dtype == (out_dtype or dtype) and (K.get_backend() != "triton" or got_o[0].stride() == x.stride())
    want_o, want_g = outputs(ln_oracle, [x.double(), *(None if t is None else t.double() for t in (w, b))],
                             [gn.double()], needs)
    # the weight and bias gradients are sums over every position whose terms cancel: their rounding error
    # scales with the sum of |terms| (sum |dn * xhat|, sum |dn|), not with the result. PyTorch's own bf16
    # LayerNorm backward on one CPU thread is 4% off the result on these inputs, yet well within this.
    dn = gn.double().abs()
    mags = differentiated([None, (dn * ln_oracle(x.double()).abs()).sum((0, 2, 3)), dn.sum((0, 2, 3))],
                          (x, w, b), needs)
    tol = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else dtype
    assert_near(got_o[0], want_o[0], tol, "n")
    for i, (a, c, m) in enumerate(zip(got_g, want_g, mags)):
        assert_near(a, c, tol, f"gradient {i}", magnitude=m)


def check_star(shape, dtype=torch.float32, layout="contiguous", needs=None, seed=0, out_dtype=None, param_dtype=None,
               device="cpu"):
    """star_relu forward and gradients against the float64 oracle."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    s = torch.tensor([1.3], dtype=param_dtype or dtype, device=device)
    b = torch.tensor([-0.2], dtype=param_dtype or dtype, device=device)
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    y_dtype = out_dtype or torch.promote_types(dtype, s.dtype)
    gy = gy.to(y_dtype)
    got_o, got_g = outputs(lambda x, s, b: K.star_relu(x, s, b, out_dtype=out_dtype), [x, s, b], [gy], needs)
    assert got_o[0].dtype == y_dtype and got_o[0].stride() == x.stride()
    want_o, want_g = outputs(star_oracle, [x.double(), s.double(), b.double()], [gy.double()], needs)
    # the scale and bias gradients are sums over every element whose terms cancel: their error scales with
    # the sum of |terms| (the same gradients for |dy|; s > 0), not with the result
    _, mag_g = outputs(star_oracle, [x.double(), s.double(), b.double()], [gy.double().abs()], needs)
    tol = dtype if dtype in (torch.bfloat16, torch.float16) else (out_dtype or dtype)
    assert_near(got_o[0], want_o[0], tol, "y")
    for i, (a, c, m) in enumerate(zip(got_g, want_g, mag_g)):
        assert_near(a, c, tol, f"gradient {i}", magnitude=m)
