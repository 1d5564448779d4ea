"""End-to-end tests of the ``metaformer`` command line on real images.

The data are scikit-learn's bundled handwritten digits (8x8, 10 classes) written out as an RGB PNG
ImageFolder (400 training and 200 validation images at 32x32). The model is the real poolformer_s12
at 32x32 input; one 4-epoch training run is shared by the tests (module fixture).

Training, its kill and resume, torchrun, the benchmark (which reads its own process's peak memory) and one
user mistake whose data loader runs in a worker process run as real processes; the other commands call
``metaformer.cli.main`` in the test process (:func:`cli_utils.run_main`), the same code without the
interpreter's start-up (about 3 s of importing torch each).
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_utils import one_error_line, run_main
from data_utils import DIGIT_NAMES, make_digits_imagefolder

import metaformer

TRAIN_ARGS = ["--model", "poolformer_s12", "--img-size", "32", "-b", "32", "--epochs", "4", "--lr", "2e-3",
              "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0",
              "--scale", "0.5", "1", "--workers", "0", "--seed", "0", "--no-progress"]
N_TRAIN, N_VAL = 400, 200
TIMEOUT = 600


def _env():
    env = dict(os.environ)
    env.pop("METAFORMER_DEBUG", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # One intra-op thread per command: on a shared 2-core machine, OpenMP threads spinning at barriers
    # make a 2-thread run up to ~15x slower as soon as another process competes for the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _succeeded(proc: subprocess.CompletedProcess, args) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"metaformer {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def cli(*args, check: bool = True, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """Runs ``python -m metaformer ARGS`` and returns the finished process."""
    proc = subprocess.run([sys.executable, "-m", "metaformer", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=timeout)
    return _succeeded(proc, args) if check else proc


def here(*args) -> subprocess.CompletedProcess:
    """``metaformer ARGS`` in this process (:func:`cli_utils.run_main`), which must succeed."""
    return _succeeded(run_main(*args), args)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_imagefolder(str(tmp_path_factory.mktemp("digits")), N_TRAIN, N_VAL, size=32)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    start = time.perf_counter()
    proc = cli("train", digits, *TRAIN_ARGS, "--output", out)
    return {"output": out, "stdout": proc.stdout, "stderr": proc.stderr, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------ train
def test_train_learns_and_writes_its_files(trained):
    out = trained["output"]
    for name in ("last.pth", "best.pth", "metrics.csv", "args.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    rows = read_csv(os.path.join(out, "metrics.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "top1", "top5", "lr", "time"]
    best_top1 = max(float(r["top1"]) for r in rows)
    assert best_top1 > 30.0, f"chance is 10%; the run reached only {best_top1}% ({rows})"
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])

    last = load(os.path.join(out, "last.pth"))  # loadable without unpickling code
    assert last["epoch"] == 4 and last["model_name"] == "poolformer_s12" and last["num_classes"] == 10
    assert last["class_names"] == sorted(DIGIT_NAMES)
    for key in ("model", "optimizer", "scheduler", "rng", "args", "history", "best_metric"):
        assert key in last, key
    assert last["best_metric"] == pytest.approx(best_top1, abs=1e-3)
    assert last["args"]["lr"] == 2e-3 and last["data_config"]["input_size"] == (3, 32, 32)
    best = load(os.path.join(out, "best.pth"))
    assert best["metrics"]["top1"] == pytest.approx(best_top1, abs=1e-3)
    # the library reads the weights of a training checkpoint too
    model = metaformer.create("poolformer_s12", checkpoint=os.path.join(out, "best.pth"), num_classes=10)
    torch.testing.assert_close(model.state_dict()["head.fc.weight"], best["model"]["head.fc.weight"])

    png = os.path.join(out, "metrics.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in trained["stderr"]
    else:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_validate_reports_the_training_accuracy(trained, digits, tmp_path):
    out = trained["output"]
    best = load(os.path.join(out, "best.pth"))
    results_file = tmp_path / "results.json"
    # no --model / --img-size: a training checkpoint brings its model and evaluation transform
    here("validate", digits, "--checkpoint", os.path.join(out, "best.pth"), "-b", "32", "--workers", "0",
         "--results-file", results_file)
    results = json.loads(results_file.read_text())
    for key in ("top1", "top5", "loss", "model", "checkpoint", "images", "img_per_sec"):
        assert key in results, key
    assert results["images"] == N_VAL and results["model"] == "poolformer_s12" and results["img_size"] == 32
    assert results["top1"] == pytest.approx(best["metrics"]["top1"], abs=0.01)
    assert results["top5"] == pytest.approx(best["metrics"]["top5"], abs=0.01)
    assert results["loss"] == pytest.approx(best["metrics"]["val_loss"], abs=1e-3)
    row = [r for r in read_csv(os.path.join(out, "metrics.csv")) if int(r["epoch"]) == best["epoch"]][0]
    assert float(row["top1"]) == pytest.approx(results["top1"], abs=0.01)


@pytest.mark.slow
def test_killed_run_resumes_exactly(trained, digits, tmp_path):
    out = str(tmp_path / "run")
    args = [sys.executable, "-m", "metaformer", "train", digits, *TRAIN_ARGS, "--output", out]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        csv_path = os.path.join(out, "metrics.csv")
        deadline = time.time() + TIMEOUT
        # metrics.csv is written right after last.pth: once it exists, epoch 2 is starting
        while not os.path.isfile(csv_path) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(1.0)  # well into epoch 2 (an epoch takes several seconds)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpt = load(os.path.join(out, "last.pth"))
    assert 1 <= ckpt["epoch"] < 4

    cli("train", digits, *TRAIN_ARGS, "--output", out, "--resume", "auto")
    rows = read_csv(os.path.join(out, "metrics.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    assert load(os.path.join(out, "last.pth"))["epoch"] == 4
    # same seed, same data, restored optimizer/scheduler/RNG state: the same numbers as the uninterrupted run
    reference = read_csv(os.path.join(trained["output"], "metrics.csv"))
    for got, want in zip(rows, reference):
        for key in ("train_loss", "val_loss", "top1", "top5", "lr"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4, abs=1e-4), (key, got, want)


@pytest.mark.slow
def test_torchrun_two_processes(digits, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "metaformer", "train", digits, *TRAIN_ARGS, "--epochs", "1", "--output", out,
           "--model-kwargs", "mlp_ratio=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("epoch 1/1") == 1  # only rank 0 prints and writes
    ckpt = load(os.path.join(out, "last.pth"))
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    metrics = ckpt["metrics"]
    # each rank saw half of the data; the sums were reduced across ranks
    assert metrics["val_images"] == N_VAL
    assert metrics["train_images"] == 2 * ((N_TRAIN // 2) // 32) * 32
    row = read_csv(os.path.join(out, "metrics.csv"))[0]
    here("validate", digits, "--checkpoint", os.path.join(out, "last.pth"), "-b", "32", "--workers", "0",
         "--results-file", tmp_path / "r.json")
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["images"] == N_VAL
    assert float(row["top1"]) == pytest.approx(res["top1"], abs=0.01)
    assert float(row["val_loss"]) == pytest.approx(res["loss"], abs=1e-3)


# ------------------------------------------------------------------------------------------------ predict
def test_predict_prints_the_trained_class_names(trained, digits):
    folder = os.path.join(digits, "val", "seven")
    images = [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:3]]
    proc = here("predict", *images, "--checkpoint", os.path.join(trained["output"], "best.pth"), "--topk", "3")
    lines = proc.stdout.splitlines()
    assert [line for line in lines if not line.startswith(" ")] == images
    ranked = [line.strip() for line in lines if line.startswith(" ")]
    assert len(ranked) == 3 * len(images)
    for line in ranked:  # "1. seven (7): 43.21%"
        rank, label, index, prob = re.fullmatch(r"(\d)\. (\w+) \((\d+)\): ([\d.]+)%", line).groups()
        assert label == sorted(DIGIT_NAMES)[int(index)] and 0 <= float(prob) <= 100


def test_predict_uses_imagenet_class_names(digits):
    from timm.data import ImageNetInfo

    image = os.path.join(digits, "val", "one", sorted(os.listdir(os.path.join(digits, "val", "one")))[0])
    proc = here("predict", image, "--model", "poolformer_s12", "--img-size", "32", "--topk", "2", "--json")
    preds = json.loads(proc.stdout)["predictions"]
    info = ImageNetInfo()
    assert [p["label"] for p in preds] == [info.index_to_description(p["index"]) for p in preds]
    assert "randomly initialised" in proc.stderr


# ------------------------------------------------------------------------------------------------ info / list
def test_info_reports_the_release_parameter_count():
    variant = metaformer.get_variant("poolformer_s12")
    out = here("info", "poolformer_s12").stdout
    assert f"{variant.params:,}" in out and "matches the release" in out  # 11,915,176
    macs = float(re.search(r"MACs\s+([\d.]+)G at 224x224", out).group(1))
    assert macs == pytest.approx(variant.macs, rel=0.05)  # 1.8G in the release's table
    assert "[64, 128, 320, 512]" in out and "poolformer_s12.sail_in1k" in out and "77.2" in out
    info = json.loads(here("info", "metaformer_ppaa_s12_224", "--json", "--no-macs").stdout)
    assert info["params"] == metaformer.get_variant("metaformer_ppaa_s12_224").params == 16_535_592
    assert info["fixed_input_size"] is True and info["feature_channels"] == [64, 128, 320, 512]


@pytest.mark.parametrize("name", ["poolformer_s12", "poolformer_m48", "caformer_s18", "randformer_s12"])
def test_mac_count_matches_the_release_table(name):
    from metaformer.cli.info import count_macs

    model = metaformer.create(name)
    assert count_macs(model, (3, 224, 224)) / 1e9 == pytest.approx(metaformer.get_variant(name).macs, rel=0.02)


def test_list():
    names = here("list", "poolformer_s*", "--pretrained").stdout.split()
    assert names == metaformer.list_models("poolformer_s*", pretrained=True)
    assert "poolformer_s12.sail_in1k" in names


def test_benchmark_cpu():
    res = json.loads(cli("benchmark", "--model", "poolformer_s12", "--img-size", "32", "-b", "4", "--steps", "2",
                         "--warmup", "1", "--train", "--amp", "--json").stdout)
    assert res["img_per_sec"] > 0 and res["mode"] == "train" and res["device"] == "cpu"
    assert "VmHWM" in res["memory_method"] and res["peak_memory_bytes"] >= 0


# ------------------------------------------------------------------------------------------------ mistakes
def _mistake_setup(case, digits, trained, tmp):
    best = os.path.join(trained["output"], "best.pth")
    if case == "missing folder":
        return ["validate", os.path.join(tmp, "nowhere"), "--model", "poolformer_s12"]
    if case == "class folder without images":
        os.makedirs(os.path.join(tmp, "data", "a"))
        os.makedirs(os.path.join(tmp, "data", "b"))
        with open(os.path.join(tmp, "data", "a", "x.txt"), "w") as f:
            f.write("not an image")
        return ["validate", os.path.join(tmp, "data"), "--model", "poolformer_s12"]
    if case == "unreadable image":
        src = os.path.join(digits, "val", "zero")
        os.makedirs(os.path.join(tmp, "data", "zero"))
        os.makedirs(os.path.join(tmp, "data", "one"))
        with open(os.path.join(src, sorted(os.listdir(src))[0]), "rb") as f, \
                open(os.path.join(tmp, "data", "zero", "ok.png"), "wb") as g:
            g.write(f.read())
        with open(os.path.join(tmp, "data", "one", "broken.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\nthis is not really a png")
        return ["validate", os.path.join(tmp, "data"), "--checkpoint", best, "-b", "1", "--workers", "1"]
    if case == "training checkpoint of another model":
        return ["validate", digits, "--model", "poolformer_s24", "--checkpoint", best]
    if case == "state dict of another model":
        path = os.path.join(tmp, "plain.pth")
        torch.save(load(best)["model"], path)
        return ["validate", digits, "--model", "poolformer_s24", "--checkpoint", path, "--img-size", "32"]
    if case == "corrupt checkpoint":
        path = os.path.join(tmp, "corrupt.pth")
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 truncated")
        image = os.path.join(digits, "val", "two", sorted(os.listdir(os.path.join(digits, "val", "two")))[0])
        return ["predict", image, "--model", "poolformer_s12", "--checkpoint", path]
    if case == "unknown flag":
        return ["train", digits, "--model", "poolformer_s12", "--no-such-flag", "1"]
    if case == "unknown model":
        return ["info", "poolformer_s99"]
    if case == "resume from a plain state dict":
        path = os.path.join(tmp, "plain.pth")
        torch.save(load(best)["model"], path)
        return ["train", digits, *TRAIN_ARGS, "--output", os.path.join(tmp, "out"), "--resume", path]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing folder", "class folder without images", "unreadable image",
                                  "training checkpoint of another model", "state dict of another model",
                                  "corrupt checkpoint", "unknown flag", "unknown model",
                                  "resume from a plain state dict"])
def test_user_mistakes_give_one_line_errors(case, digits, trained, tmp_path):
    args = _mistake_setup(case, digits, trained, str(tmp_path))
    # "unreadable image" loads in a worker process, whose own output only a real process's stderr shows
    proc = cli(*args, check=False, timeout=300) if case == "unreadable image" else run_main(*args)
    error = one_error_line(proc)
    assert error.startswith("metaformer: error: "), proc.stderr
    expected = {"missing folder": "not found", "class folder without images": "no images",
                "unreadable image": "broken.png", "training checkpoint of another model": "poolformer_s12",
                "state dict of another model": "does not fit", "corrupt checkpoint": "could not read",
                "unknown flag": "--no-such-flag", "unknown model": "poolformer_s99",
                "resume from a plain state dict": "not a checkpoint written by"}[case]
    assert expected in error, error
