"""What the Triton suites (tests/triton_interpreter_suite.py, tests/triton_ln_suite.py,
tests/cuda_halves_suite.py) share: the compile-for-an-H100 check of every launch, running the groups named on
the command line, and the check that this Triton's interpreter can run kernels at all."""

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
    from triton.compiler import make_backend

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
        src, options = _source(kernel, backend, args, kwargs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        assert compiled.asm.get("cubin"), kernel
    assert len(launches) == expected, len(launches)


def _source(kernel, backend, args, kwargs):
    """What ``JITFunction.run`` compiles for ``kernel[grid](*args, **kwargs)``: (ASTSource, options)."""
    import inspect

    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    if len(inspect.signature(create_function_from_signature).parameters) == 2:  # Triton 3.0's binder
        kernel.create_binder()
        bind = kernel.binder
    else:
        bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound = bind(*args, **kwargs)
    if len(bound) == 5:  # Triton 3.0-3.2: (bound, sig_and_spec, constexpr values, other values, excess kwargs)
        return _source_five(kernel, backend, kwargs, bound[0], bound[1])
    bound, specialization, options = bound
    options, signature, constexprs, attrs = _pack_args(kernel, backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def _source_five(kernel, backend, kwargs, bound, sig_and_spec):
    """:func:`_source` as ``JITFunction.run`` computes it where the binder returns five values (Triton 3.0 was
    checked, which takes the constants from ``_get_config``, and 3.2, from the backend's attributes descriptor)."""
    from triton.compiler import ASTSource

    options = backend.parse_options(kwargs)
    values = tuple(bound.values())
    names = [p.name for p in kernel.params if not p.is_constexpr]
    signature = {k: "*i8" if v == "none" else v for k, v in zip(names, sig_and_spec[:len(names)])}
    if hasattr(backend, "get_attrs_descriptor"):  # Triton 3.2
        config = backend.get_attrs_descriptor(kernel.params, values)
        constant_params = config.get_constants()
    else:  # Triton 3.0
        config = kernel._get_config(*values)
        constant_params = config.equal_to_1
    constants = {p.name: v for v, p in zip(values, kernel.params)
                 if p.is_constexpr or p.num in constant_params or v is None}
    return ASTSource(kernel, signature, constants, config), options


def _pack_args(kernel, backend, kwargs, bound, specialization, options):
    """What ``JITFunction.run`` compiles a launch with: (options, signature, constexprs, attrs). Newer releases
    have it as ``JITFunction._pack_args`` (3.8 was checked); Triton 3.4 computes it inline in ``run``, as
    here."""
    if hasattr(kernel, "_pack_args"):
        return kernel._pack_args(backend, kwargs, bound, specialization, options)
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    sigvals = [s[0] for s in specialization]
    signature = dict(zip([p.name for p in kernel.params], sigvals))
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(sigvals, lambda _, v: v == "constexpr")}
    attrvals = [s[1] for s in specialization]
    attrs = {path: backend.parse_attr(get_iterable_path(attrvals, path))
             for path in find_paths_if(attrvals, lambda _, v: isinstance(v, str))}
    return options, signature, constexprs, attrs


# Printed, with the reason, by a suite whose interpreter cannot run a minimal kernel; the tests then skip.
INTERPRETER_DEFECT = "TRITON INTERPRETER DEFECT:"


def interpreter_defect():
    """Under ``TRITON_INTERPRET=1``: None if Triton's interpreter runs a minimal kernel right (a loop over a
    bound given at run time, as the statistics kernels have), else why not. Triton 3.4's interpreter turns
    such a bound into a Python int with ``int()`` of a one-element array, which NumPy 2.4 and later refuse
    ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.0's writes nothing back to CPU
    tensors (a kernel storing 2.0 leaves zeros); Triton 3.8 runs it."""
    import numpy
    import torch
    import triton
    from triton_probe import probe

    out = torch.zeros(4)
    try:
        probe[(1,)](out, 3, BLOCK=4)
    except Exception as err:  # noqa: BLE001 - whatever the interpreter raises is the reason
        return (f"Triton {triton.__version__}'s interpreter (with NumPy {numpy.__version__}) cannot run a minimal "
                f"kernel with a loop over a run-time bound: {err!r}. Use NumPy < 2.4 with this Triton, or a newer "
                "Triton, to test the kernels on the CPU.")
    if out.tolist() != [3.0] * 4:
        return f"Triton {triton.__version__}'s interpreter computed {out.tolist()} for a loop summing 1.0 three times"
    return None


def exit_if_interpreter_defect() -> None:
    """Exits with status 3, printing :data:`INTERPRETER_DEFECT` and the reason, where :func:`interpreter_defect`
    finds one (so that a failure of Triton's own interpreter is not read as a failure of our kernels)."""
    reason = interpreter_defect()
    if reason:
        print(INTERPRETER_DEFECT, reason, flush=True)
        sys.exit(3)


def run_groups(groups: dict) -> None:
    """Runs the groups named in ``sys.argv`` under the forced ``"triton"`` backend, printing ``NAME passed``
    or the traceback and ``NAME FAILED`` for each; exits 1 if any failed."""
    import metaformer.kernels as K

    assert K.TRITON_AVAILABLE, K.TRITON_IMPORT_ERROR
    if K._interpreting():
        exit_if_interpreter_defect()
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
