"""Inference-time folding: :func:`optimize_for_inference`.

In evaluation a MetaFormer block is a chain of linear per-channel maps around a few non-linear
steps, and most of them fold into their neighbouring convolutions::

    x = res_scale1 * x + ls1 * Mixer(Norm1(x))
    x = res_scale2 * x + ls2 * fc2(act(fc1(Norm2(x))))

- ``Norm2``'s per-channel affine (``gamma * x_hat + beta``, one-group GroupNorm or channel LayerNorm)
  folds into ``fc1``: ``fc1(gamma * x_hat + beta) = (W * gamma) x_hat + (W beta + b)``. Only the
  normalisation itself (per-sample or per-position statistics) stays.
- ``ls2`` folds into ``fc2``'s weight and bias, and so do StarReLU's scale ``s`` and bias ``b``:
  ``fc2(s * relu(h)**2 + b) = (s * W2) relu(h)**2 + (W2 b 1 + b2)``; the activation left is ``relu(h)**2``.
- Pooling mixers: ``Norm1``'s weight times ``ls1`` becomes the single per-channel factor of the fused
  pooling kernel (``pool(N(x)) - N(x) = gamma * (pool(x_hat) - x_hat)``; the bias cancels), and the
  res scale one of its coefficients.
- Identity and random mixing: ``ls1`` folds into ``Norm1``'s affine (``ls * (gamma n + beta)``), and the
  res scale into the one multiply-add that follows.
- :class:`~metaformer.mixers.SepConv`, :class:`~metaformer.mixers.Attention`: ``Norm1``'s affine folds
  into their first linear map (``pwconv1`` / ``qkv``) and ``ls1`` into their last one (``pwconv2`` /
  ``proj``). A StarReLU inside SepConv keeps its bias: it is followed by the zero-padded depthwise
  convolution, under which a constant is not a constant at the borders; it runs as one in-place pass.
- Res scales of the SepConv, attention and MLP halves scale the residual stream that the next norm
  reads, not a map between two convolutions, so they stay as one multiply.

On CPU, in eager mode and without autograd, the folded halves run as oneDNN primitives on weights
pre-packed once (see :mod:`metaformer.kernels.cpu_eval`). Under ``torch.compile``, ``torch.export``,
ONNX export, on other devices or dtypes the same folded maths runs with standard PyTorch ops.
"""

from __future__ import annotations

import copy
import functools

from torch import nn

from .blocks import MetaFormerBlock
from .inference_block import InferenceBlock
from .kernels.guards import module_hooked

__all__ = ["optimize_for_inference", "InferenceBlock", "is_inference_optimized"]

def _refuse_train(model: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError(
            "this model was returned by metaformer.optimize_for_inference and is evaluation-only: its norms, "
            "layer scales and MLP weights are folded together, so it cannot be trained. Call .train() on the "
            "original model (optimize_for_inference leaves it untouched) and optimise it again after training."
        )
    return nn.Module.train(model, False)


def is_inference_optimized(model: nn.Module) -> bool:
    """Whether ``model`` was returned by :func:`optimize_for_inference`."""
    return bool(getattr(model, "_metaformer_inference_only", False))


def optimize_for_inference(model: nn.Module, *, strict: bool = False) -> nn.Module:
    """Returns an evaluation-only copy of a MetaFormer with the foldable maps folded.

    Every :class:`~metaformer.MetaFormerBlock` of the copy is replaced by an :class:`InferenceBlock`:
    the second norm's per-channel affine is folded into ``mlp.fc1``, layer scale 2 and StarReLU's scale
    and bias into ``mlp.fc2``, norm 1's weight and layer scale 1 into the fused pooling factor (pooling
    mixers), into the norm's affine (identity and random mixing) or into the mixer's first and last
    linear maps (``SepConv``, ``Attention``); on CPU the halves run as oneDNN primitives on weights
    packed once (see the module docstring). The copy computes the same function as ``model`` to float32
    rounding. ``model`` itself is not modified.

    Parts that cannot be folded exactly, such as a block whose norm is a user-written class, a custom
    token mixer or scale module, are kept as they are (the result stays exact), unless ``strict=True``.
    So is a block with hooks on it or on one of its parts (a probe, a pruning mask): folding would replace
    the modules those hooks belong to.

    Calling ``.train()`` on the result raises ``RuntimeError``; ``.eval()`` is allowed.

    Args:
        model: A MetaFormer (or any module containing MetaFormer blocks), in eval mode.
        strict: Refuse (``ValueError``) instead of keeping a part that cannot be folded.

    Returns:
        The folded copy, in eval mode, with ``requires_grad=False`` parameters.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.
        RuntimeError: If ``model`` (or any submodule) is in training mode.
        ValueError: With ``strict=True``, if some block part cannot be folded; the message lists them.

    Example:
        >>> model = metaformer.create("poolformer_s12", pretrained=True).eval()
        >>> fast = metaformer.optimize_for_inference(model)
        >>> with torch.inference_mode():
        ...     logits = fast(images)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        more = f" (and {len(training) - 3} more)" if len(training) > 3 else ""
        raise RuntimeError(
            f"optimize_for_inference needs a model in eval mode, but {', '.join(training[:3])}{more} "
            "is in training mode: folding bakes in evaluation-time behaviour (no dropout, no stochastic "
            "depth), so it would change a training model's results. Call model.eval() first."
        )
    out = copy.deepcopy(model)
    problems: list[str] = []
    for parent_name, parent in list(out.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, MetaFormerBlock):
                continue
            if type(child) is not MetaFormerBlock:
                problems.append(f"{_join(parent_name, child_name)}: block subclass {type(child).__name__}")
                continue
            if any(module_hooked(m) for m in child.modules()):
                # Folding replaces the block and its parts, and their hooks (a probe, a pruning mask) with them.
                problems.append(f"{_join(parent_name, child_name)}: hooks on the block or its parts (kept, so they run)")
                continue
            new, skipped = InferenceBlock.from_block(child)
            problems.extend(f"{_join(parent_name, child_name)}: {why}" for why in skipped)
            setattr(parent, child_name, new)
    if strict and problems:
        raise ValueError(
            "optimize_for_inference(strict=True) cannot fold these parts exactly:\n  " + "\n  ".join(problems)
            + "\nUse the built-in norms (GroupNorm1, LayerNorm2d), mixers and Scale, or call with strict=False "
            "to keep those parts unfolded (the result stays exact)."
        )
    out.requires_grad_(False)
    nn.Module.train(out, False)
    out.inference_skipped = problems
    out._metaformer_inference_only = True
    out.train = functools.partial(_refuse_train, out)
    return out


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b
