"""Models and measurements shared by the CPU benchmarks: timm's side, FLOP counts, peak memory, the
results file of the small ones.

timm has no IdentityFormer or RandFormer; their timm side is timm's own ``MetaFormer`` class built with
the released configuration (``GroupNorm1NoBias``, StarReLU, res scales in stages 3-4, no MLP head, as
timm's ``poolformerv2_s12``) and the release's mixers: ``nn.Identity``, and a random-mixing module
written as the original code computes it (a frozen row-softmax matrix applied over the positions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import timm
import torch
import torch.nn.functional as F
from timm.models.metaformer import GroupNorm1NoBias, MetaFormer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import metaformer
from metaformer.cli.benchmark import peak_rss_bytes
from metaformer.files import write_text

MODELS = ("poolformer_s12", "poolformerv2_s12", "identityformer_s12", "randformer_s12", "convformer_s18",
          "caformer_s18")


class TimmRandomMixing(nn.Module):
    """The original release's RandomMixing, on the NCHW tensors timm's non-attention stages use."""

    def __init__(self, dim=None, num_tokens=196, **kwargs):
        super().__init__()
        self.random_matrix = nn.Parameter(torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1),
                                          requires_grad=False)

    def forward(self, x):
        b, c, h, w = x.shape
        return torch.einsum("mn,bcn->bcm", self.random_matrix, x.reshape(b, c, h * w)).reshape(b, c, h, w)


def _random_mixing(num_tokens: int) -> type:
    return type(f"TimmRandomMixing{num_tokens}", (TimmRandomMixing,),
                {"__init__": lambda self, dim=None, **kw: TimmRandomMixing.__init__(self, dim, num_tokens)})


def timm_model(name: str) -> nn.Module:
    """timm's model of ``name`` (or timm's MetaFormer class in the release's configuration)."""
    if name in ("identityformer_s12", "randformer_s12"):
        if name == "identityformer_s12":
            mixers = nn.Identity
        else:
            # timm's stage checks issubclass(mixer, Attention): classes, not partials
            mixers = [nn.Identity, nn.Identity, _random_mixing(196), _random_mixing(49)]
        return MetaFormer(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), token_mixers=mixers,
                          norm_layers=GroupNorm1NoBias, use_mlp_head=False)
    return timm.create_model(name)


def ours(name: str) -> nn.Module:
    return metaformer.create(name)


def flops_per_image(name: str, size: int) -> float:
    """2 x the multiply-accumulates of convolutions, linear maps, matrix products and attention, at batch 1.

    Counted by ``torch.utils.flop_counter`` on our model through the plain composition (the oneDNN
    primitives of the fast paths are invisible to the counter).
    """
    model = ours(name).eval()
    previous = metaformer.get_backend()
    metaformer.set_backend("reference")
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.randn(1, 3, size, size))
    finally:
        metaformer.set_backend(previous)
    return float(counter.get_total_flops())


def gemm_peak(n: int = 2048, reps: int = 5) -> float:
    """The machine's fp32 GEMM rate (FLOP/s): the best of ``reps`` n x n x n ``torch.mm``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def train_step_fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """One step: forward, cross-entropy, backward, SGD with momentum (the optimiser's state included)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    return step


def make_variant(name: str, variant: str, train: bool, batch: int, size: int):
    """``(callable, input)`` for one benchmark variant (see bench_cpu.VARIANTS)."""
    if variant == "floor":
        return floor_variant(name, train, batch, size), None
    if variant == "floor_passes":
        return floor_passes_variant(name, batch, size, train), None
    side, _, how = variant.partition("_")
    model = timm_model(name) if side == "timm" else ours(name)
    model.train(train)
    x = torch.randn(batch, 3, size, size)
    if "cl" in how.split("_"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if how == "optimized":
        model = metaformer.optimize_for_inference(model)
    if "compiled" in how.split("_"):
        model = torch.compile(model)
    if train:
        target = torch.randint(0, 1000, (batch,))
        return train_step_fn(model, x, target), x
    return (lambda: model(x)), x


def record_calls(model: nn.Module, x: torch.Tensor) -> list:
    """(module, input shape, channels_last?) of every Conv2d / Linear call of one forward, in order; for every
    :class:`~metaformer.Attention`, (mixer, shape of q, k and v, False): its attention product; and for every
    :class:`~metaformer.RandomMixing`, (mixer, shape of its tokens (B, H*W, C), False): its matrix product."""
    from metaformer import Attention, RandomMixing

    calls, hooks = [], []

    def hook(module, inputs, _output):
        t = inputs[0]
        cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        calls.append((module, tuple(t.shape), cl))

    def attention_hook(mixer, inputs):
        b, _c, h, w = inputs[0].shape
        calls.append((mixer, (b, mixer.num_heads, h * w, mixer.head_dim), False))

    def random_mixing_hook(mixer, inputs):
        b, c, h, w = inputs[0].shape
        calls.append((mixer, (b, h * w, c), False))

    for m in model.modules():
        if type(m) in (nn.Conv2d, nn.Linear):
            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, Attention):  # its qkv / proj hooks record after this one: the product sits between
            hooks.append(m.register_forward_pre_hook(attention_hook))
        elif isinstance(m, RandomMixing):
            hooks.append(m.register_forward_pre_hook(random_mixing_hook))
    _run_plain(model, x, hooks)
    return calls


def _run_plain(model: nn.Module, x: torch.Tensor, hooks: list) -> None:
    """One forward of ``model``'s plain composition (the ``"reference"`` backend: it calls every module, where
    the fast paths call oneDNN directly) without gradients, for the recording ``hooks``, removed after it."""
    import metaformer.kernels as K

    before = K.get_backend()
    K.set_backend("reference")
    try:
        with torch.no_grad():
            model(x)
    finally:
        K.set_backend(before)
        for h in hooks:
            h.remove()


def _floor_call(module: nn.Module, train: bool = False):
    """What the floor runs for one recorded call: the module itself, an attention mixer's product
    (``scaled_dot_product_attention``, the kernel timm's attention and ours both use) on q = k = v, or a
    random-mixing mixer's matrix product over the positions (tokens (B, H*W, C)). In training a depthwise
    convolution runs as our SepConv's node (:class:`metaformer.kernels.sepconv_train.DepthwiseConvFunction`):
    ``nn.Conv2d``'s backward takes its weight gradient ~10x slower than the forward, which a floor must not
    charge where the model does not."""
    if train and _depthwise(module):
        from metaformer.kernels.sepconv_train import DepthwiseConvFunction

        return lambda t: DepthwiseConvFunction.apply(t, module.weight, module.bias, module.padding)
    if type(module) in (nn.Conv2d, nn.Linear):
        return module
    if isinstance(module, metaformer.RandomMixing):
        return lambda t: torch.matmul(module.random_matrix, t)
    return lambda t: F.scaled_dot_product_attention(t, t, t, scale=module.scale)


def _depthwise(module: nn.Module) -> bool:
    """A depthwise convolution our SepConv's training node takes (SepConv's; more than one channel)."""
    from metaformer.kernels.folding import plain_depthwise

    return plain_depthwise(module) and module.groups > 1


def _packed_conv(module: nn.Module, shape: tuple):
    """An inference call of Conv2d ``module`` as a oneDNN primitive on its weight packed once for inputs shaped
    ``shape`` (what the fast paths run), or None where that does not apply. ``nn.Conv2d`` itself reorders
    its weight on every call: a floor built from it is slower than a packed model (convformer_s18 at batch 1:
    66 ms against ours' 58), so it would not bound what a model can reach."""
    from metaformer.kernels import onednn

    if not (type(module) is nn.Conv2d and onednn.ONEDNN_AVAILABLE and module.dilation == (1, 1)
            and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
            and len(set(module.padding)) == 1 and len(set(module.stride)) == 1):
        return None
    pad, stride, groups = module.padding[0], module.stride[0], module.groups
    weight = onednn.prepack(module.weight.detach(), pad, groups, shape, stride=stride)
    bias = None if module.bias is None else module.bias.detach()
    return lambda t: onednn.conv(t, weight, bias, "none", pad, groups, stride=stride)


def floor_fn(calls: list, train: bool):
    """A callable running just the recorded convolutions / linears / attention products (forward, or forward
    and backward). In inference the convolutions run on weights packed once (:func:`_packed_conv`); in
    training the depthwise ones through our node (:func:`_floor_call`)."""
    fns = [(None if train else _packed_conv(m, shape)) or _floor_call(m, train) for m, shape, _ in calls]
    inputs = []
    for _module, shape, cl in calls:
        t = torch.randn(shape)
        if cl:
            t = t.contiguous(memory_format=torch.channels_last)
        inputs.append(t.requires_grad_(train and bool(inputs)))  # the stem's input is the image: no gradient
    grads = None
    if train:
        with torch.no_grad():
            grads = [torch.randn_like(f(t)) for f, t in zip(fns, inputs)]

    def run():
        if not train:
            with torch.inference_mode():
                for f, t in zip(fns, inputs):
                    f(t)
            return
        for f, t, g in zip(fns, inputs, grads):
            f(t).backward(g)
        for m, _, _ in calls:
            for p in m.parameters():
                p.grad = None

    return run


def floor_variant(name: str, train: bool, batch: int, size: int):
    """The ``floor`` variant: just the convolutions, linears and attention products of our model on the batch
    (see bench_cpu)."""
    model = ours(name).train(train).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    return floor_fn(record_calls(model, x), train)


def record_passes(model: nn.Module, x: torch.Tensor, train: bool = False) -> list:
    """The passes over whole tensors that an implementation built from PyTorch's CPU primitives runs besides
    the floor's products, recorded on the plain composition: ``(kind, argument, shape, channels_last?)``.

    - ``"norm"``: a norm whose output a product takes (the MLP half's; a SepConv, attention or random-mixing
      mixer's; the stem's and the downsampling's). No oneDNN primitive that PyTorch exposes takes a
      normalised input, so the norm is written out (:func:`metaformer.kernels.folding.normalise` with a
      weight of ones: PyTorch's vectorised kernel).
    - ``"stats"``: a pooling or identity mixer's norm, and PoolFormer v1's final norm, whose outputs no product
      takes: their statistics only, one reduction pass (``mean``).
    - ``"pool"``: a pooling mixer's ``avg_pool2d``.
    - ``"square"``: StarReLU's and squared ReLU's square of the hidden tensor, in place (the ReLU is a
      oneDNN post-op; no post-op that PyTorch exposes squares).
    - ``"gelu"`` (``train`` only): a GELU's backward, one pass (its forward is taken as a post-op, free).
    - ``"residual"`` (``train`` only): each of a block's two residual additions, in the backward: the branch's
      input gradient added to the output's (ATen's norm backward, the branch's last, cannot add into a
      gradient; the forward addition is taken as a oneDNN ``sum`` post-op, free).

    Everything else is left out, as if it were free: residual additions, layer and res scales, the pooling
    half's combination, GELU and ReLU (post-ops), and the head. The list is a lower bound. In training each
    pass also runs its backward (:func:`_train_pass`), and the gradients of residual additions, scales and
    norm affines are left out as free too.
    """
    from metaformer.kernels.folding import norm_kind

    passes, hooks = [], []

    def cl(t: torch.Tensor) -> bool:
        return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    def recorder(kind: str, arg):
        def hook(_module, inputs):
            t = inputs[0]
            if t.dim() == 4:
                passes.append((kind, arg, tuple(t.shape), cl(t)))
        return hook

    stats_only = set()
    for name, m in model.named_modules():
        if isinstance(m, metaformer.MetaFormerBlock) and type(m.token_mixer) in (metaformer.Pooling,
                                                                                  metaformer.Identity):
            stats_only.add(id(m.norm1))
        elif name.startswith("head"):  # PoolFormer v1's final norm on the map: only averaged after it
            stats_only.add(id(m))
    for m in model.modules():
        kind = norm_kind(m)
        if kind is not None:
            hook = recorder("stats" if id(m) in stats_only else "norm", (kind, float(m.eps)))
        elif type(m) is metaformer.Pooling:
            hook = recorder("pool", m.pool_size)
        elif type(m) in (metaformer.StarReLU, metaformer.SquaredReLU):
            hook = recorder("square", None)
        elif train and type(m) is nn.GELU:
            hook = recorder("gelu", m.approximate)
        elif train and isinstance(m, metaformer.MetaFormerBlock):
            residual = recorder("residual", None)

            def hook(module, inputs, residual=residual):  # its two additions
                residual(module, inputs)
                residual(module, inputs)
        else:
            continue
        hooks.append(m.register_forward_pre_hook(hook))
    _run_plain(model, x, hooks)
    return passes


def _pass_call(kind: str, arg):
    from metaformer.kernels.folding import normalise

    if kind == "norm":
        norm, eps = arg
        return lambda t: normalise(norm, t, eps, t.new_ones(t.shape[1]))
    if kind == "stats":
        return lambda t: t.mean((1, 2, 3) if arg[0] == "gn" else 1)
    if kind == "pool":
        return lambda t: F.avg_pool2d(t, arg, 1, arg // 2, count_include_pad=False)
    return lambda t: t.square_()  # on ones: the values stay 1 (no overflow, no subnormals)


def _norm_backward(norm: str, t: torch.Tensor, eps: float):
    """``g -> dL/dt`` for the norm of ``t`` without affine: our MLP node's norm backward (ATen's fused kernel),
    on the statistics its forward leaves, computed once here."""
    from metaformer.kernels.autograd_halves import _norm_backward, _norm_forward, _rows

    _, mean, rstd = _norm_forward(norm, t, eps)
    return lambda g: _norm_backward(norm, _rows(g), t, mean, rstd)


def _train_pass(kind: str, arg, t: torch.Tensor, g: torch.Tensor | None = None):
    """``(forward, backward)`` of one pass in training on ``t``: callables of no argument, the backward on the
    output gradient ``g`` (by default one made here). Each is the least the pass needs: a norm's forward as in inference and ATen's
    norm backward (for ``"stats"`` too: the input's gradient goes through the whole norm); the pooling's
    ``avg_pool2d`` and its backward; the square in place and, for its backward, one product of the output
    gradient with the kept ``relu(h)`` (StarReLU's scale and bias gradients, reductions, left out); a GELU's
    ``gelu_backward`` alone; a residual addition's backward, one in-place addition of two gradients (of zeros
    into ``t``: its values stay)."""
    if g is None:
        g = torch.ones_like(t) if kind == "square" else torch.zeros_like(t) if kind == "residual" \
            else torch.randn_like(t)
    if kind == "residual":
        return (lambda: None), (lambda: t.add_(g))
    if kind in ("norm", "stats"):
        backward = _norm_backward(arg[0], t, arg[1])
        return (lambda: _pass_call(kind, arg)(t)), (lambda: backward(g))
    if kind == "pool":
        pad = arg // 2
        return (lambda: _pass_call(kind, arg)(t)), \
            (lambda: torch.ops.aten.avg_pool2d_backward(g, t, [arg, arg], [1, 1], [pad, pad], False, False, None))
    if kind == "square":
        return (lambda: t.square_()), (lambda: torch.mul(g, t))
    return (lambda: None), (lambda: torch.ops.aten.gelu_backward(g, t, approximate=arg))


def passes_fn(passes: list, train: bool = False):
    """A callable running the recorded passes (see :func:`record_passes`): in model order, and in training
    then their backwards in reverse order (:func:`_train_pass`). In inference passes of one kind, shape and
    layout share their input, as a model's blocks of one stage reuse their memory (no cache misses are
    counted that the model would not pay); in training each pass has its own, as a step keeps every block's
    activations for the backward."""
    inputs, shared = [], {}
    for i, (kind, _arg, shape, cl) in enumerate(passes):
        key = (kind == "square", shape, cl, i if train else None)
        if key not in shared:
            t = torch.ones(shape) if kind == "square" else torch.randn(shape)
            shared[key] = t.contiguous(memory_format=torch.channels_last) if cl else t
        inputs.append(shared[key])
    if train:
        steps = [_train_pass(kind, arg, t) for (kind, arg, _, _), t in zip(passes, inputs)]

        def run_train():
            with torch.no_grad():
                for forward, _ in steps:
                    forward()
                for _, backward in reversed(steps):
                    backward()
        return run_train
    fns = [_pass_call(kind, arg) for kind, arg, _, _ in passes]

    def run():
        with torch.inference_mode():
            for f, t in zip(fns, inputs):
                f(t)
    return run


def optimizer_fn(model: nn.Module):
    """A callable running one SGD-with-momentum step (:func:`train_step_fn`'s optimiser) over copies of
    ``model``'s parameters with gradients, in PyTorch's fused form where it is available (the fastest here:
    convformer_s18's step 10.8 ms against 14.2 for the default loop and 19.5 for ``foreach``)."""
    params = [p.detach().clone() for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    try:
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True)
        opt.step()
    except (RuntimeError, TypeError):  # no fused CPU SGD in this torch
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return opt.step


def floor_passes_variant(name: str, batch: int, size: int, train: bool = False):
    """The ``floor_passes`` variant: the floor's products, then the passes of :func:`record_passes` (see
    bench_cpu); in training both forward and backward, then the optimiser's step (:func:`optimizer_fn`)."""
    model = ours(name).train(train).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    products = floor_fn(record_calls(model, x), train)
    passes = passes_fn(record_passes(model, x, train), train)
    step = optimizer_fn(model) if train else (lambda: None)

    def run():
        products()
        passes()
        step()
    return run


def peak_memory_subprocess(name: str, variant: str, batch: int, size: int, steps: int = 2,
                           threads: int | None = None) -> dict:
    """Peak RSS of training steps of one variant, in a fresh process (``VmHWM``: see
    :func:`metaformer.cli.benchmark.peak_rss_bytes`).

    Returns the process's peak RSS and the increase over its RSS after building the model, optimiser
    and batch (MiB): what the training steps themselves took at their peak (activations kept for the
    backward, gradients, momentum buffers, workspace).
    """
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import cpu_models as c; "
            f"print(c._memory_child({name!r}, {variant!r}, {batch}, {size}, {steps}, {threads!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_child(name, variant, batch, size, steps, threads):
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    step, _ = make_variant(name, variant, True, batch, size)
    base = _rss_mb()
    for _ in range(steps):
        step()
    peak = peak_rss_bytes() / 2 ** 20  # VmHWM: ru_maxrss would be this benchmark's own peak (fork)
    return json.dumps({"peak_rss_mib": peak, "base_rss_mib": base, "train_peak_mib": peak - base})


def write_results(output, setup: dict, results: dict) -> None:
    """Writes a small CPU benchmark's figures to ``output`` as JSON, ``{"setup": ..., "results": ...}``, with
    the thread count and torch version added to ``setup`` (all-or-nothing); nothing where ``output`` is None."""
    if output is None:
        return
    setup = {**setup, "threads": torch.get_num_threads(), "torch": torch.__version__}
    write_text(output, json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    print(f"wrote {output}")
