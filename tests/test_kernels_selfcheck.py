"""The self-check's policy (metaformer.kernels.selfcheck), on CPU.

On a GPU the dispatcher self-checks the Triton kernels; here ``run_checked`` is given kernel
functions that are deliberately wrong (or fail, or run out of memory) in one known way, built
from the PyTorch path, to test our own compare / warn / fall back / raise logic. The real
kernels pass the same self-check under Triton's interpreter (test_kernels_triton.py).
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import EPS, inputs

from metaformer.kernels import pool_mixer_residual_torch, selfcheck

SHAPE = (2, 5, 9, 8)


@pytest.fixture(autouse=True)
def _fresh_checks():
    selfcheck.reset()
    yield
    selfcheck.reset()


class Counting:
    """Calls fn and counts the calls; ``fail_on`` call numbers raise ``error`` instead."""

    def __init__(self, fn, error=None, fail_on=()):
        self.fn, self.error, self.fail_on, self.calls = fn, error, set(fail_on), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise self.error
        return self.fn(*args, **kwargs)


def wrong_forward(x, w, **kw):
    return pool_mixer_residual_torch(x, w * 1.001, **kw)  # the mixer part off by 0.1 %


def wrong_backward(x, w, **kw):
    """The right forward values; every gradient 0.1 % too large."""
    y = pool_mixer_residual_torch(x, w, **kw)
    return y + 0.001 * (y - y.detach())


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("simulated failure to compile the backward kernel")


def failing_backward(x, w, **kw):
    return _FailingBackward.apply(pool_mixer_residual_torch(x, w, **kw))


def _call(kernel, forced=False, check=True, dtype=torch.float32, channels_last=False, sample_scale=False):
    x, w, r, s, _ = inputs(SHAPE, dtype, channels_last, with_r=True, with_s=sample_scale)
    kwargs = dict(eps=EPS, pool_size=3, res_scale=r, sample_scale=s)
    y = selfcheck.run_checked(x, w, kwargs, kernel=kernel, reference=pool_mixer_residual_torch, forced=forced,
                              check=check)
    return y, x, w, kwargs


def test_correct_kernel_is_checked_once_then_used():
    kernel = Counting(pool_mixer_residual_torch)
    y, x, w, kwargs = _call(kernel)
    assert kernel.calls == 2  # the self-check, then the call itself
    torch.testing.assert_close(y, pool_mixer_residual_torch(x, w, **kwargs))
    _call(kernel)
    assert kernel.calls == 3  # no second check for the same configuration
    assert list(selfcheck.verdicts().values()) == [None]
    _call(kernel, channels_last=True)  # another configuration is checked on its own
    assert kernel.calls == 5


def test_self_check_compares_every_output_at_the_tolerance():
    common = dict(reference=pool_mixer_residual_torch, device="cpu", dtype=torch.float32, channels_last=False,
                  pool_size=3, has_r=True, has_s=True, shape=SHAPE)
    assert selfcheck.self_check(pool_mixer_residual_torch, **common) is None
    assert "y - x" in selfcheck.self_check(wrong_forward, **common)
    problem = selfcheck.self_check(wrong_backward, **common)
    assert "y - x" not in problem
    for name in ("dx", "d weight", "d res_scale", "d sample_scale"):
        assert name in problem
    nan = selfcheck.self_check(lambda x, w, **kw: pool_mixer_residual_torch(x, w, **kw) * float("nan"), **common)
    assert "nan" in nan


@pytest.mark.parametrize("kernel", [wrong_forward, wrong_backward, failing_backward],
                         ids=["wrong_forward", "wrong_backward", "failing_backward"])
def test_auto_warns_and_falls_back(kernel):
    counted = Counting(kernel)
    with pytest.warns(RuntimeWarning, match="uses the PyTorch path for these inputs from now on"):
        y, *_ = _call(counted)
    assert y is None  # the caller runs the PyTorch path
    assert counted.calls == 1  # the self-check only
    [verdict] = selfcheck.verdicts().values()
    assert verdict and ("wrong results" in verdict or "simulated failure" in verdict)
    y, *_ = _call(counted)  # the configuration stays on the PyTorch path, without a second warning
    assert y is None and counted.calls == 1
    y, *_ = _call(Counting(pool_mixer_residual_torch), dtype=torch.float64)  # other configurations unaffected
    assert y is not None


def test_forced_triton_raises_on_wrong_results_and_failures():
    with pytest.raises(RuntimeError, match="disagree with the PyTorch path.*dx"):
        _call(wrong_backward, forced=True)
    with pytest.raises(RuntimeError, match="failed earlier"):  # recorded: raises again without re-checking
        _call(wrong_backward, forced=True)
    selfcheck.reset()
    with pytest.raises(RuntimeError, match="simulated failure"):
        _call(failing_backward, forced=True)


def test_out_of_memory_is_re_raised_and_not_recorded():
    oom = torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")
    in_check = Counting(pool_mixer_residual_torch, oom, fail_on={1})
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _call(in_check)
    assert selfcheck.verdicts() == {}  # nothing recorded: the next call checks again
    y, *_ = _call(in_check)
    assert y is not None and in_check.calls == 3

    selfcheck.reset()
    in_call = Counting(pool_mixer_residual_torch, oom, fail_on={2})  # passes the check, then OOM
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _call(in_call)
    assert list(selfcheck.verdicts().values()) == [None]
    y, *_ = _call(in_call)
    assert y is not None


def test_failure_after_a_passed_check_falls_back_under_auto():
    kernel = Counting(pool_mixer_residual_torch, RuntimeError("simulated launch failure"), fail_on={3})
    assert _call(kernel)[0] is not None
    with pytest.warns(RuntimeWarning, match="simulated launch failure"):
        assert _call(kernel)[0] is None
    assert _call(kernel)[0] is None and kernel.calls == 3


def test_no_check_where_not_asked():
    """The interpreter and CPU tensors are not self-checked (check=False): the kernel runs at once."""
    kernel = Counting(wrong_forward)
    y, *_ = _call(kernel, check=False)
    assert y is not None and kernel.calls == 1 and selfcheck.verdicts() == {}


def test_self_check_leaves_grad_mode_rng_and_inputs_alone():
    state = torch.get_rng_state()
    with torch.inference_mode():
        y, x, w, kwargs = _call(Counting(pool_mixer_residual_torch))
    assert y is not None and not y.requires_grad
    assert torch.equal(torch.get_rng_state(), state)
