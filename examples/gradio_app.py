"""A small Gradio web app that classifies an uploaded image with a MetaFormer.

The app shows the top-k classes of the image with their probabilities. Gradio is an optional
dependency (``pip install "metaformer[demo]"``): this module imports without it, and :func:`main`
checks for it first, before any weights are downloaded; nothing is launched on import. The default
model downloads its ImageNet weights once (network access, or a filled Hugging Face cache);
``--random-weights`` or ``--from-pretrained DIR`` need no network. The preprocessing follows the
model's ``pretrained_cfg`` (resize to ``input_size / crop_pct``, center crop, mean/std), so the
released weights see images as they were evaluated.

Run::

    python examples/gradio_app.py                                  # poolformer_s12, ImageNet weights
    python examples/gradio_app.py --model caformer_s18 --share
    python examples/gradio_app.py --from-pretrained ./my_model --labels cat dog
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Sequence
from typing import Callable

import torch
from PIL import Image
from torchvision import transforms

import metaformer


def eval_transform(cfg: dict) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform described by a ``pretrained_cfg``."""
    size = cfg.get("input_size", (3, 224, 224))[-1]
    interpolation = transforms.InterpolationMode(cfg.get("interpolation", "bicubic"))
    return transforms.Compose([
        transforms.Resize(math.floor(size / cfg.get("crop_pct", 1.0)), interpolation=interpolation),
        transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(cfg.get("mean", metaformer.zoo.IMAGENET_MEAN), cfg.get("std", metaformer.zoo.IMAGENET_STD)),
    ])


def class_names(num_classes: int, labels: Sequence[str] | None = None) -> list:
    """Given labels, ImageNet-1k's names for 1000 classes (from timm), else ``class 0``, ``class 1``..."""
    if labels:
        if len(labels) != num_classes:
            raise ValueError(f"got {len(labels)} labels for a model with {num_classes} classes")
        return list(labels)
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]
    return [f"class {i}" for i in range(num_classes)]


def make_predict(model: torch.nn.Module, labels: Sequence[str] | None = None,
                 top_k: int = 5) -> Callable[[Image.Image], dict[str, float]]:
    """A function mapping a PIL image to ``{label: probability}`` for the ``top_k`` classes."""
    model.eval()
    transform = eval_transform(model.pretrained_cfg)
    names = class_names(model.num_classes, labels)

    @torch.no_grad()
    def predict(image: Image.Image) -> dict[str, float]:
        if image is None:
            return {}
        probs = model(transform(image.convert("RGB")).unsqueeze(0)).softmax(-1)[0]
        top = probs.topk(min(top_k, len(names)))
        return {names[i]: float(p) for p, i in zip(top.values, top.indices)}

    return predict


NEEDS_GRADIO = ('examples/gradio_app.py needs gradio, which is not installed: pip install "metaformer[demo]" '
                '(or pip install gradio), then run it again. Nothing was downloaded.')


def require_gradio() -> None:
    """Exits with an install hint when gradio is missing (the app checks this before fetching weights)."""
    if importlib.util.find_spec("gradio") is None:
        raise SystemExit(NEEDS_GRADIO)


def build_app(predict: Callable[[Image.Image], dict[str, float]], title: str, top_k: int = 5):
    """The Gradio interface around ``predict`` (imports gradio)."""
    require_gradio()
    import gradio as gr

    return gr.Interface(fn=predict, inputs=gr.Image(type="pil", label="image"),
                        outputs=gr.Label(num_top_classes=top_k, label="prediction"), title=title,
                        description="Upload an image; the model returns its most likely classes.")


def main(argv=None) -> None:
    """Parses the arguments, builds the model and launches the app (blocking)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="poolformer_s12", help="registered model name, optionally name.tag")
    parser.add_argument("--random-weights", action="store_true", help="skip the download (the answers are noise)")
    parser.add_argument("--from-pretrained", metavar="DIR", help="a folder or Hub repo written by save_pretrained")
    parser.add_argument("--labels", nargs="+", help="class names of a fine-tuned model, in class order")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    args = parser.parse_args(argv)

    require_gradio()  # before anything is downloaded or built
    if args.from_pretrained:
        model = metaformer.MetaFormer.from_pretrained(args.from_pretrained)
        title = f"MetaFormer ({args.from_pretrained})"
    else:
        model = metaformer.create(args.model, pretrained=not args.random_weights)
        title = f"{args.model} ({'random weights' if args.random_weights else model.pretrained_cfg.get('tag')})"
    app = build_app(make_predict(model, args.labels, args.top_k), title, args.top_k)
    app.launch(server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
