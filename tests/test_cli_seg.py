"""End-to-end tests of ``metaformer train-seg`` and ``validate-seg``, run as real processes on real images.

The data: scikit-learn's handwritten digits pasted onto 32x32 canvases (tests/data_utils.py
``make_digits_segmentation``), two digits (6 and 7) so that a few dozen iterations on two CPU cores learn
them: 3 classes (background, 6, 7), 64 training and 16 validation images. The model: the real
poolformer_s12 Semantic FPN (the release's 256/128-channel FPN and head) trained from scratch for 40
iterations of 4 images, without flips (a mirrored digit is another shape) or photometric distortion; the
runs that test resuming, torchrun and AMP use a narrower head and fewer iterations.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_utils import one_error_line, run_main
from data_utils import make_digits_segmentation

import metaformer
from metaformer.training import RunInfo, TrainState, build_checkpoint

N_TRAIN, N_VAL = 64, 16
BASE = ["--model", "poolformer_s12", "--num-classes", "3", "--crop-size", "32", "--scale", "128", "32", "-b", "4",
        "--drop-path", "0", "--workers", "0", "--seed", "0", "--no-progress"]
LEARN = BASE + ["--lr", "1e-3", "--iters", "40", "--eval-interval", "20", "--flip-prob", "0", "--no-photometric"]
SMALL = BASE + ["--model-kwargs", "fpn_channels=32", "head_channels=16", "--iters", "4", "--eval-interval", "2",
                "--no-plot"]
TIMEOUT = 600


def _env():
    env = dict(os.environ)
    env.pop("METAFORMER_DEBUG", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # see test_cli.py: one thread per process on the shared cores
    return env


def cli(*args) -> subprocess.CompletedProcess:
    """Runs ``python -m metaformer ARGS`` to its end, asserting it succeeds."""
    proc = subprocess.run([sys.executable, "-m", "metaformer", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=TIMEOUT)
    assert proc.returncode == 0, f"metaformer {' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"
    return proc


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The commands run in this process (run_main) use one intra-op thread, as the subprocesses do (_env):
    on a shared 2-core machine, OpenMP threads spinning at barriers cost more than they bring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_digits_segmentation(str(tmp_path_factory.mktemp("digits_seg")), N_TRAIN, N_VAL, canvas=32,
                                    digit_size=28, per_image=1, digits=(6, 7))


@pytest.fixture(scope="module")
def chance(data):
    """mIoU (percent) of the best trivial prediction: everything background (the majority class)."""
    from metaformer.seg_data import SegmentationFolder
    from metaformer.seg_metrics import SegmentationMetrics

    metrics = SegmentationMetrics(3)
    for _, mask in SegmentationFolder(data, "validation"):
        metrics.update(torch.zeros_like(mask), mask)
    return 100 * metrics.compute()["mIoU"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("seg_run"))
    proc = cli("train-seg", data, *LEARN, "--output", out)
    return {"output": out, "stdout": proc.stdout}


# ------------------------------------------------------------------------------------------------ train-seg
@pytest.mark.slow
def test_train_seg_learns_the_digits(trained, chance):
    out = trained["output"]
    for name in ("last.pth", "best.pth", "metrics.csv", "args.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    rows = read_csv(os.path.join(out, "metrics.csv"))
    assert list(rows[0]) == ["iter", "train_loss", "mIoU", "aAcc", "mAcc", "lr", "time"]
    assert [r["iter"] for r in rows] == ["20", "40"]
    best = max(float(r["mIoU"]) for r in rows)
    # chance (every pixel background) is 26.4%; 40 iterations from scratch reach about 45%
    assert best > chance + 10, f"chance mIoU is {chance:.1f}%, the run reached {best:.1f}% ({rows})"
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    # the poly schedule, logged at each evaluation's last iteration
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == pytest.approx([1e-3 * (1 - i / 40) ** 0.9 for i in (19, 39)], rel=1e-5)
    assert "iter 40/40" in trained["stdout"] and "mIoU" in trained["stdout"]

    last = load(os.path.join(out, "last.pth"))
    assert last["task"] == "segmentation" and last["num_updates"] == 40 and last["epoch"] == 2
    assert last["model_name"] == "poolformer_s12" and last["num_classes"] == 3
    assert last["data_config"]["scale"] == [128, 32] and last["best_metric"] == pytest.approx(best, abs=1e-3)
    # the library reads it: create_segmenter(checkpoint=...) gives the run's weights
    model = metaformer.create_segmenter("poolformer_s12", checkpoint=os.path.join(out, "best.pth"))
    best_ckpt = load(os.path.join(out, "best.pth"))
    torch.testing.assert_close(model.state_dict()["decode_head.conv_seg.weight"],
                               best_ckpt["model"]["decode_head.conv_seg.weight"])


@pytest.mark.slow
def test_validate_seg_reproduces_the_run(trained, data, chance, tmp_path):
    out = trained["output"]
    best = load(os.path.join(out, "best.pth"))
    results_file = tmp_path / "results.json"
    # no --model, --scale or --num-classes: the checkpoint brings them
    assert run_main("validate-seg", data, "--checkpoint", os.path.join(out, "best.pth"), "--workers", "0",
                    "--no-progress", "--results-file", results_file).returncode == 0
    res = json.loads(results_file.read_text())
    assert res["images"] == N_VAL and res["num_classes"] == 3 and res["scale"] == [128, 32]
    for key in ("mIoU", "aAcc", "mAcc"):
        assert res[key] == pytest.approx(best["metrics"][key], abs=1e-3), key
    assert res["mIoU"] > chance + 10 and min(res["IoU"]) > 0  # every class found, the digits included
    assert res["mIoU"] == pytest.approx(sum(res["IoU"]) / 3, abs=1e-3)


@pytest.mark.slow
def test_finished_run_is_kept(trained, data):
    out = trained["output"]
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in ("last.pth", "best.pth", "metrics.csv")}
    proc = run_main("train-seg", data, *LEARN, "--output", out)
    assert "already holds a run" in one_error_line(proc) and "--overwrite" in proc.stderr
    proc = run_main("train-seg", data, *LEARN, "--output", out, "--resume", "auto")
    assert proc.returncode == 0 and "nothing to do: 40 iteration(s) done" in proc.stdout
    assert {name: os.path.getmtime(os.path.join(out, name)) for name in before} == before
    # a classifier's command refuses the segmenter by name
    assert "validate-seg" in one_error_line(run_main("validate", data, "--checkpoint", os.path.join(out, "best.pth")))


@pytest.mark.slow
def test_killed_run_resumes_exactly(data, tmp_path):
    reference = str(tmp_path / "reference")  # the uninterrupted run, in this process (one thread, as the others)
    assert run_main("train-seg", data, *SMALL, "--output", reference).returncode == 0
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "metaformer", "train-seg", data, *SMALL, "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        csv_path, deadline = os.path.join(out, "metrics.csv"), time.time() + TIMEOUT
        # metrics.csv is written right after last.pth: once it exists, iterations 3-4 are starting
        while not os.path.isfile(csv_path) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpt = load(os.path.join(out, "last.pth"))
    assert ckpt["epoch"] == 1 and ckpt["num_updates"] == 2

    cli("train-seg", data, *SMALL, "--output", out, "--resume", "auto")
    rows, want = read_csv(os.path.join(out, "metrics.csv")), read_csv(os.path.join(reference, "metrics.csv"))
    assert [r["iter"] for r in rows] == [r["iter"] for r in want] == ["2", "4"]
    # same batches (IterationBatchSampler), restored optimizer/schedule/RNG: the uninterrupted run's numbers
    for got, expected in zip(rows, want):
        for key in ("train_loss", "mIoU", "aAcc", "mAcc", "lr"):
            assert float(got[key]) == pytest.approx(float(expected[key]), rel=1e-4, abs=1e-4), (key, got, expected)
    # and its weights, optimizer moments and BatchNorm statistics, bit for bit (one thread, same machine)
    got, expected = load(os.path.join(out, "last.pth")), load(os.path.join(reference, "last.pth"))
    assert got["num_updates"] == expected["num_updates"] == 4
    torch.testing.assert_close(got["model"], expected["model"], rtol=0, atol=0)
    torch.testing.assert_close(got["optimizer"]["state"], expected["optimizer"]["state"], rtol=0, atol=0)


@pytest.mark.slow
def test_torchrun_two_processes(data, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "metaformer",
           "train-seg", data, *SMALL, "--iters", "2", "--eval-interval", "2", "--output", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout and proc.stdout.count("iter 2/2") == 1  # only rank 0 prints and writes
    ckpt = load(os.path.join(out, "last.pth"))
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["metrics"]["val_images"] == N_VAL  # each rank evaluated half; the confusion matrices were summed
    assert ckpt["metrics"]["train_images"] == 2 * 2 * 4  # 2 processes x 2 iterations x 4 images
    row = read_csv(os.path.join(out, "metrics.csv"))[-1]
    assert run_main("validate-seg", data, "--checkpoint", os.path.join(out, "last.pth"), "--workers", "0",
                    "--no-progress", "--results-file", tmp_path / "r.json").returncode == 0
    res = json.loads((tmp_path / "r.json").read_text())
    for key in ("mIoU", "aAcc", "mAcc"):
        assert float(row[key]) == pytest.approx(res[key], abs=1e-3), key


def test_amp_bfloat16(data, tmp_path):
    out = tmp_path / "amp"
    proc = run_main("train-seg", data, *SMALL, "--iters", "1", "--eval-interval", "1", "--amp", "--output", out)
    assert proc.returncode == 0 and "amp bfloat16" in proc.stdout, proc.stderr
    row = read_csv(out / "metrics.csv")[0]
    assert row["iter"] == "1" and 0 <= float(row["mIoU"]) <= 100 and float(row["train_loss"]) > 0


# ------------------------------------------------------------------------------------------------ mistakes
def _classifier_checkpoint(path):
    model = metaformer.create("poolformer_s12", num_classes=3)
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    torch.save(build_checkpoint(state, RunInfo("poolformer_s12", {}, 3, ["a", "b", "c"], {})), path)
    return path


@pytest.mark.parametrize("case", ["no_data", "no_split", "labels", "kwargs", "resume_classifier", "plain_no_model"])
def test_user_mistakes_give_one_line_errors(case, data, tmp_path):
    small = SMALL + ["--output", tmp_path / "out"]
    if case == "no_data":
        line = one_error_line(run_main("train-seg", tmp_path / "nothing", *small))
        assert "data folder not found" in line
    elif case == "no_split":
        line = one_error_line(run_main("train-seg", data, *small, "--val-split", "test"))
        assert "--val-split test" in line and "annotations/test" in line
    elif case == "labels":  # 3-class masks trained as 2 classes
        line = one_error_line(run_main("train-seg", data, *[a if a != "3" else "2" for a in small]))
        assert "outside the 2 classes" in line and "--num-classes" in line
    elif case == "kwargs":
        line = one_error_line(run_main("train-seg", data, *BASE, "--model-kwargs", "num_classes=5", "--output",
                                       tmp_path / "out"))
        assert "--model-kwargs num_classes" in line
    elif case == "resume_classifier":
        path = _classifier_checkpoint(tmp_path / "cls.pth")
        line = one_error_line(run_main("train-seg", data, *small, "--resume", path))
        assert "task: segmentation here, classification in the checkpoint" in line
    else:
        path = tmp_path / "fpn.pth"
        torch.save(metaformer.create_segmenter("poolformer_s12", 3).state_dict(), path)
        line = one_error_line(run_main("validate-seg", data, "--checkpoint", path))
        assert "backbone name is required (--model)" in line
