"""The CPU benchmarks' plumbing: bench_cpu_chunks.py, bench_cpu_allocator.py, bench_cpu_hook_check.py,
bench_cpu_layernorm.py, bench_cpu_shapes.py, bench_host_dispatch.py, and bench_cpu.py's floor and updates
(timings are never asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import docs_hook, require_triton_kernels
from torch import nn

import metaformer
from metaformer.kernels import cpu_eval

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_cpu  # noqa: E402
import bench_cpu_allocator  # noqa: E402
import bench_cpu_chunks  # noqa: E402
import bench_cpu_hook_check  # noqa: E402
import bench_cpu_layernorm  # noqa: E402
import bench_cpu_shapes  # noqa: E402
import bench_host_dispatch  # noqa: E402
import cpu_models  # noqa: E402


def test_hook_check_benchmark_times_the_check_and_the_forward(tmp_path, capsys):
    out = tmp_path / "hooks.json"
    assert bench_cpu_hook_check.main(["--models", "poolformer_s12", "--batches", "1", "2", "--size", "64",
                                      "--rounds", "1", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"poolformer_s12@1", "poolformer_s12@2"}
    row = data["results"]["poolformer_s12@2"]
    assert row["blocks"] == 12 and row["forward_s"] > 0 and row["check_s"] > 0
    assert row["share"] == pytest.approx(row["check_s"] / row["forward_s"])
    assert "poolformer_s12" in capsys.readouterr().out


def test_layernorm_benchmark_times_every_variant_at_every_stage(tmp_path, capsys):
    out = tmp_path / "ln.json"
    assert bench_cpu_layernorm.main(["--batch", "1", "--size", "64", "--rounds", "1", "--calls", "1",
                                     "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["results"]) == ["1x16x16x64", "1x8x8x128", "1x4x4x320", "1x2x2x512"]
    for row in data["results"].values():
        assert set(row) == set(bench_cpu_layernorm.VARIANTS) and row["none"]["forward_vs_none"] == 1.0
        assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in row.values())
    assert "1x4x4x320" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_cpu_layernorm.main(["--rounds", "0"])


def test_shapes_benchmark_times_both_sides_steady_and_in_turn(tmp_path, capsys):
    out = tmp_path / "shapes.json"
    assert bench_cpu_shapes.main(["--models", "poolformer_s12", "--batches", "1", "2", "--size", "64",
                                  "--rounds", "1", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]["poolformer_s12"]
    assert set(rows) == {"ours@1", "ours@2", "timm_cl@1", "timm_cl@2"}
    for r in rows.values():
        assert r["steady_s"] > 0 and r["in_turn_vs_steady"] == pytest.approx(r["in_turn_s"] / r["steady_s"])
    assert "timm_cl@2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_cpu_shapes.main(["--batches", "4"])


def test_chunks_benchmark_writes_every_variant_and_restores_the_threshold(tmp_path, capsys):
    before = cpu_eval._CHUNK_ABOVE, cpu_eval.KEPT_BLOCK_BYTES
    out = tmp_path / "chunks.json"
    assert bench_cpu_chunks.main(["--models", "poolformer_s12", "--batch", "2", "--size", "64", "--rounds", "1",
                                  "--output", str(out)]) == 0
    assert (cpu_eval._CHUNK_ABOVE, cpu_eval.KEPT_BLOCK_BYTES) == before
    data = json.loads(out.read_text())
    assert data["setup"]["batch"] == 2 and data["setup"]["kept_block_bytes"] == before[1]
    row = data["results"]["poolformer_s12"]
    assert set(row) == set(bench_cpu_chunks.VARIANTS)
    assert all(r["median_s"] > 0 and r["img_per_s"] > 0 for r in row.values())
    assert row["default"]["vs_default"] == 1.0
    assert "poolformer_s12" in capsys.readouterr().out


def test_chunks_benchmark_refuses_bad_arguments():
    with pytest.raises(SystemExit):
        bench_cpu_chunks.main(["--rounds", "0"])


def test_the_floor_records_every_matrix_product_in_order():
    """caformer_s18's floor: every conv / linear of the plain composition, and each attention product
    between its block's qkv and proj, with the shape the mixer gives q, k and v."""
    model = metaformer.create("caformer_s18").eval()
    calls = cpu_models.record_calls(model, torch.randn(2, 3, 64, 64))
    convs = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert [m for m, _, _ in calls if type(m) in (nn.Conv2d, nn.Linear)] == convs  # each once, in model order
    mixers = [m for m in model.modules() if isinstance(m, metaformer.Attention)]
    assert [m for m, _, _ in calls if isinstance(m, metaformer.Attention)] == mixers and len(mixers) == 12
    for i, (m, shape, _) in enumerate(calls):
        if isinstance(m, metaformer.Attention):
            assert calls[i + 1][0] is m.qkv and calls[i + 2][0] is m.proj  # qkv's hook fires after the pre-hook
            side = 4 if m.num_heads == 10 else 2  # stage 3 at 64 / 16, stage 4 at 64 / 32
            assert shape == (2, m.num_heads, side * side, 32)
            t = torch.randn(shape)
            torch.testing.assert_close(cpu_models._floor_call(m)(t),
                                       F.scaled_dot_product_attention(t, t, t, scale=32 ** -0.5))
    run = cpu_models.floor_fn(calls, train=True)
    run()  # forward and backward through all of them
    assert all(p.grad is None for m, _, _ in calls for p in m.parameters())


def test_the_training_floor_takes_depthwise_gradients_as_the_model_does():
    """In training the floor runs each depthwise convolution as our SepConv's node, whose gradients equal the
    module's; its other convolutions are the modules themselves."""
    model = metaformer.create("convformer_s18").train().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    calls = cpu_models.record_calls(model, x)
    depthwise = [(m, shape) for m, shape, _ in calls if cpu_models._depthwise(m)]
    assert len(depthwise) == 18 and all(m.kernel_size == (7, 7) for m, _ in depthwise)
    assert all(cpu_models._floor_call(m, True) is m for m, _, _ in calls if not cpu_models._depthwise(m))
    m, shape = depthwise[0]
    t = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    got = torch.autograd.grad(cpu_models._floor_call(m, True)(t).square().sum(), (t, m.weight))
    want = torch.autograd.grad(m(t).square().sum(), (t, m.weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cpu_models.floor_fn(calls, train=True)()
    assert sum(e.name == "DepthwiseConvFunctionBackward" for e in prof.events()) == 18


def test_the_floor_records_random_mixing_products():
    """randformer_s12's floor: each random-mixing mixer's matrix product over the positions, with the tokens'
    shape, between the block's norm and its MLP; the product is the mixer's own."""
    model = metaformer.create("randformer_s12").eval()
    calls = cpu_models.record_calls(model, torch.randn(1, 3, 224, 224))
    mixers = [m for m in model.modules() if isinstance(m, metaformer.RandomMixing)]
    recorded = [(m, shape) for m, shape, _ in calls if isinstance(m, metaformer.RandomMixing)]
    assert [m for m, _ in recorded] == mixers and len(mixers) == 8
    assert [shape for _, shape in recorded] == [(1, 196, 320)] * 6 + [(1, 49, 512)] * 2
    m = mixers[0]
    t = torch.randn(1, 196, 320)
    with torch.no_grad():
        want = m(t.transpose(1, 2).reshape(1, 320, 14, 14)).reshape(1, 320, 196).transpose(1, 2)
        torch.testing.assert_close(cpu_models._floor_call(m)(t), want)
    cpu_models.floor_fn(calls, train=False)()


def test_the_inference_floor_runs_convolutions_on_packed_weights():
    """In inference the floor's convolutions run on weights packed once (nn.Conv2d reorders its weight at every
    call, which made the floor slower than a packed model at batch 1): each equals its module's output, and
    oneDNN reorders no weight while the floor runs."""
    model = metaformer.create("convformer_s18").eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    calls = cpu_models.record_calls(model, x)
    convs = [(m, shape, cl) for m, shape, cl in calls if type(m) is nn.Conv2d]
    assert {m.kernel_size for m, _, _ in convs} == {(7, 7), (3, 3), (1, 1)}  # stem, depthwise and downsampling, 1x1
    for m, shape, cl in convs:
        packed = cpu_models._packed_conv(m, shape)
        assert packed is not None
        t = torch.randn(shape).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        with torch.no_grad():
            torch.testing.assert_close(packed(t), m(t), rtol=1e-5, atol=1e-5)
    run = cpu_models.floor_fn(calls, train=False)
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    names = [e.name for e in prof.events()]
    assert "aten::mkldnn_convolution" not in names and "mkldnn::_convolution_pointwise" in names


@pytest.mark.parametrize("name", ["poolformer_s12", "identityformer_s12", "caformer_s18"])
def test_the_passes_floor_records_each_separate_pass_once(name):
    """floor_passes: a pooling or identity mixer's norm (and PoolFormer v1's final norm) as statistics only,
    every other norm of a map written out, each pooling, and each StarReLU / squared-ReLU square of a map,
    in model order with the shapes the plain composition gives them; the passes compute what they stand for."""
    model = metaformer.create(name).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, inp: seen.append((m, tuple(inp[0].shape))))
             for m in model.modules() if type(m) in (metaformer.GroupNorm1, metaformer.LayerNorm2d,
                                                     metaformer.Pooling, metaformer.StarReLU, metaformer.SquaredReLU)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    seen = [(m, shape) for m, shape in seen if len(shape) == 4]  # the head's MLP squares rows, not a map
    blocks = [b for b in model.modules() if isinstance(b, metaformer.MetaFormerBlock)]
    mixer_norms = {id(b.norm1) for b in blocks if type(b.token_mixer) in (metaformer.Pooling, metaformer.Identity)}
    head = {id(m) for m in model.head.modules()}
    want = [("pool" if type(m) is metaformer.Pooling else
             "square" if type(m) in (metaformer.StarReLU, metaformer.SquaredReLU) else
             "stats" if id(m) in mixer_norms | head else "norm", shape) for m, shape in seen]
    passes = cpu_models.record_passes(model, x)
    assert [(kind, shape) for kind, _, shape, _ in passes] == want
    kinds = {kind for kind, _ in want}
    assert kinds >= ({"norm", "stats", "pool"} if name == "poolformer_s12" else {"norm", "square"})
    t = torch.randn(2, 8, 5, 5)
    for kind, arg, _, _ in passes:
        got = cpu_models._pass_call(kind, arg)(t.clone())
        if kind == "norm":
            torch.testing.assert_close(got, metaformer.LayerNorm2d(8, eps=arg[1]).eval()(t) if arg[0] == "ln"
                                       else F.group_norm(t, 1, None, None, arg[1]))
        elif kind == "stats":
            torch.testing.assert_close(got, t.mean((1, 2, 3)) if arg[0] == "gn" else t.mean(1))
        elif kind == "pool":
            torch.testing.assert_close(got, nn.AvgPool2d(arg, 1, arg // 2, count_include_pad=False)(t))
        else:
            torch.testing.assert_close(got, t * t)
    cpu_models.passes_fn(passes)()  # runs them all


@pytest.mark.parametrize("name", ["poolformer_s12", "convformer_s18"])
def test_the_training_passes_floor_adds_backwards_residuals_and_the_optimiser(name):
    """floor_passes in training: the inference passes, each GELU (a backward of its own) and two residual
    additions per block, in model order; each pass's backward is the gradient autograd gives the op it
    stands for, and the whole floor (products, passes, the optimiser's step) runs on a small batch."""
    model = metaformer.create(name).train()
    x = torch.randn(2, 3, 64, 64)
    inference = cpu_models.record_passes(model, x)
    passes = cpu_models.record_passes(model, x, train=True)
    blocks = [b for b in model.modules() if isinstance(b, metaformer.MetaFormerBlock)]
    gelus = [m for m in model.modules() if type(m) is nn.GELU]
    assert [p for p in passes if p[0] not in ("gelu", "residual")] == inference
    assert sum(p[0] == "residual" for p in passes) == 2 * len(blocks)
    assert sum(p[0] == "gelu" for p in passes) == (len(blocks) if name == "poolformer_s12" else 0) == len(gelus)
    first = passes.index(next(p for p in passes if p[0] == "residual"))
    assert passes[first + 1][0] == "residual" and passes[first][2] == passes[first + 1][2]
    for kind, arg in [("norm", ("gn", 1e-5)), ("norm", ("ln", 1e-6)), ("stats", ("gn", 1e-5)), ("pool", 3),
                      ("gelu", "none"), ("gelu", "tanh")]:
        t = torch.randn(2, 8, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        cpu_models._train_pass(kind, arg, t)[0]()  # the forward runs
        tg = t.detach().clone().requires_grad_()
        if kind in ("norm", "stats"):
            y = F.group_norm(tg, 1, None, None, arg[1]) if arg[0] == "gn" else \
                F.layer_norm(tg.permute(0, 2, 3, 1), (8,), None, None, arg[1]).permute(0, 3, 1, 2)
        elif kind == "pool":
            y = F.avg_pool2d(tg, arg, 1, arg // 2, count_include_pad=False)
        else:
            y = F.gelu(tg, approximate=arg)
        g = torch.randn_like(y)
        want, = torch.autograd.grad(y, tg, g)
        torch.testing.assert_close(cpu_models._train_pass(kind, arg, t, g)[1](), want, rtol=1e-9, atol=1e-9)
    t = torch.randn(2, 8, 5, 5)
    before = t.clone()
    cpu_models._train_pass("residual", None, t)[1]()
    assert torch.equal(t, before)  # zeros added: the values stay
    step = cpu_models.optimizer_fn(model)
    p0 = [p.detach().clone() for p in model.parameters()]
    step()
    assert all(torch.equal(a, b) for a, b in zip(p0, model.parameters()))  # the step ran on copies
    cpu_models.floor_passes_variant(name, 2, 64, train=True)()


@pytest.mark.slow  # two child processes (interpreter and timm start-up)
def test_allocator_benchmark_measures_in_a_child_process_with_the_settings():
    args = bench_cpu_allocator.parse_args(["--batch", "1", "--size", "32", "--calls", "1"])
    got = bench_cpu_allocator._in_child("poolformer_s12", "ours", "kept", args)
    assert got["ms"] > 0 and got["faults"] >= 0 and got["kept"]
    assert not bench_cpu_allocator._in_child("poolformer_s12", "ours", "default", args)["kept"]
    here = bench_cpu_allocator.measure("poolformer_s12", "timm_cl", 1, 32, 1)
    assert here["ms"] > 0 and here["faults"] >= 0
    with pytest.raises(SystemExit):
        bench_cpu_allocator.parse_args(["--calls", "0"])


def test_summary_pairs_each_round_with_timms_best_layout():
    """vs_timm_best divides medians; vs_timm_best_paired takes the median of the per-round ratios against timm's
    best layout (the faster median, here NCHW). A slow round of timm's (the third) and one of ours (the first)
    move the ratio of medians, not the paired one. Worked by hand."""
    times = {"timm_nchw": [1.0, 1.0, 4.0], "timm_cl": [2.0, 2.0, 2.0], "ours": [0.5, 2.0, 2.0]}
    rows = {r["variant"]: r for r in bench_cpu.summarise("m", "inference", times, 1e9, 1e12, 2, {})}
    assert rows["ours"]["vs_timm_best"] == pytest.approx(1.0 / 2.0)
    assert rows["ours"]["vs_timm_best_paired"] == pytest.approx(2.0)  # median of 1/0.5, 1/2, 4/2
    assert rows["timm_nchw"]["vs_timm_best_paired"] == 1.0
    assert rows["timm_cl"]["vs_timm_best_paired"] == pytest.approx(0.5)  # median of 0.5, 0.5, 2
    assert rows["ours"]["median_ms"] == pytest.approx(2000.0) and rows["ours"]["min_ms"] == pytest.approx(500.0)


def test_an_update_replaces_only_the_rows_it_measures(tmp_path):
    """A training-only run with --update keeps the file's inference rows and settings, adds its own rows
    and records its settings; a file of another batch size is refused."""
    out = tmp_path / "cpu.json"
    small = ["--models", "poolformer_s12", "--batch", "2", "--size", "64", "--quick", "--no-compile", "--no-memory",
             "--output", str(out)]
    bench_cpu.main(small + ["--train-reps", "0"])
    before = json.loads(out.read_text())
    assert {r["pass"] for r in before["rows"]} == {"inference"}
    bench_cpu.main(small + ["--no-inference", "--train-models", "poolformer_s12", "--update"])
    after = json.loads(out.read_text())
    assert [r for r in after["rows"] if r["pass"] == "inference"] == before["rows"]
    assert {r["variant"] for r in after["rows"] if r["pass"] == "train"} == {"timm_nchw", "timm_cl", "ours", "floor",
                                                                               "floor_passes"}
    assert after["settings"]["reps"] == before["settings"]["reps"]
    assert [u["rows"] for u in after["settings"]["updates"]] == [["poolformer_s12 train"]]
    assert "training step" in out.with_suffix(".md").read_text()
    page = "\n".join(docs_hook("results_page").file_markdown(out, tmp_path))  # the performance page shows the update
    assert "rows: poolformer_s12 train, metaformer: " in page and "malloc_env: " in page
    with pytest.raises(SystemExit):
        bench_cpu.parse_args(small[:2] + ["--batch", "4", "--size", "64", "--output", str(out), "--update"])
    with pytest.raises(SystemExit):
        bench_cpu.parse_args(["--output", str(tmp_path / "none.json"), "--update"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit):
        bench_cpu.parse_args(["--output", str(tmp_path / "bad.json"), "--update"])


def test_host_dispatch_benchmark_profiles_each_tree_with_the_launches_stubbed(tmp_path, capsys):
    """Two trees (the package and a copy) in alternating subprocesses: the CUDA halves ran (the dispatch's
    functions show in the profile) and no Triton kernel was launched (under the interpreter a launch takes
    seconds)."""
    import shutil

    require_triton_kernels("the CUDA halves run on CPU only under Triton's interpreter")
    src, copy = str(ROOT / "src"), tmp_path / "copy"
    shutil.copytree(ROOT / "src" / "metaformer", copy / "metaformer")
    out = tmp_path / "host.json"
    assert bench_host_dispatch.main(["--src", src, str(copy), "--models", "convformer_s18", "--calls", "2",
                                     "--rounds", "2", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {k: len(r) for k, r in data["rounds"].items()} == {src: 2, str(copy): 2}
    for tree in (src, str(copy)):
        for case in ("convformer_s18 inference", "convformer_s18 train"):
            row = data["summary"][tree][case]
            assert row["ours_us"] > 0 and row["calls"] > 100 and 0 < row["wall_ms"] < 1000, (tree, case, row)
    assert "convformer_s18 train" in capsys.readouterr().out
    assert bench_host_dispatch.main(["--src", str(tmp_path), "--output", str(out)]) == 2  # no package there
    assert bench_host_dispatch.main(["--src", src, src, "--output", str(out)]) == 2  # a tree twice
