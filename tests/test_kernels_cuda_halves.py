"""The block halves through the Triton LayerNorm / StarReLU kernels (metaformer.kernels.cuda_halves).

The exactness checks run in tests/cuda_halves_suite.py, in a subprocess under Triton's interpreter
(it must be switched on before triton is imported); here: that they pass, that nothing applies on CPU
outside the interpreter, and on a GPU (skipped without one) a real block in fp32 and under bf16 autocast.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SRC, graph_node_names, require_triton_kernels, skip_if_interpreter_defect, subprocess_env

import metaformer.kernels as K

_TESTS = Path(__file__).resolve().parent

H = pytest.importorskip("metaformer.kernels.cuda_halves")


@pytest.fixture
def backend():
    before = K.get_backend()
    yield K.set_backend
    K.set_backend(before)


@pytest.mark.slow
def test_halves_equal_the_block_under_the_interpreter():
    """Outputs and the gradients of the input and every parameter against mixer_half / mlp_half (fp32 1e-5,
    fp64 1e-9), eval and training, drop path on and off, a real caformer_s18 block and hand-built ones."""
    require_triton_kernels("triton is not installed: the Triton kernels cannot be tested")
    env = subprocess_env(SRC, _TESTS, drop=("METAFORMER_BACKEND",), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(_TESTS / "cuda_halves_suite.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    skip_if_interpreter_defect(proc.stdout)
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("passed"), proc.stdout + proc.stderr


@pytest.mark.skipif(K._interpreting(), reason="checks the path outside Triton's interpreter")
@pytest.mark.parametrize("name", ["triton", "auto", "torch", "reference"])
def test_nothing_applies_on_cpu(backend, name):
    """A CPU tensor outside the interpreter: every function returns None, whatever the backend (the block's
    own halves run; a forced "triton" does not raise here)."""
    from metaformer import MetaFormerBlock
    from metaformer.layers import LayerNorm2d, StarReLU

    backend(name)
    block = MetaFormerBlock(8, norm_layer=LayerNorm2d, act_layer=StarReLU)
    x = torch.randn(2, 8, 3, 3)
    assert not H.halves_apply(x)
    assert H.ln_mixer_half(block, x) is None and H.starrelu_mlp_half(block, x) is None and H.ln_block(block, x) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_group_norm1_is_group_norm_in_the_input_layout(dtype, affine):
    """folding.group_norm1 (the GroupNorm the CUDA halves and CUDA identity halves run) against
    F.group_norm: values and every gradient (fp32 1e-5, fp64 1e-9), NCHW and channels_last, a mean far from
    zero; the result keeps the input's layout; under autocast a bf16 input gives fp32, as F.group_norm."""
    from torch.nn import functional as F

    from metaformer.kernels.folding import group_norm1

    tol = 1e-5 if dtype == torch.float32 else 1e-9
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(3, 6, 5, 4, generator=g, dtype=torch.float64) * 3.0 + 5.0).to(dtype)
    w0 = 1.0 + 0.3 * torch.randn(6, generator=g, dtype=torch.float64).to(dtype) if affine != "none" else None
    b0 = 0.3 * torch.randn(6, generator=g, dtype=torch.float64).to(dtype) if affine == "both" else None
    gy = torch.randn(x0.shape, generator=g, dtype=torch.float64).to(dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        outs = []
        for fn in (group_norm1, lambda x, w, b, eps: F.group_norm(x, 1, w, b, eps)):
            leaves = [t.detach().clone().requires_grad_(True) for t in (x0.contiguous(memory_format=layout), w0, b0)
                      if t is not None]
            args = leaves + [None] * (3 - len(leaves))
            y = fn(*args, 1e-5)
            outs.append((y, torch.autograd.grad(y, leaves, gy)))
        (got, got_g), (want, want_g) = outs
        assert got.dtype == dtype and got.is_contiguous(memory_format=layout), got.stride()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        for a, b in zip(got_g, want_g):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
    xb = x0.to(torch.bfloat16)
    wf, bf = (None if t is None else t.float() for t in (w0, b0))
    for autocast in (False, True):  # CPU autocast keeps group_norm's input dtype (CUDA's: test below)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert group_norm1(xb, wf, bf, 1e-5).dtype == F.group_norm(xb, 1, wf, bf, 1e-5).dtype == torch.bfloat16
            assert group_norm1(x0, w0, b0, 1e-5, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    for layout in (torch.contiguous_format, torch.channels_last):  # written in out_dtype by its last op
        x = x0.contiguous(memory_format=layout)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                leaves = [t if t is None else t.detach().requires_grad_(grad) for t in (x, w0, b0)]
                got = group_norm1(*leaves, 1e-5, out_dtype=torch.bfloat16)
                assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=layout), got.stride()
                assert got.requires_grad == grad
                want = F.group_norm(x, 1, w0, b0, 1e-5).to(torch.bfloat16)
                torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_group_norm1_on_cuda_keeps_channels_last_and_autocasts_as_group_norm():
    """On CUDA: channels_last kept (ATen's GroupNorm returns NCHW), the values of F.group_norm, and under
    autocast a bf16 input gives fp32, as F.group_norm."""
    from torch.nn import functional as F

    from metaformer.kernels.folding import group_norm1

    x = (torch.randn(4, 64, 14, 14, device="cuda") * 2 + 3).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    y = group_norm1(x, w, b, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.group_norm(x, 1, w, b, 1e-5), rtol=1e-5, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        xb = x.to(torch.bfloat16)
        want = F.group_norm(xb, 1, w, b, 1e-5)
        got = group_norm1(xb, w, b, 1e-5)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name, stage, shape", [("caformer_s18", 2, (8, 320, 14, 14)),
                                                ("convformer_s18", 0, (8, 64, 28, 28)),
                                                ("poolformer_s12", 0, (8, 64, 28, 28)),
                                                ("poolformerv2_s12", 1, (8, 128, 14, 14)),
                                                ("identityformer_s12", 1, (8, 128, 14, 14))])
def test_real_block_on_cuda(backend, name, stage, shape):
    """A real block on a GPU through the dispatch (the block's forward: ``ln_block`` for caformer_s18 and, with
    its SepConv through ``_mix``, convformer_s18; the GroupNorm halves for the pooling models, the identity half
    with ``group_norm1``) against its plain halves,
    channels_last, in training and in inference: fp32 (TF32 off) within 1e-5, bf16 autocast within 2e-2; in
    inference the norm keeps channels_last."""
    import metaformer

    backend("auto")
    block = metaformer.create(name, drop_path_rate=0.3).stages[stage].blocks[1].cuda().train()
    x = torch.randn(*shape, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        n = H._normalised(block.norm2, x)
        assert n is not None and n.is_contiguous(memory_format=torch.channels_last), (type(block.norm2), n.stride())
    _forward_matches_plain(block, x, lambda b, t: b.mlp_half(b.mixer_half(t)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pointwise_on_cuda_is_a_matrix_product_where_the_precision_agrees(backend):
    """A 1x1 convolution of a channels_last CUDA map (``_pointwise``): under bf16 autocast, and in fp32 with TF32
    off for both cuDNN and matrix products, a matrix product (the graph has no convolution) with the
    convolution's values (2e-2, 1e-5), dtype and strides; in fp32 with PyTorch's default TF32 settings (cuDNN
    on, matrix products off) the convolution itself."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 256, 1).cuda()
    x = torch.randn(4, 64, 14, 10, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def convolves(out):
        return any("Convolution" in n for n in graph_node_names(out))

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        assert convolves(H._pointwise(conv, x))
        torch.backends.cudnn.allow_tf32 = False
        for autocast, tol in ((False, 1e-5), (True, 2e-2)):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                got, want = H._pointwise(conv, x), conv(x)
            assert not convolves(got) and convolves(want)
            assert got.dtype == want.dtype and got.stride() == want.stride(), (got.dtype, got.stride(), want.stride())
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _forward_matches_plain(module, x, plain, strides: bool = False) -> None:
    """``module``'s forward (the dispatch) against ``plain(module, x)``, TF32 off: in training the output and the
    gradients of the input and every parameter (the same random stream for both), then in inference the
    output and its dtype (and its strides, if asked); fp32 within 1e-5, bf16 autocast within 2e-2. The module
    is left in training mode."""
    device = x.device.type
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for autocast, tol in ((False, 1e-5), (True, 2e-2)):
            module.train()
            outs = []
            for fn in (lambda m, t: m(t), plain):
                module.zero_grad(set_to_none=True)
                xg = x.clone().requires_grad_(True)
                torch.manual_seed(0)
                with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                    y = fn(module, xg)
                y.float().square().mean().backward()
                outs.append([y.float(), xg.grad] + [p.grad for p in module.parameters()])
            for got, want in zip(*outs):
                torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
            module.eval()  # inference: a GroupNorm in the input's layout
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                got, want = module(x), plain(module, x)
            module.train()
            assert got.dtype == want.dtype, (got.dtype, want.dtype)
            assert not strides or got.stride() == want.stride(), (got.stride(), want.stride())
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("part", ["stem", "downsample"])
def test_stem_and_downsampling_norms_on_cuda(backend, part):
    """convformer_s18's stem and first downsampling on a GPU: the module's forward (the norm through the Triton
    LayerNorm kernel) against its plain composition, channels_last, output and the gradients of the input
    and every parameter in training, and the output in inference: fp32 (TF32 off) within 1e-5, bf16 autocast
    within 2e-2. Under autocast the kernel writes what the plain norm hands on: fp32 after the stem (the
    residual stream's dtype, as F.layer_norm), bf16 before the downsampling's convolution (what it casts to)."""
    import metaformer

    backend("auto")
    model = metaformer.create("convformer_s18")
    module = (model.stem if part == "stem" else model.stages[1].downsample).cuda()
    shape = (4, 3, 64, 48) if part == "stem" else (4, 64, 14, 10)
    x = torch.randn(*shape, device="cuda").contiguous(memory_format=torch.channels_last)
    if part == "stem":
        plain = lambda m, t: m.norm(m.conv(t))  # noqa: E731
    else:
        plain = lambda m, t: m.conv(m.norm(t))  # noqa: E731
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = module.conv(x) if part == "stem" else x
        n = H.edge_norm(module.norm, y, None if part == "stem" else module.conv)
        assert n is not None and n.is_contiguous(memory_format=torch.channels_last), n
        assert n.dtype == (torch.float32 if part == "stem" else torch.bfloat16), n.dtype
    _forward_matches_plain(module, x, plain, strides=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"])
def test_inference_replays_from_a_cuda_graph(backend, name):
    """A model's inference (bf16 autocast, channels_last) captured in a CUDA graph after eager calls on a side
    stream (the kernels self-check on first use, which capture cannot): the replay on a new input equals the
    eager forward on it. The docs' performance page recommends this where the host is the bottleneck."""
    import metaformer

    backend("auto")
    model = metaformer.create(name).cuda().eval().to(memory_format=torch.channels_last)
    static = torch.randn(8, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)

    def forward(t):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(t)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward(static)
    x = torch.randn_like(static)
    static.copy_(x)
    graph.replay()
    want = forward(x)
    assert out.shape == want.shape == (8, 1000)
    torch.testing.assert_close(out.float(), want.float(), rtol=1e-2, atol=1e-2 * want.float().abs().max().item())
