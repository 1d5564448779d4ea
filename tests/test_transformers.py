"""Hugging Face transformers' PoolFormer checkpoints (the ``sail/poolformer_*`` Hub repos) load exactly.

What is compared: transformers' ``PoolFormerForImageClassification`` with random (non-trivial)
weights is saved as transformers saves it and as the Hub repos hold it (``pytorch_model.bin``), loaded
here by ``checkpoint=`` and as the ``transformers_in1k`` pretrained tag, and its logits (and stage
maps) are compared with ours in fp32, rtol 1e-5.

Why they must agree: in evaluation transformers' PoolFormer computes the release's function (the
same blocks; its head is the release's: one-group GroupNorm on the final map, spatial mean, Linear).
It differs from the release only in training, where its MLP drops whole samples (DropPath with the
drop-path rate, after the activation and after the second convolution) where the release has
element-wise dropout with ``drop_rate`` (0); ours follows the release, so training behaviour is the
release's, and the loaded weights give the release's logits. The release itself is compared with
ours in test_parity.py.
"""

import pytest
import torch
from hub_cache import place_hub_file, remove_hub_repo
from transformers import PoolFormerConfig, PoolFormerForImageClassification, PoolFormerModel
from transformers.utils import is_torch_available

if not is_torch_available():  # transformers 5 switches its PyTorch models off below PyTorch 2.6
    pytest.skip(f"this transformers cannot run its PyTorch models on PyTorch {torch.__version__}",
                allow_module_level=True)

import metaformer
from metaformer.weights import detect_layout, read_checkpoint

SIZE = 64


def _hf_model(cls=PoolFormerForImageClassification, name="poolformer_s12", seed=0):
    variant = metaformer.get_variant(name)
    config = PoolFormerConfig(depths=list(variant.depths), hidden_sizes=list(variant.dims), num_labels=1000,
                              layer_scale_init_value=variant.extra["layer_scale_init_values"])
    model = cls(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial values everywhere: norms, layer scales and biases matter
        for pname, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif "layer_scale" in pname:
                p.copy_(0.3 * (0.5 + torch.rand(p.shape, generator=g)))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


def _close(actual, expected):
    assert expected.abs().max() > 1e-2  # not two near-zero tensors
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.fixture(scope="module")
def hf_s12():
    return _hf_model()


def test_save_pretrained_folder_loads_with_the_same_logits(hf_s12, tmp_path):
    hf_s12.save_pretrained(tmp_path)  # transformers' own save (model.safetensors + config.json)
    path = tmp_path / "model.safetensors"
    assert detect_layout(read_checkpoint(str(path))) == "transformers"
    ours = metaformer.create("poolformer_s12", checkpoint=str(path)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = hf_s12(pixel_values=x).logits
        _close(ours(x), expected)
        # the stage maps too: transformers' hidden_states are the raw stage outputs
        hidden = hf_s12(pixel_values=x, output_hidden_states=True).hidden_states
        _, ours_maps = ours.forward_intermediates(x)
    assert len(hidden) == 4
    for got, want in zip(ours_maps, hidden):
        _close(got, want)


def test_hub_file_as_a_pretrained_tag(hf_s12, tmp_path):
    source = metaformer.zoo.get_pretrained_cfg("poolformer_s12.transformers_in1k")
    assert (source.layout, source.hf_hub_id, source.hf_filename) == ("transformers", "sail/poolformer_s12",
                                                                     "pytorch_model.bin")
    torch.save(hf_s12.state_dict(), tmp_path / "pytorch_model.bin")  # the Hub repos' file: a plain state dict
    place_hub_file("sail/poolformer_s12", "pytorch_model.bin", tmp_path / "pytorch_model.bin")
    try:
        ours = metaformer.create("poolformer_s12.transformers_in1k", pretrained=True).eval()
        assert ours.pretrained_cfg["crop_pct"] == 0.9 and ours.pretrained_cfg["tag"] == "transformers_in1k"
        x = torch.randn(2, 3, SIZE, SIZE)
        with torch.no_grad():
            _close(ours(x), hf_s12(pixel_values=x).logits)
        # fine-tuning and backbones adapt these weights as any others'
        ten = metaformer.create("poolformer_s12.transformers_in1k", pretrained=True, num_classes=10)
        assert ten.num_classes == 10
        torch.testing.assert_close(ten.stem.conv.weight, ours.stem.conv.weight)
    finally:
        remove_hub_repo("sail/poolformer_s12")


def test_base_model_checkpoint_loads_into_a_backbone(tmp_path):
    base = _hf_model(PoolFormerModel, seed=1)  # no head: keys "encoder.*" without the "poolformer." prefix
    base.save_pretrained(tmp_path)
    backbone = metaformer.create("poolformer_s12", features_only=True, checkpoint=str(tmp_path / "model.safetensors"))
    backbone.eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        hidden = base(pixel_values=x, output_hidden_states=True).hidden_states
        maps = backbone.forward_intermediates(x, intermediates_only=True)
    for got, want in zip(maps, hidden):
        _close(got, want)
    with pytest.raises(metaformer.CheckpointError, match="missing"):  # a classifier needs the head
        metaformer.create("poolformer_s12", checkpoint=str(tmp_path / "model.safetensors"))


def test_transformers_checkpoint_of_another_size_is_refused(hf_s12, tmp_path):
    torch.save(hf_s12.state_dict(), tmp_path / "s12.bin")
    with pytest.raises(metaformer.CheckpointError, match="transformers layout"):
        metaformer.create("poolformer_s24", checkpoint=str(tmp_path / "s12.bin"))
