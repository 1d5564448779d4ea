"""Tests of metaformer.kernels (PyTorch and reference backends, dispatch) against the plain
GroupNorm + AvgPool2d composition (the oracle in kernel_checks.py). The Triton kernels are
tested in test_kernels_triton.py (interpreter, compilation) and test_kernels_cuda.py (GPU); the
self-check in test_kernels_selfcheck.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import SRC, onnx_torchscript_exporter, subprocess_env
from kernel_checks import EPS, check, check_large_mean, fused, inputs, ref

import metaformer.kernels as K

SHAPES = [(2, 5, 7, 9), (3, 8, 13, 11), (1, 4, 6, 6), (2, 3, 1, 1), (2, 3, 2, 3)]


@pytest.fixture
def backend():
    """Restores the backend selection after each test."""
    before = K.get_backend()
    yield K.set_backend
    K.set_backend(before)


# ------------------------------------------------------------------------------ torch backend
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scales", [(False, False), (True, True), (True, False), (False, True)])
def test_torch_fp32_matches_reference(backend, shape, channels_last, scales):
    backend("torch")
    y = check(shape, torch.float32, channels_last, *scales)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("k", [1, 5, 7])
def test_torch_other_pool_sizes(backend, k):
    backend("torch")
    check((2, 4, 9, 8), torch.float32, False, True, True, k=k)
    check((2, 4, 9, 8), torch.float32, True, False, False, k=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 2, 3)])
def test_torch_half_matches_fp32_reference(backend, dtype, channels_last, shape):
    backend("torch")
    check(shape, dtype, channels_last, True, True)


@pytest.mark.parametrize(("offset", "channels_last", "ones_grad"),
                         [(300.0, False, True), (300.0, True, False), (3000.0, False, True), (3000.0, True, True)])
def test_torch_large_mean_as_accurate_as_plain_composition(backend, offset, channels_last, ones_grad):
    """x = offset + 3 randn, fp32 vs float64: y - x and every gradient (x, weight, res_scale,
    sample_scale) as accurate as GroupNorm + AvgPool2d in fp32. Uncentred pooling lost two digits
    of the weight gradient here (pool(x) - x cancels)."""
    backend("torch")
    check_large_mean((2, 65, 57, 55), offset, channels_last, ones_grad)


@pytest.mark.parametrize(("name", "channels_last"), [("torch", False), ("torch", True), ("reference", False)])
def test_gradcheck_fp64(backend, name, channels_last):
    backend(name)
    x, w, r, s, _ = inputs((2, 3, 4, 5), torch.float64, channels_last, True, True)
    ins = [t.requires_grad_(True) for t in (x, w, r, s)]
    assert torch.autograd.gradcheck(lambda *a: fused(*a), ins)


def test_reference_backend_matches_oracle(backend):
    backend("reference")
    check((2, 5, 7, 9), torch.float32, False, True, True)
    check((2, 5, 7, 9), torch.float32, True, False, False)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_torch_compile_fullgraph_and_export(backend, grad):
    """Both formulations (forward-only, and the centred one used when something needs a gradient)
    trace without graph breaks, export, and give the oracle's output and gradients."""
    backend("auto")
    x, w, r, s, gy = inputs((2, 4, 6, 5), with_r=True, with_s=True)
    w, r = w.requires_grad_(grad), r.requires_grad_(grad)

    def f(x, w, r, s):
        return K.pool_mixer_residual(x, w, eps=EPS, res_scale=r, sample_scale=s)

    for compiler in ("eager", "aot_eager"):  # aot_eager also traces the backward
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=compiler)  # fullgraph: any graph break raises
        y = compiled(x, w, r, s)
        torch.testing.assert_close(y, ref(x, w, r, s), rtol=1e-5, atol=1e-5)
        if grad:
            got = torch.autograd.grad(y, (w, r), gy)
            want = torch.autograd.grad(ref(x, w, r, s), (w, r), gy)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.r = torch.nn.Parameter(w.detach(), grad), torch.nn.Parameter(r.detach(), grad)

        def forward(self, x, s):
            return f(x, self.w, self.r, s)

    ep = torch.export.export(M(), (x, s))
    torch.testing.assert_close(ep.module()(x, s), ref(x, w, r, s), rtol=1e-5, atol=1e-5)


def test_torch_onnx_export_matches_onnxruntime(backend):
    """The centred formulation (the one traced while parameters require grad) exports to ONNX."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import io

    backend("auto")
    x, w, r, _, _ = inputs((2, 4, 6, 5), channels_last=False, with_r=True)
    x = x * 3 + 300

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.r = torch.nn.Parameter(w), torch.nn.Parameter(r)

        def forward(self, x):
            return K.pool_mixer_residual(x, self.w, eps=EPS, pool_size=5, res_scale=self.r)

    buf = io.BytesIO()
    torch.onnx.export(M(), (x,), buf, **onnx_torchscript_exporter(), opset_version=17, input_names=["x"])
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), ref(x, w, r, k=5), rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------------------ dispatch
def test_backend_selection(backend):
    assert K.BACKENDS == ("auto", "torch", "triton", "reference")
    backend("torch")
    assert K.get_backend() == "torch"
    backend("Reference")
    assert K.get_backend() == "reference"
    backend("auto")
    assert K.resolve_backend(torch.zeros(1, 1, 1, 1)) == "torch"  # CPU tensor
    with pytest.raises(ValueError, match="auto, torch, triton, reference"):
        K.set_backend("cuda")
    assert K.get_backend() == "auto"


def test_env_var_sets_initial_backend_and_is_validated(monkeypatch, backend):
    # the variable is read on first use: simulate a fresh process by clearing the selection
    monkeypatch.setattr(K, "_backend", None)
    monkeypatch.setenv("METAFORMER_BACKEND", "reference")
    assert K.get_backend() == "reference"
    monkeypatch.setattr(K, "_backend", None)
    monkeypatch.setenv("METAFORMER_BACKEND", "fast")
    with pytest.raises(ValueError, match="METAFORMER_BACKEND.*auto, torch, triton, reference"):
        K.get_backend()
    monkeypatch.setattr(K, "_backend", None)
    monkeypatch.delenv("METAFORMER_BACKEND")
    assert K.get_backend() == "auto"


def test_triton_backend_on_cpu_raises_clear_error(backend):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: CPU tensors are allowed")
    backend("triton")
    with pytest.raises(RuntimeError, match="(CUDA tensor|could not be imported)"):
        fused(torch.randn(1, 2, 3, 3), torch.ones(2))


def test_input_validation():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="pool_size"):
        K.pool_mixer_residual(x, torch.ones(3), eps=EPS, pool_size=2)
    with pytest.raises(ValueError, match="weight"):
        K.pool_mixer_residual(x, torch.ones(4), eps=EPS)
    with pytest.raises(ValueError, match="sample_scale"):
        K.pool_mixer_residual(x, torch.ones(3), eps=EPS, sample_scale=torch.ones(3))
    with pytest.raises(ValueError, match="res_scale"):
        K.pool_mixer_residual(x, torch.ones(3), eps=EPS, res_scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        K.pool_mixer_residual(x[0], torch.ones(3), eps=EPS)


def test_a_triton_older_than_3_is_not_used(tmp_path):
    """Triton 2.x (PyTorch 2.3's) refuses the kernels: the kernels switch Triton off at import and say why, and
    the PyTorch paths run (a stand-in package that reports version 2.3.1)."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("__version__ = '2.3.1'\n")
    code = (
        "import torch, metaformer.kernels as K\n"
        "assert not K.TRITON_AVAILABLE and 'older than 3.0' in str(K.TRITON_IMPORT_ERROR), K.TRITON_IMPORT_ERROR\n"
        "x = torch.randn(1, 2, 3, 3)\n"
        "assert K.resolve_backend(x) == 'torch'\n"
        "K.pool_mixer_residual(x, torch.ones(2), eps=1e-5)\n"
    )
    env = subprocess_env(tmp_path, SRC, drop=("METAFORMER_BACKEND",))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, metaformer.kernels as K\n"
        "assert not K.TRITON_AVAILABLE\n"
        "x = torch.randn(1, 2, 3, 3)\n"
        "assert K.resolve_backend(x) == 'torch'\n"
        "K.pool_mixer_residual(x, torch.ones(2), eps=1e-5)\n"
        "K.set_backend('triton')\n"
        "try:\n"
        "    K.pool_mixer_residual(x, torch.ones(2), eps=1e-5)\n"
        "except RuntimeError as e:\n"
        "    assert 'could not be imported' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = subprocess_env(drop=("METAFORMER_BACKEND",))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
