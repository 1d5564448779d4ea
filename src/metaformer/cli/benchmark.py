"""``metaformer benchmark``: images per second and peak memory of a model on this machine."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

from ..training import autocast
from .options import (
    CLIError,
    add_device_args,
    format_count,
    image_size,
    log,
    parse_model_kwargs,
    resolve_device,
)

DESCRIPTION = """\
Measure inference (or, with --train, forward + backward + SGD step) throughput on random inputs:
the median step time over --steps timed steps after --warmup steps, as images per second, and the
peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the growth of the process's peak
resident set size (VmHWM on Linux, getrusage ru_maxrss elsewhere), which also counts allocator caches
and is 0 when the run stays below an earlier peak.

  metaformer benchmark --model poolformer_s12 -b 256 --amp --channels-last --device cuda
  metaformer benchmark --model poolformer_s12 --train -b 64
"""


def add_parser(sub) -> argparse.ArgumentParser:
    """Adds the ``benchmark`` sub-command."""
    p = sub.add_parser("benchmark", help="throughput (img/s) and peak memory", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, metavar="NAME", help="model name (weights are not loaded)")
    p.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                   help="architecture overrides for metaformer.create")
    p.add_argument("--num-classes", type=int, default=1000, metavar="K", help="classifier size (default: 1000)")
    p.add_argument("--train", action="store_true", help="time training steps (forward, backward, SGD step)")
    p.add_argument("-b", "--batch-size", type=int, default=64, metavar="N", help="batch size (default: 64)")
    p.add_argument("--img-size", type=image_size, metavar="S", help="input resolution (default: the model's)")
    p.add_argument("--steps", type=int, default=20, metavar="N", help="timed steps (default: 20)")
    p.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed warm-up steps (default: 5)")
    p.add_argument("--grad-checkpointing", action="store_true", help="with --train: activation checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    add_device_args(p, amp_help="run under autocast (bfloat16 by default)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=run)
    return p


def peak_rss_bytes() -> int:
    """This process's peak resident set size, bytes: ``VmHWM`` of ``/proc/self/status`` where there is one.

    ``getrusage``'s ``ru_maxrss`` elsewhere. Not ``ru_maxrss`` on Linux: it is carried over from the process
    that forked this one, so a command started by a process holding gigabytes reported that process's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> int:
    """Runs ``metaformer benchmark``; returns the exit status."""
    from .. import create

    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise CLIError("--batch-size and --steps must be >= 1, --warmup >= 0")
    device = resolve_device(args.device)
    model = create(args.model, num_classes=args.num_classes, **parse_model_kwargs(args.model_kwargs))
    size = model.pretrained_cfg["input_size"]
    if args.img_size:
        size = (size[0], args.img_size, args.img_size)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    x = torch.randn(args.batch_size, *size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model.check_input(x)
    step_model = torch.compile(model) if args.compile else model

    if args.train:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        target = torch.randint(0, max(args.num_classes, 1), (args.batch_size,), device=device)

        def step():
            with autocast(device, args.amp, args.amp_dtype):
                loss = torch.nn.functional.cross_entropy(step_model(x), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast(device, args.amp, args.amp_dtype):
                step_model(x)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    rss0 = peak_rss_bytes()
    for _ in range(args.warmup):
        step()
    _sync(device)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        memory = {"peak_memory_bytes": peak, "peak_memory_over_model_bytes": peak - base_mem,
                  "memory_method": "torch.cuda.max_memory_allocated"}
    else:
        memory = {"peak_memory_bytes": max(0, peak_rss_bytes() - rss0),
                  "memory_method": "growth of peak RSS (VmHWM; getrusage ru_maxrss where there is none) during the benchmark"}
    results = {
        "model": args.model, "mode": "train" if args.train else "inference", "device": str(device),
        "batch_size": args.batch_size, "img_size": size[-1], "amp": args.amp and args.amp_dtype,
        "channels_last": args.channels_last, "steps": args.steps,
        "step_ms_median": 1000 * median, "step_ms_min": 1000 * min(times),
        "img_per_sec": args.batch_size / median, **memory,
        "param_count": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(results), flush=True)
    else:
        mem = results["peak_memory_bytes"] / 2**20
        log(f"{args.model} {results['mode']} on {device}: batch {args.batch_size} at {size[-1]}px, "
            f"amp {results['amp'] or 'off'}, {format_count(results['param_count'])} params")
        log(f"  {results['img_per_sec']:.1f} img/s  (median step {results['step_ms_median']:.1f} ms over "
            f"{args.steps} steps, min {results['step_ms_min']:.1f} ms)")
        log(f"  peak memory {mem:.1f} MiB  ({memory['memory_method']})")
    return 0
