"""Tests of metaformer.optimize_for_inference: exactness of the folding, refusals, eval-only result."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import metaformer
from metaformer.inference import InferenceBlock, is_inference_optimized
from metaformer.kernels.folding import Folded
from metaformer.layers import GroupNorm1

# (model, input size): odd sizes where any size works; the hybrid with a position embedding needs 224.
CASES = [
    ("poolformer_s12", (45, 61)),
    ("poolformerv2_s12", (45, 61)),
    ("identityformer_s12", (45, 61)),
    ("randformer_s12", (224, 224)),
    ("convformer_s18", (37, 50)),
    ("caformer_s18", (64, 64)),
    ("metaformer_pppa_s12_224", (224, 224)),
]


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial norms, layer scales and res scales, so that every fold changes the weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() != 1 or not any(k in name for k in ("norm", "layer_scale", "res_scale")):
                continue
            noise = torch.randn(p.shape, generator=g)
            if leaf == "bias":
                p.copy_(0.5 * noise)
            elif "layer_scale" in name:
                p.copy_(0.3 * noise)  # signed, some large: layer scales of a trained model are far from 1e-5
            else:
                p.copy_(1.0 + 0.5 * noise)
    return model


def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Element-wise closeness relative to the output's scale (float32 rounding of a deep network)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("name,size", CASES, ids=[c[0] for c in CASES])
def test_optimized_matches_original(name, size):
    model = _randomise(metaformer.create(name)).eval()
    before = copy.deepcopy(model.state_dict())
    trainable = {k: p.requires_grad for k, p in model.named_parameters()}  # RandFormer's matrix is frozen
    fast = metaformer.optimize_for_inference(model)
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        actual = fast(x)
        metaformer.set_backend("reference")  # the plain composition of the original model
        try:
            expected = model(x)
        finally:
            metaformer.set_backend("auto")
    assert actual.shape == expected.shape
    _assert_close_scaled(actual, expected)
    # Also through the portable (non-oneDNN) path: autograd enabled with an input that requires grad.
    actual_grad_mode = fast(x.clone().requires_grad_(True))
    _assert_close_scaled(actual_grad_mode.detach(), expected)
    # Every block was folded, nothing was left as is, and the original is untouched.
    assert fast.inference_skipped == []
    assert not any(isinstance(m, metaformer.MetaFormerBlock) for m in fast.modules())
    assert sum(isinstance(m, InferenceBlock) for m in fast.modules()) == sum(model.depths)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and trainable == {k: p.requires_grad for k, p in model.named_parameters()}
    assert is_inference_optimized(fast) and not is_inference_optimized(model)


def test_starrelu_scale_and_bias_are_folded_into_fc2():
    """ConvFormer's MLP StarReLU leaves only relu(h)**2; its s and b are in fc2 (sail-sg/metaformer#5)."""
    model = _randomise(metaformer.create("convformer_s18")).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, metaformer.layers.StarReLU):
                m.scale.fill_(0.7)
                m.bias.fill_(-0.3)
    fast = metaformer.optimize_for_inference(model)
    blocks = [m for m in fast.modules() if isinstance(m, InferenceBlock)]
    assert blocks and all(b.act_kind == "square" and type(b.act) is metaformer.layers.SquaredReLU for b in blocks)
    assert not any(isinstance(m, metaformer.layers.StarReLU) for b in blocks for m in b.act.modules())
    x = torch.randn(2, 3, 37, 50)
    with torch.inference_mode():
        _assert_close_scaled(fast(x), model(x))


@pytest.mark.skipif(not metaformer.kernels.onednn.ONEDNN_AVAILABLE, reason="a PyTorch build without oneDNN")
def test_every_cached_weight_is_prepacked():
    """Each 1x1 / depthwise weight the CPU halves cache is in oneDNN's packed layout, in the default path
    and in the optimized copy: a weight packed for the wrong input shape is refused by oneDNN, kept plain
    and reordered on every call (optimize_for_inference measured slower than the default for that)."""
    from metaformer.kernels import cache

    model = metaformer.create("convformer_s18").eval()
    fast = metaformer.optimize_for_inference(model)
    x = torch.randn(1, 3, 64, 64)
    for net in (model, fast):
        cache.clear_cache()
        with torch.inference_mode():
            net(x)
        values = [value for owner, tags in cache._ENTRIES.items() if any(owner is m for m in net.modules())
                  for shapes in tags.values() for _, _, value in shapes.values()]
        folded = [v for v in values if isinstance(v, Folded)]
        assert len(folded) == 2 * sum(model.depths)  # the SepConv and the MLP half of every block
        weights = [w for v in folded for w in (v.w1, v.w2, *v.extra[:1])]  # extra[0]: the depthwise weight
        assert all(w.layout == torch._mkldnn for w in weights), [tuple(w.shape) for w in weights
                                                                 if w.layout != torch._mkldnn]


def test_optimized_features_only_backbone():
    model = _randomise(metaformer.create("poolformer_s12", features_only=True)).eval()
    fast = metaformer.optimize_for_inference(model)
    x = torch.randn(1, 3, 40, 40)
    with torch.inference_mode():
        for a, e in zip(fast(x), model(x)):
            _assert_close_scaled(a, e)


def test_refuses_training_mode():
    model = metaformer.create("poolformer_s12")
    with pytest.raises(RuntimeError, match=r"eval mode.*model\.eval\(\)"):
        metaformer.optimize_for_inference(model)
    model.eval()
    model.stages[1].blocks[0].train()  # one submodule left in training mode is enough to refuse
    with pytest.raises(RuntimeError, match="stages.1.blocks.0"):
        metaformer.optimize_for_inference(model)


def test_refuses_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        metaformer.optimize_for_inference(lambda x: x)


class MyNorm(GroupNorm1):
    """A user-written norm (a subclass that changes the maths): must not be folded as a GroupNorm."""

    def forward(self, x):
        return super().forward(x) * 2.0 - 0.1


def _model_with_custom_norm():
    # Custom norm in the last stage only; the first three stages stay foldable.
    norms = (GroupNorm1, GroupNorm1, GroupNorm1, MyNorm)
    model = metaformer.MetaFormer(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), norm_layers=norms, num_classes=7)
    return _randomise(model).eval()


def test_custom_norm_is_kept_and_exact():
    model = _model_with_custom_norm()
    fast = metaformer.optimize_for_inference(model)
    assert len(fast.inference_skipped) == 2  # both halves of the one custom-norm block
    assert all("stages.3.blocks.0" in why and "MyNorm" in why for why in fast.inference_skipped)
    x = torch.randn(2, 3, 53, 47)
    with torch.inference_mode():
        _assert_close_scaled(fast(x), model(x))


def test_custom_norm_strict_refuses():
    model = _model_with_custom_norm()
    with pytest.raises(ValueError, match=r"(?s)MyNorm.*strict=False"):
        metaformer.optimize_for_inference(model, strict=True)


def test_custom_mixer_is_kept_and_exact():
    class Shift(nn.Module):
        def __init__(self, dim):
            super().__init__()

        def forward(self, x):
            return torch.roll(x, 1, dims=-1) - x

    model = metaformer.MetaFormer(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), token_mixers=Shift, num_classes=5)
    model = _randomise(model).eval()
    fast = metaformer.optimize_for_inference(model)
    assert len(fast.inference_skipped) == 4 and all("Shift" in why for why in fast.inference_skipped)
    x = torch.randn(2, 3, 33, 35)
    with torch.inference_mode():
        _assert_close_scaled(fast(x), model(x))


def test_result_is_eval_only():
    model = metaformer.create("poolformer_s12").eval()
    fast = metaformer.optimize_for_inference(model)
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(RuntimeError, match=r"evaluation-only.*original model"):
        fast.train()
    with pytest.raises(RuntimeError, match="evaluation-only"):
        fast.train(True)
    assert fast.eval() is fast and not fast.training
    fast.train(False)
    # The original can still train.
    model.train()
    assert model.training


def test_optimized_copy_survives_deepcopy():
    model = _randomise(metaformer.create("poolformer_s12")).eval()
    fast = copy.deepcopy(metaformer.optimize_for_inference(model))
    with pytest.raises(RuntimeError, match="evaluation-only"):
        fast.train()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        _assert_close_scaled(fast(x), model(x))


def test_reference_backend_is_respected():
    model = _randomise(metaformer.create("poolformer_s12")).eval()
    fast = metaformer.optimize_for_inference(model)
    x = torch.randn(2, 3, 32, 32)
    old = metaformer.get_backend()
    try:
        metaformer.set_backend("reference")
        with torch.inference_mode():
            _assert_close_scaled(fast(x), model(x))
    finally:
        metaformer.set_backend(old)
