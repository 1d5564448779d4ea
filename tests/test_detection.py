"""Detection: torchvision's RetinaNet / Faster R-CNN / Mask R-CNN on MetaFormer + FPN. The backbone and neck
of checkpoints saved in mmdetection's layout give the reference's maps (tests/reference/mm_dense.py, written
from mmdetection's FPN); each detector trains and predicts on two backbone families."""

import logging

import pytest
import torch
from helpers import place_release_identityformer_s12
from reference import mm_dense
from torch import nn

import metaformer
from metaformer import CheckpointError
from metaformer.detection import load_detector_checkpoint

DIMS = [64, 128, 320, 512]
SMALL = dict(min_size=64, max_size=96)  # torchvision's resizing, kept small for speed
FEW = {"retinanet": dict(topk_candidates=50, detections_per_img=10),  # few boxes and RoIs, for speed
       "faster_rcnn": dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                           rpn_post_nms_top_n_test=50, box_batch_size_per_image=16, box_detections_per_img=10)}
FEW["mask_rcnn"] = FEW["faster_rcnn"]
FAMILIES = {"poolformer_s12": mm_dense.v1_backbone, "caformer_s18": mm_dense.baselines_backbone}
# mmdetection head tensors (shapes as in the release configs); torchvision's heads are different modules
_HEADS = {"retinanet": {"bbox_head.retina_cls.weight": (720, 256, 3, 3), "bbox_head.retina_reg.bias": (36,)},
          "mask_rcnn": {"rpn_head.rpn_conv.weight": (256, 256, 3, 3),
                        "roi_head.bbox_head.fc_cls.weight": (81, 1024),
                        "roi_head.mask_head.conv_logits.weight": (80, 256, 1, 1)}}


class _MMDetector(nn.Module):
    """The backbone and neck of an mmdetection model in the release's settings."""

    def __init__(self, name, kind):
        super().__init__()
        self.backbone = FAMILIES[name](name)
        retina = kind == "retinanet"
        self.neck = mm_dense.MMFPN(DIMS, 256, 5, start_level=1 if retina else 0,
                                   add_extra_convs="on_input" if retina else False)

    def forward(self, x):
        return self.neck(self.backbone(x))


@pytest.fixture(scope="module")
def mmdet_checkpoint(tmp_path_factory):
    cache = {}

    def get(name, kind, fork_last3=False):
        key = (name, kind, fork_last3)
        if key not in cache:
            ref = mm_dense.randomize_(_MMDetector(name, kind), seed=len(name) + len(kind)).eval()
            sd = dict(ref.state_dict())
            if fork_last3:  # the release's FORK_LAST3=1 RetinaNet: norm0 is an Identity, absent from the file
                sd = {k: v for k, v in sd.items() if not k.startswith("backbone.norm0.")}
            g = torch.Generator().manual_seed(0)
            sd.update({k: torch.randn(shape, generator=g) for k, shape in _HEADS[kind].items()})
            path = tmp_path_factory.mktemp("det") / f"{kind}_{name}.pth"
            torch.save({"meta": {"mmdet_version": "2.19.0", "epoch": 12}, "state_dict": sd}, path)
            cache[key] = ref, path
        return cache[key]

    return get


@pytest.fixture(scope="module")
def detectors():
    cache = {}

    def get(name, kind):
        if (name, kind) not in cache:
            cache[name, kind] = metaformer.create_detector(name, kind, num_classes=3, **SMALL, **FEW[kind])
        return cache[name, kind]

    return get


@pytest.mark.parametrize("name,kind,fork_last3", [("poolformer_s12", "retinanet", False),
                                                  ("poolformer_s12", "retinanet", True),
                                                  ("caformer_s18", "mask_rcnn", False)])
def test_mmdet_backbone_and_neck_give_the_reference_maps(mmdet_checkpoint, name, kind, fork_last3, caplog):
    ref, path = mmdet_checkpoint(name, kind, fork_last3)
    with caplog.at_level(logging.WARNING, logger="metaformer"):
        model = metaformer.create_detector(name, kind, checkpoint=str(path), **SMALL).eval()
    heads = sorted({k.split(".")[0] for k in _HEADS[kind]})
    assert f"heads ({', '.join(heads)}) have no torchvision counterpart" in caplog.text
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours, expected = list(model.backbone(x).values()), ref(x)
    assert len(ours) == len(expected) == 5
    strides = [8, 16, 32, 64, 128] if kind == "retinanet" else [4, 8, 16, 32, 64]
    for got, want, s in zip(ours, expected, strides):
        assert got.shape == (2, 256, -(-64 // s), -(-96 // s))
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


def _targets(masks: bool):
    boxes = [torch.tensor([[8.0, 10.0, 50.0, 60.0], [30.0, 5.0, 90.0, 40.0]]),
             torch.tensor([[20.0, 20.0, 60.0, 70.0]])]
    out = []
    for b, size in zip(boxes, ((64, 96), (80, 64))):
        t = {"boxes": b, "labels": torch.arange(1, len(b) + 1)}
        if masks:
            m = torch.zeros(len(b), *size, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(b.long().tolist()):
                m[i, y0:y1, x0:x1] = 1
            t["masks"] = m
        out.append(t)
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("kind", metaformer.detection.DETECTORS)
def test_training_step_and_inference(detectors, name, kind):
    model = detectors(name, kind).train()
    model.zero_grad()
    images = [torch.rand(3, 64, 96), torch.rand(3, 80, 64)]
    losses = model(images, _targets(masks=kind == "mask_rcnn"))
    expected = {"retinanet": {"classification", "bbox_regression"},
                "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}}
    expected["mask_rcnn"] = expected["faster_rcnn"] | {"loss_mask"}
    assert set(losses) == expected[kind]
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for part in (model.backbone.body.stem, model.backbone.body.feature_norms[-1], model.backbone.fpn):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and {"boxes", "labels", "scores"} <= set(out[0])
    if kind == "mask_rcnn":
        assert out[1]["masks"].shape[-2:] == (80, 64)


def test_the_library_layout_round_trips(detectors, tmp_path):
    model = detectors("poolformer_s12", "retinanet")
    torch.save(model.state_dict(), tmp_path / "det.pth")
    again = metaformer.create_detector("poolformer_s12", "retinanet", num_classes=3,
                                       checkpoint=str(tmp_path / "det.pth"), **SMALL)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    other = metaformer.create_detector("poolformer_s12", "retinanet", num_classes=5, **SMALL)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"mis-shaped 2: head\.classification_head\.cls_logits\.bias"):
        load_detector_checkpoint(other, tmp_path / "det.pth")
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing loaded


def test_pretrained_starts_the_backbone_from_imagenet(tmp_path):
    release = place_release_identityformer_s12(tmp_path)
    model = metaformer.create_detector("identityformer_s12", "retinanet", pretrained=True, **SMALL)
    expected = release.state_dict()
    for ours, theirs in (("stem.conv.weight", "downsample_layers.0.conv.weight"),
                         ("stages.3.blocks.1.mlp.fc2.weight", "stages.3.1.mlp.fc2.weight")):
        torch.testing.assert_close(model.backbone.body.state_dict()[ours].flatten(1), expected[theirs].flatten(1))
    assert model.backbone.body.out_indices == (1, 2, 3)


def test_bad_checkpoints_and_arguments(mmdet_checkpoint, detectors):
    ref, path = mmdet_checkpoint("poolformer_s12", "retinanet")
    sd = torch.load(path, weights_only=True)["state_dict"]
    bad = dict(sd)
    del bad["neck.fpn_convs.4.conv.bias"]
    bad["neck.extra.weight"] = torch.zeros(1)
    bad["ema.backbone"] = torch.zeros(1)
    model = detectors("poolformer_s12", "retinanet")
    with pytest.raises(CheckpointError) as e:
        load_detector_checkpoint(model, bad)
    msg = str(e.value)
    assert "missing 1: neck.fpn_convs.4.conv.bias" in msg
    assert "unexpected 2: ema.backbone, neck.extra.weight" in msg
    with pytest.raises(CheckpointError, match=r"does not fit the detector: missing 2: neck\.lateral_convs\.3"):
        load_detector_checkpoint(detectors("caformer_s18", "mask_rcnn"), sd)
    with pytest.raises(ValueError, match="unknown detector kind 'yolo'"):
        metaformer.create_detector("poolformer_s12", "yolo")
    with pytest.raises(TypeError, match="sets out_indices of the backbone itself"):
        metaformer.create_detector("poolformer_s12", backbone_kwargs={"out_indices": (3,)})
    with pytest.raises(TypeError, match="built by metaformer.create_detector"):
        load_detector_checkpoint(nn.Sequential(), sd)
    with pytest.raises(ValueError, match="features_only=True"):
        metaformer.MetaFormerFPN(metaformer.create("poolformer_s12"))
