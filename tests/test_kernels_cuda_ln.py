"""The LayerNorm / StarReLU Triton kernels on a real GPU (skipped without CUDA).

Forward and every gradient, bf16 / fp16 / fp32 / fp64, both layouts, at ConvFormer's and CAFormer's
stage shapes and odd ones, against the float64 oracles of ln_checks.py on the same rounded inputs;
the dtypes under CUDA autocast; the self-check under "auto".
"""

from __future__ import annotations

import pytest
import torch
from ln_checks import EPS, check_layernorm, check_residual, check_star, draw

import metaformer.kernels as K
from metaformer.kernels import selfcheck, torch_ln

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
SHAPES = {"64x56x56": (32, 64, 56, 56), "2x65x57x55": (2, 65, 57, 55), "512x7x7": (16, 512, 7, 7),
          "1x768x1x1": (1, 768, 1, 1)}


@pytest.fixture
def backend():
    before = K.get_backend()
    yield K.set_backend
    K.set_backend(before)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_triton_matches_the_oracles(backend, dtype, layout, shape):
    backend("triton")
    shape, dtype = SHAPES[shape], DTYPES[dtype]
    check_residual(shape, dtype, layout, device="cuda")
    check_residual(shape, dtype, layout, present=("weight", "res_scale"), y_layout="channels_last", device="cuda",
                   needs=[True, True, True, False, True, False, False])
    check_layernorm(shape, dtype, layout, bias=False, device="cuda")
    check_star(shape, dtype, layout, device="cuda")


def test_autocast_dtypes_and_values(backend):
    """Under CUDA autocast F.layer_norm returns float32 and StarReLU's fp32 parameters promote; the
    kernels give the same dtypes and values (out_dtype writes the dtype the next convolution casts to)."""
    x, y, w, *_ = draw((8, 64, 14, 14), torch.bfloat16, "channels_last", ("weight",), device="cuda")
    w, r = w.float(), torch.rand(64, device="cuda") + 0.5
    s, b = torch.tensor([1.1], device="cuda"), torch.tensor([-0.1], device="cuda")
    outs = {}
    for name in ("triton", "torch"):
        backend(name)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs[name] = (K.layernorm_channels(x, w, eps=EPS), *K.residual_layernorm(x, y, w, eps=EPS, res_scale=r),
                          K.star_relu(x, s, b), K.layernorm_channels(x, w, eps=EPS, out_dtype=torch.bfloat16))
    for got, want in zip(outs["triton"], outs["torch"]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2 if want.dtype == torch.bfloat16 else 1e-5, atol=1e-2)
    assert [t.dtype for t in outs["triton"]] == [torch.float32] * 4 + [torch.bfloat16]


def test_self_check_passes_and_auto_uses_triton(backend):
    backend("auto")
    selfcheck.reset()
    x, y, w, b, r, ls, s = draw((4, 320, 14, 14), torch.bfloat16, "channels_last", device="cuda")
    w, r = w.requires_grad_(True), r.requires_grad_(True)
    z, n = K.residual_layernorm(x, y, w, eps=EPS, res_scale=r, sample_scale=s)
    (z.float().sum() + n.float().square().sum()).backward()
    K.star_relu(x, torch.ones(1, device="cuda"), torch.zeros(1, device="cuda"))
    verdicts = selfcheck.verdicts()
    assert len(verdicts) == 2 and list(verdicts.values()) == [None, None], verdicts
    assert all(k[0] in ("residual_layernorm", "star_relu") for k in verdicts)


def test_large_batch_and_matches_the_composition_exactly_enough(backend):
    """A batch of 70,000 (one launch axis), and fp32 against the composition itself (rtol 1e-5)."""
    backend("triton")
    x = torch.randn(70000, 8, 3, 3, device="cuda")
    w = torch.randn(8, device="cuda")
    torch.testing.assert_close(K.layernorm_channels(x, w, eps=EPS), torch_ln.layernorm_channels_torch(x, w, eps=EPS),
                               rtol=1e-5, atol=1e-5)
