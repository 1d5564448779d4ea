"""The block halves through the Triton LayerNorm / StarReLU kernels (metaformer.kernels.cuda_halves).

The exactness checks run in tests/cuda_halves_suite.py, in a subprocess under Triton's interpreter
(it must be switched on before triton is imported); here: that they pass, that nothing applies on CPU
outside the interpreter, and on a GPU (skipped without one) a real block in fp32 and under bf16 autocast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metaformer.kernels as K

_TESTS = Path(__file__).resolve().parent
_SRC = _TESTS.parent / "src"

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
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_SRC), str(_TESTS), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1"}
    env.pop("METAFORMER_BACKEND", None)
    proc = subprocess.run([sys.executable, str(_TESTS / "cuda_halves_suite.py")], env=env, capture_output=True,
                          text=True, timeout=600)
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_block_on_cuda(backend):
    """caformer_s18's stage-2 block on a GPU: fp32 (TF32 off) within 1e-5, bf16 autocast within 2e-2."""
    import metaformer

    backend("auto")
    block = metaformer.create("caformer_s18", drop_path_rate=0.3).stages[2].blocks[1].cuda().train()
    x = torch.randn(8, 320, 14, 14, device="cuda")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for autocast, tol in ((False, 1e-5), (True, 2e-2)):
            outs = []
            for fn in (H.ln_block, lambda b, t: b.mlp_half(b.mixer_half(t))):
                block.zero_grad(set_to_none=True)
                xg = x.clone().requires_grad_(True)
                torch.manual_seed(0)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    y = fn(block, xg)
                y.float().square().mean().backward()
                outs.append([y.float(), xg.grad] + [p.grad for p in block.parameters()])
            for got, want in zip(*outs):
                scale = want.abs().max().item()
                torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, scale))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
