"""What the Triton suites (tests/triton_interpreter_suite.py, tests/triton_ln_suite.py) share: the
compile-for-an-H100 check of every launch, and running the groups named on the command line."""

from __future__ import annotations

import sys
import time
import traceback
import types


def compile_for_h100(launcher, kernels, names, drive, expected: int) -> None:
    """Runs ``drive()`` with ``launcher.tk`` standing in for ``kernels``, so that every ``kernel[grid](...)``
    the launch code makes is recorded instead of run, then compiles each recorded launch for an H100
    (sm_90) with Triton's own compiler (PTX, then a cubin through ptxas) and checks there were
    ``expected`` launches. Needs no GPU; must run without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    assert all(isinstance(getattr(kernels, n), triton.runtime.jit.JITFunction) for n in names), \
        "TRITON_INTERPRET is set"
    launches = []

    class Record:  # stands in for kernel[grid](...): records the launch instead of running it
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid, args, kwargs))

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    real, launcher.tk = launcher.tk, types.SimpleNamespace(**{n: Record(getattr(kernels, n)) for n in names})
    try:
        drive()
    finally:
        launcher.tk = real
    for kernel, grid, args, kwargs in launches:
        assert len(grid) == 1 and 0 < grid[0] < 2**31, grid
        bind = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = bind(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        assert compiled.asm.get("cubin"), kernel
    assert len(launches) == expected, len(launches)


def run_groups(groups: dict) -> None:
    """Runs the groups named in ``sys.argv`` under the forced ``"triton"`` backend, printing ``NAME passed``
    or the traceback and ``NAME FAILED`` for each; exits 1 if any failed."""
    import metaformer.kernels as K

    assert K.TRITON_AVAILABLE, K.TRITON_IMPORT_ERROR
    K.set_backend("triton")
    failed = False
    for name in sys.argv[1:]:
        t0 = time.perf_counter()
        try:
            groups[name]()
        except Exception:
            failed = True
            traceback.print_exc()
            print(f"{name} FAILED", flush=True)
        else:
            print(f"{name} passed in {time.perf_counter() - t0:.1f} s", flush=True)
    sys.exit(1 if failed else 0)
