"""Run-time self-check of the Triton kernels: wrong numbers never pass silently.

A Triton kernel can compile on a new card, driver or Triton release and still compute wrong
numbers, or compile its forward and fail in its backward (compiled only when the first backward
runs, far from the call that chose the kernels). So, on first use per configuration (device,
dtype, memory layout, pool size, which optional scales are present, tile sizes), the dispatcher
runs the kernels forward and backward on a fixed multi-tile input and compares the mixer part
``y - x`` and every gradient with the PyTorch path on the same inputs (in fp32; fp64 for fp64).

- Under the ``"auto"`` backend a mismatch or an exception (compile or launch, forward or
  backward) warns once and sends that configuration to the PyTorch path from then on.
- Under a forced ``"triton"`` backend it raises.
- ``torch.cuda.OutOfMemoryError`` is always re-raised and never recorded: a transient shortage
  of memory says nothing about the kernels.

The check needs a synchronising comparison, so it cannot run while a CUDA graph is being
captured: under ``"auto"`` an unchecked configuration then takes the PyTorch path (run one call
before capturing); a forced ``"triton"`` raises.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

__all__ = ["CHECK_SHAPE", "TOLERANCES", "check_key", "compare_outputs", "guarded", "reset", "run_checked", "self_check",
           "verdicts"]

CHECK_SHAPE = (2, 65, 97, 89)  # several tiles, channel blocks, statistics parts and backward splits
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_UNCHECKED = object()
_verdicts: dict = {}  # check_key -> None (passed) or what went wrong


def check_key(x: torch.Tensor, pool_size: int, res_scale, sample_scale, extra=()) -> tuple:
    """The configuration a self-check covers."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return (str(x.device), x.dtype, "channels_last" if channels_last else "contiguous", pool_size,
            res_scale is not None, sample_scale is not None, *extra)


def verdicts() -> dict:
    """A copy of the recorded checks: configuration key -> None (passed) or the failure."""
    return dict(_verdicts)


def reset() -> None:
    """Forgets every recorded check (the next call per configuration checks again)."""
    _verdicts.clear()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError)


def _inputs(shape, device, dtype, channels_last, has_r, has_s):
    g = torch.Generator().manual_seed(1234)
    B, C = shape[:2]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    w = torch.randn(C, generator=g, dtype=torch.float64)
    r = 1 + 0.3 * torch.randn(C, generator=g, dtype=torch.float64) if has_r else None
    s = torch.rand(B, generator=g, dtype=torch.float64) + 0.5 if has_s else None
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    gy = gy.to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    vec = [None if t is None else t.to(device=device, dtype=dtype) for t in (w, r, s)]
    return x, *vec, gy


def _outputs(fn, x, w, r, s, gy, eps, pool_size):
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in (x, w, r, s)]
    y = fn(leaves[0], leaves[1], eps=eps, pool_size=pool_size, res_scale=leaves[2], sample_scale=leaves[3])
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy)
    names = [n for n, t in zip(("dx", "d weight", "d res_scale", "d sample_scale"), leaves) if t is not None]
    return {"y - x": y.detach().double() - x.double(), **{n: g.double() for n, g in zip(names, grads)}}


def self_check(kernel: Callable, reference: Callable, *, device, dtype: torch.dtype, channels_last: bool,
               pool_size: int, has_r: bool, has_s: bool, eps: float = 1e-5, shape=CHECK_SHAPE) -> str | None:
    """Runs ``kernel`` and ``reference`` forward and backward on the same fixed inputs.

    Both are called as ``fn(x, weight, eps=, pool_size=, res_scale=, sample_scale=)``; the
    reference gets the inputs (already rounded to ``dtype``) in fp32 (fp64 for fp64).

    Returns:
        None if every output agrees within ``TOLERANCES[dtype]`` relative to its largest
        magnitude, else a description of the worst disagreement.

    Raises:
        Whatever ``kernel`` raises (the caller decides what a failure means).
    """
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tol = TOLERANCES.get(dtype, 1e-4)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
        x, w, r, s, gy = _inputs(shape, device, dtype, channels_last, has_r, has_s)
        got = _outputs(kernel, x, w, r, s, gy, eps, pool_size)
        cast = [None if t is None else t.to(ref_dtype) for t in (x, w, r, s, gy)]
        want = _outputs(reference, *cast, eps, pool_size)
    return compare_outputs(got, want, tol)


def _describe(key) -> str:
    device, dtype, layout, k, has_r, has_s = key[:6]
    return (f"{device} {str(dtype).replace('torch.', '')} {layout} pool_size={k}"
            f"{' with res_scale' if has_r else ''}{' with sample_scale' if has_s else ''}")


def compare_outputs(got: dict, want: dict, tol: float) -> str | None:
    """None if every ``got[name]`` agrees with ``want[name]`` within ``tol`` relative to the latter's
    largest magnitude (NaN never agrees), else a description of each disagreement."""
    problems = []
    for name, ref in want.items():
        ref = ref.double()
        scale = ref.abs().max().item() if ref.numel() else 0.0
        err = (got[name].double() - ref).abs().max().item() if ref.numel() else 0.0
        if not (err <= tol * max(scale, 1e-30)):  # also catches NaN
            problems.append(f"{name}: max abs error {err:.3g} vs largest magnitude {scale:.3g} "
                            f"(tolerance {tol:g} relative)")
    return "; ".join(problems) or None


def _fail(key, problem: str, forced: bool, err: BaseException | None = None, *, what: str = "the Triton pooling kernels",
          description: str | None = None, stacklevel: int = 6) -> None:
    """Records a failure; raises under a forced backend, warns under "auto"."""
    _verdicts[key] = problem
    description = _describe(key) if description is None else description
    if forced:
        if err is not None:
            raise err
        raise RuntimeError(f"metaformer: {what} disagree with the PyTorch path for {description}: {problem}. Use "
                           f"set_backend('auto') (falls back to PyTorch) or set_backend('torch'), and please report "
                           f"this with your GPU, driver and Triton version.")
    warnings.warn(f"metaformer: {what} failed for {description} ({problem}); the 'auto' backend uses the PyTorch path "
                  f"for these inputs from now on. set_backend('triton') shows the error.", RuntimeWarning,
                  stacklevel=stacklevel)


def guarded(key, *, call: Callable, check: Callable, forced: bool, do_check: bool, device, what: str,
            description: Callable[[], str], stacklevel: int = 4):
    """``call()`` under the self-check policy for configuration ``key``; None means: use the PyTorch path.

    Args:
        key: The configuration (hashable); each is checked once.
        call: Runs the Triton kernels on the real inputs.
        check: Runs the self-check; returns None or what disagreed (exceptions count as failures).
        forced: The ``"triton"`` backend was selected (raise instead of falling back).
        do_check: Run the self-check on first use (real GPUs only).
        device: The inputs' device (no check can run while a CUDA graph is being captured on it).
        what: The kernels' name in messages (``"the Triton LayerNorm kernels"``).
        description: Gives the configuration in words (called only for a message: building the string at
            every call cost the host more than some of the kernels it launches cost the GPU).
        stacklevel: Of the warning under ``"auto"``, counted with this function as 1 (the default 4 is
            the caller of a public function that calls a helper that calls this).
    """
    verdict = _verdicts.get(key, _UNCHECKED)
    if verdict is _UNCHECKED and do_check:
        if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
            if forced:
                raise RuntimeError(f"metaformer: {what} are self-checked on first use, which cannot happen during "
                                   "CUDA-graph capture; run one call before capturing")
            return None
        try:
            verdict = check()
        except Exception as e:
            if _is_oom(e):
                raise
            _fail(key, f"the self-check raised {type(e).__name__}: {e}", forced, e, what=what,
                  description=description(), stacklevel=stacklevel + 1)
            return None
        if verdict is not None:
            _fail(key, f"the self-check found wrong results: {verdict}", forced, what=what, description=description(),
                  stacklevel=stacklevel + 1)
            return None
        _verdicts[key] = None
    elif verdict is not _UNCHECKED and verdict is not None:
        if forced:
            raise RuntimeError(f"metaformer: {what} failed earlier for {description()}: {verdict}")
        return None
    try:
        return call()
    except Exception as e:
        if _is_oom(e) or forced:
            raise
        _fail(key, f"{type(e).__name__}: {e}", forced, what=what, description=description(), stacklevel=stacklevel + 1)
        return None


def run_checked(x: torch.Tensor, weight: torch.Tensor, kwargs: dict, *, kernel: Callable, reference: Callable,
                forced: bool, check: bool, extra=()) -> torch.Tensor | None:
    """``kernel(x, weight, **kwargs)`` under the self-check policy; None means: use the PyTorch path.

    Args:
        x, weight, kwargs: The call (``kwargs``: eps, pool_size, res_scale, sample_scale).
        kernel: The Triton implementation.
        reference: The PyTorch implementation the self-check compares with.
        forced: The ``"triton"`` backend was selected (raise instead of falling back).
        check: Run the self-check on first use (real GPUs only).
        extra: More parts of the configuration key (the tile sizes).
    """
    key = check_key(x, kwargs["pool_size"], kwargs["res_scale"], kwargs["sample_scale"], extra)

    def run_check():
        return self_check(kernel, reference, device=x.device, dtype=x.dtype, channels_last=key[2] != "contiguous",
                          pool_size=kwargs["pool_size"], has_r=key[4], has_s=key[5], eps=kwargs["eps"])

    return guarded(key, call=lambda: kernel(x, weight, **kwargs), check=run_check, forced=forced, do_check=check,
                   device=x.device, what="the Triton pooling kernels", description=lambda: _describe(key), stacklevel=5)
