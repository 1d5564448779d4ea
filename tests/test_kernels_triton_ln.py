"""The LayerNorm / StarReLU Triton kernels without a GPU: through Triton's interpreter, and compiled for an H100.

Each group of tests/triton_ln_suite.py runs in a subprocess (the interpreter must be switched on
before triton is imported); the subprocesses start together, on first use. Skipped if Triton is not
installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_triton_suite, suite_group

_SUITE = Path(__file__).resolve().parent / "triton_ln_suite.py"
# groups per subprocess, and whether they interpret
_PROCESSES = {("tiles", "star"): True, ("misc",): True, ("compile",): False}


@pytest.fixture(scope="module")
def suite_results():
    """Starts every subprocess at once; returns {group: (passed?, the process's output)}."""
    return run_triton_suite(_SUITE, _PROCESSES)


@pytest.mark.slow
@pytest.mark.parametrize("group", ["tiles", "misc", "star"])
def test_ln_kernels_under_interpreter(suite_results, group):
    """tiles: several position tiles (partial ones), padded channels and backward splits (tiny tile sizes),
    both layouts, x and y in different layouts, every optional tensor, subsets of the gradients; misc:
    bf16/fp16/fp64, dtype promotion, out_dtype, one channel, one position, 300 channels, gradients of one
    output (broadcast), transposed gradients, non-dense inputs, no-grad, +300 offsets, too many channels,
    the self-checks; star: StarReLU over several programs and backward steps, dtypes, layouts, promotion,
    non-dense and broadcast. Everything against float64 oracles on the same rounded inputs."""
    ok, out = suite_group(suite_results, group)
    assert ok, out


@pytest.mark.slow
def test_ln_kernels_compile_for_h100(suite_results):
    """Every kernel, with the arguments the launch code computes, compiles to a cubin for sm_90."""
    ok, out = suite_group(suite_results, "compile")
    assert ok, out
