"""The library parts of segmentation training: the release's recipe and loss, the batches of an
iteration-based run, the mIoU evaluation and the weights files of ``metaformer train-seg``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

import metaformer
from metaformer.training import (
    IterationBatchSampler,
    RunInfo,
    SegmentationLoss,
    SegRecipe,
    TrainState,
    build_checkpoint,
    evaluate_segmentation,
    load_model_file,
    load_segmenter_file,
    run_differences,
    write_metrics_csv,
)
from metaformer.weights import CheckpointError

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads spinning at barriers cost more than
    they bring to these small models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("world_size", [1, 3])
def test_iteration_batches_are_those_of_distributed_sampler_epochs(world_size):
    n, b = 23, 2
    for rank in range(world_size):
        whole = list(IterationBatchSampler(n, b, 0, 20, rank=rank, world_size=world_size, seed=5))
        # reference: torch's DistributedSampler for each epoch, batched with the last partial batch dropped
        expected = []
        for epoch in range(10):
            sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=5)
            sampler.set_epoch(epoch)
            order = list(sampler)
            expected += [order[i:i + b] for i in range(0, len(order) - b + 1, b)]
        assert whole == expected[:20]
        # any cut gives the same batches: a resumed run draws what the uninterrupted one drew
        assert list(IterationBatchSampler(n, b, 0, 7, rank=rank, world_size=world_size, seed=5)) + \
            list(IterationBatchSampler(n, b, 7, 13, rank=rank, world_size=world_size, seed=5)) == whole


def test_iteration_batches_refuse_a_share_smaller_than_a_batch():
    with pytest.raises(ValueError, match="less than one batch of 4"):
        IterationBatchSampler(6, 4, 0, 1, world_size=2)


# ------------------------------------------------------------------------------------------ recipe
def test_recipe_is_the_release_config():
    r = SegRecipe()  # sail-sg/poolformer segmentation/configs/sem_fpn/PoolFormer/fpn_poolformer_s12_ade20k_40k.py
    assert (r.lr, r.weight_decay, r.power, r.min_lr, r.iters, r.eval_interval) == (2e-4, 1e-4, 0.9, 0.0, 40000, 4000)
    assert (r.batch_size, r.crop_size, tuple(r.scale), tuple(r.ratio_range)) == (4, 512, (2048, 512), (0.5, 2.0))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = r.create_optimizer(model)
    # mmcv's default optimizer constructor: torch's AdamW, one group, every parameter decayed
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert len(group["params"]) == 4 and group["weight_decay"] == 1e-4 and group["lr"] == 2e-4
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8


def test_poly_schedule_is_mmcv_poly_lr_updater():
    recipe = SegRecipe(lr=0.01, min_lr=1e-4, power=0.9, iters=50)
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=recipe.lr)
    scheduler = recipe.create_scheduler(optimizer)
    used = []
    for i in range(recipe.iters):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step_update(num_updates=i + 1)
    # mmcv PolyLrUpdaterHook (by_epoch=False): (base_lr - min_lr) * (1 - iter / max_iters) ** power + min_lr
    mmcv = [(0.01 - 1e-4) * (1 - i / 50) ** 0.9 + 1e-4 for i in range(50)]
    torch.testing.assert_close(torch.tensor(used, dtype=torch.float64), torch.tensor(mmcv, dtype=torch.float64))
    assert [recipe.learning_rate_at(i) for i in range(50)] == pytest.approx(mmcv, rel=1e-12)


# ------------------------------------------------------------------------------------------ loss
def test_loss_is_mmseg_019_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=g, requires_grad=True)
    mask = torch.randint(0, 5, (2, 6, 7), generator=g)
    mask[0, :2] = 255
    loss = SegmentationLoss(5)(logits, mask)
    # mmseg 0.19: per-pixel cross-entropy, 0 at ignored pixels, mean over every pixel (avg_non_ignore came in 0.23)
    logp = logits.detach().log_softmax(1)
    picked = logp.gather(1, mask.clamp(max=4)[:, None])[:, 0]
    reference = -(picked * (mask != 255)).sum() / mask.numel()
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-6, atol=1e-7)
    assert not torch.isclose(loss, F.cross_entropy(logits, mask, ignore_index=255))  # torch's averages labelled ones
    loss.backward()
    assert logits.grad[0, :, :2].abs().max() == 0


def test_loss_names_a_label_outside_the_classes():
    with pytest.raises(ValueError, match="label 7, outside the 5 classes 0..4.*--num-classes"):
        SegmentationLoss(5)(torch.zeros(1, 5, 2, 2), torch.tensor([[[0, 7], [1, 255]]]))


# ------------------------------------------------------------------------------------------ evaluation
class _FixedLogits(nn.Module):
    """A segmenter whose logits at stride 2 are given (upsampled to the input, as SemanticFPN does)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.align_corners = logits, False

    def forward(self, x):
        return F.interpolate(self.logits[: x.shape[0]], size=x.shape[2:], mode="bilinear", align_corners=False)


def test_evaluation_resizes_logits_to_the_mask_and_counts_like_mmseg():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 4, 6, generator=g)
    image = torch.zeros(1, 3, 8, 12)  # the evaluation transform's size
    mask = torch.randint(0, 3, (1, 5, 9), generator=g)  # the original size
    mask[0, 0, :3] = 255
    result = evaluate_segmentation(_FixedLogits(logits), [(image, mask)], CPU, 3, progress=False)
    pred = F.interpolate(F.interpolate(logits, size=(8, 12), mode="bilinear"), size=(5, 9), mode="bilinear").argmax(1)
    keep = mask != 255
    ious, accs = [], []
    for c in range(3):
        p, t = (pred == c) & keep, (mask == c) & keep
        ious.append((p & t).sum().item() / (p | t).sum().item())
        accs.append((p & t).sum().item() / t.sum().item())
    assert result["IoU"] == pytest.approx([100 * v for v in ious])
    assert result["mIoU"] == pytest.approx(100 * sum(ious) / 3)
    assert result["mAcc"] == pytest.approx(100 * sum(accs) / 3)
    assert result["aAcc"] == pytest.approx(100 * ((pred == mask) & keep).sum().item() / keep.sum().item())
    assert result["images"] == 1
    with pytest.raises(ValueError, match="no images"):
        evaluate_segmentation(_FixedLogits(logits), [], CPU, 3, progress=False)


# ------------------------------------------------------------------------------------------ files
def _seg_checkpoint(model, **run):
    optimizer = SegRecipe().create_optimizer(model)
    state = TrainState(model, optimizer)
    state.num_updates = 8
    info = dict(model_name="poolformer_s12", model_kwargs={"fpn_channels": 32, "head_channels": 16},
                num_classes=3, class_names=[], data_config=SegRecipe(scale=(128, 32)).data_config(),
                eval_metric="mIoU", task="segmentation")
    info.update(run)
    return build_checkpoint(state, RunInfo(**info))


def test_train_seg_checkpoints_load_back(tmp_path):
    torch.manual_seed(0)
    model = metaformer.create_segmenter("poolformer_s12", 3, fpn_channels=32, head_channels=16).eval()
    path = tmp_path / "last.pth"
    torch.save(_seg_checkpoint(model), path)
    loaded = load_segmenter_file(path)  # the checkpoint names its backbone and build arguments
    assert loaded.name == "poolformer_s12" and loaded.model.num_classes == 3 and "iteration 8" in loaded.weights
    assert loaded.data_config["scale"] == [128, 32]
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.model(x), model(x))
    # so does the library's create_segmenter, and a classifier loader refuses it by name
    again = metaformer.create_segmenter("poolformer_s12", checkpoint=path, fpn_channels=32, head_channels=16).eval()
    torch.testing.assert_close(again(x), model(x))
    with pytest.raises(CheckpointError, match="segmentation checkpoint.*validate-seg"):
        load_model_file(path)
    with pytest.raises(CheckpointError, match="trained on poolformer_s12, not poolformer_s24"):
        load_segmenter_file(path, "poolformer_s24")
    with pytest.raises(ValueError, match="5 classes asked for"):
        load_segmenter_file(path, num_classes=5)


def test_plain_and_classification_files(tmp_path):
    torch.manual_seed(0)
    model = metaformer.create_segmenter("poolformer_s12", 4, fpn_channels=32, head_channels=16).eval()
    plain = tmp_path / "fpn.pth"
    torch.save({"state_dict": model.state_dict()}, plain)  # mmseg wraps its weights so
    with pytest.raises(ValueError, match="backbone name is required"):
        load_segmenter_file(plain)
    loaded = load_segmenter_file(plain, "poolformer_s12", model_kwargs={"fpn_channels": 32, "head_channels": 16})
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.model(x), model(x))
    backbone_only = tmp_path / "cls.pth"
    torch.save(metaformer.create("poolformer_s12", num_classes=4).state_dict(), backbone_only)
    with pytest.raises(CheckpointError, match="no Semantic FPN"):
        load_segmenter_file(backbone_only, "poolformer_s12")
    classifier = metaformer.create("poolformer_s12", num_classes=4)
    ckpt = build_checkpoint(TrainState(classifier, torch.optim.SGD(classifier.parameters(), lr=0.1)),
                            RunInfo("poolformer_s12", {}, 4, list("abcd"), {}))
    torch.save(ckpt, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match="classification checkpoint.*metaformer validate"):
        load_segmenter_file(tmp_path / "train.pth")
    seg = _seg_checkpoint(metaformer.create_segmenter("poolformer_s12", 3, fpn_channels=32, head_channels=16))
    assert run_differences(seg, RunInfo("poolformer_s12", {"fpn_channels": 32, "head_channels": 16}, 3, [], {})) == [
        "task: classification here, segmentation in the checkpoint"]


def test_metrics_csv_takes_the_columns_asked_for(tmp_path):
    rows = [{"epoch": 1, "iter": 20, "train_loss": 0.5, "mIoU": 41.123456789, "aAcc": 90.0, "mAcc": math.nan,
             "lr": 1e-4, "time": 2.0, "train_images": 80}]
    write_metrics_csv(rows, tmp_path / "m.csv", fields=["iter", "train_loss", "mIoU", "aAcc", "mAcc", "lr", "time"])
    assert (tmp_path / "m.csv").read_text().splitlines() == ["iter,train_loss,mIoU,aAcc,mAcc,lr,time",
                                                            "20,0.5,41.1235,90,nan,0.0001,2"]
