"""Every fused path equals the plain composition (``set_backend("reference")``).

Small models of every family (one block per stage, narrow), odd sizes and batch 1, NCHW and channels_last
inputs, evaluation and training, stochastic depth on and off, fp32 and fp64. The fp32 gradients are
compared with an fp64 oracle (the plain composition in float64 on the same weights and masks): the
fused path's error must stay within twice the plain composition's own fp32 error, or 1e-5 of the
gradient's scale (5e-4 for the scalar StarReLU parameters, whose gradients sum every position with
cancellation). fp64 runs are held to 1e-9.
"""

from __future__ import annotations

import copy
import functools
import gc
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import subprocess_env, with_backend
from torch import nn
from torch.nn import functional as F

import metaformer
from metaformer import MetaFormer
from metaformer.kernels import cache, onednn
from metaformer.mixers import Attention, Identity, Pooling, RandomMixing, SepConv
from metaformer.zoo import get_variant

P = functools.partial
ATTN_V1 = P(Attention, head_dim=16, proj_bias=True)
ATTN_B = P(Attention, head_dim=16, proj_bias=False)
# name -> (registered variant whose parts are used, token mixers or None for the variant's own)
FAMILIES = {
    "poolformer": ("poolformer_s12", None),
    "poolformerv2": ("poolformerv2_s12", None),
    "identityformer": ("identityformer_s12", None),
    "randformer": ("randformer_s12", "rand"),
    "convformer": ("convformer_s18", None),
    "caformer": ("caformer_s18", (SepConv, SepConv, ATTN_B, ATTN_B)),
    "id_v1": ("metaformer_id_s12", None),
    "attention_v1_ln": ("metaformer_ppaa_s12_224", (Pooling, Pooling, ATTN_V1, ATTN_V1)),
}
SIZE = (45, 61)  # stages: 11x15, 6x8, 3x4, 2x2


@functools.cache
def tiny(family: str, drop_path_rate: float = 0.0, features_only: bool = False) -> MetaFormer:
    name, mixers = FAMILIES[family]
    kwargs = get_variant(name).model_kwargs()
    kwargs.pop("pos_embed_sizes", None)
    if mixers == "rand":
        mixers = (Identity, Identity, P(RandomMixing, spatial_size=(3, 4)), P(RandomMixing, spatial_size=(2, 2)))
    if mixers is not None:
        kwargs["token_mixers"] = list(mixers)
    kwargs.update(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), num_classes=7, drop_path_rate=drop_path_rate,
                  features_only=features_only)
    torch.manual_seed(0)
    model = MetaFormer(**kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking affines, scales and StarReLU parameters
        for p in model.parameters():
            if p.dim() <= 1 and p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _run(model, x, backend, seed=0, grad=True, input_grad=True):
    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        xi = x.detach().requires_grad_(grad and input_grad)
        y = model(xi)
        if not grad:
            return y.detach(), {}
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        if input_grad:
            grads["input"] = xi.grad.detach().clone()
        return y.detach(), grads

    return with_backend(backend, run)


def _close(actual, expected, oracle=None, rtol=1e-5, what="", floor=0.0):
    """Scale-relative closeness; with an oracle, within twice the reference's own error too.

    ``floor``: a scale to use where the true value is zero (a pooling block's norm bias cancels exactly,
    so its gradient is rounding noise around zero in the plain composition).
    """
    scale = max((oracle if oracle is not None else expected).abs().max().item(), floor)
    err = (actual - (oracle if oracle is not None else expected)).abs().max().item()
    allowed = rtol * scale
    if oracle is not None:
        allowed = max(allowed, 2 * (expected - oracle).abs().max().item())
    assert err <= allowed + 1e-30, f"{what}: error {err:.3g} > allowed {allowed:.3g} (scale {scale:.3g})"


def _floor(grads, key):
    """The scale of a norm bias's gradient: its weight's (the bias of a pooling block's norm cancels)."""
    if key.endswith("norm1.bias") and key[:-4] + "weight" in grads:
        return grads[key[:-len("bias")] + "weight"].abs().max().item()
    return 0.0


def _pool_norm_terms(model, run):
    """``run()`` (a forward and backward of ``model``), and for the ``norm1.weight`` of every pooling block
    the largest per-channel sum of |terms| of its gradient, ``sum |g * (pool(x_hat) - x_hat)|`` over the
    batch and positions (``g``: the gradient at the token mixer's output).

    The gradient itself is that sum without the bars, and the terms cancel: pool(x_hat) - x_hat sums to
    zero over a map that one window covers (the last stage's 2x2 here), so the gradient can be 80x smaller
    than its terms. Rounding scales with the terms, so they are the tolerance's scale (as ln_checks does
    for the channel LayerNorm).
    """
    seen, handles = {}, []
    for name, block in model.named_modules():
        if isinstance(getattr(block, "token_mixer", None), Pooling):
            def keep(mixer, args, out, name=name):
                if out.requires_grad:
                    out.register_hook(lambda g, name=name: seen[name].__setitem__("g", g.detach()))
            handles.append(block.norm1.register_forward_hook(
                lambda m, args, out, name=name: seen.__setitem__(name, {"x": args[0].detach()})))
            handles.append(block.token_mixer.register_forward_hook(keep))
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    terms = {}
    for name, block in model.named_modules():
        if "g" in seen.get(name, {}):
            plain = copy.deepcopy(block.norm1)
            with torch.no_grad():
                plain.weight.fill_(1.0)
                if plain.bias is not None:
                    plain.bias.zero_()
                x_hat = plain(seen[name]["x"])
                terms[f"{name}.norm1.weight"] = (seen[name]["g"] * block.token_mixer(x_hat)).abs().sum(
                    (0, 2, 3)).max().item()
    return result, terms


def _compare(family, x, *, train, drop_path=0.0, dtype=torch.float32, subset=None):
    model = copy.deepcopy(tiny(family, drop_path)).to(dtype)
    model.train(train)
    if subset is not None:  # fine-tuning some parameters: the input needs no gradient
        for name, p in model.named_parameters():
            p.requires_grad_(any(part in name for part in subset.split("|")) and "random_matrix" not in name)
        assert any(p.requires_grad for p in model.parameters())
    x = x.to(dtype)
    fast, fast_g = _run(model, x, "auto", input_grad=subset is None)
    ref, ref_g = _run(model, x, "reference", input_grad=subset is None)
    assert set(fast_g) == set(ref_g) and all(g is not None for g in fast_g.values())
    if dtype == torch.float64:
        _close(fast, ref, rtol=1e-9, what="output")
        for k in ref_g:
            _close(fast_g[k], ref_g[k], rtol=1e-9, what=k, floor=_floor(ref_g, k))
        return
    model64 = copy.deepcopy(model).double()
    (oracle, oracle_g), terms = _pool_norm_terms(
        model64, lambda: _run(model64, x.double(), "reference", input_grad=subset is None))
    _close(fast, ref, rtol=1e-5, what="output")
    for k in ref_g:
        # A scalar gradient (StarReLU's scale and bias) sums every position of a block, with cancellation:
        # its fp32 rounding reaches 1e-4 of its value in the plain composition too (fp64: 1e-9 below).
        rtol = 5e-4 if ref_g[k].numel() == 1 else 1e-5
        _close(fast_g[k], ref_g[k], oracle_g[k].float(), rtol=rtol, what=k,
               floor=max(_floor(oracle_g, k), terms.get(k, 0.0)))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eval_inference_matches_reference(family, layout):
    x = torch.randn(2, 3, *SIZE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    model = tiny(family).eval()
    with torch.inference_mode():
        fast, ref = _fast_and_reference(model, x)
    _close(fast, ref, what=family)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("train,drop_path", [(True, 0.0), (True, 0.3), (False, 0.0)],
                         ids=["train", "train-droppath", "eval-with-grad"])
def test_gradients_match_reference_fp32(family, train, drop_path):
    _compare(family, torch.randn(2, 3, *SIZE), train=train, drop_path=drop_path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp64_train_droppath_batch1(family):
    size = (33, 29) if family != "randformer" else SIZE
    if family == "randformer":
        x = torch.randn(1, 3, *SIZE)
    else:
        x = torch.randn(1, 3, *size).contiguous(memory_format=torch.channels_last)
    _compare(family, x, train=True, drop_path=0.3, dtype=torch.float64)


@pytest.mark.parametrize("family", ["poolformer", "convformer", "caformer", "randformer"])
def test_fp64_eval(family):
    _compare(family, torch.randn(2, 3, *SIZE), train=False, dtype=torch.float64)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("subset", ["mlp", "token_mixer|scale", "norm"])
def test_eval_mode_finetuning_of_a_subset_gets_every_gradient(family, subset):
    """An eval-mode model with only some parameters trainable: the inference-only paths must not run."""
    _compare(family, torch.randn(2, 3, *SIZE), train=False, subset=subset)


def _fast_and_reference(model, x):
    """The model's output with the fast paths (the ``auto`` backend) and with the ``reference`` backend."""
    fast = model(x)
    return fast, with_backend("reference", lambda: model(x))


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
def test_folded_weights_go_with_the_model():
    """The folded copy (docs/kernels.md: its memory) is held weakly: it goes with its model and with
    clear_cache(), and the reference backend keeps none."""
    x = torch.randn(1, 3, *SIZE)
    cache.clear_cache()
    model = copy.deepcopy(tiny("convformer")).eval()
    with torch.no_grad():
        with_backend("reference", P(model, x))
    assert cache.cache_size() == 0
    with torch.no_grad():
        model(x)
    assert cache.cache_size() > 0
    cache.clear_cache()
    assert cache.cache_size() == 0
    with torch.no_grad():
        model(x)
    assert cache.cache_size() > 0
    del model
    gc.collect()
    assert cache.cache_size() == 0


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
@pytest.mark.parametrize("family", ["poolformer", "poolformerv2", "convformer", "caformer"])
def test_folded_weights_are_never_stale(family):
    """The eval paths cache folded weights; in-place changes and replaced parameters are seen."""
    model = copy.deepcopy(tiny(family)).eval()
    x = torch.randn(2, 3, *SIZE)

    def check():
        with torch.inference_mode():
            _close(*_fast_and_reference(model, x), what=family)

    check()
    assert cache.cache_size() > 0
    block = model.stages[2].blocks[0]
    with torch.no_grad():
        block.mlp.fc1.weight.mul_(1.5)
        block.norm2.weight.add_(0.25)
        for m in block.modules():
            if isinstance(m, metaformer.layers.StarReLU):
                m.scale.mul_(-0.5)
                m.bias.add_(0.7)
        for m in model.modules():
            if isinstance(m, metaformer.layers.Scale):
                m.scale.mul_(0.9)
    check()
    block.mlp.fc2.weight = nn.Parameter(torch.randn_like(block.mlp.fc2.weight) * 0.05)  # replaced
    check()
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    check()
    for p in model.parameters():  # an optimiser step
        p.grad = 0.01 * torch.randn_like(p) if p.requires_grad else None
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    check()


@pytest.mark.parametrize("family", ["poolformer", "convformer", "caformer"])
def test_cpu_autocast_training_matches_reference(family):
    """Under CPU bf16 autocast the fused paths (fp32 maths) step aside: a training step runs the plain
    composition, so its output and gradients are those of the reference backend under the same autocast."""
    model = tiny(family, 0.0).train()
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    out = {}
    for backend in ("auto", "reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[backend] = _run(model, x, backend)
    (y, g), (ry, rg) = out["auto"], out["reference"]
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-6)
    for key in rg:
        torch.testing.assert_close(g[key], rg[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"d {k}: {m}")


# CAFormer is left out: PyTorch has no double backward for CPU scaled_dot_product_attention.
@pytest.mark.parametrize("family", ["poolformer", "poolformerv2", "convformer"])
def test_second_derivatives_match_reference(family):
    """``create_graph=True`` (a gradient penalty): the written-out backward nodes stay differentiable."""
    model = copy.deepcopy(tiny(family, 0.3)).double().train()
    x = torch.randn(2, 3, 33, 29, dtype=torch.float64)
    out = {}
    def penalty():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        (gx,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                    xi, create_graph=True)
        (gx ** 2).sum().backward()
        return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}

    for backend in ("auto", "reference"):
        out[backend] = with_backend(backend, penalty)
    fast, ref = out["auto"], out["reference"]
    assert set(fast) == set(ref) and ref
    for k in ref:
        _close(fast[k], ref[k], rtol=1e-9, what=k, floor=_floor(ref, k))


@pytest.mark.parametrize("family", ["poolformerv2", "convformer", "caformer"])
def test_model_built_inside_inference_mode(family):
    """Parameters that are inference tensors (no version counter): the eval paths run, are exact, and see an
    in-place change made under inference mode (nothing is cached for them)."""
    with torch.inference_mode():
        model = copy.deepcopy(tiny(family)).eval()
        for m in model.modules():  # as if built here: every parameter an inference tensor
            for name, p in list(m.named_parameters(recurse=False)):
                setattr(m, name, nn.Parameter(p.detach().clone(), requires_grad=False))
        assert all(p.is_inference() for p in model.parameters())
        x = torch.randn(2, 3, *SIZE)
        _close(*_fast_and_reference(model, x), what=family)
        model.stages[2].blocks[0].mlp.fc1.weight.mul_(1.5)
        _close(*_fast_and_reference(model, x), what=family)


def _weight_reorders(text: str) -> list:
    """oneDNN verbose lines of reorders into a packed 1x1 or depthwise weight (the stem's and downsampling's
    own convolutions, ATen's, are left out)."""
    out = []
    for line in text.splitlines():
        if ",reorder," in line and ",exec," in line:
            desc = line.split(",")[-2]
            dims = desc.split("x")
            if len(dims) == 4 and (dims[2:] == ["1", "1"] or dims[1] == "1"):
                out.append(line)
    return out


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
@pytest.mark.parametrize("optimized", [False, True], ids=["default", "optimize_for_inference"])
def test_packed_weights_follow_the_batch_size(optimized, capfd):
    """Weights are packed for the input shape they run on; after another batch size they are packed again,
    not reordered by oneDNN on every call (measured 6.5x slower: ConvFormer-S18 at batch 1 after batch 16)."""
    model = copy.deepcopy(tiny("convformer")).eval()
    if optimized:
        model = metaformer.optimize_for_inference(model)
    with torch.inference_mode():
        model(torch.randn(16, 3, 112, 112))
        model(torch.randn(1, 3, 112, 112))  # packs again for batch 1
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            model(torch.randn(1, 3, 112, 112))
    text = capfd.readouterr().out
    assert text.count("brgconv_1x1") >= 2 * sum(model.depths if not optimized else (1, 1, 2, 1))
    assert _weight_reorders(text) == []


@pytest.fixture
def glibc_defaults(monkeypatch):
    """The chunking rule of a process under glibc's default settings, whatever the environment running the tests
    (one started with settings that keep freed memory runs whole batches: see the tests below)."""
    from metaformer.kernels import cpu_eval

    monkeypatch.setattr(cpu_eval, "KEPT_BLOCK_BYTES", 0)


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
@pytest.mark.parametrize("family,batch,rows", [("poolformer", 12, 4), ("poolformer", 11, 1), ("convformer", 12, 4),
                                               ("caformer", 9, 3)])
def test_blocks_in_chunks_match_reference(family, batch, rows, capfd, glibc_defaults):
    """A batch whose MLP hidden tensor outgrows the cache runs each block a few samples at a time (the
    oneDNN convolutions see ``rows`` samples); the result is the plain composition's, in the default path
    and in the optimized copy."""
    from metaformer.blocks import MetaFormerBlock
    from metaformer.kernels import cpu_eval
    from metaformer.layers import LayerNorm2d, StarReLU

    if family == "poolformer":
        block, size = MetaFormerBlock(64), 56
    else:  # the baselines' parts: channel LayerNorm without bias, StarReLU, no MLP bias or layer scale
        size = 56 if family == "convformer" else 64  # attention over 64x64 tokens
        block = MetaFormerBlock(64, token_mixer=SepConv if family == "convformer" else P(Attention, head_dim=32),
                                norm_layer=P(LayerNorm2d, eps=1e-6, bias=False), act_layer=StarReLU, mlp_bias=False,
                                layer_scale_init_value=None, res_scale_init_value=1.0)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    block.eval()
    x = torch.randn(batch, 64, size, size)
    given = x.clone()
    assert cpu_eval.chunk_rows(x, 256) == rows
    optimized = metaformer.optimize_for_inference(nn.Sequential(block).eval())
    with torch.inference_mode():
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            fast = block(x)
            folded = optimized(x)
        convs = [line for line in capfd.readouterr().out.splitlines() if ",convolution," in line]
        expected = with_backend("reference", lambda: block(x))
    assert len(convs) >= 2 * 2 * batch // rows and all(re.search(rf"[,\d]mb{rows}_", line) for line in convs), convs[:2]
    _close(fast, expected, what="default")
    _close(folded, expected, what="optimized")
    assert torch.equal(x, given)  # the halves write into temporaries of their own, never into the input


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
@pytest.mark.parametrize("mixer,batch,rows", [("pooling", 12, 4), ("pooling", 11, 1), ("identity", 12, 4),
                                              ("random", 9, 3)])
def test_chunks_of_a_light_mixer_write_over_its_output(mixer, batch, rows, glibc_defaults):
    """In chunks, a pooling, identity or random-mixing block runs its mixer half whole and the MLP half writes
    each chunk's result over the mixer half's output: no chunk is copied into a block output (the copies made
    kept memory 0.8-3.2% slower than the whole batch). The result is the plain composition's, in the default
    path and in the optimized copy, and the input is left as it was."""
    from metaformer.blocks import MetaFormerBlock
    from metaformer.kernels import cpu_eval
    from metaformer.layers import StarReLU

    token_mixer = {"pooling": Pooling, "identity": Identity, "random": P(RandomMixing, spatial_size=(56, 56))}
    block = MetaFormerBlock(64, token_mixer=token_mixer[mixer], act_layer=StarReLU, mlp_bias=False,
                            layer_scale_init_value=None, res_scale_init_value=1.0)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    block.eval()
    x = torch.randn(batch, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    given = x.clone()
    assert cpu_eval.chunk_rows(x, 256) == rows
    optimized = metaformer.optimize_for_inference(nn.Sequential(block).eval())
    expected = with_backend("reference", lambda: block(x))
    for what, run in (("default", block), ("optimized", optimized)):
        with torch.inference_mode():
            run(x)  # packs the weights
            got, events = _profiled(functools.partial(run, x), record_shapes=True)
        chunk_copies = [e for e in events if e.name == "aten::copy_" and e.input_shapes[0] == [rows, 64, 56, 56]]
        assert chunk_copies == [], what
        _close(got, expected, what=what)
    assert torch.equal(x, given)


def test_kept_block_bytes_reads_glibc_settings():
    """The largest freed block glibc keeps: the smaller of its mmap and trim thresholds where both are set (by
    GLIBC_TUNABLES, else by the MALLOC_*_THRESHOLD_ variables), 0 under the defaults, with one of them alone, with a
    value glibc would not read, and off Linux."""
    from metaformer.kernels.cpu_eval import kept_block_bytes

    kept = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}
    assert kept_block_bytes({}, "linux") == 0
    assert kept_block_bytes(kept, "linux") == 4_000_000_000
    assert kept_block_bytes(kept, "darwin") == 0
    assert kept_block_bytes({"MALLOC_MMAP_THRESHOLD_": "4000000000"}, "linux") == 0
    assert kept_block_bytes({**kept, "MALLOC_TRIM_THRESHOLD_": "33554432"}, "linux") == 32 << 20
    assert kept_block_bytes({**kept, "MALLOC_TRIM_THRESHOLD_": "lots"}, "linux") == 0
    tunables = "glibc.malloc.mmap_threshold=0x4000000:glibc.malloc.trim_threshold=4000000000"
    assert kept_block_bytes({"GLIBC_TUNABLES": tunables}, "linux") == 64 << 20
    assert kept_block_bytes({**kept, "GLIBC_TUNABLES": tunables}, "linux") == 64 << 20  # the tunables first
    assert kept_block_bytes({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, "linux") == 0


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE or not sys.platform.startswith("linux"),
                    reason="oneDNN and glibc's settings")
def test_a_process_that_keeps_freed_memory_runs_whole_batches():
    """Started with the settings docs/kernels.md recommends (freed memory kept), a process runs the first stage's
    blocks on the whole batch: the chunks saved the page faults of fresh blocks, which it no longer pays (whole
    models 1-5% faster there, 6-9% slower under the defaults). A fresh process either way, as glibc reads the
    settings at start; the block's oneDNN convolutions see the whole batch, and its result is the plain
    composition's."""
    script = textwrap.dedent("""
        import re, sys, torch
        from functools import partial
        from metaformer.blocks import MetaFormerBlock
        from metaformer.kernels import cpu_eval, set_backend
        from metaformer.layers import LayerNorm2d, StarReLU
        from metaformer.mixers import SepConv
        block = MetaFormerBlock(64, token_mixer=SepConv, norm_layer=partial(LayerNorm2d, eps=1e-6, bias=False),
                                act_layer=StarReLU, mlp_bias=False, layer_scale_init_value=None).eval()
        x = torch.randn(16, 64, 56, 56)
        with torch.inference_mode():
            got = block(x)
            set_backend("reference")
            want = block(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        print(cpu_eval.KEPT_BLOCK_BYTES, cpu_eval.chunk_rows(x, 256), cpu_eval.block_chunk_rows(block, x))
    """)
    env = subprocess_env(drop=[k for k in os.environ if k.startswith("MALLOC_")] + ["GLIBC_TUNABLES"])
    outputs = []
    for extra in ({}, {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}):
        done = subprocess.run([sys.executable, "-c", script], env={**env, **extra}, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.split())
    assert outputs == [["0", "4", "4"], ["4000000000", "16", "None"]]


# ------------------------------------------------------------------------------------------------ hooks
# The fused paths read a block's parts' weights without calling the parts. A hook on a part (a FLOP
# counter, a feature probe, the pre-hook of torch.nn.utils.prune that recomputes `weight`) must still run,
# and see what it sees in the plain composition: such a block runs its plain composition.
def _blocks(model):
    from metaformer import MetaFormerBlock

    return [m for m in model.modules() if type(m) is MetaFormerBlock]


def _probe_parts(model):
    """Forward hooks on every part of every block; returns the list they append (name, output) to and
    their handles."""
    seen, handles = [], []
    for i, block in enumerate(_blocks(model)):
        for name, part in block.named_modules():
            if name:
                handles.append(part.register_forward_hook(
                    lambda m, args, out, key=f"{i}.{name}": seen.append((key, out.detach().clone()))))
    return seen, handles


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_hooks_on_block_parts_run_as_in_the_plain_composition(family, train):
    model = copy.deepcopy(tiny(family)).train(train)
    seen, handles = _probe_parts(model)
    x = torch.randn(2, 3, *SIZE)

    def forward():
        seen.clear()
        with torch.set_grad_enabled(train):
            y = model(x)
        return y.detach(), list(seen)

    fast, fast_seen = with_backend("auto", forward)
    ref, ref_seen = with_backend("reference", forward)
    for h in handles:
        h.remove()
    assert [k for k, _ in fast_seen] == [k for k, _ in ref_seen]
    assert len(ref_seen) >= 6 * len(_blocks(model))
    for (key, a), (_, b) in zip(fast_seen, ref_seen):
        torch.testing.assert_close(a, b, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(fast, ref)


@pytest.mark.parametrize("family", ["poolformer", "convformer"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_pruned_mlp_weights_are_the_ones_used(family, train):
    from torch.nn.utils import prune

    model = copy.deepcopy(tiny(family)).train(train)
    fc1 = _blocks(model)[0].mlp.fc1
    prune.l1_unstructured(fc1, "weight", amount=0.5)
    with torch.no_grad():  # the pruning pre-hook recomputes `weight` from these at the next call
        fc1.weight_orig.mul_(2.0)
    x = torch.randn(2, 3, *SIZE)
    # The fused path first: had it read the stale `weight`, the reference run would not refresh it for it.
    fast, fast_g = _run(model, x, "auto", grad=train)
    ref, ref_g = _run(model, x, "reference", grad=train)
    torch.testing.assert_close(fast, ref)
    if train:
        key = next(k for k in ref_g if k.endswith("mlp.fc1.weight_orig"))
        torch.testing.assert_close(fast_g[key], ref_g[key])
        assert (fast_g[key] != 0).any()


def test_global_module_hooks_see_every_part():
    from torch.nn.modules.module import register_module_forward_hook

    model = copy.deepcopy(tiny("caformer")).eval()
    x = torch.randn(2, 3, *SIZE)
    calls = []
    handle = register_module_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    try:
        with torch.no_grad():
            fast = with_backend("auto", lambda: (calls.clear(), model(x), list(calls)))
            ref = with_backend("reference", lambda: (calls.clear(), model(x), list(calls)))
    finally:
        handle.remove()
    assert fast[2] == ref[2] and "Linear" in ref[2] and "Conv2d" in ref[2]
    torch.testing.assert_close(fast[1], ref[1])


def test_a_forward_replaced_on_a_part_is_called():
    model = copy.deepcopy(tiny("convformer")).eval()
    fc2 = _blocks(model)[1].mlp.fc2
    inner = fc2.forward
    fc2.forward = lambda t: 2.0 * inner(t)  # an instance-level wrapper, as accelerate's hooks install
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        fast = with_backend("auto", lambda: model(x))
        ref = with_backend("reference", lambda: model(x))
        del fc2.forward
        plain = with_backend("reference", lambda: model(x))
    torch.testing.assert_close(fast, ref)
    assert not torch.allclose(ref, plain)


def _evaluated_with_primitives(model, x, capfd):
    """The model's output in inference mode with the fast paths and with the reference backend, and the
    oneDNN primitives the fast run executed (mkldnn's verbose lines)."""
    with torch.inference_mode():
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            fast = model(x)
        primitives = capfd.readouterr().out
        return fast, with_backend("reference", lambda: model(x)), primitives


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
def test_a_hook_on_the_block_itself_keeps_the_fused_path(capfd):
    model = copy.deepcopy(tiny("convformer")).eval()
    block = _blocks(model)[0]
    outputs = []
    handle = block.register_forward_hook(lambda m, args, out: outputs.append(out.shape))
    x = torch.randn(3, 3, *SIZE)
    fast, ref, primitives = _evaluated_with_primitives(model, x, capfd)
    handle.remove()
    assert ",convolution," in primitives  # the oneDNN evaluation path ran
    assert outputs == [torch.Size([3, 16, 11, 15])] * 2
    _close(fast, ref, what="output")


def test_optimize_for_inference_keeps_hooked_blocks():
    from metaformer import MetaFormerBlock
    from metaformer.inference import InferenceBlock

    model = copy.deepcopy(tiny("caformer")).eval()
    hooked = _blocks(model)[2]
    seen = []
    hooked.mlp.fc1.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    folded = metaformer.optimize_for_inference(model)
    kinds = [type(b).__name__ for b in folded.modules() if isinstance(b, (MetaFormerBlock, InferenceBlock))]
    assert kinds == ["InferenceBlock"] * 2 + ["MetaFormerBlock"] + ["InferenceBlock"] * 2
    assert any("hooks" in p for p in folded.inference_skipped), folded.inference_skipped
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        y = folded(x)
        ref = with_backend("reference", lambda: model(x))
    assert len(seen) == 2  # the copy's hook ran (and the model's, in the reference run)
    _close(y, ref, what="output")
    with pytest.raises(ValueError, match="hooks"):
        metaformer.optimize_for_inference(model, strict=True)


def test_hooks_on_a_folded_blocks_parts_run():
    model = copy.deepcopy(tiny("convformer")).eval()
    folded = metaformer.optimize_for_inference(model)
    block = next(m for m in folded.modules() if type(m).__name__ == "InferenceBlock")
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        plain = folded(x)
        seen = []
        handle = block.fc1.register_forward_hook(lambda m, args, out: seen.append(out.shape))
        hooked = folded(x)
        handle.remove()
    assert seen == [torch.Size([2, 64, 11, 15])]
    _close(hooked, plain, what="output")


@pytest.mark.parametrize("name", ["poolformer_s12", "convformer_s18"])
def test_a_hook_based_mac_counter_sees_every_layer(name):
    """What thop and ptflops do: forward hooks on every Conv2d and Linear, MACs from the output shapes.
    The fast paths had hidden every block's layers from them (poolformer_s12: 0.23 G of the release's 1.8 G)."""
    model = metaformer.create(name).eval()
    macs = []

    def count(m, args, out):
        per_output = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] if isinstance(
            m, nn.Conv2d) else m.in_features
        macs.append(out.numel() * per_output)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    hooked = sum(macs)
    assert hooked / 1e9 == pytest.approx(get_variant(name).macs, rel=0.02)  # the release's table
    # and PyTorch's own counter, a dispatch mode, on the same model and input
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, 224, 224))
    assert counter.get_total_flops() / 2 == pytest.approx(hooked, rel=1e-6)


def _profiled(fn, record_shapes=False):
    """``(fn(), the profiler's events of that call)``: which operators a path ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=record_shapes) as prof:
        result = fn()
    return result, prof.events()


@pytest.mark.parametrize("family", ["convformer", "caformer", "attention_v1_ln"])
@pytest.mark.parametrize("mode", ["eval", "optimize_for_inference", "train"])
def test_the_channel_layernorm_runs_with_a_weight(family, mode):
    """PyTorch's CPU LayerNorm forward without a weight is a scalar loop, twice as slow as with one
    (``benchmarks/bench_cpu_layernorm.py``); the fast paths, which fold the norm's affine into the next
    convolution, pass a weight of ones. Every LayerNorm a model runs on CPU gets a weight."""
    model = copy.deepcopy(tiny(family)).train(mode == "train")
    if mode == "optimize_for_inference":
        model = metaformer.optimize_for_inference(model)
    x = torch.randn(2, 3, *SIZE).contiguous(memory_format=torch.channels_last)

    def run():
        with torch.set_grad_enabled(mode == "train"):
            y = model(x)
        if mode == "train":
            y.sum().backward()

    calls = [e for e in _profiled(run, record_shapes=True)[1] if e.name == "aten::native_layer_norm"]
    assert calls, "no LayerNorm ran"
    no_weight = [e.input_shapes for e in calls if not e.input_shapes[2]]
    assert not no_weight, f"{len(no_weight)} of {len(calls)} LayerNorm calls without a weight: {no_weight[:3]}"


def test_the_layernorm_weight_of_ones_is_made_once_and_serves_training_too():
    """``ln_weight``'s ones are made once per width and dtype and shared, as an ordinary tensor even where the
    first call came under ``torch.inference_mode`` (an inference tensor could not be saved for a later training
    step's backward); the norm equals PyTorch's without a weight, bit for bit."""
    from metaformer.kernels import folding

    folding._ONES.clear()
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        first = folding.ln_weight(None, x, 8)
        n = folding.normalise("ln", x, 1e-6)
    assert folding.ln_weight(None, x, 8) is first and not first.is_inference() and not first.requires_grad
    assert torch.equal(first, torch.ones(8)) and folding.ln_weight(None, x.double(), 8).dtype == torch.float64
    plain = F.layer_norm(x.permute(0, 2, 3, 1), (8,), None, None, 1e-6).permute(0, 3, 1, 2)
    assert torch.equal(n, plain)
    model = copy.deepcopy(tiny("convformer")).train()  # its MLP node saves the ones for its backward
    folding._ONES.clear()
    with torch.inference_mode():
        model.eval()(torch.randn(1, 3, *SIZE))
    model.train()(torch.randn(2, 3, *SIZE)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["poolformerv2", "convformer"])
def test_the_mlp_half_backward_takes_no_square_root(family):
    """PyTorch's CPU ``sqrt`` runs 7-10x slower than a multiply: the StarReLU MLP half's node keeps ``relu(h)``
    and squares it again, instead of keeping the square and taking its root (6% of a convformer_s18 step)."""
    model = copy.deepcopy(tiny(family)).train()
    x = torch.randn(2, 3, *SIZE)
    names = {e.name for e in _profiled(lambda: model(x).sum().backward())[1]}
    assert "PointwiseHalfFunctionBackward" in names and "aten::sqrt" not in names


@pytest.mark.parametrize("kernel,padding,bias", [((7, 7), (3, 3), False), ((3, 5), (1, 2), True),
                                                 ((5, 3), (0, 3), True), ((1, 1), (0, 0), False)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("size", [(15, 14), (11, 9), (5, 3)], ids=["per-sample", "whole-batch", "small"])
def test_the_depthwise_node_equals_the_convolution(kernel, padding, bias, layout, size):
    """SepConv's training node (a weight gradient as one forward convolution per sample, or of the whole batch
    on a map of fewer than 196 positions, or PyTorch's own below 16; an input gradient as the flipped kernel's
    convolution) equals ``F.conv2d``'s autograd: fp64 to 1e-9, odd sizes, batch 3, kernels that are not
    square, paddings other than k // 2 (a larger or smaller output), with and without bias."""
    from metaformer.kernels import sepconv_train
    from metaformer.kernels.sepconv_train import DepthwiseConvFunction

    positions = (size[0] + 2 * padding[0] - kernel[0] + 1) * (size[1] + 2 * padding[1] - kernel[1] + 1)
    branch = {"per-sample": positions >= sepconv_train._PER_SAMPLE_POSITIONS,
              "small": positions < sepconv_train._BATCHED_POSITIONS}
    assert branch["per-sample"] == (size == (15, 14)) and branch["small"] == (size == (5, 3))  # each branch taken
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, *size, dtype=torch.float64, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, *kernel, dtype=torch.float64, generator=g)
    b = torch.randn(6, dtype=torch.float64, generator=g) if bias else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ref = F.conv2d(x, w, b, padding=padding, groups=6)
    out = DepthwiseConvFunction.apply(x, w, b, padding)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    gy = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    for got, want in zip(torch.autograd.grad(out, leaves, gy), torch.autograd.grad(ref, leaves, gy)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # second derivatives (create_graph=True) through the plain composition, on a smaller map and fewer channels
    if size != (11, 9):
        return
    small = [x.detach()[:2, :2, :5, :4], w.detach()[:2]] + ([b.detach()[:2]] if bias else [])
    fn = lambda x, w, b=None: DepthwiseConvFunction.apply(x, w, b, padding)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, tuple(t.clone().requires_grad_() for t in small))


@pytest.mark.parametrize("needs", ["all", "input only", "scalars only"])
def test_the_starrelu_node_equals_the_module(needs):
    """SepConv's StarReLU node: the forward bits of ``StarReLU`` in fp32 (its own ops), gradients to 1e-9 in
    fp64 for each subset of what requires one, and second derivatives."""
    from metaformer.kernels.sepconv_train import StarReLUFunction
    from metaformer.layers import StarReLU

    act = StarReLU(0.8, -0.3)
    x32 = torch.randn(2, 5, 7, 3).contiguous(memory_format=torch.channels_last)
    assert torch.equal(StarReLUFunction.apply(x32, act.scale, act.bias), act(x32))
    act = act.double()
    x = torch.randn(2, 5, 7, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(needs != "scalars only")
    act.requires_grad_(needs != "input only")
    leaves = [t for t in (x, act.scale, act.bias) if t.requires_grad]
    gy = torch.randn(x.shape, dtype=torch.float64)
    got = torch.autograd.grad(StarReLUFunction.apply(x, act.scale, act.bias), leaves, gy)
    want = torch.autograd.grad(act(x), leaves, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.autograd.gradgradcheck(StarReLUFunction.apply, (x.detach().requires_grad_(), act.scale, act.bias))


@pytest.mark.parametrize("family", ["convformer", "caformer"])
def test_sepconv_trains_through_its_nodes(family):
    """In fp32 training on CPU every SepConv runs its StarReLU and its depthwise convolution as the nodes of
    :mod:`metaformer.kernels.sepconv_train`: no depthwise weight gradient from ``convolution_backward``
    (~10x slower than the forward convolution on CPU), and gradients that equal the plain composition's at
    map sizes that take the per-sample and the whole-batch forms. In fp64, or with oneDNN switched off, only the
    StarReLU node."""
    model = copy.deepcopy(tiny(family)).train()
    x = torch.randn(2, 3, 128, 128)  # stages 32x32, 16x16 (per sample), 8x8, 4x4 (the whole batch)
    _compare(family, x, train=True)
    events = _profiled(lambda: model(x).sum().backward(), record_shapes=True)[1]
    sepconvs = sum(isinstance(m, SepConv) for m in model.modules())
    for node in ("DepthwiseConvFunctionBackward", "StarReLUFunctionBackward"):
        assert sum(e.name == node for e in events) == sepconvs, node
    depthwise = [e.input_shapes for e in events if e.name == "aten::convolution_backward"
                 and len(e.input_shapes[2]) == 4 and e.input_shapes[2][1] == 1]
    assert not depthwise, depthwise
    # fp64 (no oneDNN), or oneDNN switched off: PyTorch's per-sample convolutions are slower than the module's
    # backward there
    model64 = copy.deepcopy(tiny(family)).double().train()
    names = {e.name for e in _profiled(lambda: model64(x.double()).sum().backward())[1]}
    assert "StarReLUFunctionBackward" in names and "DepthwiseConvFunctionBackward" not in names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (the flags' note that TF32 on oneDNN needs an Intel GPU)
        with torch.backends.mkldnn.flags(enabled=False):
            names = {e.name for e in _profiled(lambda: model(x).sum().backward())[1]}
    assert "StarReLUFunctionBackward" in names and "DepthwiseConvFunctionBackward" not in names


@pytest.mark.parametrize("family", ["poolformer", "id_v1"])
def test_a_gelu_mlp_trains_through_the_plain_composition(family):
    """The MLP half's node made a GELU MLP's training step 4.5% slower than the plain composition (poolformer_s12,
    wall time): GELU MLPs train through the plain composition, the StarReLU family through the node."""
    model = copy.deepcopy(tiny(family)).train()
    x = torch.randn(2, 3, *SIZE)
    names = {e.name for e in _profiled(lambda: model(x).sum().backward())[1]}
    assert "aten::gelu_backward" in names and "PointwiseHalfFunctionBackward" not in names


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
@pytest.mark.parametrize("family,drop_path", [("poolformerv2", 0.0), ("convformer", 0.3), ("caformer", 0.0)])
def test_data_gradients_through_onednn_match_reference(family, drop_path, monkeypatch):
    """The MLP half's backward runs its data gradients as oneDNN 1x1 convolutions on maps of 2,048 positions
    or more; the small test maps have fewer, so the threshold is lowered to reach that path here."""
    from metaformer.kernels import autograd_halves

    monkeypatch.setattr(autograd_halves, "_ONEDNN_GRAD_ROWS", 1)
    x = torch.randn(3, 3, *SIZE)
    _compare(family, x, train=True, drop_path=drop_path)
    model = copy.deepcopy(tiny(family, drop_path)).train()
    y = model(x).sum()
    convs = [e for e in _profiled(y.backward)[1] if e.name == "mkldnn::_convolution_pointwise"]
    assert len(convs) == 2 * sum(model.depths)  # da and dn of every MLP half


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
@pytest.mark.parametrize("family", ["poolformer", "convformer"])
def test_the_downsampling_convolution_runs_on_a_packed_weight(family):
    """In evaluation on CPU each downsampling convolution runs as a oneDNN primitive on a weight packed once
    (``F.conv2d`` reordered it on every call), and so does the stem's before a channel LayerNorm (the
    baselines'; PoolFormer v1's stem has no norm); the values are the plain composition's, a weight changed in
    place is used at the next call, a hook on the convolution runs, and with gradients on it gets one."""
    model = copy.deepcopy(tiny(family)).eval()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        y, events = _profiled(lambda: model(x))
        convs = [e for e in events if e.name == "aten::mkldnn_convolution"]
        assert len(convs) == (1 if family == "poolformer" else 0)  # PoolFormer v1's stem: F.conv2d
        torch.testing.assert_close(y, _run(model, x, "reference", grad=False)[0], rtol=1e-5, atol=1e-5)
        conv = model.stages[2].downsample.conv
        conv.weight.mul_(-0.5)  # in place: the packed weight must follow
        torch.testing.assert_close(model(x), _run(model, x, "reference", grad=False)[0], rtol=1e-5, atol=1e-5)
    seen = []
    handle = conv.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert seen == [(2, conv.out_channels, 3, 4)]
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()  # eval mode, gradients on: the plain convolution, which has a backward
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    model.stages[1].downsample.conv = nn.Sequential(model.stages[1].downsample.conv)  # one's own module there
    with torch.no_grad():
        torch.testing.assert_close(model(x), _run(model, x, "reference", grad=False)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch,size", [(2, (45, 61)), (1, (224, 224)), (3, (9, 8))])
def test_the_stem_on_a_packed_weight_returns_the_plain_stems_values_and_layout(layout, batch, size):
    """The stem called on its own, before a channel LayerNorm, in evaluation: the packed primitive's result is
    the plain stem's to float32 rounding with the same strides (channels_last, which the plain norm returns
    for NCHW images too); with a hook on its convolution, or gradients on, the plain stem runs."""
    stem = copy.deepcopy(tiny("convformer")).eval().stem
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, 3, *size).contiguous(memory_format=fmt)
    with torch.no_grad():
        (got, events), want = _profiled(lambda: stem(x)), with_backend("reference", lambda: stem(x))
    assert not [e for e in events if e.name == "aten::mkldnn_convolution"], "the stem ran F.conv2d"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.stride() == want.stride(), f"strides {got.stride()}, the plain stem's {want.stride()}"
    seen = []
    handle = stem.conv.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        torch.testing.assert_close(stem(x), want, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert len(seen) == 1
    stem(x).sum().backward()
    assert stem.conv.weight.grad is not None


# ---------------------------------------------------------------------------- function transforms, forward AD
# The fused paths' autograd.Functions have no vmap or jvp rules and the oneDNN primitives carry no tangents:
# under torch.func transforms and forward-mode AD the blocks run their plain composition.
def _fc1_key(names):
    return next(k for k in names if k.endswith("mlp.fc1.weight"))


@pytest.mark.parametrize("family", ["poolformer", "convformer", "caformer"])
def test_per_sample_gradients_with_torch_func(family):
    from torch.func import functional_call, grad, vmap

    model = copy.deepcopy(tiny(family)).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(3, 3, *SIZE)

    def loss(p, xb):
        return functional_call(model, p, (xb[None],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))
    fast = with_backend("auto", lambda: per_sample(params, x))
    ref = with_backend("reference", lambda: per_sample(params, x))
    assert set(fast) == set(ref)
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], msg=lambda m, k=k: f"{k}: {m}")
    key = _fc1_key(ref)
    assert fast[key].shape[0] == 3 and (fast[key][0] != fast[key][1]).any()


@pytest.mark.parametrize("family", ["poolformer", "convformer"])  # CAFormer: PyTorch's CPU SDPA has no forward AD
@pytest.mark.parametrize("how", ["jvp", "dual_no_grad"])
def test_forward_mode_ad_keeps_the_tangent(family, how):
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    model = copy.deepcopy(tiny(family)).eval()
    x = torch.randn(2, 3, *SIZE)
    t = torch.randn(2, 3, *SIZE)

    def tangent():
        if how == "jvp":
            return jvp(model, (x,), (t,))[1]
        with torch.no_grad(), fwAD.dual_level():  # forward AD does not depend on the grad mode
            return fwAD.unpack_dual(model(fwAD.make_dual(x, t))).tangent

    fast = with_backend("auto", tangent)
    ref = with_backend("reference", tangent)
    assert fast is not None
    torch.testing.assert_close(fast, ref)
    # and the tangent is the derivative: a central difference in float64 agrees
    model64, x64, t64, eps = copy.deepcopy(model).double(), x.double(), t.double(), 1e-6
    with torch.no_grad():
        diff = (model64(x64 + eps * t64) - model64(x64 - eps * t64)) / (2 * eps)
    torch.testing.assert_close(fast.double(), diff, rtol=1e-4, atol=1e-5 * diff.abs().max().item())


# ------------------------------------------------------------------------- dispatch modes, tensor subclasses
@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
@pytest.mark.parametrize("family", ["convformer", "caformer"])
def test_a_fake_tensor_pass_leaves_the_fast_paths_on(family, capfd):
    """A FakeTensorMode pass (shape and memory estimators) once switched the oneDNN paths off for good."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    model = copy.deepcopy(tiny(family)).eval()
    cache.clear_cache()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        y = model(torch.empty(2, 3, *SIZE))
    assert isinstance(y, FakeTensor) and tuple(y.shape) == (2, 7)
    assert cache.cache_size() == 0  # nothing folded from fake tensors
    x = torch.randn(2, 3, *SIZE)
    fast, ref, primitives = _evaluated_with_primitives(model, x, capfd)
    assert ",convolution," in primitives and cache.cache_size() > 0  # the oneDNN evaluation path still runs
    _close(fast, ref, what="output")


def test_a_tensor_subclass_sees_the_standard_ops():
    class Logged(torch.Tensor):
        calls: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls.append(getattr(func, "__name__", str(func)))
            return super().__torch_function__(func, types, args, kwargs or {})

    model = copy.deepcopy(tiny("convformer")).eval()
    x = torch.randn(2, 3, *SIZE)

    def logged():
        Logged.calls = []
        with torch.no_grad():
            y = model(x.as_subclass(Logged))
        return y.as_subclass(torch.Tensor), Logged.calls

    fast, fast_calls = with_backend("auto", logged)
    ref, ref_calls = with_backend("reference", logged)
    assert fast_calls == ref_calls and ref_calls.count("conv2d") >= 10
    torch.testing.assert_close(fast, ref)


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
def test_one_refused_primitive_call_leaves_the_primitives_on():
    """A call oneDNN refuses (here a weight for 5 channels on a 3-channel input; out of memory alike) falls
    back once; only a build that refuses every call (other private signatures) switches them off."""
    x = torch.randn(1, 3, 4, 4)
    assert onednn.conv(x, torch.randn(8, 5, 1, 1), None, "relu") is None
    assert onednn.conv_add(x, torch.randn(1, 8, 4, 4), torch.randn(8, 5, 1, 1), None) is None
    assert onednn.onednn_ok(x)
    w = torch.randn(8, 3, 1, 1)
    torch.testing.assert_close(onednn.conv(x, w, None, "relu"), torch.relu(F.conv2d(x, w)))


@pytest.mark.skipif(onednn._INPLACE is None, reason="no in-place oneDNN primitive in this build")
def test_in_place_primitive_refused_by_a_build_falls_back_and_is_switched_off(monkeypatch):
    """``conv_add(..., inplace=True)`` on a build whose in-place variant takes other arguments (here the
    out-of-place op of the same arity, which reads them in another order and refuses): right results from the
    out-of-place primitive, and the in-place one is not tried again; a refusal of one call alone leaves it on."""
    x, w, b = torch.randn(2, 3, 5, 5), torch.randn(8, 3, 1, 1), torch.randn(8)
    want = lambda other: other + F.conv2d(x, w, b)  # noqa: E731
    other = torch.randn(2, 8, 5, 5)
    expected = want(other)
    # one refused call (a weight for 5 channels on a 3-channel input): None, the in-place primitive stays on
    assert onednn.conv_add(torch.randn(1, 3, 4, 4), torch.randn(1, 8, 4, 4), torch.randn(8, 5, 1, 1), None,
                           inplace=True) is None
    assert onednn._INPLACE is not None
    torch.testing.assert_close(onednn.conv_add(x, other, w, b, inplace=True), expected)
    monkeypatch.setattr(onednn, "_INPLACE", torch.ops.mkldnn._convolution_pointwise.binary)
    other = torch.randn(2, 8, 5, 5)
    expected = want(other)
    torch.testing.assert_close(onednn.conv_add(x, other, w, b, inplace=True), expected)
    assert onednn._INPLACE is None and onednn.onednn_ok(x)
    other = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(onednn.conv_add(x, other, w, b, inplace=True), want(other))


# ------------------------------------------------------------------------------- the cache across shapes
def test_the_cache_keeps_values_for_the_last_shapes():
    """A model evaluated at a few input shapes in turn reuses each shape's packed weights (it refolded
    and repacked every weight at each change of shape); a changed source drops every shape's value."""
    owner = nn.Linear(3, 3)
    builds = []

    def value(shape):
        return cache.derived(owner, "t", [owner.weight, owner.bias], lambda: builds.append(shape) or [shape],
                             shape=shape)

    first = [value((b, 3)) for b in range(1, cache.SHAPES_KEPT + 1)]
    again = [value((b, 3)) for b in range(1, cache.SHAPES_KEPT + 1)]
    assert all(a is b for a, b in zip(first, again)) and len(builds) == cache.SHAPES_KEPT
    value((99, 3))  # one more shape: the least recently used one, (1, 3), goes
    assert value((2, 3)) is first[1] and len(builds) == cache.SHAPES_KEPT + 1
    value((1, 3))
    assert len(builds) == cache.SHAPES_KEPT + 2
    with torch.no_grad():
        owner.weight.add_(1.0)  # a source changes: every shape's value is stale and goes
    fresh = value((2, 3))
    assert fresh is not first[1] and sum(len(s) for s in cache._ENTRIES[owner].values()) == 1


@pytest.mark.skipif(not onednn.ONEDNN_AVAILABLE, reason="no oneDNN in this build")
def test_batch_sizes_in_turn_reuse_their_packed_weights():
    model = copy.deepcopy(tiny("convformer")).eval()
    block = _blocks(model)[0]
    xs = [torch.randn(b, 3, *SIZE) for b in (1, 2, 3)]

    def packed():
        return {shape: id(entry[2]) for shape, entry in cache._ENTRIES[block]["mlp_half"].items()}

    with torch.inference_mode():
        for x in xs:
            model(x)
        before = packed()
        outputs = [model(x) for x in xs]
        assert packed() == before and len(before) == 3  # the same packed values, none rebuilt
        for x, y in zip(xs, outputs):
            _close(y, with_backend("reference", lambda x=x: model(x)), what=f"batch {x.shape[0]}")


# ------------------------------------------------------------------------------ results written in place
# In evaluation the halves write their result into a temporary of their own where they have one (the mixer
# half's output for the MLP half, the pooled map, the norm's output, ``res_scale * x``): never into a tensor
# the caller gave, or one that a subclass's half returned.
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "optimized"])
def test_evaluation_leaves_every_block_input_as_it_was(family, mode):
    model = copy.deepcopy(tiny(family)).eval()  # a copy: the hooks stay off the shared model
    if mode == "optimized":
        model = metaformer.optimize_for_inference(model)
    inputs, handles = [], []
    for stage in model.stages:  # every block's input, kept by a hook on the block itself (which keeps the fast path)
        for block in stage.blocks:
            handles.append(block.register_forward_pre_hook(
                lambda m, args: inputs.append((args[0], args[0].clone()))))
    x = torch.randn(3, 3, *SIZE)
    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        fast = model(x)
        for handle in handles:
            handle.remove()
        expected = with_backend("reference", lambda: model(x))
    _close(fast, expected, what=family)
    assert len(inputs) == sum(len(stage.blocks) for stage in model.stages)
    for i, (given, before) in enumerate(inputs):
        assert torch.equal(given, before), f"block {i}'s input was written over"


class _NoMixerBlock(metaformer.MetaFormerBlock):
    """An ablation that drops the token-mixer half: its ``mixer_half`` returns its input itself."""

    def mixer_half(self, x):
        return x


class _HalfMlpBlock(metaformer.MetaFormerBlock):
    """An ablation with its own MLP half: half the MLP's output is added."""

    def mlp_half(self, x):
        return x + 0.5 * self.mlp(self.norm2(x))


@pytest.mark.parametrize("family", ["poolformer", "convformer"])
@pytest.mark.parametrize("cls", [_NoMixerBlock, _HalfMlpBlock], ids=["own-mixer-half", "own-mlp-half"])
def test_a_subclass_with_its_own_half_runs_it(family, cls):
    """A subclass's ``mixer_half`` or ``mlp_half`` is its own maths: the fused paths (built from the parts)
    must not replace it, and the MLP half must not write into what a subclass's mixer half returned (here
    the block input itself)."""
    from metaformer.layers import LayerNorm2d, StarReLU

    kwargs = {} if family == "poolformer" else dict(token_mixer=SepConv, norm_layer=P(LayerNorm2d, eps=1e-6, bias=False),
                                                    act_layer=StarReLU, res_scale_init_value=1.0)
    torch.manual_seed(0)
    block = cls(16, **kwargs).eval()
    with torch.no_grad():  # trained-looking scales: a half replaced by the fused one would show
        for p in block.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    x = torch.randn(2, 16, 9, 7).contiguous(memory_format=torch.channels_last)
    given = x.clone()
    for grad in (False, True):
        with torch.inference_mode(not grad):
            y = block(x)
            expected = with_backend("reference", lambda: block(given))
        assert torch.equal(x, given)
        _close(y, expected, what=f"output, {'with' if grad else 'without'} gradients")


# ---------------------------------------------------------------------------------------- output layout
@pytest.mark.parametrize("family", ["poolformer", "convformer", "caformer"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_returned_maps_keep_the_input_layout(family, layout):
    """The CPU fast paths work in channels_last; the maps a model returns come back in the input's memory
    format, as the plain composition returns them: ``forward_features(x).view(B, -1)``, a classic, works."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 3, *SIZE).contiguous(memory_format=fmt)
    model = tiny(family).eval()
    backbone = tiny(family, features_only=True).eval()
    with torch.no_grad():
        outputs = {"forward_features": [model.forward_features(x)], "backbone": backbone(x)}
        final, maps = model.forward_intermediates(x)
        outputs["forward_intermediates"] = [final, *maps]
        references = {"forward_features": [with_backend("reference", lambda: model.forward_features(x))],
                      "backbone": with_backend("reference", lambda: backbone(x))}
        final, maps = with_backend("reference", lambda: model.forward_intermediates(x))
        references["forward_intermediates"] = [final, *maps]
    for what, maps in outputs.items():
        for i, (y, ref) in enumerate(zip(maps, references[what])):
            assert y.is_contiguous(memory_format=fmt), f"{what}[{i}] is not in the input's layout"
            _close(y, ref, what=f"{what}[{i}]")
    if layout == "nchw":
        flat = outputs["forward_features"][0].view(len(x), -1)
        _close(flat, references["forward_features"][0].view(len(x), -1), what="flattened")


@pytest.mark.parametrize("family", ["poolformer", "randformer", "convformer", "caformer"])
@pytest.mark.parametrize("mode", ["eval", "train", "optimized"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_a_block_or_stage_called_on_its_own_returns_the_input_layout(family, mode, layout):
    """Blocks and stages used as building blocks of one's own model: the CPU fast paths work in channels_last,
    but a block returns its input's layout, as the plain composition does (``y.view(B, C, -1)`` works), and a
    stage the layout its downsampling gives, with the same values (and gradients in training)."""
    model = copy.deepcopy(tiny(family)).train(mode == "train")
    if mode == "optimized":
        model = metaformer.optimize_for_inference(model)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    stage = model.stages[2]  # the third stage: attention in CAFormer, random mixing in RandFormer
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 6, 8, generator=g).contiguous(memory_format=fmt)  # the third stage's input
    inner = torch.randn(2, 48, 3, 4, generator=g).contiguous(memory_format=fmt)  # its blocks' input
    for what, module, given in (("stage", stage, x), ("block", stage.blocks[0], inner)):
        if mode == "train":
            got, grads = _run(module, given, "auto")
            want, want_grads = _run(module, given, "reference")
            for name, grad in grads.items():
                _close(grad, want_grads[name], what=f"{what}: gradient of {name}", floor=_floor(want_grads, name))
        else:
            with torch.no_grad():
                got = module(given)
                want = with_backend("reference", lambda m=module, t=given: m(t))
        _close(got, want, what=what)
        if what == "block":  # the input's layout
            assert got.is_contiguous(memory_format=fmt), f"block: strides {got.stride()} for an input in {layout}"
            if layout == "nchw":
                got.view(len(got), got.shape[1], -1)  # raised on a channels_last result
        else:  # the layout the downsampling gives (the baselines' channel LayerNorm returns channels_last strides)
            with torch.no_grad():
                entry = module.downsample(given)
            assert got.stride() == entry.stride(), f"stage: strides {got.stride()}, its blocks' input's {entry.stride()}"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["eval", "train", "optimized"])
def test_in_a_model_the_layout_converts_once_before_the_blocks(family, mode):
    """A block returns its input's layout, so in a model (or stage) its input must be channels_last already:
    every block of the model gets and returns channels_last for an NCHW batch (no copy between blocks)."""
    model = copy.deepcopy(tiny(family)).train(mode == "train")
    if mode == "optimized":
        model = metaformer.optimize_for_inference(model)
    seen = []
    blocks = [b for stage in model.stages for b in stage.blocks]
    hooks = [b.register_forward_hook(lambda m, args, y: seen.append(
        (args[0].is_contiguous(memory_format=torch.channels_last), y.is_contiguous(memory_format=torch.channels_last))))
        for b in blocks]
    try:
        with torch.set_grad_enabled(mode == "train"):
            model(torch.randn(2, 3, *SIZE))
    finally:
        for h in hooks:
            h.remove()
    assert seen == [(True, True)] * len(blocks)


@pytest.mark.parametrize("family", ["poolformer", "identityformer"])
def test_compiled_models_return_maps_in_the_input_layout(family):
    """Under torch.compile the pooling and identity families' blocks work in channels_last too (standard ops):
    the compiled model's maps come back in the input's layout, as the eager model's do."""
    model = tiny(family).eval()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        features = torch.compile(model.forward_features, fullgraph=True, backend="aot_eager")(x)
        expected = with_backend("reference", lambda: model.forward_features(x))
    assert features.is_contiguous()
    _close(features, expected, what="compiled forward_features")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["eval", "train", "optimized", "backbone"])
def test_an_empty_batch_gives_an_empty_result(family, mode):
    """A batch of none (a data shard with no images left) runs as in the plain composition, where the fast paths'
    chunk arithmetic raised IndexError."""
    model = copy.deepcopy(tiny(family, features_only=mode == "backbone")).train(mode == "train")
    if mode == "optimized":
        model = metaformer.optimize_for_inference(model)
    x = torch.randn(0, 3, *SIZE)
    with torch.no_grad():
        out = model(x)
        expected = with_backend("reference", lambda: model(x))
    outs, refs = (out, expected) if mode == "backbone" else ([out], [expected])
    assert [tuple(t.shape) for t in outs] == [tuple(t.shape) for t in refs] and all(t.numel() == 0 for t in outs)


@pytest.mark.parametrize("family", ["poolformer", "poolformerv2", "identityformer", "randformer"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_one_group_norms_keep_their_digits_when_a_sample_mean_is_large(family, layout, train):
    """The CPU evaluation path runs blocks in channels_last, where ATen's GroupNorm kernel takes the variance
    as E[x^2] - E[x]^2 in fp32 and loses digits to cancellation (tracing.group_norm): at mean 100 and
    spread 3 its normalised output was 1.6e-3 off. A block's update (its output minus its input) must match
    the fp64 plain composition to 1e-5 of the update's scale, as at mean 0: as built (the token mixer's half
    dominates the update) and with fc2 scaled up 1000x (the MLP half, whose norm feeds fc1, dominates). In
    training the output and the input's gradient."""
    g = torch.Generator().manual_seed(3)
    block = copy.deepcopy(tiny(family).stages[0].blocks[0]).train(train)
    x = 100 + 3 * torch.randn(2, block.mlp.fc1.in_channels, 11, 15, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for half in ("token mixer", "mlp"):
        if half == "mlp":
            with torch.no_grad():
                block.mlp.fc2.weight.mul_(1000)
        what = f"{family} block update, the {half} half dominating"
        if not train:
            with torch.inference_mode():
                fast = with_backend("auto", lambda: block(x)) - x
                oracle = with_backend("reference", lambda: copy.deepcopy(block).double()(x.double())) - x.double()
            _close(fast.double(), oracle, rtol=1e-5, what=what)
            continue
        fast, fast_g = _run(block, x, "auto")
        oracle, oracle_g = _run(copy.deepcopy(block).double(), x.double(), "reference")
        _close((fast - x).double(), oracle - x.double(), rtol=1e-5, what=what)
        _close(fast_g["input"].double(), oracle_g["input"], rtol=1e-5, what=f"{what}: input gradient")
