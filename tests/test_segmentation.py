"""Semantic FPN: parity with mmsegmentation's FPN + FPNHead (tests/reference/mm_dense.py, written from mmseg's
source) through checkpoints saved in the mmseg layout, fine-tuning, training, and the errors."""

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import place_release_identityformer_s12
from reference import mm_dense

import metaformer
from metaformer import CheckpointError
from metaformer.segmentation import FPNHead, convert_sync_batchnorm, load_segmenter_checkpoint

CASES = {"poolformer_s12": mm_dense.v1_backbone, "caformer_s18": mm_dense.baselines_backbone}
DIMS = (64, 128, 320, 512)


def _reference(name, num_classes=150, seed=3):
    ref = mm_dense.EncoderDecoder(CASES[name](name), mm_dense.MMFPN(list(DIMS), 256, 4),
                                  mm_dense.MMFPNHead([256] * 4, 128, [4, 8, 16, 32], num_classes, 0.1))
    return mm_dense.randomize_(ref, seed=seed).eval()


def _save_mmseg(ref, path):
    """As mmcv saves a checkpoint: a dict with meta (plain Python) and the state dict."""
    torch.save({"meta": {"mmseg_version": "0.19.0", "CLASSES": ("wall", "building"), "iter": 40000},
                "state_dict": ref.state_dict()}, path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """name -> (reference, path of its mmseg checkpoint), each built once."""
    cache = {}

    def get(name):
        if name not in cache:
            ref = _reference(name)
            path = tmp_path_factory.mktemp("seg") / f"fpn_{name}.pth"
            _save_mmseg(ref, path)
            cache[name] = ref, path
        return cache[name]

    return get


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, store):
    return (request.param,) + store(request.param)


@pytest.fixture
def s12(store):
    return ("poolformer_s12",) + store("poolformer_s12")


def _assert_rel_close(got, expected, rel):
    scale = expected.abs().max().item()
    assert scale > 1e-2
    torch.testing.assert_close(got, expected, rtol=rel, atol=rel * scale)


def test_mmseg_checkpoint_gives_the_reference_logits(saved):
    name, ref, path = saved
    ours = metaformer.create_segmenter(name, checkpoint=str(path)).eval()
    assert ours.num_classes == 150  # taken from the checkpoint's classifier
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 96)
        out = ours(x)
        assert out.shape == (2, 150, 64, 96)
        _assert_rel_close(out, ref(x), 1e-5)
        ours.double(), ref.double()
        x = torch.randn(1, 3, 80, 48, dtype=torch.float64)
        _assert_rel_close(ours(x), ref(x), 1e-9)
        ref.float()


def test_the_library_layout_round_trips(s12, tmp_path):
    name, ref, path = s12
    first = metaformer.create_segmenter(name, checkpoint=str(path)).eval()
    torch.save(first.state_dict(), tmp_path / "ours.pth")
    second = metaformer.create_segmenter(name, checkpoint=str(tmp_path / "ours.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(second(x), first(x), rtol=0, atol=0)


def test_fine_tuning_replaces_only_the_classifier(s12, caplog):
    name, ref, path = s12
    with caplog.at_level(logging.INFO, logger="metaformer"):
        model = metaformer.create_segmenter(name, num_classes=5, checkpoint=str(path))
    assert "classifier replaced" in caplog.text
    assert model.decode_head.conv_seg.weight.shape == (5, 128, 1, 1)
    sd = ref.state_dict()
    torch.testing.assert_close(model.neck.fpn_convs[2].conv.weight, sd["neck.fpn_convs.2.conv.weight"])
    torch.testing.assert_close(model.decode_head.scale_heads[3][4].bn.running_var,
                               sd["decode_head.scale_heads.3.4.bn.running_var"])


def test_pretrained_starts_the_backbone_from_imagenet(tmp_path):
    release = place_release_identityformer_s12(tmp_path)
    model = metaformer.create_segmenter("identityformer_s12", num_classes=3, pretrained=True).eval()
    ref = mm_dense.baselines_backbone("identityformer_s12")  # its per-stage norms fresh, as ours
    ref.load_state_dict({k: v for k, v in release.state_dict().items() if not k.startswith(("norm.", "head."))},
                        strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(model.backbone(x), ref(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_misfitting_checkpoints_are_refused_and_load_nothing(tmp_path):
    sd = _reference("poolformer_s12", num_classes=4).state_dict()
    model = metaformer.create_segmenter("poolformer_s12", num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    bad = dict(sd)
    del bad["neck.lateral_convs.1.conv.bias"]
    bad["auxiliary_head.conv_seg.weight"] = torch.zeros(4, 64, 1, 1)
    with pytest.raises(CheckpointError, match=r"unexpected 1: auxiliary_head\.conv_seg\.weight"):
        load_segmenter_checkpoint(model, bad)
    del bad["auxiliary_head.conv_seg.weight"]
    bad["decode_head.scale_heads.1.0.conv.weight"] = torch.zeros(128, 256, 1, 1)
    with pytest.raises(CheckpointError) as e:
        load_segmenter_checkpoint(model, bad)
    assert "missing 1: neck.lateral_convs.1.conv.bias" in str(e.value)
    assert ("mis-shaped 1: decode_head.scale_heads.1.0.conv.weight: checkpoint (128, 256, 1, 1) vs model "
            "(128, 256, 3, 3)") in str(e.value)

    # neck and head fit, the backbone does not (a caformer backbone): nothing at all is loaded
    other = _reference("caformer_s18", num_classes=4).state_dict()
    mixed = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
    mixed.update({k: v for k, v in other.items() if k.startswith("backbone.")})
    torch.save(mixed, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="mixed.pth, backbone.*does not fit the model"):
        load_segmenter_checkpoint(model, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="no backbone tensors"):
        load_segmenter_checkpoint(model, {k: v for k, v in sd.items() if not k.startswith("backbone.")})
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_training_step_reaches_every_parameter():
    model = metaformer.create_segmenter("poolformer_s12", num_classes=3, drop_path_rate=0.1)
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 3, (2, 64, 64))
    target[:, :4] = 255  # ignored pixels
    loss = F.cross_entropy(model(x), target, ignore_index=255)
    loss.backward()
    assert torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    for part in (model.backbone.stem, model.backbone.feature_norms[3], model.neck, model.decode_head):
        assert all(p.grad.abs().sum() > 0 for p in part.parameters())  # (pooling blocks' norm1.bias get none)
    assert model.decode_head.scale_heads[0][0].bn.num_batches_tracked.item() == 1


def test_out_indices_subset_and_head_strides():
    model = metaformer.create_segmenter("poolformer_s12", num_classes=2, out_indices=(1, 2, 3)).eval()
    assert model.decode_head.feature_strides == [8, 16, 32]
    assert [len(h) for h in model.decode_head.scale_heads] == [1, 2, 4]  # conv; conv+up; (conv+up) x 2
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 2, 64, 96)


def test_bad_arguments_and_inputs():
    with pytest.raises(TypeError, match="features_only"):
        metaformer.create_segmenter("poolformer_s12", features_only=True)
    with pytest.raises(ValueError, match="either pretrained"):
        metaformer.create_segmenter("poolformer_s12", pretrained=True, checkpoint="x.pth")
    with pytest.raises(ValueError, match="features_only=True"):
        metaformer.SemanticFPN(metaformer.create("poolformer_s12"), 3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        metaformer.create_segmenter("poolformer_s12", num_classes=0)
    with pytest.raises(ValueError, match="powers of two"):
        FPNHead(3, feature_strides=(4, 12))
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        metaformer.create_segmenter("poolformer_s12", checkpoint="/nonexistent/fpn.pth")
    model = metaformer.create_segmenter("poolformer_s12", num_classes=3)
    with pytest.raises(ValueError, match="add a batch dimension"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="FPN expects 4 maps"):
        model.neck([torch.randn(1, 64, 16, 16)] * 4)
    with pytest.raises(ValueError, match="SyncBatchNorm runs on GPUs only"):
        convert_sync_batchnorm(model)
