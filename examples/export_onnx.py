"""Exporting a MetaFormer to ONNX and checking ONNX Runtime against eager PyTorch.

The model is exported with ``torch.onnx.export`` (a dynamic batch axis) and run
with ONNX Runtime on a fresh batch of a different size; the outputs must match the eager model's
within ``--atol``. The pooling models' fused block (see the kernels page) is written with standard
operators, so the ``"torch"`` kernel backend exports as it is; ``--backend reference`` exports the
plain GroupNorm + AvgPool composition instead.

By default the TorchScript-based exporter (``dynamo=False``) is used, at opset 17: it needs only ``onnx``.
``--dynamo`` selects the ``torch.export``-based exporter, which also needs ``onnxscript``, at the opset that
exporter defaults to (18 and later: its operator library is written for them; PyTorch 2.8 refused opset 17
for our models, with "No ONNX function found for aten.sym_size.int"). ``--opset`` picks another.

``--output`` is written all-or-nothing (a complete file, or the previous one unchanged), and an existing
file only with ``--overwrite``.

Run::

    python examples/export_onnx.py --output poolformer_s12.onnx
    python examples/export_onnx.py --model caformer_s18 --image-size 224
"""

from __future__ import annotations

import argparse
import inspect
import os
import tempfile
import time
import warnings
from typing import Optional

import torch

import metaformer
from metaformer.files import atomic_write


def export(model: torch.nn.Module, path: str, image_size: int, opset: Optional[int] = None,
           dynamo: bool = False) -> None:
    """Writes ``model`` (in eval mode) to ``path``, one file with the weights inside, with a dynamic batch axis
    named ``batch``, at ``opset`` (None: 17 for the TorchScript-based exporter, the ``torch.export``-based
    exporter's own default with ``dynamo``)."""
    example = torch.randn(2, model.in_chans, image_size, image_size)
    accepts = inspect.signature(torch.onnx.export).parameters  # what this PyTorch's exporter takes
    with warnings.catch_warnings():
        # Tracing warns about the model's Python-level input checks; they hold for every batch size.
        warnings.simplefilter("ignore")
        if dynamo:
            # One self-contained file (all our models are far below ONNX's 2 GB limit): with external data the
            # weights would go to a second file named after `path`, which an all-or-nothing write renames alone.
            # The batch axis as a tuple in the arguments' order: PyTorch 2.6 read a dict's keys as `input_names`,
            # later releases as forward's parameter names.
            inline = {"external_data": False} if "external_data" in accepts else {}
            if opset is not None:
                inline["opset_version"] = opset
            torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["logits"], dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **inline)
        else:
            # (dynamo=False picks the TorchScript-based exporter where torch.onnx.export takes it: 2.4 and later)
            legacy = {"dynamo": False} if "dynamo" in accepts else {}
            torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["logits"],
                              opset_version=17 if opset is None else opset,
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, **legacy)


def main(argv=None) -> float:
    """Exports, checks the file with ``onnx.checker``, compares ONNX Runtime with eager; returns the max error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="poolformer_s12")
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=3, help="batch of the check (differs from the export's 2)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: 17, or with --dynamo that exporter's default)")
    parser.add_argument("--backend", default="torch", choices=["torch", "reference"],
                        help="metaformer kernel backend used while exporting")
    parser.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--output", help="where to write the .onnx file (default: a temporary file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    if args.dynamo and torch.__version__ < (2, 7):
        # (from 2.5 torch.onnx.export has the torch.export-based exporter with dynamic_shapes, but 2.6's failed on
        # these models with a dynamic batch axis: its type-promotion pass could not broadcast addcmul's and lerp's
        # per-channel operands over a symbolic batch; 2.8 and later export them)
        parser.error(f"--dynamo needs PyTorch 2.7 or later (torch.onnx.export's torch.export-based exporter, with "
                     f"a dynamic batch axis); this is PyTorch "
                     f"{torch.__version__}: upgrade it, or leave out --dynamo for the TorchScript-based exporter")
    if args.output and os.path.lexists(args.output) and not args.overwrite:
        parser.error(f"--output {args.output} already exists; pass --overwrite to replace it, or choose another name")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        parser.error(f"--output {args.output}: its folder does not exist; create it first")

    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    metaformer.set_backend(args.backend)
    model = metaformer.create(args.model, pretrained=args.pretrained).eval()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.output or os.path.join(tmp, f"{args.model}.onnx")
        start = time.perf_counter()

        def write(part: str) -> None:  # checked before it is put in place: a failing file leaves the previous one
            export(model, part, args.image_size, args.opset, args.dynamo)
            onnx.checker.check_model(part)

        atomic_write(path, write)
        imports = onnx.load(path, load_external_data=False).opset_import
        opset = next(o.version for o in imports if o.domain in ("", "ai.onnx"))
        print(f"exported {args.model} to {path} ({os.path.getsize(path) / 2**20:.1f} MiB, opset {opset}, "
              f"{time.perf_counter() - start:.1f}s)")

        x = torch.randn(args.batch_size, model.in_chans, args.image_size, args.image_size)
        with torch.no_grad():
            expected = model(x)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    actual = torch.from_numpy(actual)
    error = (actual - expected).abs().max().item()
    torch.testing.assert_close(actual, expected, atol=args.atol, rtol=1e-4)
    print(f"ONNX Runtime matches eager on a batch of {args.batch_size}: max abs difference {error:.2e} "
          f"(atol {args.atol:g})")
    return error


if __name__ == "__main__":
    main()
