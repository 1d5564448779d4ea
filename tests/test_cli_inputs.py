"""The command line against hostile data, files and arguments, and the first hour's surprises (issues
15.10, 15.13, 15.14, 16.4, 16.7). See cli_utils for the data and the model."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib

import pytest
from cli_utils import ARGS, N_TRAIN, N_VAL, one_error_line, run_main
from test_cli import _env, cli


@pytest.fixture(scope="module")
def best(data, tmp_path_factory):
    """best.pth of a finished 1-epoch run."""
    out = str(tmp_path_factory.mktemp("run1") / "run")
    cli("train", data, *ARGS, "--epochs", "1", "--output", out)
    return os.path.join(out, "best.pth")


# ------------------------------------------------------------------------------------------- 15.10 datasets
def _hostile_copy(data, tmp_path) -> str:
    root = str(tmp_path / "data")
    shutil.copytree(data, root)
    for split in ("train", "val"):
        some = os.path.join(root, split, "one", sorted(os.listdir(os.path.join(root, split, "one")))[0])
        hidden = os.path.join(root, split, ".ipynb_checkpoints", "one")
        os.makedirs(hidden)
        shutil.copy(some, hidden)
        os.makedirs(os.path.join(root, split, "two", ".ipynb_checkpoints"))
        shutil.copy(some, os.path.join(root, split, "two", ".ipynb_checkpoints"))
        os.symlink("..", os.path.join(root, split, "three", "up"))  # back to the split folder
        os.symlink(".", os.path.join(root, split, "four", "again"))  # to itself
    return root


def test_hidden_folders_and_symlink_loops_in_datasets(best, data, tmp_path):
    root = _hostile_copy(data, tmp_path)
    proc = run_main("validate", root, "--checkpoint", best, "-b", "32", "--workers", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"({N_VAL} images" in proc.stdout and "10 classes" in proc.stdout
    proc = run_main("predict", os.path.join(root, "val"), "--checkpoint", best, "--json")
    assert len(proc.stdout.splitlines()) == N_VAL
    proc = run_main("train", root, *ARGS, "--epochs", "1", "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert f"{N_TRAIN} images, 10 classes" in proc.stdout

    from metaformer.training import find_images, image_folder

    dataset = image_folder(os.path.join(root, "val"))
    assert dataset.classes == sorted(os.listdir(os.path.join(data, "val"))) and len(dataset) == N_VAL
    assert len(find_images(os.path.join(root, "val"))) == N_VAL


# ------------------------------------------------------------------------------------------- 15.13 / 15.14
def _bomb(path, side: int = 10000) -> str:
    """A real PNG of side x side black pixels (100 M pixels for 10000): about 100 KB on disk."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + grey pixels
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return str(path)


def _case(case, best, data, tmp):
    image = os.path.join(data, "val", "one", sorted(os.listdir(os.path.join(data, "val", "one")))[0])
    if case == "img-size 100000":
        return ["validate", data, "--checkpoint", best, "--img-size", "100000"], "METAFORMER_MAX_IMG_SIZE"
    if case == "negative img-size":
        return ["benchmark", "--model", "poolformer_s12", "--img-size", "-5"], "at least 8"
    if case == "workers 100000":
        return ["train", data, *ARGS, "--epochs", "1", "-j", "100000", "--output", tmp], "exhaust memory"
    if case == "decompression bomb":
        return ["predict", _bomb(os.path.join(tmp, "bomb.png")), "--checkpoint", best], "decompression"
    if case == "checkpoint is a folder":
        return ["predict", image, "--checkpoint", os.path.dirname(best)], "is a folder, not a file"
    if case == "checkpoint is a symlink loop":
        os.symlink("loop.pth", os.path.join(tmp, "loop.pth"))
        return ["predict", image, "--checkpoint", os.path.join(tmp, "loop.pth")], "symbolic link loop"
    if case == "results file in a missing folder":
        return (["validate", data, "--checkpoint", best, "-j", "0", "--results-file",
                 os.path.join(tmp, "nowhere", "r.json")], "folder does not exist")
    if case == "results file exists":
        with open(os.path.join(tmp, "r.json"), "w") as f:
            f.write("{}")
        return (["validate", data, "--checkpoint", best, "-j", "0", "--results-file", os.path.join(tmp, "r.json")],
                "already exists; pass --overwrite")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["img-size 100000", "negative img-size", "workers 100000", "decompression bomb",
                                  "checkpoint is a folder", "checkpoint is a symlink loop",
                                  "results file in a missing folder", "results file exists"])
def test_hostile_arguments_end_in_one_line_before_any_work(case, best, data, tmp_path):
    args, expected = _case(case, best, data, str(tmp_path))
    proc = run_main(*args)
    line = one_error_line(proc)
    assert expected in line, line
    assert "top1" not in proc.stdout  # nothing was evaluated first
    if case == "results file exists":
        assert open(os.path.join(tmp_path, "r.json")).read() == "{}"


def test_predict_a_folder(best, data):
    folder = os.path.join(data, "val", "seven")
    proc = run_main("predict", folder, "--checkpoint", best, "--topk", "1")
    names = [line for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert names == [os.path.join(folder, f) for f in sorted(os.listdir(folder))]


# ------------------------------------------------------------------------------------------- 16.4 workers
def test_default_workers_fit_the_machine(best, data):
    from metaformer.cli import build_parser

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for command in (["validate", data], ["train", data, "--model", "poolformer_s12"]):
        assert build_parser().parse_args(command).workers == min(4, cpus)
    proc = cli("validate", data, "--checkpoint", best, "--no-progress")
    assert "worker processes in total" not in proc.stderr  # torch's warning about too many workers


# ------------------------------------------------------------------------------------------- 16.7 offline
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unreachable_hub_env():
    env = _env()
    env.pop("HF_HUB_OFFLINE", None)
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    return env


def test_unreachable_hub_fails_fast_with_command_line_advice(data):
    image = os.path.join(data, "val", "one", sorted(os.listdir(os.path.join(data, "val", "one")))[0])
    cmd = [sys.executable, "-m", "metaformer", "predict", image, "--model", "convformer_s18", "--pretrained"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_unreachable_hub_env(), timeout=300)
    line = one_error_line(proc)
    assert "--pretrained convformer_s18.sail_in1k" in line and "cannot be reached" in line
    assert "--checkpoint PATH" in line and "checkpoint=PATH" not in line.replace("--checkpoint PATH", "")
    assert "HF_HUB_OFFLINE" not in line


def test_unreachable_hub_still_loads_cached_weights(data, tmp_path):
    import timm
    from hub_cache import place_hub_file, remove_hub_repo
    from safetensors.torch import save_file

    reference = timm.create_model("convformer_s18").eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    place_hub_file("timm/convformer_s18.sail_in1k", "model.safetensors", path)
    try:
        image = os.path.join(data, "val", "one", sorted(os.listdir(os.path.join(data, "val", "one")))[0])
        cmd = [sys.executable, "-m", "metaformer", "predict", image, "--model", "convformer_s18", "--pretrained",
               "--json", "--topk", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_unreachable_hub_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert '"predictions"' in proc.stdout
    finally:
        remove_hub_repo("timm/convformer_s18.sail_in1k")
