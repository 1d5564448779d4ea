"""Shared helpers of the test suite."""

import functools
import importlib.util
import os
from pathlib import Path

# The checkout's package folder: subprocesses put it first on PYTHONPATH (subprocess_env)
SRC = Path(__file__).resolve().parents[1] / "src"

# One model per family: what is one code path for every model of a family is tested on these.
FAMILY_REPS = ["poolformer_s12", "metaformer_ppaa_s12_224", "metaformer_pppf_s12_224", "identityformer_s12",
               "randformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"]


def subprocess_env(*paths, drop=(), **extra: str) -> dict:
    """``os.environ`` for a subprocess that imports this checkout's ``metaformer``: ``paths`` (default: :data:`SRC`)
    put first on ``PYTHONPATH``, the variables named in ``drop`` removed, then ``extra`` set."""
    env = {k: v for k, v in os.environ.items() if k not in set(drop)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*(str(p) for p in (paths or (SRC,))), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@functools.cache
def built_model(name: str, **kwargs):
    """One shared instance per (name, kwargs): building the large variants is the slow part.

    A variant (``features_only=True``, ...) takes the plain model's tensors wherever a name and shape match,
    so the session holds each model's weights once: 33 models and their 33 backbones, each with weights of
    its own, took the test process to 22 GB.
    """
    import metaformer

    model = metaformer.create(name, **kwargs)
    if kwargs:
        own = model.state_dict()
        base = {k: v for k, v in built_model(name).state_dict().items() if k in own and v.shape == own[k].shape}
        model.load_state_dict(base, strict=False, assign=True)
    return model


def graph_node_names(out) -> list:
    """The class names of every autograd node in ``out``'s graph (``ConvolutionBackward0``, ``MmBackward0``...)."""
    names, stack, seen = [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return names


def input_size_for(name: str):
    """Small inputs for speed; models with fixed-size parts need their 224x224."""

    model = built_model(name)
    return (224, 224) if model.pretrained_cfg["fixed_input_size"] else (64, 64)


def place_release_identityformer_s12(folder):
    """Puts a random identityformer_s12 in the release's layout where ``pretrained=True`` finds it (the
    sail/dl Hub repo, offline cache) and returns that reference model (tests/reference)."""
    import torch
    from hub_cache import place_hub_file
    from reference import original_baselines

    ref = original_baselines.randomize_(original_baselines.build("identityformer_s12"), seed=11)
    torch.save(ref.state_dict(), folder / "identityformer_s12.pth")
    place_hub_file("sail/dl", "identityformer/identityformer_s12.pth", folder / "identityformer_s12.pth")
    return ref


def run_triton_suite(suite, processes: dict, timeout_s: float = 600) -> dict:
    """Runs the groups of a Triton test suite script in subprocesses started together (Triton's interpreter
    must be switched on before triton is imported): ``processes`` maps a tuple of groups to whether they
    run under the interpreter. Returns {group: (passed?, the process's output)}; skips the test if triton
    is installed but not importable. Read a group's result with :func:`suite_group`."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pytest

    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
    tests = Path(__file__).resolve().parent
    procs = {}
    for groups, interpret in processes.items():
        env = subprocess_env(SRC, tests, drop=("METAFORMER_BACKEND", "TRITON_INTERPRET"))
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        procs[groups] = subprocess.Popen([sys.executable, str(suite), *groups], env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
    t0 = time.perf_counter()
    results = {}
    for groups, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\n[killed after {timeout_s} s]"
        for g in groups:
            results[g] = (f"{g} passed" in out, out)
    if all("TRITON_AVAILABLE" in out and "AssertionError" in out and not ok for ok, out in results.values()):
        pytest.skip(f"triton is installed, but the kernels are off: {next(iter(results.values()))[1].strip()[-300:]}")
    return results


def suite_group(results: dict, group: str) -> tuple:
    """``(passed?, output)`` of ``group`` in :func:`run_triton_suite`'s results; skips the calling test where the
    group's process found Triton's interpreter unable to run a minimal kernel (``INTERPRETER_DEFECT`` of
    tests/triton_suite_common.py, printed with the reason): a fault of that Triton, not of our kernels."""
    ok, out = results[group]
    skip_if_interpreter_defect(out)
    return ok, out


def skip_if_interpreter_defect(output: str) -> None:
    """Skips the calling test if a Triton suite's ``output`` says the interpreter itself is broken (see
    :func:`suite_group`)."""
    import pytest
    from triton_suite_common import INTERPRETER_DEFECT

    for line in output.splitlines():
        if line.startswith(INTERPRETER_DEFECT):
            pytest.skip(line[len(INTERPRETER_DEFECT):].strip())


def docs_hook(name: str):
    """The documentation build's hook module ``docs/_hooks/<name>.py``, loaded as mkdocs loads it (a file,
    not a package)."""
    path = Path(__file__).resolve().parents[1] / "docs" / "_hooks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_backend(backend: str, fn):
    """``fn()`` with the kernel backend set to ``backend``, then the previous backend back."""
    import metaformer

    previous = metaformer.get_backend()
    metaformer.set_backend(backend)
    try:
        return fn()
    finally:
        metaformer.set_backend(previous)


def onnx_has_dynamo() -> bool:
    """Whether ``torch.onnx.export`` has the ``torch.export``-based exporter as we call it: ``dynamo`` and
    ``dynamic_shapes`` (PyTorch 2.5 and later; 2.4's ``dynamo=True`` routes to ``dynamo_export``, without
    ``dynamic_shapes``)."""
    import inspect

    import torch

    return {"dynamo", "dynamic_shapes"} <= set(inspect.signature(torch.onnx.export).parameters)


def onnx_torchscript_exporter() -> dict:
    """The keyword that picks ``torch.onnx.export``'s TorchScript-based exporter where it has a choice: ``dynamo=False``
    (the argument is new in PyTorch 2.4; before, that exporter is the only one)."""
    import inspect

    import torch

    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def require_triton_kernels(reason: str) -> None:
    """Skips the calling test unless triton is installed (``reason`` says why the test needs it) and the kernels
    took it: not a Triton older than 3.0 (``metaformer.kernels.TRITON_MIN_VERSION``), nor a broken install."""
    import pytest

    pytest.importorskip("triton", reason=reason)
    import metaformer.kernels as K

    if not K.TRITON_AVAILABLE:
        pytest.skip(f"the Triton kernels are off: {K.TRITON_IMPORT_ERROR}")

