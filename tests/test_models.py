"""Every registered model: forward, backward, features, config, bad input."""

import pytest
import torch
from helpers import FAMILY_REPS, built_model, input_size_for
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
    if name in FAMILY_REPS:  # choosing stages is one code path for every model of a family
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


@pytest.mark.parametrize("drop_prob,scale_by_keep", [(0.3, True), (0.3, False), (1.0, True), (0.0, True)])
def test_drop_path_drops_the_samples_timms_drops(drop_prob, scale_by_keep):
    """Our DropPath (written so that building a model needs no timm) is the release's timm.layers.DropPath:
    same output from the same seed, in training and evaluation."""
    from timm.layers import DropPath as TimmDropPath

    from metaformer.layers import DropPath

    x = torch.randn(16, 8, 5, 5)
    for training in (True, False):
        ours = DropPath(drop_prob, scale_by_keep).train(training)
        theirs = TimmDropPath(drop_prob, scale_by_keep).train(training)
        torch.manual_seed(3)
        got = ours(x)
        torch.manual_seed(3)
        torch.testing.assert_close(got, theirs(x), rtol=0, atol=0)
        assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("shape,kwargs", [((300, 200), {"std": 0.02}), ((64, 3, 7, 7), {"mean": 0.1, "std": 0.5, "a": -1.0,
                                                                                        "b": 0.9}), ((1000,), {})])
def test_trunc_normal_draws_the_release_weights(shape, kwargs):
    """Our trunc_normal_ is the release's (timm's) draw, bit for bit from the same seed; PyTorch's own
    nn.init.trunc_normal_ is not (rejection sampling since 2.14), so a seeded model would get other weights."""
    from timm.layers import trunc_normal_ as timm_trunc_normal_

    from metaformer.layers import trunc_normal_

    ours, theirs = torch.empty(shape), torch.empty(shape)
    torch.manual_seed(0)
    assert trunc_normal_(ours, **kwargs) is ours
    torch.manual_seed(0)
    timm_trunc_normal_(theirs, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_building_a_model_does_not_import_timm():
    """`import metaformer` and `create` leave timm (and torchvision) unimported: the command line starts
    ~2.5 s sooner wherever it does not read images with timm's transforms."""
    import subprocess
    import sys

    code = ("import sys, metaformer; m = metaformer.create('caformer_s18', drop_path_rate=0.1); "
            "print(sorted(k for k in ('timm', 'torchvision') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
