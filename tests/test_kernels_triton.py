"""The Triton kernels without a GPU: through Triton's interpreter, and compiled for an H100.

Each group of tests/triton_interpreter_suite.py runs in a subprocess (the interpreter must be
switched on before triton is imported); the three subprocesses start together, on first use,
so that the slow interpreter uses every core. Skipped if Triton is not installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_triton_suite, suite_group

_SUITE = Path(__file__).resolve().parent / "triton_interpreter_suite.py"
# groups per subprocess (balanced: about the same interpreter time each), and whether they interpret
_PROCESSES = {("tiles",): True, ("misc", "precision"): True, ("compile",): False}


@pytest.fixture(scope="module")
def suite_results():
    """Starts every subprocess at once; returns {group: (passed?, the process's output)}."""
    return run_triton_suite(_SUITE, _PROCESSES)


@pytest.mark.slow
@pytest.mark.parametrize("group", ["tiles", "precision", "misc"])
def test_triton_kernels_under_interpreter(suite_results, group):
    """tiles: several pixel tiles, channel blocks, statistics parts and backward splits (tiny tile
    sizes) against the oracle; precision: offsets +300 / +3000 against float64; misc: shapes, pool
    sizes 1-7, fp32/bf16/fp16/fp64, layouts, non-dense inputs and gradients, no-grad, empty
    tensors, and the self-check on the real kernels."""
    ok, out = suite_group(suite_results, group)
    assert ok, out


@pytest.mark.slow
def test_triton_kernels_compile_for_h100(suite_results):
    """Every kernel, with the arguments the launch code computes, compiles to a cubin for sm_90."""
    ok, out = suite_group(suite_results, "compile")
    assert ok, out


def test_samples_beyond_int32_offsets_are_refused():
    """Offsets within a sample are int32: larger samples raise under a forced "triton" and take the
    PyTorch path under "auto" (checked without memory: broadcast tensors have no storage)."""
    ti = pytest.importorskip("metaformer.kernels.triton_impl", reason="triton is not installed")
    import torch

    import metaformer.kernels as K

    huge = torch.empty(()).expand(2, 2**15, 2**8, 2**8)  # 2**31 elements per sample
    assert "32-bit offsets" in ti.unsupported_reason(huge, 3)
    assert ti.unsupported_reason(torch.empty(()).expand(128, 512, 56, 56), 7) is None
    with pytest.raises(RuntimeError, match="too large.*set_backend"):
        ti.pool_mixer_residual_triton(huge, torch.ones(2**15), eps=1e-5)
    before = K.get_backend()
    try:
        K.set_backend("auto")
        kwargs = dict(eps=1e-5, pool_size=3, res_scale=None, sample_scale=None)
        assert K._run_triton(huge, torch.ones(2**15), kwargs) is None
    finally:
        K.set_backend(before)
