"""GPU benchmark of the PoolFormer token-mixer half-block: fused Triton kernels vs PyTorch.

Times ``y = x + ls * (AvgPool2d(GroupNorm(x)) - GroupNorm(x))`` alone, at poolformer_s12's four
stage shapes, for:

- ``triton``: ``metaformer.kernels.pool_mixer_residual`` with the Triton backend,
- ``eager``: the reference composition (nn.GroupNorm(1, C) + nn.AvgPool2d + sub + scale + add),
- ``compiled``: ``torch.compile`` of that reference composition.

Forward (no grad) and forward + backward (grads w.r.t. x, GroupNorm weight/bias and layer scale).
Medians over interleaved repetitions, timed with CUDA events. Achieved bandwidth counts the
minimum traffic of the forward: read x once and write y once, i.e.
``GB/s = 2 * B*C*H*W * bytes_per_element / t``; for forward + backward the minimum is reading
x and dy and writing dx (``3 * numel * bytes``), a lower bound for any implementation that
recomputes rather than stores intermediates.

Usage::

    python benchmarks/bench_pool_mixer_gpu.py                  # batch 128, bf16 and fp32
    python benchmarks/bench_pool_mixer_gpu.py --dtypes bf16 --reps 50 --peak-gbps 4800  # H200

After the mixer table it times the whole model (timm's eager model vs ours, bf16 autocast, inference
and a training step, peak memory). ``--models-only --device cpu --batch 2 --size 64 --reps 2`` is a
smoke run of that part on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch import nn

STAGES = [(64, 56), (128, 28), (320, 14), (512, 7)]  # poolformer_s12 (C, H=W) at 224x224
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per variant (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed repetitions per variant")
    p.add_argument("--peak-gbps", type=float, default=3350.0, help="card's DRAM bandwidth (H100 SXM: 3350)")
    p.add_argument("--channels-last", action="store_true", help="use channels_last inputs")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--model", default="poolformer_s12", help="model of the whole-model part (default poolformer_s12)")
    p.add_argument("--size", type=int, default=224, help="image side of the whole-model part (default 224)")
    p.add_argument("--models-only", action="store_true", help="skip the mixer-half table")
    p.add_argument("--device", default="cuda", help="device of the whole-model part (cpu: a smoke run only)")
    return p.parse_args(argv)


class RefMixerHalf(nn.Module):
    """The unfused token-mixer half-block, as the original release writes it."""

    def __init__(self, dim: int, pool_size: int = 3, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(1, dim, eps=eps)
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)
        self.ls = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        n = self.norm(x)
        return x + self.ls[:, None, None] * (self.pool(n) - n)


class FusedMixerHalf(nn.Module):
    def __init__(self, ref: RefMixerHalf):
        super().__init__()
        self.ref = ref

    def forward(self, x):
        from metaformer.kernels import pool_mixer_residual

        r = self.ref
        return pool_mixer_residual(x, r.norm.weight * r.ls, eps=r.norm.eps, pool_size=r.pool.kernel_size)


def _step(fn, x, train: bool):
    if train:
        y = fn(x)
        y.backward(torch.ones_like(y))
    else:
        with torch.no_grad():
            fn(x)


def time_interleaved(fns: dict, x, train: bool, reps: int, warmup: int) -> dict:
    """Median ms per variant; variants alternate within each repetition."""
    for fn in fns.values():
        for _ in range(warmup):
            _step(fn, x, train)
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _step(fn, x, train)
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {k: statistics.median(v) for k, v in times.items()}


def peak_mem_mib(fn, x) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(fn, x, True)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_models(args) -> None:
    """Whole model, timm's eager model vs ours: inference and a training step (SGD-free: forward, backward,
    zero_grad) under bf16 autocast, interleaved, medians; peak memory of a training step."""
    import time

    import timm

    import metaformer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    models = {"timm": timm.create_model(args.model), "ours": metaformer.create(args.model)}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    for m in models.values():
        m.to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run(model, train):
        model.train(train)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if train:
                model(x).float().logsumexp(1).mean().backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(x)

    print(f"\nwhole model {args.model}, batch {args.batch}, {args.size}x{args.size}, bf16 autocast, {device}")
    for train in (False, True):
        for m in models.values():
            for _ in range(args.warmup):
                run(m, train)
        times = {k: [] for k in models}
        for _ in range(args.reps):
            for name, m in models.items():
                sync()
                t0 = time.perf_counter()
                run(m, train)
                sync()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        line = f"  {'train step' if train else 'inference':10}: " + ", ".join(
            f"{k} {1e3 * v:.2f} ms ({args.batch / v:.0f} img/s)" for k, v in med.items())
        line += f"; ours/timm speed {med['timm'] / med['ours']:.2f}x"
        if train and cuda:
            mem = {}
            for name, m in models.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                run(m, True)
                torch.cuda.synchronize()
                mem[name] = torch.cuda.max_memory_allocated() / 2**20
            line += f"; peak memory timm {mem['timm']:.0f} MiB, ours {mem['ours']:.0f} MiB " \
                    f"({mem['ours'] / mem['timm']:.2f}x)"
        print(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.models_only:
        bench_models(args)
        return 0
    if not torch.cuda.is_available():
        print("bench_pool_mixer_gpu: no CUDA device available; this benchmark needs a GPU. Exiting.")
        return 1
    import metaformer.kernels as K

    if not K.TRITON_AVAILABLE:
        print(f"bench_pool_mixer_gpu: Triton is unavailable ({K.TRITON_IMPORT_ERROR!r}). Exiting.")
        return 1
    K.set_backend("triton")
    torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}, medians of {args.reps} interleaved reps"
    )
    print(
        f"GB/s: forward = 2*numel*bytes/t (read x, write y); fwd+bwd = 3*numel*bytes/t (read x, dy; write dx); "
        f"% of peak {args.peak_gbps:.0f} GB/s"
    )
    header = (
        f"{'dtype':5} {'shape':>12} {'pass':7} | {'triton ms':>9} {'eager ms':>9} {'compile ms':>10} | "
        f"{'vs eager':>8} {'vs comp':>8} | {'triton GB/s':>11} {'%peak':>6} | "
        f"{'peak MiB t/e/c':>20}"
    )
    print(header)
    print("-" * len(header))
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for C, S in STAGES:
            ref = RefMixerHalf(C).cuda().to(dtype)
            with torch.no_grad():
                ref.norm.weight.normal_(1.0, 0.1)
                ref.norm.bias.normal_(0.0, 0.1)
                ref.ls.normal_(0.0, 0.1)
            fns = {"triton": FusedMixerHalf(ref), "eager": ref}
            if not args.no_compile:
                fns["compiled"] = torch.compile(ref)
            x = torch.randn(args.batch, C, S, S, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
            with torch.no_grad():  # sanity: same output as the reference
                torch.testing.assert_close(fns["triton"](x).float(), ref(x).float(), rtol=2e-2, atol=2e-2)
            numel, nbytes = x.numel(), x.element_size()
            for train in (False, True):
                xin = x.detach().requires_grad_(train)
                t = time_interleaved(fns, xin, train, args.reps, args.warmup)
                traffic = (3 if train else 2) * numel * nbytes
                gbps = traffic / (t["triton"] * 1e-3) / 1e9
                mem = ""
                if train:
                    mem = "/".join(f"{peak_mem_mib(fn, xin):.0f}" for fn in fns.values())
                tc = t.get("compiled", float("nan"))
                print(
                    f"{dname:5} {f'{C}x{S}x{S}':>12} {'fwd+bwd' if train else 'fwd':7} | "
                    f"{t['triton']:9.3f} {t['eager']:9.3f} {tc:10.3f} | "
                    f"{t['eager'] / t['triton']:7.2f}x {tc / t['triton']:7.2f}x | "
                    f"{gbps:11.0f} {100 * gbps / args.peak_gbps:5.1f}% | {mem:>20}"
                )
    K.set_backend("auto")
    bench_models(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
