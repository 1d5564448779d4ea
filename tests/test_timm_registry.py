"""metaformer's models in timm's registry (``mf_`` prefix), driven by timm's own functions."""

import warnings

import pytest
import timm
import torch
from helpers import place_release_identityformer_s12
from hub_cache import place_hub_file, remove_hub_repo
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config, resolve_model_data_config
from timm.optim import create_optimizer_v2
from torchvision import transforms as T

import metaformer
from metaformer import MetaFormer
from metaformer.timm_registry import PREFIX, register_timm_models


@pytest.fixture(scope="module")
def registered():
    timm_own = set(timm.list_models())
    names = register_timm_models()
    return timm_own, names


def test_every_model_registered_under_the_prefix_without_clash(registered):
    timm_own, names = registered
    assert PREFIX == "mf_" and len(names) == 33
    assert sorted(names) == sorted(PREFIX + n for n in metaformer.list_models())
    assert not timm_own & set(names) and not any(n.startswith(PREFIX) for n in timm_own)
    assert set(timm.list_models("mf_*")) == set(names)
    # timm's own models of the same names are untouched
    assert timm.models.model_entrypoint("poolformer_s12").__module__ == "timm.models.metaformer"
    assert timm.models.model_entrypoint("mf_poolformer_s12").__module__ == "metaformer.timm_registry"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # registering again changes nothing and warns nothing
        assert register_timm_models() == names


def test_pretrained_tags_are_listed(registered):
    tags = timm.list_pretrained("mf_poolformer_s12*")
    assert sorted(tags) == [f"mf_poolformer_s12.{t}" for t in ("release_in1k", "sail_in1k", "transformers_in1k")]
    assert timm.models.get_pretrained_cfg("mf_poolformer_s12").tag == "sail_in1k"  # the default, as in create
    assert "mf_caformer_s18.sail_in22k" in timm.list_models(pretrained=True)
    cfg = timm.models.get_pretrained_cfg("mf_caformer_s18.sail_in1k_384")
    assert cfg.input_size == (3, 384, 384) and cfg.pool_size == (12, 12) and cfg.crop_pct == 1.0
    assert cfg.first_conv == "stem.conv" and cfg.classifier == "head.fc.fc2"  # the MLP head's last layer, as timm
    assert timm.models.get_pretrained_cfg("mf_poolformer_s12").classifier == "head.fc"
    assert timm.models.get_pretrained_cfg("mf_metaformer_ppaa_s12_224").fixed_input_size


def test_create_model_maps_timm_arguments(registered):
    model = timm.create_model("mf_poolformer_s12", num_classes=10, in_chans=1, drop_rate=0.25,
                              drop_path_rate=0.1, proj_drop_rate=0.05)
    assert isinstance(model, MetaFormer) and model.num_classes == 10 and model.in_chans == 1
    assert model.head.drop.p == 0.25  # timm's drop_rate is the classifier dropout
    assert model.stages[0].blocks[0].mlp.drop1.p == 0.05  # proj_drop_rate: dropout in the MLPs
    assert model.stages[3].blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    pooled = timm.create_model("mf_caformer_s18", num_classes=0, global_pool="")
    assert pooled(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    backbone = timm.create_model("mf_convformer_s18", features_only=True, out_indices=(1, 3))
    assert backbone.feature_info.channels() == [128, 512]
    assert [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == [128, 512]
    with pytest.raises(TypeError, match="unknown argument"):
        timm.create_model("mf_poolformer_s12", not_an_argument=1)
    with pytest.raises(TypeError, match="cache_dir"):
        timm.create_model("mf_poolformer_s12", cache_dir="/tmp/x")
    with pytest.raises(ValueError, match="only 224x224"):
        timm.create_model("mf_metaformer_pppf_s12_224", img_size=256)


def test_pretrained_through_timm_gives_the_release_logits(registered, tmp_path):
    ref = place_release_identityformer_s12(tmp_path)  # the release's file where sail/dl's would be
    try:
        model = timm.create_model("mf_identityformer_s12.release_in1k", pretrained=True).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            expected = ref(x)
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        assert model.pretrained_cfg["tag"] == "release_in1k"
        finetune = timm.create_model("mf_identityformer_s12", pretrained=True, pretrained_cfg="release_in1k",
                                     num_classes=5, features_only=False)
        assert finetune.num_classes == 5
        torch.testing.assert_close(finetune.stem.conv.weight, model.stem.conv.weight)
        backbone = timm.create_model("mf_identityformer_s12.release_in1k", pretrained=True, features_only=True)
        torch.testing.assert_close(backbone.stages[3].blocks[1].mlp.fc2.weight,
                                   model.stages[3].blocks[1].mlp.fc2.weight)
    finally:
        remove_hub_repo("sail/dl")


def test_default_tag_and_local_file_overlay(registered, tmp_path):
    src = metaformer.create("poolformer_s12")
    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    place_hub_file("timm/poolformer_s12.sail_in1k", "model.safetensors", tmp_path / "model.safetensors")
    try:
        model = timm.create_model("mf_poolformer_s12", pretrained=True)  # default tag: timm's Hub copy
        torch.testing.assert_close(model.state_dict(), src.state_dict())
    finally:
        remove_hub_repo("timm/poolformer_s12.sail_in1k")
    local = timm.create_model("mf_poolformer_s12", pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"),
                                                                               crop_pct=0.8))
    torch.testing.assert_close(local.state_dict(), src.state_dict())
    assert local.pretrained_cfg["crop_pct"] == 0.8


def test_timm_data_config_and_transform(registered):
    model = timm.create_model("mf_poolformer_m36")
    cfg = resolve_data_config({}, model=model)
    assert cfg == resolve_model_data_config(model)
    assert cfg == {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                   "std": (0.229, 0.224, 0.225), "crop_pct": 0.95, "crop_mode": "center"}
    transform = create_transform(**cfg)
    image = Image.fromarray(torch.randint(0, 256, (300, 260, 3), dtype=torch.uint8).numpy())
    expected = T.Compose([T.Resize(int(224 / 0.95), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                          T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])(image)
    torch.testing.assert_close(transform(image), expected)
    # a tag's preprocessing, from timm's registry, before any model is built (what timm's scripts read)
    args = timm.models.resolve_model_input_args("mf_convformer_s18.sail_in22k_ft_in1k_384")
    assert args["pretrained_cfg"]["input_size"] == (3, 384, 384) and args["pretrained_cfg"]["crop_pct"] == 1.0


def test_layer_decay_optimizer_uses_group_matcher(registered):
    model = timm.create_model("mf_metaformer_ppaa_s12_224", num_classes=10)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter, once
    scale = {name: g["lr_scale"] for g in optimizer.param_groups for name, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    decay = {name: g["weight_decay"] for g in optimizer.param_groups for name, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert scale["stem.conv.weight"] < scale["stages.0.blocks.0.mlp.fc1.weight"] \
        < scale["stages.3.blocks.1.mlp.fc1.weight"] < scale["head.fc.weight"] == 1.0
    assert scale["stages.2.pos_embed"] == scale["stages.2.blocks.0.mlp.fc1.weight"]
    assert decay["stages.2.pos_embed"] == 0.0 and decay["stages.2.blocks.0.mlp.fc1.weight"] == 0.05
