"""The Triton block halves (kernels/cuda_halves.py) under Triton's interpreter: ``python tests/cuda_halves_suite.py``.

Run by test_kernels_cuda_halves.py in a subprocess with ``TRITON_INTERPRET=1`` (set before triton is
imported) and the ``"triton"`` backend forced. Each function's output and the gradients of the input
and of every parameter equal those of the block's own halves (``mixer_half``, ``mlp_half``, both in
turn for ``ln_block``) under the same random stream: fp32 within rtol 1e-5, fp64 within 1e-9, in eval
and in training, drop path on and off, for a real CAFormer block (timm's ``caformer_s18`` stage 2:
attention, res scales) and hand-built ones (SepConv, layer and res scales, a norm bias, channels_last,
tiny tiles so that several programs run), and the cases that must return None. Prints ``passed``.
"""

from __future__ import annotations

import functools
import sys
import time

import torch
from helpers import graph_node_names
from triton_suite_common import exit_if_interpreter_defect

import metaformer
import metaformer.kernels as K
from metaformer import MetaFormerBlock
from metaformer.kernels import cuda_halves as H
from metaformer.kernels import triton_ln
from metaformer.layers import DropPath, GroupNorm1, LayerNorm2d, Scale, StarReLU
from metaformer.mixers import Identity, SepConv

TOL = {torch.float32: 1e-5, torch.float64: 1e-9}
PAIRS = {  # ours -> the block's own composition
    "ln_mixer_half": (H.ln_mixer_half, lambda b, x: b.mixer_half(x)),
    "starrelu_mlp_half": (H.starrelu_mlp_half, lambda b, x: b.mlp_half(x)),
    "ln_block": (H.ln_block, lambda b, x: b.mlp_half(b.mixer_half(x))),
}
# The dispatch (the block's own forward) picks these halves on CUDA, here under the interpreter.
DISPATCH = {"block_forward": (lambda b, x: b(x), lambda b, x: b.mlp_half(b.mixer_half(x)))}
# A Stem's and a Downsample's own forward (kernels.stem_forward, downsample_forward) -> their plain composition.
EDGES = {"stem": (lambda m, x: m(x), lambda m, x: m.norm(m.conv(x))),
         "downsample": (lambda m, x: m(x), lambda m, x: m.conv(m.norm(x)))}
# A 1x1 convolution and a SepConv mixer through the halves' own forms (cuda_halves._pointwise, _mix).
PARTS = {"pointwise": (lambda m, x: H._pointwise(m, x), lambda m, x: m(x)),
         "mix": (lambda m, x: H._mix(m, x), lambda m, x: m(x))}
FUNCTIONS = {**PAIRS, **DISPATCH, **EDGES, **PARTS}  # what check() and check_inference() can compare
SEED = 3  # draws a drop-path mask of 4 samples with some dropped and some kept (asserted)


def randomize_(block: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter away from its initial value (scales near 1, biases and StarReLU's bias near 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.copy_(p + 0.3 * noise if p.dim() <= 1 else p + 0.05 * noise)
    return block


def run(fn, block, x):
    """(output, {name: gradient}) for the input and every parameter, from the same random stream."""
    block.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(True)
    torch.manual_seed(SEED)
    out = fn(block, xg)
    assert out is not None
    names = ["input"] + [n for n, p in block.named_parameters() if p.requires_grad]
    leaves = [xg] + [p for p in block.parameters() if p.requires_grad]
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, gout, allow_unused=True)
    return out.detach(), {n: g for n, g in zip(names, grads)}


def check(block, x, which=tuple(PAIRS), label="", modes=(False, True)):
    """Every function of ``which`` against the block's halves, in eval and / or training (``modes``).

    Gradients of the parameters are sums over every position: their tolerance is relative to their largest
    entry as well (cancellation in a sum of the other order)."""
    tol = TOL[x.dtype]
    for training in modes:
        block.train(training)
        for name in which:
            ours, plain = FUNCTIONS[name]
            got, got_g = run(ours, block, x)
            want, want_g = run(plain, block, x)
            where = f"{label} {name} {'train' if training else 'eval'}"
            assert got.dtype == want.dtype, (where, got.dtype, want.dtype)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, w=where: f"{w} output: {m}")
            for key, w in want_g.items():
                g = got_g[key]
                assert (g is None) == (w is None), (where, key)
                if w is not None:
                    atol = tol * max(1.0, w.abs().max().item())
                    torch.testing.assert_close(g, w, rtol=tol, atol=atol, msg=lambda m, k=f"{where} d {key}": f"{k}: {m}")


def hand_block(dim=8, norm_bias=True, drop_path=0.5, norm=None, act=StarReLU, mixer=SepConv, dtype=torch.float32):
    norm = norm or functools.partial(LayerNorm2d, eps=1e-6, bias=norm_bias)
    block = MetaFormerBlock(dim, token_mixer=mixer, norm_layer=norm, act_layer=act, mlp_bias=False,
                            drop_path=drop_path, layer_scale_init_value=0.7, res_scale_init_value=1.3)
    return randomize_(block).to(dtype)


def group_real_block() -> None:
    """caformer_s18's first stage-2 block (Attention, res scales, LayerNorm2d without bias, StarReLU)."""
    torch.manual_seed(0)
    block = metaformer.create("caformer_s18", drop_path_rate=0.3).stages[2].blocks[1]
    assert type(block.norm1) is LayerNorm2d and type(block.mlp.act) is StarReLU
    assert block.drop_path1.drop_prob > 0, block.drop_path1
    randomize_(block)
    check(block, torch.randn(2, 320, 2, 3), label="caformer_s18 stage 2", modes=(True,))


def group_dispatch() -> None:
    """The blocks' own forward (kernels.dispatch) takes these halves, in training: caformer (LayerNorm,
    attention), convformer (SepConv), poolformerv2 and identityformer (GroupNorm, StarReLU MLP), poolformer v1
    (the fused pooling half, then the GroupNorm + GELU MLP half) and the token-mixer study's spatial-MLP
    stage (GroupNorm + SpatialMLP, then GroupNorm + GELU); and in inference, where the GroupNorm halves run
    the norm in the input's layout."""
    torch.manual_seed(0)
    for name, stage, dim, hw in (("caformer_s18", 2, 320, (3, 2)), ("convformer_s18", 0, 64, (3, 2)),
                                 ("poolformerv2_s12", 0, 64, (3, 2)), ("identityformer_s12", 1, 128, (3, 2)),
                                 ("poolformer_s12", 0, 64, (3, 2)), ("metaformer_pppf_s12_224", 3, 512, (7, 7))):
        block = randomize_(metaformer.create(name, drop_path_rate=0.3).stages[stage].blocks[1])
        check(block, torch.randn(2, dim, *hw), which=("block_forward",), label=name, modes=(True,))
        check_inference(block, torch.randn(2, dim, *hw), ("block_forward",), f"{name} inference")


def group_hand_blocks() -> None:
    """SepConv blocks with every scale and a norm bias: fp32 and fp64, NCHW and channels_last, drop path
    on and off, tiny tiles (several position tiles, backward splits and StarReLU programs)."""
    torch.manual_seed(SEED)  # the mask the checks draw: some samples dropped, some kept
    mask = torch.empty(4, 1, 1, 1).bernoulli_(0.5)
    assert 0 < mask.sum() < 4, mask.view(-1)
    small = dict(tile=64, nchw_min_positions=4, bwd_iters=2, ew_block=128, ew_bwd_iters=2)
    x = torch.randn(4, 8, 3, 5)
    with triton_ln.configured(**small):
        check(hand_block(), x, label="fp32 drop path 0.5, tiny tiles", modes=(True,))
    check(hand_block(), x[:2], label="fp32 eval", modes=(False,))
    check(hand_block(drop_path=0.0, norm_bias=False), x.contiguous(memory_format=torch.channels_last),
          label="channels_last, drop path 0", which=("ln_block",), modes=(True,))
    check(hand_block(dtype=torch.float64), x.double(), label="fp64 drop path 0.5", which=("ln_block",), modes=(True,))
    # the drop path really drops: training differs from eval on the dropped samples
    block = hand_block()
    x = torch.randn(4, 8, 5, 7)
    with torch.no_grad():
        torch.manual_seed(SEED)
        train = H.ln_block(block.train(), x)
        ev = H.ln_block(block.eval(), x)
    differs = (train - ev).flatten(1).abs().amax(1) > 1e-3
    assert differs.any(), differs


def group_partial_cover() -> None:
    """A GroupNorm block with StarReLU (the MLP half's activation alone) and a LayerNorm block with GELU
    (the norm alone); the functions a block does not fit return None."""
    gn = hand_block(norm=functools.partial(GroupNorm1, eps=1e-6, bias=False), mixer=Identity)
    x = torch.randn(4, 8, 3, 3)
    check(gn, x, which=("starrelu_mlp_half",), label="GroupNorm + StarReLU", modes=(True,))
    xg = x.clone().requires_grad_(True)  # (in inference the GroupNorm mixer half applies: group_groupnorm)
    assert H.ln_mixer_half(gn, xg) is None and H.ln_block(gn, x) is None
    gelu = hand_block(act=torch.nn.GELU)
    check(gelu, x, which=("starrelu_mlp_half", "ln_block"), label="LayerNorm2d + GELU", modes=(True,))
    other = hand_block(norm=functools.partial(torch.nn.GroupNorm, 1), act=torch.nn.GELU)  # not the library's norm
    assert all(fn(other, x) is None for fn, _ in PAIRS.values())
    # a subclass of the mixer half's layer scale or drop path may change the maths ln_block fuses: the whole
    # block does not apply (the block's forward then runs the halves, the same values)
    for part, base in (("layer_scale1", Scale), ("drop_path1", DropPath)):
        own = hand_block()
        getattr(own, part).__class__ = type(f"Own{base.__name__}", (base,), {})
        assert H.ln_block(own, x) is None, part
        check(own, x, which=("block_forward",), label=f"own {part}", modes=(True,))


def check_inference(block, x, which, label=""):
    """Every function of ``which`` against the block's halves where autograd needs no graph (eval,
    ``torch.no_grad``): the same output, dtype and values (fp32 1e-5, fp64 1e-9)."""
    tol = TOL[x.dtype]
    block.eval()
    with torch.no_grad():
        for name in which:
            ours, plain = FUNCTIONS[name]
            got, want = ours(block, x), plain(block, x)
            assert got is not None, (label, name)
            assert got.dtype == want.dtype, (label, name, got.dtype, want.dtype)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, w=f"{label} {name}": f"{w}: {m}")


def group_groupnorm() -> None:
    """PoolFormer v1's parts, a one-group GroupNorm with bias and GELU: in inference the norm runs in the
    input's layout (folding.group_norm1) and both halves equal the block's, fp32 and fp64, NCHW and
    channels_last, under autocast too; a channels_last input gives a channels_last norm and first
    convolution (ATen's GroupNorm returns NCHW on CUDA). In training (a graph needed) ATen's GroupNorm
    runs: the GELU block's halves do not apply, the StarReLU block's MLP half takes the activation alone."""
    block = hand_block(norm=GroupNorm1, act=torch.nn.GELU, mixer=SepConv, drop_path=0.5)
    x = torch.randn(4, 8, 5, 3) * 2.0 + 0.7  # a mean away from zero
    cl = x.contiguous(memory_format=torch.channels_last)
    both = ("ln_mixer_half", "starrelu_mlp_half")
    check_inference(block, x, both, "GroupNorm1 + GELU fp32")
    check_inference(block, cl, both, "GroupNorm1 + GELU channels_last")
    check_inference(hand_block(norm=GroupNorm1, act=torch.nn.GELU, dtype=torch.float64), x.double(), both,
                    "GroupNorm1 + GELU fp64")
    star = hand_block(norm=functools.partial(GroupNorm1, eps=1e-6, bias=False), mixer=Identity)
    check_inference(star, cl, both, "GroupNorm1 + StarReLU channels_last")
    assert H.ln_block(block, x) is None
    block.train()
    xg = x.clone().requires_grad_(True)
    assert H.ln_mixer_half(block, xg) is None and H.starrelu_mlp_half(block, xg) is None  # training: ATen's norm
    with torch.no_grad():
        block.eval()
        n = H._normalised(block.norm2, cl)
        h = block.mlp.fc1(n)
        assert n.is_contiguous(memory_format=torch.channels_last) and h.is_contiguous(
            memory_format=torch.channels_last), (n.stride(), h.stride())
        # autocast: written in the dtype the 1x1 convolution casts to, as the plain half's values
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = H.starrelu_mlp_half(block, cl), block.mlp_half(cl)
            n = H._normalised(block.norm2, cl)
            assert n.dtype == block.norm2(cl).dtype, (n.dtype, block.norm2(cl).dtype)
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        for dtype in (torch.bfloat16, torch.float16):  # without autocast: the input's dtype, as F.group_norm
            xb = cl.to(dtype)
            n = H._normalised(block.norm2, xb)
            want = block.norm2.float()(xb.float())
            assert n.dtype == dtype, n.dtype
            torch.testing.assert_close(n.float(), want, rtol=1e-2, atol=1e-2)


def _kernel_node(out, kind):
    """The autograd node of the module's norm in ``out``'s graph (the stem's output is the norm's; the
    downsampling's is its convolution's, whose first input is the norm's)."""
    node = out.grad_fn
    return node if kind == "stem" else node.next_functions[0][0]


def _nodes_near(node, depth: int) -> list:
    """The class names of ``node`` and the autograd nodes up to ``depth`` steps behind it."""
    names, level = [], [node]
    for _ in range(depth + 1):
        names += [type(n).__name__ for n in level]
        level = [n for m in level for n, _ in m.next_functions if n is not None]
    return names


def group_edge_norms() -> None:
    """A Stem's and a Downsample's LayerNorm2d through the kernel (dispatch.stem_forward, downsample_forward):
    the module's forward against its plain composition, output (values and strides) and the gradients of the
    input and every parameter, fp32 (1e-5) and fp64 (1e-9), NCHW and channels_last, with and without a norm
    bias, eval and training; for a channels_last map the kernel's autograd node is in the graph (an NCHW map
    keeps the plain norm, which returns channels_last). A hook on the norm, a subclassed norm, a GroupNorm1
    and the "reference" backend keep the plain norm. convformer_s18's own stem and downsampling (eps 1e-6,
    no bias)."""
    from metaformer.layers import Downsample, Stem

    for kind, make, shape in (("stem", lambda nl: Stem(3, 8, norm_layer=nl), (2, 3, 13, 10)),
                              ("downsample", lambda nl: Downsample(8, 16, norm_layer=nl), (2, 8, 7, 5))):
        for bias in (True, False):
            for dtype in (torch.float32, torch.float64):
                module = randomize_(make(functools.partial(LayerNorm2d, eps=1e-6, bias=bias))).to(dtype)
                x = torch.randn(shape, dtype=dtype) * 2.0 + 0.5
                for layout in (torch.contiguous_format, torch.channels_last):
                    xl = x.contiguous(memory_format=layout)
                    check(module, xl, which=(kind,), label=f"{kind} bias={bias} {dtype} {layout}")
                    for training in (False, True):
                        module.train(training)
                        got, want = module(xl), EDGES[kind][1](module, xl)
                        assert got.stride() == want.stride(), (kind, bias, dtype, layout, training, got.stride())
                    name = type(_kernel_node(module(xl.clone().requires_grad_(True)), kind)).__name__
                    assert ("Permute" in name) == (layout == torch.contiguous_format), (kind, layout, name)
                    assert ("LayerNorm" in name) == (layout == torch.channels_last), (kind, layout, name)
        # the cases that keep the module's own norm
        module = randomize_(make(functools.partial(LayerNorm2d, eps=1e-6)))
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        calls = []
        handle = module.norm.register_forward_hook(lambda *a, c=calls: c.append(1))
        try:
            assert "Permute" in type(_kernel_node(module(x), kind)).__name__ and calls == [1], kind
        finally:
            handle.remove()
        K.set_backend("reference")
        try:
            assert "Permute" in type(_kernel_node(module(x), kind)).__name__, kind
        finally:
            K.set_backend("triton")

        class OwnNorm(LayerNorm2d):
            pass

        cl = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
        assert H.edge_norm(LayerNorm2d(8), cl) is not None
        assert H.edge_norm(OwnNorm(8), cl) is None and H.edge_norm(GroupNorm1(8), cl) is None
        assert H.edge_norm(torch.nn.Identity(), cl) is None
        # ATen's GroupNorm (on each sample's row for a channels_last CPU map, the affine after it), not the kernel
        near = _nodes_near(_kernel_node(make(GroupNorm1)(x), kind), 3)
        assert any("GroupNorm" in n for n in near) and not any("LayerNorm" in n for n in near), (kind, near)
    model = metaformer.create("convformer_s18")
    for kind, module, shape in (("stem", model.stem, (2, 3, 18, 14)), ("downsample", model.stages[1].downsample,
                                                                         (2, 64, 5, 4))):
        assert type(module.norm) is LayerNorm2d, (kind, module.norm)
        randomize_(module)
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        check(module, x, which=(kind,), label=f"convformer_s18 {kind}")
        assert "LayerNorm" in type(_kernel_node(module(x.clone().requires_grad_(True)), kind)).__name__, kind


def group_pointwise() -> None:
    """The 1x1 convolutions as matrix products of a channels_last map's (B, H, W, C) view (``_pointwise``), and
    a SepConv mixer through them and the StarReLU kernel (``_mix``): the output (values, dtype and strides) and
    the gradients of the input and every parameter equal the convolution's, fp32 (1e-5) and fp64 (1e-9), with
    and without a bias; the graph has a matrix product and no convolution (a SepConv: only its depthwise one).
    An NCHW map, a strided, grouped, 3x3 or padded convolution and a Conv2d subclass keep the convolution."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for bias in (True, False):
            conv = randomize_(torch.nn.Conv2d(8, 12, 1, bias=bias)).to(dtype)
            x = torch.randn(2, 8, 3, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
            check(conv, x, which=("pointwise",), label=f"1x1 {dtype} bias={bias}")
            out = H._pointwise(conv, x.clone().requires_grad_(True))
            names = graph_node_names(out)
            assert out.stride() == conv(x).stride() and out.is_contiguous(memory_format=torch.channels_last)
            assert not any("Convolution" in n for n in names) and any("mm" in n.lower() for n in names), names
    conv = torch.nn.Conv2d(8, 12, 1)  # a weight of transposed strides (a model's .to(channels_last) changes them too)
    conv.weight = torch.nn.Parameter(torch.randn(8, 12, 1, 1).transpose(0, 1))
    check(conv, torch.randn(2, 8, 3, 5).contiguous(memory_format=torch.channels_last), which=("pointwise",),
          label="1x1, transposed weight")
    for dtype in (torch.float32, torch.float64):
        mixer = randomize_(SepConv(8)).to(dtype)
        x = torch.randn(2, 8, 5, 4, dtype=dtype).contiguous(memory_format=torch.channels_last)
        check(mixer, x, which=("mix",), label=f"SepConv {dtype}")
        names = graph_node_names(H._mix(mixer, x.clone().requires_grad_(True)))
        assert sum("Convolution" in n for n in names) == 1 and any("StarReLU" in n for n in names), names
    x = torch.randn(2, 8, 6, 6)
    cl = x.contiguous(memory_format=torch.channels_last)
    own = type("OwnConv", (torch.nn.Conv2d,), {})(8, 8, 1)
    for conv, t in ((torch.nn.Conv2d(8, 8, 1), x), (torch.nn.Conv2d(8, 8, 1, stride=2), cl),
                    (torch.nn.Conv2d(8, 8, 1, groups=2), cl), (torch.nn.Conv2d(8, 8, 3, padding=1), cl),
                    (torch.nn.Conv2d(8, 8, 1, padding=1), cl), (own, cl)):
        out = H._pointwise(conv, t.clone().requires_grad_(True))
        assert any("Convolution" in n for n in graph_node_names(out)), conv
        torch.testing.assert_close(out, conv(t), rtol=0, atol=0)


def group_not_applicable() -> None:
    """None for other backends, integer or 3-D inputs; True for the forced backend in the interpreter."""
    block = hand_block()
    x = torch.randn(2, 8, 3, 3)
    assert H.halves_apply(x)
    assert not H.halves_apply(x.to(torch.int32)) and not H.halves_apply(x[0]) and not H.halves_apply(None)
    for backend in ("reference", "torch", "auto"):  # auto: a CPU tensor is not CUDA
        K.set_backend(backend)
        try:
            assert all(fn(block, x) is None for fn, _ in PAIRS.values()), backend
        finally:
            K.set_backend("triton")


GROUPS = [group_not_applicable, group_partial_cover, group_groupnorm, group_edge_norms, group_pointwise,
          group_hand_blocks, group_real_block, group_dispatch]

if __name__ == "__main__":
    assert K.TRITON_AVAILABLE, K.TRITON_IMPORT_ERROR
    assert K._interpreting(), "run with TRITON_INTERPRET=1"
    exit_if_interpreter_defect()
    K.set_backend("triton")
    for group in [g for g in GROUPS if len(sys.argv) < 2 or g.__name__ in sys.argv[1:]]:
        t0 = time.perf_counter()
        group()
        print(f"{group.__name__} passed in {time.perf_counter() - t0:.1f} s", flush=True)
    print("passed")
    sys.exit(0)
