"""timm's model-test conventions over every registered model, and PyTorch's tools over each family.

timm 1.0's tests/test_models.py checks, per model: forward (and grad checkpointing), backward (every
parameter gets a gradient), the default cfg contract, TorchScript, features, forward_intermediates,
FX forward/backward and FX + TorchScript. Here, at small inputs (64x64; 224x224 for the fixed-size
models) and on the models the rest of the suite already built (tests/helpers.py):

- every model: cfg contract, TorchScript, FX (``torch.fx.symbolic_trace``), features, intermediates;
  eager backward is test_models.py::test_forward_backward;
- one model per family (:data:`FAMILY_REPS`): torchvision's feature extraction with timm's FX
  backward, FX + TorchScript, scripted and traced ``features_only`` backbones, pruning,
  ``torch.compile(fullgraph=True)``, ``torch.export`` and both ONNX exporters (ONNX Runtime).

Every output is compared with eager PyTorch in fp32 (rtol 1e-5, atol 1e-5 of the output's scale).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import warnings

import pytest
import torch
from helpers import FAMILY_REPS, built_model, input_size_for, onnx_has_dynamo, onnx_torchscript_exporter
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import metaformer

NAMES = metaformer.list_models()
# FAMILY_REPS (helpers): one model of each family: PoolFormer v1, the hybrids (attention with position
# embedding, spatial MLP), IdentityFormer, RandFormer, PoolFormerV2, ConvFormer, CAFormer.


def _close(actual, expected, tol=1e-5):
    if isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _close(a, e, tol)
        return
    assert isinstance(actual, torch.Tensor) and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(expected.abs().max().item(), 1e-3))


def _input(name, batch=1):
    h, w = input_size_for(name)
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(len(name)))


def _model(name, **kwargs):
    return built_model(name, **kwargs).eval()


@functools.cache
def _eager(name):
    """The shared model's eager logits, final map and stage maps on :func:`_input` (computed once)."""
    model, x = _model(name), _input(name)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        return model(x), final, inter


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's and the TorchScript exporter's deprecation warnings
        yield


# ------------------------------------------------------------------------------------------ every model
@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_contract(name):
    """timm's test_model_default_cfgs: widths, forward_features / forward_head(pre_logits), cfg names
    (reset_classifier(0) and (0, '') are checked per family in test_reset_and_prune)."""
    model, x = _model(name), _input(name)
    cfg = model.default_cfg
    logits, final, _ = _eager(name)
    assert cfg is model.pretrained_cfg and model.num_classes == cfg["num_classes"] == 1000
    assert model.num_features == model.head_hidden_size == model.dims[-1] > 0
    with torch.no_grad():
        fmap = model.forward_features(x)
        pre = model.forward_head(fmap, pre_logits=True)
    _close(fmap, final)
    assert fmap.shape[1:] == (model.num_features, x.shape[-2] // 32, x.shape[-1] // 32)
    assert pre.shape == (1, model.head_hidden_size)
    _close(model.get_classifier()(pre), logits)
    assert cfg["pool_size"] == tuple(s // 32 for s in cfg["input_size"][1:])  # the final map at input_size
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    assert state[cfg["classifier"] + ".weight"].shape[0] == cfg["num_classes"]


@pytest.mark.parametrize("name", NAMES)
def test_torchscript(name):
    model, x = _model(name), _input(name)
    with _quiet():
        scripted = torch.jit.script(model)
    with torch.no_grad():
        out = scripted(x)
    assert isinstance(out, torch.Tensor)
    _close(out, _eager(name)[0])


@pytest.mark.parametrize("name", NAMES)
def test_fx_symbolic_trace(name):
    model, x = _model(name), _input(name)
    traced = torch.fx.symbolic_trace(model)
    targets = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert not any("kernels" in t or "mkldnn" in t for t in targets)  # the plain composition
    with torch.no_grad():
        _close(traced(x), _eager(name)[0])


@pytest.mark.parametrize("name", NAMES)
def test_features(name):
    """timm's test_model_forward_features, and the backbone equals the normed intermediates."""
    backbone, x = _model(name, features_only=True), _input(name)
    info = backbone.feature_info
    assert info.channels() == list(backbone.dims) and info.reduction() == [4, 8, 16, 32]
    assert [f["module"] for f in info] == [f"stages.{i}" for i in range(4)]
    with torch.no_grad():
        feats = backbone(x)
        assert len(feats) == 4
        for c, r, f in zip(info.channels(), info.reduction(), feats):
            assert f.shape[:2] == (1, c) and torch.isfinite(f).all()
            assert f.shape[-1] <= math.ceil(x.shape[-1] / r) + 1
        _close(backbone.forward_intermediates(x, indices=list(backbone.out_indices), norm=True,
                                              intermediates_only=True), feats)


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates(name):
    """timm's test_model_forward_intermediates: every model's stage maps, raw and normed; indices,
    stop_early and grad checkpointing on one model per family (the same mixin code for all)."""
    model, x = _model(name), _input(name)
    _, final, inter = _eager(name)
    assert [t.shape[1] for t in inter] == model.feature_info.channels()
    assert [t.shape[-1] for t in inter] == [x.shape[-1] // r for r in model.feature_info.reduction()]
    with torch.no_grad():
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        _close(normed[:3], inter[:3])
        _close(normed[3], model.head.norm(inter[3]) if model.head.norm_first else inter[3])
    if name not in FAMILY_REPS:  # indices, stop_early and checkpointing are one code path for every model
        return
    with torch.no_grad():
        _close(model.forward_intermediates(x, indices=2, intermediates_only=True), inter[2:])
        _close(model.forward_intermediates(x, indices=[0, -1], intermediates_only=True), [inter[0], inter[3]])
        early, taken = model.forward_intermediates(x, indices=[1], stop_early=True)
        _close(early, inter[1])
        _close(taken, [inter[1]])
    model.set_grad_checkpointing(True)
    try:
        checkpointed, _ = model.forward_intermediates(x)
    finally:
        model.set_grad_checkpointing(False)
    _close(checkpointed.detach(), final)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


# ------------------------------------------------------------------------------------- one per family
def test_graph_node_names_are_the_documented_ones():
    """The names docs/how-to/timm-torchvision-transformers.md documents for create_feature_extractor."""
    train_nodes, eval_nodes = get_graph_node_names(_model("poolformer_s12"))
    assert eval_nodes[:2] == ["x", "stem.conv"] and train_nodes[:2] == eval_nodes[:2]
    for i, depth in enumerate((2, 2, 6, 2)):
        assert (f"stages.{i}.downsample.conv" if i else "stages.0.downsample") in eval_nodes
        assert f"stages.{i}.blocks.0.token_mixer.avg_pool2d" in eval_nodes
        assert f"stages.{i}.blocks.{depth - 1}.add_1" in eval_nodes  # a block's output: its second residual sum
        assert not any(n.startswith(f"stages.{i}.blocks.{depth}.") for n in eval_nodes)
    assert eval_nodes[-3:] == ["head.mean", "head.drop", "head.fc"]


@pytest.mark.parametrize("name", FAMILY_REPS)
def test_torchvision_feature_extraction_and_fx_backward(name):
    """timm's FX tests: torchvision's create_feature_extractor on stage names, the eval graph equal to
    eager, the train graph giving every parameter a finite gradient."""
    model, x = copy.deepcopy(_model(name)), _input(name, batch=2)
    logits, _, inter = _eager(name)
    model.reset_classifier(42)
    extractor = create_feature_extractor(model, train_return_nodes={"head": "logits"},
                                         eval_return_nodes={"stages.1": "s1", "stages.3": "s3", "head": "logits"})
    extractor.eval()
    with torch.no_grad():
        out = extractor(x[:1])
        _close(out["s1"], inter[1])
        _close(out["s3"], inter[3])
        _close(out["logits"], model(x[:1]))
    extractor.train()
    out = extractor(x)["logits"]
    assert out.shape == (2, 42)
    out.mean().backward()
    for pname, p in extractor.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert sum(p.numel() for p in extractor.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", FAMILY_REPS)
def test_fx_then_torchscript_and_backbones(name):
    """FX + TorchScript; features_only backbones scripted and traced (a scripted backbone returns a list)."""
    model, x = _model(name), _input(name)
    backbone = _model(name, features_only=True)
    with _quiet():
        fx_scripted = torch.jit.script(torch.fx.symbolic_trace(model))
        scripted_backbone = torch.jit.script(backbone)
        fx_scripted_backbone = torch.jit.script(torch.fx.symbolic_trace(backbone))
    assert "Tensor[]" in str(scripted_backbone.forward.schema)
    with torch.no_grad():
        _close(fx_scripted(x), _eager(name)[0])
        feats = backbone(x)
        _close(scripted_backbone(x), feats)
        _close(fx_scripted_backbone(x), feats)
        _close(torch.fx.symbolic_trace(backbone)(x), feats)


@pytest.mark.parametrize("name", FAMILY_REPS)
def test_reset_and_prune(name, tmp_path):
    """reset_classifier (0, (0, ''), MLP heads) and prune_intermediate_layers on copies of the model."""
    model, x = copy.deepcopy(_model(name)), _input(name)
    logits, final, inter = _eager(name)
    with torch.no_grad():
        pre = model.forward_head(final, pre_logits=True)
        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)
        _close(model(x), pre)
        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.shape == final.shape
        if model.head.norm_first:  # the map through the head's norm (a vector norm: over each position)
            _close(unpooled, model.head.norm(final))
        with pytest.raises(ValueError, match="num_classes=0"):
            model.reset_classifier(10, "")
        model.reset_classifier(7, "avg")
        assert model(x).shape == (1, 7) and model.config["num_classes"] == 7
        assert type(model.get_classifier()) is type(_model(name).get_classifier())  # MLP heads stay MLP heads
        assert model.describe()["global_pool"] == "avg"
    model = copy.deepcopy(_model(name))
    with torch.no_grad():
        assert model.prune_intermediate_layers([0, 1]) == [0, 1]
        assert len(model.stages) == 2 and model.num_features == model.head_hidden_size == model.dims[1]
        assert model.feature_info.channels() == list(model.dims[:2])
        _close(model.forward_intermediates(x, indices=[0, 1], intermediates_only=True), inter[:2])
        _close(model(x), inter[1])  # no norm, no pooling, no classifier: the last kept map
    with pytest.raises(TypeError, match="pruned"):
        model.save_pretrained(tmp_path)
    backbone = copy.deepcopy(_model(name, features_only=True))
    with torch.no_grad():
        feats = backbone(x)
        backbone.prune_intermediate_layers([0, 2])
        assert backbone.out_indices == (0, 1, 2) and len(backbone.stages) == 3
        _close(backbone(x), feats[:3])


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_REPS)
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    model, x = _model(name), _input(name)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    with torch.no_grad():
        _close(compiled(x), model(x))


@pytest.mark.slow
def test_compile_aot_eager_backbone():  # the classifier: test_export.py::test_compile_fullgraph
    torch._dynamo.reset()
    model, x = _model("poolformer_s12", features_only=True), _input("poolformer_s12")
    with torch.no_grad():
        _close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_REPS)
def test_torch_export(name):
    model, x = _model(name), _input(name)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        _close(program.module()(x), model(x))
    if name == "poolformer_s12":
        backbone = _model(name, features_only=True)
        with torch.no_grad():
            _close(torch.export.export(backbone, (x,)).module()(x), backbone(x))


def _onnx_run(model, x, dynamo):
    import onnxruntime as ort

    buf = io.BytesIO()
    with _quiet():
        if dynamo:  # the default exporter of recent PyTorch (torch.export, then onnxscript)
            data = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto.SerializeToString()
        else:
            torch.onnx.export(model, (x,), buf, **onnx_torchscript_exporter(), opset_version=17)
            data = buf.getvalue()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: x.numpy()})]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY_REPS)
def test_onnx_torchscript_exporter(name):
    model, x = _model(name), _input(name)
    (logits,) = _onnx_run(model, x, dynamo=False)
    _close(logits, _eager(name)[0], tol=1e-4)  # ONNX Runtime's kernels round differently from PyTorch's


@pytest.mark.slow
@pytest.mark.parametrize("name,features_only", [("caformer_s18", False), ("poolformer_s12", True)])
def test_onnx_dynamo_exporter(name, features_only):
    if not onnx_has_dynamo():
        pytest.skip(f"torch.onnx.export has no torch.export-based exporter on PyTorch {torch.__version__} (from 2.5)")
    model, x = _model(name, features_only=features_only), _input(name)
    outputs = _onnx_run(model, x, dynamo=True)
    with torch.no_grad():
        expected = model(x)
    _close(outputs if features_only else outputs[0], expected, tol=1e-4)


def test_tracing_is_silent_and_eager_still_checks():
    """Input checks say nothing under torch.jit.trace (the TorchScript ONNX exporter's tracer); eager
    calls still raise."""
    model, x = _model("caformer_s18"), _input("caformer_s18")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x, check_trace=False)
    assert not [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    with torch.no_grad():
        _close(traced(x), _eager("caformer_s18")[0])
    with pytest.raises(ValueError, match="input channels"):
        model(x[:, :1])
