"""The library parts of training (metaformer.training): exact state round trips, checkpoints, recipe, data."""

from __future__ import annotations

import io
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import metaformer
from metaformer.training import (
    LoopSettings,
    Recipe,
    RunInfo,
    TrainState,
    build_checkpoint,
    load_model_file,
    seed_all,
    train_one_epoch,
)

CPU = torch.device("cpu")


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(16, 3, 32, 32, generator=g)
    labels = torch.randint(0, 4, (16,), generator=g)
    return TensorDataset(images, labels)


def _state(recipe: Recipe, init_seed: int, name: str = "") -> TrainState:
    torch.manual_seed(init_seed)
    if name:
        model = metaformer.create(name, num_classes=4)
    else:  # a small MetaFormer with stochastic depth: the round trips run in a fraction of a second
        model = metaformer.MetaFormer(depths=(1, 2), dims=(16, 32), num_classes=4, drop_path_rate=0.2)
    optimizer = recipe.create_optimizer(model, global_batch=4)
    return TrainState(model, optimizer, recipe.create_scheduler(optimizer, updates_per_epoch=2),
                      ema=recipe.create_ema(model))


def _epoch(state: TrainState, recipe: Recipe, loader) -> float:
    settings = LoopSettings(device=CPU, epochs=recipe.epochs, grad_accum_steps=2, clip_grad=1.0,
                            sched_on_updates=recipe.sched_on_updates, progress=False)
    result = train_one_epoch(state, loader, settings, recipe.create_loss(), mixup=recipe.create_mixup(4, 4))
    state.scheduler.step(state.epoch + 1)
    state.record({"epoch": state.epoch + 1, "train_loss": result.loss}, -result.loss)
    return result.loss


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what a checkpoint file gives back: no pickled code


RECIPE = Recipe(epochs=3, warmup_epochs=1, sched_on_updates=True, model_ema=True, model_ema_decay=0.9,
                mixup=0.8, cutmix=1.0, smoothing=0.1)


@pytest.mark.parametrize("restore_rng", [True, False])
def test_state_dict_round_trip_continues_bit_identically(restore_rng):
    """Train, save after epoch 1, continue; a fresh state loaded from the save must continue identically.

    Drop path (torch RNG), mixup/cutmix (NumPy RNG) and the loader's shuffling (torch RNG) all draw random
    numbers, so without the restored RNG states the continuation differs: the second case shows the
    comparison can fail.
    """
    loader = DataLoader(_data(), batch_size=4, shuffle=True)
    seed_all(0)
    a = _state(RECIPE, init_seed=0)
    _epoch(a, RECIPE, loader)
    saved = _roundtrip(a.state_dict())
    losses_a = [_epoch(a, RECIPE, loader) for _ in range(2)]

    seed_all(123)  # another process: other RNG states, other initial weights
    b = _state(RECIPE, init_seed=1)
    notes = b.load_state_dict(saved, restore_rng=restore_rng)
    assert notes == []
    assert (b.epoch, b.num_updates, len(b.history)) == (1, 2, 1)
    losses_b = [_epoch(b, RECIPE, loader) for _ in range(2)]

    same = all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    if not restore_rng:
        assert not same and losses_a != losses_b
        return
    assert same and losses_a == losses_b
    for x, y in zip(a.ema.module.state_dict().values(), b.ema.module.state_dict().values()):
        assert torch.equal(x, y)
    assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]
    assert (a.epoch, a.num_updates, a.best_metric, a.best_epoch) == (b.epoch, b.num_updates, b.best_metric,
                                                                     b.best_epoch)
    assert a.history == b.history


def test_state_dict_notes_what_it_cannot_restore():
    recipe = Recipe(epochs=2, warmup_epochs=0, model_ema=True)
    a = _state(Recipe(epochs=2, warmup_epochs=0), init_seed=0)  # no EMA
    saved = a.state_dict(rng=[a.state_dict()["rng"][0]] * 2)  # as if two processes saved it
    b = _state(recipe, init_seed=0)
    notes = b.load_state_dict(saved)
    assert any("no EMA weights" in n for n in notes) and any("another number of processes" in n for n in notes)


def test_record_tracks_the_best_in_either_direction():
    state = _state(Recipe(epochs=1, warmup_epochs=0, sched="none"), init_seed=0)
    assert [state.record({"epoch": i + 1}, v) for i, v in enumerate([1.0, 3.0, 2.0])] == [True, True, False]
    assert (state.best_metric, state.best_epoch, state.epoch) == (3.0, 2, 3)
    state = _state(Recipe(epochs=1, warmup_epochs=0, sched="none"), init_seed=0)
    assert [state.record({"epoch": i + 1}, v, lower_is_better=True) for i, v in enumerate([1.0, 3.0, 0.5])] == [
        True, False, True]


def test_checkpoint_loads_back_through_load_model_file(tmp_path):
    from metaformer.files import save_torch

    state = _state(Recipe(epochs=1, warmup_epochs=0, model_ema=True), init_seed=0, name="poolformer_s12")
    state.record({"epoch": 1, "top1": 50.0}, 50.0)
    run = RunInfo(model_name="poolformer_s12", model_kwargs={"mlp_ratio": 4}, num_classes=4,
                  class_names=["a", "b", "c", "d"], data_config={"input_size": (3, 32, 32)})
    path = tmp_path / "last.pth"
    save_torch(build_checkpoint(state, run), path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "metaformer-train/1" and ckpt["metrics"] == {"epoch": 1, "top1": 50.0}
    assert ckpt["epoch"] == 1 and len(ckpt["rng"]) == 1

    loaded = load_model_file(str(path), use_ema=False)
    assert loaded.name == "poolformer_s12" and loaded.class_names == ["a", "b", "c", "d"]
    assert not loaded.model.training
    for k, v in state.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[k], v, rtol=0, atol=0)
    ema = load_model_file(str(path), use_ema=True).model
    for k, v in state.ema.module.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[k], v, rtol=0, atol=0)

    # a plain state dict in another layout: the name is required and num_classes comes from the classifier
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.model.state_dict().items()}}, plain)
    with pytest.raises(ValueError, match="model name is required"):
        load_model_file(str(plain))
    model = load_model_file(str(plain), "poolformer_s12").model
    assert model.num_classes == 4
    torch.testing.assert_close(model.state_dict()["head.fc.weight"], state.model.state_dict()["head.fc.weight"])
    with pytest.raises(metaformer.CheckpointError, match="poolformer_s12"):
        load_model_file(str(path), "poolformer_s24")


def test_posterize_fix_is_scoped_to_the_transform():
    """RandAugment at magnitude 10 posterizes to 0 bits, which Pillow 11 rejects; the fixed transform
    makes a black image instead, and timm's own table of operations is not touched."""
    from PIL import Image
    from timm.data import auto_augment

    before = dict(auto_augment.NAME_TO_OP)
    transform = Recipe(aa="rand-m10-n1-mstd0-inc1").train_transform(
        {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert auto_augment.NAME_TO_OP == before
    ops = [op for t in transform.transforms for op in getattr(t, "ops", [])]
    posterize = [op for op in ops if op.name == "PosterizeIncreasing"]
    assert posterize and all(op.aug_fn is not before["PosterizeIncreasing"] for op in posterize)
    op = posterize[0]
    op.prob = 1.0
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert op(img).getextrema() == ((0, 0), (0, 0), (0, 0))


def test_split_folders_and_image_folder_errors(tmp_path):
    from metaformer.training import DataError, image_folder, split_folders

    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    assert split_folders(str(tmp_path)) == (os.path.join(tmp_path, "train"), os.path.join(tmp_path, "val"))
    with pytest.raises(DataError, match="no images"):
        image_folder(os.path.join(tmp_path, "train"))
    with pytest.raises(DataError, match="not found"):
        split_folders(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------- the run folder
def _ckpt(epoch, best_epoch, best_metric):
    return {"format": "metaformer-train/1", "model_name": "poolformer_s12", "model": {}, "epoch": epoch,
            "best_epoch": best_epoch, "best_metric": best_metric}


@pytest.mark.parametrize("case", ["best.pth older than the best epoch", "best.pth one epoch newer",
                                  "best.pth missing", "consistent"])
def test_reconcile_best_agrees_with_the_file_that_exists(case, tmp_path):
    from metaformer.training import RunFolder

    folder = RunFolder(str(tmp_path))
    resume = {"best.pth older than the best epoch": _ckpt(3, 3, 0.9), "best.pth one epoch newer": _ckpt(3, 2, 0.8),
              "best.pth missing": _ckpt(3, 2, 0.8), "consistent": _ckpt(3, 2, 0.8)}[case]
    on_disk = {"best.pth older than the best epoch": _ckpt(2, 2, 0.8), "best.pth one epoch newer": _ckpt(4, 4, 0.95),
               "best.pth missing": None, "consistent": _ckpt(2, 2, 0.8)}[case]
    if on_disk is not None:
        torch.save(on_disk, folder.best)
    notes = folder.reconcile_best(resume, "top1")
    assert bool(notes) == (case != "consistent")
    if case == "best.pth missing":
        assert (resume["best_epoch"], resume["best_metric"]) == (None, None) and not os.path.exists(folder.best)
        return
    best = torch.load(folder.best, weights_only=True)
    assert (resume["best_epoch"], resume["best_metric"]) == (best["epoch"], best["best_metric"])


def test_run_folder_saves_best_before_last(tmp_path):
    from metaformer.files import WriteError
    from metaformer.training import RunFolder

    folder = RunFolder(str(tmp_path))
    os.makedirs(os.path.join(folder.last, "x"))  # last.pth cannot be replaced
    with pytest.raises(WriteError):
        folder.save(_ckpt(1, 1, 0.5), is_best=True)
    assert torch.load(folder.best, weights_only=True)["epoch"] == 1


def test_run_folder_lock(tmp_path):
    import socket
    import subprocess
    import sys

    from metaformer.training import RunFolder, RunLockedError

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(tmp_path / ".lock", "w") as f:
            f.write(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            RunFolder(str(tmp_path)).lock()
    finally:
        holder.kill()
        holder.wait()
    folder = RunFolder(str(tmp_path))
    folder.lock()  # the holder is gone: its lock is taken over
    assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    folder.unlock()
    assert not (tmp_path / ".lock").exists()
