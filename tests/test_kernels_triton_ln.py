"""The LayerNorm / StarReLU Triton kernels without a GPU: through Triton's interpreter, and compiled for an H100.

Each group of tests/triton_ln_suite.py runs in a subprocess (the interpreter must be switched on
before triton is imported); the subprocesses start together, on first use. Skipped if Triton is not
installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
_SRC = _TESTS.parent / "src"
_SUITE = _TESTS / "triton_ln_suite.py"
_PROCESSES = {("tiles", "star"): True, ("misc",): True, ("compile",): False}  # groups, interpreted?
_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def suite_results():
    """Starts every subprocess at once; returns {group: (passed?, the process's output)}."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
    procs = {}
    for groups, interpret in _PROCESSES.items():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_SRC), str(_TESTS), os.environ.get("PYTHONPATH", "")])}
        env.pop("METAFORMER_BACKEND", None)
        env.pop("TRITON_INTERPRET", None)
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        procs[groups] = subprocess.Popen([sys.executable, str(_SUITE), *groups], env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
    t0 = time.perf_counter()
    results = {}
    for groups, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(1.0, _TIMEOUT_S - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\n[killed after {_TIMEOUT_S} s]"
        for g in groups:
            results[g] = (f"{g} passed" in out, out)
    if all("TRITON_AVAILABLE" in out and "AssertionError" in out and not ok for ok, out in results.values()):
        pytest.skip(f"triton is installed but not importable: {next(iter(results.values()))[1].strip()[-300:]}")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("group", ["tiles", "misc", "star"])
def test_ln_kernels_under_interpreter(suite_results, group):
    """tiles: several position tiles (partial ones), padded channels and backward splits (tiny tile sizes),
    both layouts, x and y in different layouts, every optional tensor, subsets of the gradients; misc:
    bf16/fp16/fp64, dtype promotion, out_dtype, one channel, one position, 300 channels, gradients of one
    output (broadcast), transposed gradients, non-dense inputs, no-grad, +300 offsets, too many channels,
    the self-checks; star: StarReLU over several programs and backward steps, dtypes, layouts, promotion,
    non-dense and broadcast. Everything against float64 oracles on the same rounded inputs."""
    ok, out = suite_results[group]
    assert ok, out


@pytest.mark.slow
def test_ln_kernels_compile_for_h100(suite_results):
    """Every kernel, with the arguments the launch code computes, compiles to a cubin for sm_90."""
    ok, out = suite_results["compile"]
    assert ok, out
