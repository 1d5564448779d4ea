"""Checkpoint reading and strict conversion between layouts."""

import pytest
import torch
from reference import original_v1, save_original
from safetensors.torch import save_file

import metaformer
from metaformer import CheckpointError
from metaformer.weights import convert_state_dict, detect_layout, read_checkpoint


@pytest.fixture(scope="module")
def ppaa_original():
    return original_v1.randomize_(original_v1.build("metaformer_ppaa_s12_224"), seed=2).state_dict()


def test_layout_detection(ppaa_original):
    assert detect_layout(ppaa_original) == "original_v1"
    assert detect_layout(metaformer.create("poolformer_s12").state_dict()) == "metaformer"
    assert detect_layout({"downsample_layers.0.conv.weight": torch.zeros(1)}) == "original_baselines"
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        detect_layout({"encoder.weight": torch.zeros(1)})


def test_hybrid_position_embedding_shifts_indices(ppaa_original):
    model = metaformer.create("metaformer_ppaa_s12_224")
    converted = convert_state_dict(ppaa_original, model)
    torch.testing.assert_close(converted["stages.2.pos_embed"], ppaa_original["network.4.pos_embed"])
    torch.testing.assert_close(converted["stages.2.blocks.0.token_mixer.qkv.weight"],
                               ppaa_original["network.5.0.token_mixer.qkv.weight"])
    torch.testing.assert_close(converted["stages.3.downsample.conv.weight"], ppaa_original["network.6.proj.weight"])
    torch.testing.assert_close(converted["stages.3.blocks.1.layer_scale2.scale"],
                               ppaa_original["network.7.1.layer_scale_2"])


def test_missing_unexpected_and_misshaped_are_named(ppaa_original):
    model = metaformer.create("metaformer_ppaa_s12_224")
    sd = dict(ppaa_original)
    del sd["network.7.1.mlp.fc2.bias"]
    sd["network.7.1.extra"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(10, 512)
    with pytest.raises(CheckpointError) as e:
        convert_state_dict(sd, model)
    msg = str(e.value)
    assert "missing 1: stages.3.blocks.1.mlp.fc2.bias" in msg
    assert "unexpected 1: network.7.1.extra (as stages.3.blocks.1.extra)" in msg
    assert "mis-shaped 1: head.fc.weight: checkpoint (10, 512) vs model (1000, 512)" in msg
    # and nothing was loaded: the model is untouched when loading fails
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        metaformer.weights.load_state_dict_into(model, sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_checkpoint_of_another_model_is_refused(tmp_path, ppaa_original):
    save_original_path = tmp_path / "ppaa.pth.tar"
    torch.save(ppaa_original, save_original_path)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        metaformer.create("metaformer_pppa_s12_224", checkpoint=str(save_original_path))


def test_formats_wrappers_and_corrupt_files(tmp_path):
    ref = original_v1.randomize_(original_v1.build("poolformer_s12"), seed=4).eval()
    sd = ref.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
        for f in ("w.safetensors", "wrapped.pth"):
            model = metaformer.create("poolformer_s12", checkpoint=str(tmp_path / f)).eval()
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    (tmp_path / "bad.pth").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "bad.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        read_checkpoint(tmp_path / "list.pth")


def test_fine_tuning_checkpoint_with_new_classes(tmp_path):
    ref = original_v1.build("poolformer_s12")
    save_original(ref, tmp_path / "w.pth")
    model = metaformer.create("poolformer_s12", checkpoint=str(tmp_path / "w.pth"), num_classes=3)
    assert model.head.fc.weight.shape == (3, 512)
    torch.testing.assert_close(model.stem.conv.weight, ref.state_dict()["patch_embed.proj.weight"])


def test_release_detection_backbone_checkpoint(tmp_path):
    """The release's detection/segmentation backbones add GroupNorms norm0, norm2, norm4, norm6 (sail-sg/poolformer's
    detection/ and segmentation/ code)."""
    ref = original_v1.randomize_(original_v1.build("poolformer_s12"), seed=8)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith(("norm.", "head."))}
    for i, k in enumerate((0, 2, 4, 6)):
        c = (64, 128, 320, 512)[i]
        sd[f"norm{k}.weight"] = torch.rand(c) + 0.5
        sd[f"norm{k}.bias"] = torch.randn(c)
    torch.save(sd, tmp_path / "det.pth")
    full = metaformer.create("poolformer_s12", features_only=True, checkpoint=str(tmp_path / "det.pth")).eval()
    torch.testing.assert_close(full.feature_norms[2].weight, sd["norm4.weight"])
    part = metaformer.create("poolformer_s12", features_only=True, out_indices=(1, 3),
                             checkpoint=str(tmp_path / "det.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        f_full, f_part = full(x), part(x)
    torch.testing.assert_close(f_part[0], f_full[1])
    torch.testing.assert_close(f_part[1], f_full[3])
