"""Tests of metaformer.kernels against the plain GroupNorm + AvgPool2d composition.

The oracle (``_oracle``) is written here from the definition, independently of the code under
test. The Triton kernels are checked on CPU through Triton's interpreter in a subprocess (the
interpreter must be switched on before triton is imported): this file doubles as that
subprocess's script (``python tests/test_kernels.py --triton-interpret``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

_SRC = Path(__file__).resolve().parents[1] / "src"
try:
    import metaformer.kernels as K
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, str(_SRC))
    import metaformer.kernels as K

EPS = 1e-5
SHAPES = [(2, 5, 7, 9), (3, 8, 13, 11), (1, 4, 6, 6), (2, 3, 1, 1), (2, 3, 2, 3)]


def _oracle(x, w, r=None, s=None, eps=EPS, k=3):
    """res_scale * x + (w * s) * (pool(GN(x)) - GN(x)), GN = GroupNorm(1) with unit affine."""
    n = F.group_norm(x, 1, None, None, eps)
    mix = F.avg_pool2d(n, k, 1, k // 2, count_include_pad=False) - n
    scale = w[None, :, None, None]
    if s is not None:
        scale = scale * s[:, None, None, None]
    res = x if r is None else x * r[None, :, None, None]
    return res + scale * mix


def _inputs(shape, dtype=torch.float32, channels_last=False, with_r=False, with_s=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.7 + 0.6).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    r = (1 + 0.3 * torch.randn(C, generator=g, dtype=torch.float64)).to(dtype) if with_r else None
    s = (torch.rand(B, generator=g, dtype=torch.float64) + 0.5).to(dtype) if with_s else None
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, r, s, gy


def _run(fn, x, w, r, s, gy, k=3, cast=None):
    """Output and grads (x, w, r, s) of fn; with cast, inputs are first cast to that dtype."""
    leaves = [t if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, r, s)]
    ins = [t if (t is None or cast is None) else t.to(cast) for t in leaves]
    y = fn(ins[0], ins[1], r=ins[2], s=ins[3], k=k)
    gy = gy if cast is None else gy.to(cast)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy)
    return y, grads


def _fused(x, w, r=None, s=None, k=3):
    return K.pool_mixer_residual(x, w, eps=EPS, pool_size=k, res_scale=r, sample_scale=s)


def _ref(x, w, r=None, s=None, k=3):
    return _oracle(x, w, r, s, EPS, k)


def _check(shape, dtype, channels_last, with_r, with_s, k=3, seed=0):
    """Forward and all gradients of the selected backend against the oracle."""
    x, w, r, s, gy = _inputs(shape, dtype, channels_last, with_r, with_s, seed)
    y, grads = _run(_fused, x, w, r, s, gy, k)
    assert y.dtype == dtype and y.shape == x.shape
    if dtype in (torch.float32, torch.float64):
        y_ref, grads_ref = _run(_ref, x, w, r, s, gy, k)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(y, y_ref, **tol)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    else:  # half precision: against an fp32 oracle on the same (rounded) inputs
        y_ref, grads_ref = _run(_ref, x, w, r, s, gy, k, cast=torch.float32)
        torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
        for a, b in zip(grads, grads_ref):
            # reductions (weight / scale grads) are compared relative to their magnitude
            scale = max(1.0, b.abs().max().item())
            torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=3e-2, atol=3e-2)
    return y


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
    y = _check(shape, torch.float32, channels_last, *scales)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("k", [1, 5, 7])
def test_torch_other_pool_sizes(backend, k):
    backend("torch")
    _check((2, 4, 9, 8), torch.float32, False, True, True, k=k)
    _check((2, 4, 9, 8), torch.float32, True, False, False, k=k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 2, 3)])
def test_torch_half_matches_fp32_reference(backend, dtype, channels_last, shape):
    backend("torch")
    _check(shape, dtype, channels_last, True, True)


def test_torch_large_mean_stats_are_exact(backend):
    """Statistics must not suffer from E[x^2] - E[x]^2 cancellation."""
    backend("torch")
    x, w, _, _, _ = _inputs((2, 8, 16, 16))
    x = x + 300.0
    torch.testing.assert_close(_fused(x, w), _ref(x.double(), w.double()).float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("name", "channels_last"), [("torch", False), ("torch", True), ("reference", False)])
def test_gradcheck_fp64(backend, name, channels_last):
    backend(name)
    x, w, r, s, _ = _inputs((2, 3, 4, 5), torch.float64, channels_last, True, True)
    ins = [t.requires_grad_(True) for t in (x, w, r, s)]
    assert torch.autograd.gradcheck(lambda *a: _fused(*a), ins)


def test_reference_backend_matches_oracle(backend):
    backend("reference")
    _check((2, 5, 7, 9), torch.float32, False, True, True)
    _check((2, 5, 7, 9), torch.float32, True, False, False)


def test_torch_compile_fullgraph_and_export(backend):
    backend("auto")
    x, w, r, s, _ = _inputs((2, 4, 6, 5))

    def f(x, w, r, s):
        return K.pool_mixer_residual(x, w, eps=EPS, res_scale=r, sample_scale=s)

    compiled = torch.compile(f, fullgraph=True, backend="eager")  # dynamo only: no graph breaks
    torch.testing.assert_close(compiled(x, w, r, s), _ref(x, w, r, s), rtol=1e-5, atol=1e-5)

    class M(torch.nn.Module):
        def forward(self, x, w, r, s):
            return f(x, w, r, s)

    ep = torch.export.export(M(), (x, w, r, s))
    torch.testing.assert_close(ep.module()(x, w, r, s), _ref(x, w, r, s), rtol=1e-5, atol=1e-5)


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
        _fused(torch.randn(1, 2, 3, 3), torch.ones(2))


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


# ------------------------------------------------------------------------------ triton (interpreter)
def _triton_interpreter_checks() -> None:
    """Runs in a subprocess with TRITON_INTERPRET=1 (tiny tensors: the interpreter is slow)."""
    assert K.TRITON_AVAILABLE, K.TRITON_IMPORT_ERROR
    K.set_backend("triton")
    n = 0
    for shape in [(2, 5, 7, 9), (1, 3, 1, 1), (2, 3, 2, 3), (1, 4, 5, 4)]:
        for channels_last in (False, True):
            for scales in [(False, False), (True, True)]:
                _check(shape, torch.float32, channels_last, *scales)
                n += 1
    _check((2, 4, 7, 6), torch.float32, False, True, False, k=5)
    _check((2, 4, 7, 6), torch.bfloat16, True, True, True)
    _check((2, 4, 7, 6), torch.float16, False, False, True)
    n += 3
    x, w, r, s, _ = _inputs((2, 2, 2, 3), torch.float64, False, True, True)
    assert torch.autograd.gradcheck(lambda *a: _fused(*a), [t.requires_grad_(True) for t in (x, w, r, s)])
    x, w, r, s, _ = _inputs((1, 2, 3, 2), torch.float64, True, False, True)
    assert torch.autograd.gradcheck(
        lambda x, w, s: _fused(x, w, s=s), [t.requires_grad_(True) for t in (x, w, s)]
    )
    # a non-dense input is made contiguous
    x, w, _, _, gy = _inputs((2, 4, 6, 10))
    xs = x[..., ::2]
    torch.testing.assert_close(_fused(xs, w), _ref(xs, w), rtol=1e-5, atol=1e-5)
    print(f"triton interpreter checks passed ({n + 3} cases)")


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(_SRC), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("METAFORMER_BACKEND", None)
    out = subprocess.run(
        [sys.executable, __file__, "--triton-interpret"], env=env, capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0 and "TRITON_AVAILABLE" in out.stderr and "AssertionError" in out.stderr:
        pytest.skip(f"triton is installed but not importable: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "triton interpreter checks passed" in out.stdout


if __name__ == "__main__":
    if "--triton-interpret" in sys.argv:
        _triton_interpreter_checks()


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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_SRC), os.environ.get("PYTHONPATH", "")])}
    env.pop("METAFORMER_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
