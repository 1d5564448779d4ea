"""The Triton kernels on a real GPU against the PyTorch path (skipped without CUDA).

Forward and every gradient for bf16, fp16 and fp32, both memory layouts, pool sizes 3/5/7, on
(2, 65, 57, 55), (128, 64, 56, 56) and (1, C, 1, 1), with and without the optional scales; the
reference is the PyTorch formulation in fp32 (fp64 for the fp32 case) on the same rounded
inputs. Also the self-check and the fallback under "auto" on the device.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import EPS, check_large_mean, inputs

import metaformer.kernels as K
from metaformer.kernels import selfcheck

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# largest error / largest magnitude allowed, per dtype (outputs are rounded to the dtype)
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 2e-5}


@pytest.fixture
def backend():
    before = K.get_backend()
    yield K.set_backend
    K.set_backend(before)


def _outputs(fn, x, w, r, s, gy, k):
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in (x, w, r, s)]
    y = fn(leaves[0], leaves[1], eps=EPS, pool_size=k, res_scale=leaves[2], sample_scale=leaves[3])
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy)
    return [y.double() - leaves[0].double(), *[g.double() for g in grads]]


def _compare(shape, dtype, channels_last, k, with_r, with_s):
    x, w, r, s, gy = inputs(shape, dtype, channels_last, with_r, with_s)
    x, w, gy = x.cuda(), w.cuda(), gy.cuda()
    r, s = (None if t is None else t.cuda() for t in (r, s))
    got = _outputs(K.pool_mixer_residual, x, w, r, s, gy, k)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    cast = [None if t is None else t.to(ref_dtype) for t in (x, w, r, s, gy)]
    want = _outputs(K.pool_mixer_residual_torch, *cast, k)
    # y - x comes from x by cancellation (on a 1x1 map it is 0 but for rounding): its floor is x's scale
    floor = {"y - x": 1e-5 * x.double().abs().max().item()}
    for name, a, b in zip(("y - x", "dx", "d weight", "d res_scale", "d sample_scale"), got, want):
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= TOL[dtype] * max(scale, floor.get(name, 1e-12)), \
            f"{name}: error {err:.3g}, largest magnitude {scale:.3g}"


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("shape", [(2, 65, 57, 55), (128, 64, 56, 56), (1, 96, 1, 1)],
                         ids=["2x65x57x55", "128x64x56x56", "1x96x1x1"])
def test_triton_matches_torch_path(backend, dtype, channels_last, k, shape):
    backend("triton")
    scales = (True, True) if k == 3 else (k == 5, False)
    _compare(shape, DTYPES[dtype], channels_last, k, *scales)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_channels_last_pool_gradient_right_whatever_pytorch_does(k):
    """avg_pool_same's channels_last gradient on CUDA equals the NCHW one on CPU, also where this PyTorch's
    NHWC backward of a padded avg_pool2d is wrong (pytorch/pytorch#188344; the probe says which)."""
    from metaformer.kernels.torch_impl import avg_pool_same, cuda_channels_last_pool_backward_ok

    print(f"PyTorch {torch.__version__}: channels_last pool backward ok: "
          f"{cuda_channels_last_pool_backward_ok(torch.device('cuda'))}")
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    g = torch.randn_like(x)
    leaf = x.clone().requires_grad_(True)
    want = torch.autograd.grad(avg_pool_same(leaf, k), leaf, g)[0]
    leaf = x.cuda().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = avg_pool_same(leaf, k)
    assert y.is_contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(y, leaf, g.cuda().contiguous(memory_format=torch.channels_last))[0]
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offset", [300.0, 3000.0])
def test_triton_large_mean_as_accurate_as_plain_composition(backend, offset):
    backend("triton")
    check_large_mean((2, 65, 57, 55), offset, channels_last=offset > 1000, ones_grad=True, device="cuda")


def test_self_check_passes_and_auto_uses_triton(backend):
    backend("auto")
    selfcheck.reset()
    x, w, r, s, _ = inputs((4, 64, 28, 28), torch.bfloat16, True, True, True)
    x, w, r, s = x.cuda(), w.cuda(), r.cuda(), s.cuda()
    assert K.resolve_backend(x) == "triton"
    K.pool_mixer_residual(x, w, eps=EPS, res_scale=r, sample_scale=s)
    verdicts = selfcheck.verdicts()
    assert len(verdicts) == 1 and list(verdicts.values()) == [None], verdicts


def test_batch_above_cuda_grid_limit(backend):
    """More than 65,535 samples: the batch is folded into grid axis 0."""
    backend("triton")
    x = torch.randn(70000, 2, 3, 3, device="cuda")
    w = torch.randn(2, device="cuda")
    torch.testing.assert_close(K.pool_mixer_residual(x, w, eps=EPS),
                               K.pool_mixer_residual_torch(x, w, eps=EPS), rtol=1e-5, atol=1e-5)
