"""Every registered model: forward, backward, features, config, bad input."""

import pytest
import torch
from helpers import built_model, input_size_for
from timm.data import resolve_data_config

import metaformer
from metaformer import MetaFormer

NAMES = metaformer.list_models()


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name):
    model = built_model(name).train()
    h, w = input_size_for(name)
    x = torch.randn(2, 3, h, w, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 1000)
    out.logsumexp(1).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in model.named_parameters():  # every parameter (RandFormer's frozen matrix is a buffer)
        assert p.requires_grad and p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", NAMES)
def test_features_only(name):
    model = built_model(name, features_only=True).eval()
    h, w = input_size_for(name)
    with torch.no_grad():
        feats = model(torch.randn(1, 3, h, w))
    dims = list(metaformer.get_variant(name).dims)
    assert model.feature_info.channels() == dims
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert [f.shape[1] for f in feats] == dims
    assert [f.shape[-1] for f in feats] == [w // r for r in (4, 8, 16, 32)]
    sub = metaformer.create(name, features_only=True, out_indices=(1, 3))
    assert sub.feature_info.channels() == [dims[1], dims[3]]


@pytest.mark.parametrize("name", NAMES)
def test_config(name):
    model = built_model(name)
    variant = metaformer.get_variant(name)
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == variant.crop_pct
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert model.num_classes == 1000 and model.num_features == variant.dims[-1]
    # the architecture is fully describable (save_pretrained's config.json) and rebuilds identically
    rebuilt = MetaFormer.from_config(model.describe())
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == \
           [(k, v.shape) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(name):
    model = built_model(name)
    h, w = input_size_for(name)
    with pytest.raises(ValueError, match="4-D input"):
        model(torch.randn(3, h, w))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, h, w))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, h, w, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1.0]])
    if model.pretrained_cfg["fixed_input_size"]:
        with pytest.raises(ValueError, match="fixed spatial size"):
            model(torch.randn(1, 3, 192, 224))
