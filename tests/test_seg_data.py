"""Segmentation data and metrics: the folder dataset on real images (digits pasted on canvases), the release's
transforms, and mIoU / pixel accuracy checked against a direct per-class count."""

import colorsys
import math
import os

import numpy as np
import pytest
import torch
from data_utils import make_digits_segmentation
from PIL import Image

from metaformer import SegEvalTransform, SegmentationFolder, SegmentationMetrics, SegTrainTransform
from metaformer.seg_data import scale_saturation


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return make_digits_segmentation(str(tmp_path_factory.mktemp("digits_seg")), n_train=6, n_val=3)


def _direct_metrics(preds, labels, k, ignore):
    """Per class, by counting pixels: IoU = |P & L| / |P | L| over labelled pixels; Acc = |P & L| / |L|."""
    p = np.concatenate([x.ravel() for x in preds])
    t = np.concatenate([x.ravel() for x in labels])
    p, t = p[t != ignore], t[t != ignore]
    iou, acc = [], []
    for c in range(k):
        inter, union, lab = np.sum((p == c) & (t == c)), np.sum((p == c) | (t == c)), np.sum(t == c)
        iou.append(inter / union if union else math.nan)
        acc.append(inter / lab if lab else math.nan)
    return np.nanmean(iou), np.mean(p == t), np.nanmean(acc), iou


def test_metrics_match_a_direct_count():
    g = torch.Generator().manual_seed(0)
    k, metrics = 6, SegmentationMetrics(6)
    preds, labels = [], []
    for shape in ((2, 17, 23), (1, 9, 31)):
        t = torch.randint(0, 4, shape, generator=g)  # classes 4 and 5 never labelled
        t[torch.rand(shape, generator=g) < 0.2] = 255
        p = torch.where(torch.rand(shape, generator=g) < 0.6, t.clamp(max=3), torch.randint(0, 5, shape, generator=g))
        metrics.update(p, t)
        preds.append(p.numpy())
        labels.append(t.numpy())
    miou, aacc, macc, iou = _direct_metrics(preds, labels, k, 255)
    got = metrics.compute()
    assert got["mIoU"] == pytest.approx(miou, rel=1e-12)
    assert got["aAcc"] == pytest.approx(aacc, rel=1e-12)
    assert got["mAcc"] == pytest.approx(macc, rel=1e-12)
    assert math.isnan(got["IoU"][5]) and not math.isnan(got["IoU"][4])  # 4 predicted only: IoU 0, defined
    assert got["IoU"][4] == 0.0
    metrics.all_reduce()  # no process group: unchanged
    assert metrics.compute()["mIoU"] == got["mIoU"]
    # logits are reduced by argmax
    logits = torch.nn.functional.one_hot(torch.from_numpy(preds[1]), k).permute(0, 3, 1, 2).float()
    alone = SegmentationMetrics(k)
    alone.update(logits, torch.from_numpy(labels[1]))
    assert alone.compute()["aAcc"] == pytest.approx(_direct_metrics(preds[1:], labels[1:], k, 255)[1])
    alone.reset()
    assert math.isnan(alone.compute()["mIoU"])


def test_metrics_errors():
    m = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="label 7 is outside 0..2 and is not ignore_index 255"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="class indices"):
        m.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="positive int"):
        SegmentationMetrics(0)


def test_folder_pairs_images_and_masks(digits_root, tmp_path):
    train = SegmentationFolder(digits_root, "training")
    assert len(train) == 6 and len(SegmentationFolder(digits_root, "validation")) == 3
    image, mask = train.read(0)
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 255
    expected = np.array(Image.open(os.path.join(digits_root, "annotations", "training", "0000.png")))
    assert torch.equal(mask, torch.from_numpy(expected).long())
    normalised, _ = train[0]  # default: ImageNet normalisation only
    torch.testing.assert_close(normalised[0], (image[0] / 255 - 0.485) / 0.229)
    reduced = SegmentationFolder(digits_root, "training", reduce_zero_label=True).read(0)[1]
    torch.testing.assert_close(reduced, torch.where(mask == 0, 255, mask - 1))

    # the other layout: SPLIT/images + SPLIT/masks; an image without mask; an RGB mask
    for sub in ("images", "masks"):
        os.makedirs(tmp_path / "train" / sub)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "images" / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "images" / "b.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "masks" / "a.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) .* have no mask, e.g. expected .*b\.png"):
        SegmentationFolder(tmp_path, "train")
    os.remove(tmp_path / "train" / "images" / "b.png")
    with pytest.raises(ValueError, match="has mode RGB: masks must be single-channel"):
        SegmentationFolder(tmp_path, "train")[0]
    with pytest.raises(FileNotFoundError, match="no segmentation data in .*expected image and mask folders"):
        SegmentationFolder(tmp_path, "val")


def test_train_transform_keeps_image_and_mask_aligned():
    # four uniform quadrants whose colour encodes their class
    colours = torch.tensor([[250.0, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10]])
    mask = torch.zeros(120, 200, dtype=torch.long)
    mask[:60, 100:], mask[60:, :100], mask[60:, 100:] = 1, 2, 3
    image = colours[mask].permute(2, 0, 1).contiguous()
    t = SegTrainTransform(crop_size=96, scale=(256, 64), ratio_range=(0.5, 2.0), photometric=False, mean=(0, 0, 0),
                          std=(1 / 255, 1 / 255, 1 / 255), flip_prob=0.5)
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out_mask = t(image, mask)
        assert out_image.shape == (3, 96, 96) and out_mask.shape == (96, 96)
        labelled = out_mask != 255
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, 255}
        # the colour at each labelled pixel is its class's colour (bilinear edges aside)
        nearest = (out_image.permute(1, 2, 0)[..., None, :] - colours).abs().sum(-1).argmin(-1)
        assert (nearest[labelled] == out_mask[labelled]).float().mean() > 0.95
        assert torch.all(out_image[:, ~labelled] == 0)  # padding: image 0, mask 255


def test_eval_transform_and_photometric_distortion():
    image, mask = torch.rand(3, 300, 500) * 255, torch.zeros(300, 500, dtype=torch.long)
    out, out_mask = SegEvalTransform(scale=(2048, 512))(image, mask)
    assert out.shape == (3, 512, 864) and out_mask is mask  # 300x500 -> 512x853 (fits 2048x512) -> x32
    pixels = torch.rand(3, 4, 5) * 255
    pixels[:, 0, 0] = 128.0  # grey: no saturation to scale
    for factor in (0.5, 1.3, 4.0):
        got = scale_saturation(pixels, factor)
        for y in range(4):
            for x in range(5):
                h, s, v = colorsys.rgb_to_hsv(*(pixels[:, y, x] / 255).tolist())
                want = colorsys.hsv_to_rgb(h, min(1.0, s * factor), v)
                torch.testing.assert_close(got[:, y, x] / 255, torch.tensor(want), rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    from metaformer.seg_data import photometric_distortion

    for _ in range(5):
        out = photometric_distortion(image)
        assert out.shape == image.shape and 0 <= out.min() and out.max() <= 255
