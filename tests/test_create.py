"""`create`: ablation overrides, custom mixers, errors, and the model surface."""

import functools

import pytest
import timm
import torch
from torch import nn

import metaformer
from metaformer import Attention, GroupNorm1, LayerNorm2d, Pooling, SpatialMLP, StarReLU


class ShiftMixer(nn.Module):
    """The docs' worked example: a few-line custom mixer with a learnable parameter."""

    def __init__(self, dim, shift=1):
        super().__init__()
        self.shift = shift
        self.gate = nn.Parameter(torch.full((dim, 1, 1), 0.5))

    def forward(self, x):
        return self.gate * torch.roll(x, self.shift, dims=-1) - x


def _mixers(model):
    return [type(stage.blocks[0].token_mixer) for stage in model.stages]


def test_custom_mixer_forward_backward_reaches_every_parameter():
    model = metaformer.create("poolformer_s12", token_mixer=functools.partial(ShiftMixer, shift=2))
    assert _mixers(model) == [ShiftMixer] * 4
    assert model.stages[0].blocks[0].token_mixer.shift == 2
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_per_stage_mixers_by_name_and_class():
    model = metaformer.create("poolformer_s12", token_mixers=["pooling", "identity", "attention", SpatialMLP])
    assert _mixers(model) == [Pooling, metaformer.Identity, Attention, SpatialMLP]
    # a fixed-size mixer given without its size gets its stage's size at 224x224
    assert model.stages[3].blocks[0].token_mixer.spatial_size == (7, 7)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    with pytest.raises(ValueError, match="fixed spatial size 7x7"):
        model(torch.randn(1, 3, 256, 256))


def test_norm_act_pool_size_and_scales():
    model = metaformer.create("poolformer_s12", norm_layer="layernorm2d", act_layer=StarReLU, pool_size=5,
                              layer_scale_init_value=0.5, mlp_ratio=2)
    block = model.stages[1].blocks[0]
    assert isinstance(block.norm1, LayerNorm2d) and isinstance(block.mlp.act, StarReLU)
    assert block.token_mixer.pool_size == 5
    assert torch.all(block.layer_scale1.scale == 0.5)
    assert block.mlp.fc1.out_channels == 2 * 128
    assert not metaformer.kernels.dispatch.pool_mixer_fusable(block)  # the identity needs a one-group GroupNorm
    # baselines family crossed with v1 parts
    conv = metaformer.create("convformer_s18", token_mixers=["sepconv", "sepconv", "pooling", "attention"],
                             norm_layer=functools.partial(GroupNorm1, eps=1e-6, bias=False))
    assert _mixers(conv)[2:] == [Pooling, Attention]
    assert conv(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match="pool_size applies to pooling mixers"):
        metaformer.create("convformer_s18", pool_size=5)


def test_drop_path_schedule_matches_release():
    model = metaformer.create("poolformer_s24", drop_path_rate=0.3)
    rates = [b.drop_path_rate for s in model.stages for b in s.blocks]
    n = sum((4, 4, 12, 4))
    assert rates == pytest.approx([0.3 * k / (n - 1) for k in range(n)])


def test_num_classes_in_chans_drop_rate():
    model = metaformer.create("poolformer_s12", num_classes=10, in_chans=1, drop_rate=0.1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    assert model.pretrained_cfg["input_size"] == (1, 224, 224)
    assert model.stages[0].blocks[0].mlp.drop1.p == 0.1
    headless = metaformer.create("poolformer_s12", num_classes=0)
    assert headless(torch.randn(1, 3, 64, 64)).shape == (1, 512)


def test_unknown_model_argument_and_component_list_what_is_accepted():
    with pytest.raises(ValueError, match=r"unknown model 'poolformer_s13'; known models: poolformer") as e:
        metaformer.create("poolformer_s13")
    assert "poolformer_s12" in str(e.value).split(": ")[1].split(", ")[:3]  # close matches first
    with pytest.raises(TypeError, match=r"unknown argument\(s\) 'token_mixr'.*accepted: token_mixer"):
        metaformer.create("poolformer_s12", token_mixr="identity")
    with pytest.raises(TypeError, match="define the variant"):
        metaformer.create("poolformer_s12", depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"unknown token_mixer 'atention'.*attention"):
        metaformer.create("poolformer_s12", token_mixer="atention")
    with pytest.raises(ValueError, match="4 stages, got 2 mixers"):
        metaformer.create("poolformer_s12", token_mixers=["pooling", "pooling"])
    with pytest.raises(ValueError, match=r"no pretrained tag 'nope'; available: .*poolformer_s12\.sail_in1k"):
        metaformer.create("poolformer_s12.nope")
    with pytest.raises(ValueError, match="either pretrained=True or checkpoint=PATH"):
        metaformer.create("poolformer_s12", pretrained=True, checkpoint="x.pth")
    with pytest.raises(TypeError, match="takes the whole model from the repo"):
        metaformer.create("hf-hub:me/model", num_classes=3)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: missing.pth"):
        metaformer.create("poolformer_s12", checkpoint="missing.pth")


def test_model_surface():
    model = metaformer.create("poolformer_s12").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 512, 2, 2)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 512)
        torch.testing.assert_close(model.get_classifier()(pre), model(x))
        final, inter = model.forward_intermediates(x)
        assert [f.shape[1] for f in inter] == [64, 128, 320, 512]
        torch.testing.assert_close(final, feats)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(x).shape == (2, 5)
    with pytest.raises(ValueError, match="non-negative int"):
        model.reset_classifier(-1)
    assert model.default_cfg is model.pretrained_cfg


def test_grad_checkpointing_gives_the_same_gradients():
    model = metaformer.create("poolformer_s12", layer_scale_init_value=0.3)
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).square().mean().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[k], rtol=1e-5, atol=1e-7)


def test_reference_backend_gives_the_same_model_output():
    model = metaformer.create("poolformerv2_s12").eval()
    with torch.no_grad():
        for blk in (b for s in model.stages for b in s.blocks):
            blk.norm1.weight.uniform_(0.5, 1.5)
        x = torch.randn(2, 3, 97, 131)
        fused = model(x)
        previous = metaformer.get_backend()
        metaformer.set_backend("reference")
        try:
            reference = model(x)
        finally:
            metaformer.set_backend(previous)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"])
def test_stage_by_stage_against_timm(name):
    """Where timm agrees with the original (everything before the head), our stages equal timm's."""
    t = timm.create_model(name).eval()
    with torch.no_grad():
        for p in t.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    ours = metaformer.create(name).eval()
    from metaformer.weights import load_state_dict_into  # timm's layout converts with reshapes only

    load_state_dict_into(ours, t.state_dict(), "timm")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = t.stem(x), ours.stem(x)
        torch.testing.assert_close(b, a)
        for i in range(4):
            a, b = t.stages[i](a), ours.stages[i](b)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_spatial_mlp_with_hidden_width_is_a_token_mlp():
    mixer = SpatialMLP(64, spatial_size=(4, 6), hidden_dim=16)
    x = torch.randn(2, 64, 4, 6, requires_grad=True)
    y = mixer(x)
    expected = mixer.fc2(mixer.act(mixer.fc1(x.reshape(2, 64, 24)))).reshape(2, 64, 4, 6)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert all(p.grad is not None for p in mixer.parameters())
    assert isinstance(mixer, metaformer.TokenMixer)
    model = metaformer.create("poolformer_s12", token_mixers=["pooling", "pooling", "pooling",
                                                              functools.partial(SpatialMLP, hidden_dim=32)])
    assert model.stages[3].blocks[0].token_mixer.spatial_size == (7, 7)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
