"""Runs every script of examples/ with small arguments, each in its own process, as a user would.

The Gradio app is only imported (it must import without gradio and launch nothing) and its
prediction function called directly.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["ablation", "finetune_folder", "segmentation", "detection_backbone", "export_onnx", "cam", "gradio_app"]


def start_example(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``examples/{name}.py`` with ``args`` in its own process and returns the finished process."""
    # One thread per process: the examples are tiny and the test machines are shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(EXAMPLES.parent))


def run_example(name: str, *args: str, timeout: float = 300) -> str:
    """Runs ``examples/{name}.py`` with ``args``; returns its stdout, failing with its output on error."""
    proc = start_example(name, *args, timeout=timeout)
    assert proc.returncode == 0, f"{name}.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_has_docstring_and_main(name):
    source = (EXAMPLES / f"{name}.py").read_text()
    assert source.startswith('"""'), f"{name}.py needs a module docstring"
    assert "def main(argv=None)" in source
    assert 'if __name__ == "__main__":\n    main()' in source


def test_ablation():
    out = run_example("ablation", "--mixers", "pooling", "identity", "shift", "--steps", "2", "--batch-size", "8")
    table = out[out.index("val acc"):]
    for mixer in ("pooling", "identity", "shift"):
        assert f"\n{mixer} " in table


def _accuracies(out: str) -> dict:
    rows = out[out.index("val acc"):].splitlines()[1:]
    return {r.split()[0]: (float(r.split()[-2]), float(r.split()[-1].rstrip("%")) / 100) for r in rows if r.strip()
            and r.split()[-1].endswith("%")}


@pytest.mark.slow
def test_ablation_shows_the_mixer_matters():
    """The default network separates the mixers: without one (identity) it is clearly behind pooling.

    In poolformer_s12 the four downsampling convolutions mix every position of a 32x32 digit, so the
    mixers tied (93.1 / 92.8 / 93.6%); the example's two-stage default leaves the mixing to the mixer.
    Half the default steps already show it (pooling 69%, identity 48% on this seed).
    """
    out = run_example("ablation", "--mixers", "pooling", "identity", "--steps", "50")
    results = _accuracies(out)
    (pool_loss, pool_acc), (id_loss, id_acc) = results["pooling"], results["identity"]
    assert pool_acc - id_acc >= 0.10 and id_loss > pool_loss, out


@pytest.mark.slow
def test_finetune_folder_and_cam_on_the_saved_model(tmp_path):
    saved = tmp_path / "model"
    out = run_example("finetune_folder", "--epochs", "1", "--max-steps", "2", "--batch-size", "8",
                      "--save", str(saved))
    assert "10 classes" in out and "val acc" in out
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()

    png = tmp_path / "cam.png"
    out = run_example("cam", "--from-pretrained", str(saved), "--image-size", "64", "--output", str(png))
    assert png.is_file()
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (64, 64) and image.mode == "RGB"


@pytest.mark.slow
def test_finetune_folder_on_an_unsplit_folder(tmp_path):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (16, 16), (40 * i, 100 if label == "a" else 200, 0)).save(tmp_path / label / f"{i}.png")
    out = run_example("finetune_folder", str(tmp_path), "--epochs", "1", "--batch-size", "4", "--image-size", "32")
    assert "8 train / 2 val images, 2 classes" in out


@pytest.mark.slow
def test_segmentation():
    out = run_example("segmentation", "--iters", "4", "--eval-interval", "2")
    assert "64 training and 16 validation images, 3 classes" in out and "chance (all background) mIoU" in out
    assert "iter    2" in out and "iter    4" in out and "best mIoU" in out


@pytest.mark.slow
def test_detection_backbone():
    out = run_example("detection_backbone", "--image-size", "128", "--batch-size", "1")
    assert "strides [4, 8, 16, 32]" in out and "loss_classifier" in out and "inference" in out


@pytest.mark.slow
def test_export_onnx(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    out = run_example("export_onnx", "--image-size", "64", "--output", str(path))
    assert path.is_file() and "ONNX Runtime matches eager" in out
    assert "opset 17," in out  # the TorchScript-based exporter's default here, read back from the file


@pytest.mark.slow
def test_export_onnx_dynamo_writes_one_self_contained_file(tmp_path):
    """The torch.export-based exporter would put the weights in a second file named after the (temporary) path
    it is given; the example writes them into the one file it puts in place."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module)
    import torch

    if torch.__version__ < (2, 7):
        out = start_example("export_onnx", "--dynamo", "--output", str(tmp_path / "model.onnx"))
        assert out.returncode == 2 and "--dynamo needs PyTorch 2.7 or later" in out.stderr, out.stderr
        assert not any(tmp_path.iterdir())
        pytest.skip("the example refuses --dynamo before PyTorch 2.7: no torch.export-based exporter before 2.5, "
                    "and 2.6's fails on a dynamic batch axis (the refusal was checked)")
    path = tmp_path / "model.onnx"
    out = run_example("export_onnx", "--dynamo", "--image-size", "32", "--output", str(path))
    assert "ONNX Runtime matches eager" in out
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.slow
def test_cam_default_image(tmp_path):
    from PIL import Image

    png = tmp_path / "cam.png"
    png.write_bytes(b"an earlier heatmap")  # replaced, as asked
    run_example("cam", "--image-size", "96", "--output", str(png), "--overwrite")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (96, 96)
    assert [p.name for p in tmp_path.iterdir()] == ["cam.png"]  # no temporary left beside it


@pytest.mark.parametrize("name, output, existing, message", [
    ("export_onnx", "model.onnx", True, "already exists; pass --overwrite"),
    ("cam", "cam.png", True, "already exists; pass --overwrite"),
    ("export_onnx", "missing/model.onnx", False, "its folder does not exist"),
    ("cam", "cam.notanimage", False, "must end in an image extension"),
    ("finetune_folder", "saved/config.json", True, "already holds a saved model; pass --overwrite"),
])
def test_examples_refuse_an_output_they_would_lose_or_clobber(tmp_path, name, output, existing, message):
    """A finished file is kept unless ``--overwrite`` says otherwise; the refusal comes before any work."""
    path = tmp_path / output
    if existing:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"finished work")
    if name == "finetune_folder":  # its output is a folder (--save) that may hold a save_pretrained model
        proc = start_example(name, "--image-size", "32", "--save", str(path.parent))
    else:
        proc = start_example(name, "--image-size", "32", "--output", str(path))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == (
        [output] if existing else [])
    if existing:
        assert path.read_bytes() == b"finished work"


def test_gradio_app_imports_without_launching():
    import torch
    from PIL import Image

    import metaformer

    module = load_module("gradio_app")  # must not need gradio, nor launch anything
    if importlib.util.find_spec("gradio") is None:
        assert "gradio" not in sys.modules
    torch.manual_seed(0)
    model = metaformer.create("poolformer_s12", num_classes=3)
    model.pretrained_cfg["input_size"] = (3, 64, 64)
    predict = module.make_predict(model, labels=["cat", "dog", "bird"], top_k=2)
    scores = predict(Image.new("RGB", (80, 60), (120, 30, 200)))
    assert len(scores) == 2 and set(scores) <= {"cat", "dog", "bird"}
    assert all(0.0 <= p <= 1.0 for p in scores.values())
    assert len(module.class_names(1000)) == 1000


def test_gradio_app_asks_for_gradio_before_downloading(tmp_path):
    """Without gradio the app stops at once with the install command, before fetching any weights."""
    if importlib.util.find_spec("gradio") is not None:
        pytest.skip("gradio is installed here; this checks the message users without it get")
    # An empty, offline Hub cache: were the weights fetched first, the error would be about them instead.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "t")}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "gradio_app.py"), "--model", "poolformer_s12"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'pip install "metaformer[demo]"' in proc.stderr and "Nothing was downloaded" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "hf").exists()

