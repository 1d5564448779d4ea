"""The models under torch.compile(fullgraph=True), torch.jit.trace, torch.export and ONNX export (ONNX Runtime)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import onnx_torchscript_exporter, with_backend

import metaformer

SIZE = (64, 64)


def _model(name: str, optimized: bool = False):
    torch.manual_seed(0)
    model = metaformer.create(name).eval()
    with torch.no_grad():  # non-trivial norms and layer scales, so that a wrong fold would show
        for n, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in n or "scale" in n):
                p.add_(0.2 * torch.randn_like(p))
    return metaformer.optimize_for_inference(model) if optimized else model


def _close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("optimized", [False, True], ids=["default", "optimized"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend, optimized):
    model = _model("poolformer_s12", optimized)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        expected = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fullgraph: any graph break raises
    with torch.no_grad():
        _close(compiled(x), expected)


def test_compile_warns_of_nothing_in_our_code():
    """torch.compile warns when it traces through a functools cache wrapper ("Dynamo detected a call to a
    functools.lru_cache-wrapped function"): the fast paths look their part classes up without one."""
    from torch._dynamo import utils as dynamo_utils

    getattr(dynamo_utils, "warn_once_cache", set()).clear()  # dynamo warns once per message and process
    torch._dynamo.reset()
    model = _model("convformer_s18")
    x = torch.randn(2, 3, *SIZE)
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        torch.compile(model, fullgraph=True, backend="eager")(x)
    ours = [str(w.message).splitlines()[0] for w in seen if "metaformer" in str(w.message) or "cache" in str(w.message)]
    assert ours == []


@pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there are global hooks")  # (torch's own)
@pytest.mark.parametrize("where", ["part", "global"])
def test_compile_fullgraph_with_hooks(where):
    """A model with a forward hook on a block's part, or a global module hook, compiles in one graph, equals the
    plain composition and runs the hook as eager does. (PyTorch 2.4's Dynamo failed building its guards, "DictGuardManager
    does not support a leaf_guard", where the hook check read a hook dict under another name than the call did.)"""
    from torch.nn.modules.module import register_module_forward_hook

    model = _model("poolformer_s12")
    x = torch.randn(2, 3, *SIZE)
    calls = []
    block = model.stages[0].blocks[0]
    if where == "part":
        handles = [block.mlp.fc1.register_forward_hook(lambda m, args, out: calls.append("fc1")),
                   model.stages[2].blocks[1].token_mixer.register_forward_hook(lambda m, a, o: calls.append("pool"))]
    else:
        handles = [register_module_forward_hook(lambda m, args, out: calls.append(type(m).__name__))]
    try:
        with torch.no_grad():
            expected = with_backend("reference", lambda: model(x))
            eager_calls = list(calls)
            calls.clear()
            torch._dynamo.reset()
            _close(torch.compile(model, fullgraph=True, backend="eager")(x), expected)
    finally:
        for h in handles:
            h.remove()
    calls = [c for c in calls if c != "OptimizedModule"]  # (torch.compile's wrapper is a module too)
    if where == "part":
        assert calls == eager_calls == ["fc1", "pool"]
    elif _dynamo_runs_global_hooks():
        assert calls == eager_calls and "Pooling" in calls and "Conv2d" in calls


def _dynamo_runs_global_hooks() -> bool:
    """Whether this PyTorch's torch.compile runs a global module hook on every module it calls, as eager does, for
    plain torch modules (PyTorch 2.4's skips some: then only the values of ours are compared)."""
    from torch.nn.modules.module import register_module_forward_hook

    model = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Identity(), torch.nn.Conv2d(2, 2, 1)) for _ in range(2)))
    calls = []
    handle = register_module_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    try:
        x = torch.randn(1, 2, 3, 3)
        model(x)
        eager_calls = list(calls)
        calls.clear()
        torch._dynamo.reset()
        torch.compile(model, fullgraph=True, backend="eager")(x)
    finally:
        handle.remove()
        torch._dynamo.reset()
    return [c for c in calls if c != "OptimizedModule"] == eager_calls


def test_compile_fullgraph_as_a_processs_first_call():
    """A model compiled before any eager call in its process: the fast paths import their part classes at the
    first look-up, which then runs while Dynamo traces, and must not break the graph (``importlib.import_module``
    there did: 3-7 graph breaks)."""
    code = ("import torch, metaformer\n"
            "for name in ('poolformer_s12', 'caformer_s18'):\n"
            "    model = metaformer.create(name).eval()\n"
            "    with torch.no_grad():\n"
            "        torch.compile(model, fullgraph=True, backend='eager')(torch.randn(1, 3, 64, 64))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("METAFORMER_TEST_INDUCTOR") != "1",
                    reason="Inductor needs a C++ compiler and ~1 min per model on CPU; set METAFORMER_TEST_INDUCTOR=1")
def test_compile_inductor():
    model = _model("poolformer_s12")
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        _close(torch.compile(model, fullgraph=True)(x), expected)


def test_jit_trace_default_backend():
    """``torch.jit.trace(model.eval(), x)`` passes its own check (it re-runs the trace and compares the graphs,
    which failed with "Graphs differed across invocations" while the fast path ran under tracing) and the
    traced module computes what the model does, on another input."""
    assert metaformer.get_backend() == "auto"
    model = _model("poolformer_s12")
    x = torch.randn(2, 3, *SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice and its own group_norm size check
        traced = torch.jit.trace(model, x)  # check_trace=True: raises TracingCheckError on a mismatch
    x2 = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        _close(traced(x2), model(x2))


# Every family's plain model: test_surface.py (torch.export, both ONNX exporters, compile).
@pytest.mark.parametrize("name,optimized", [("poolformer_s12", True)], ids=["poolformer_s12-optimized"])
def test_torch_export(name, optimized):
    model = _model(name, optimized)
    x = torch.randn(2, 3, *SIZE)
    program = torch.export.export(model, (x,))
    # Export takes the pure-PyTorch path: no Triton and no oneDNN-private operator in the graph.
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("mkldnn" in t or "triton" in t for t in targets), targets
    x2 = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        _close(program.module()(x2), model(x2))


@pytest.mark.parametrize("name", ["poolformer_s12", "caformer_s18"])
def test_torch_export_with_a_dynamic_batch(name):
    """A program exported with a dynamic batch axis runs other batch sizes. (On PyTorch 2.6 the pooling half's
    `rstd[:, None]` made torch.export guard the batch against 2**63 - 1, which it refused for a dynamic axis.)"""
    model = _model(name)
    program = torch.export.export(model, (torch.randn(2, 3, *SIZE),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    x = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        _close(program.module()(x), model(x))


@pytest.mark.parametrize("name,optimized", [("poolformer_s12", False), ("poolformer_s12", True)],
                         ids=["poolformer_s12", "poolformer_s12-optimized"])
def test_onnx_export_matches_onnxruntime(name, optimized):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _model(name, optimized)
    x = torch.randn(2, 3, *SIZE)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        # dynamo=False: the TorchScript-based exporter needs only `onnx` (dynamo=True also needs onnxscript).
        torch.onnx.export(model, (x,), buf, **onnx_torchscript_exporter(), opset_version=17, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, *SIZE)  # another batch size: the batch axis is dynamic
    (logits,) = session.run(None, {"images": x3.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x3), rtol=1e-4, atol=1e-4)
