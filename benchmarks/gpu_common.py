"""Shared pieces of the GPU benchmark scripts: the machine's description, its memory bandwidth,
timing without artefacts, correctness comparisons and the JSON writer."""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

_SRC = Path(__file__).resolve().parents[1] / "src"
if str(_SRC) not in sys.path:  # run from a checkout: import the package beside the script
    sys.path.insert(0, str(_SRC))

# DRAM bandwidth (GB/s) by device name; the first substring that matches wins, so specific names come first.
PEAK_GBPS = [
    ("H200", 4800.0), ("GH200", 4000.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("L40", 864.0),
    ("L4", 300.0), ("A10G", 600.0), ("A10", 600.0), ("RTX 4090", 1008.0), ("V100", 900.0), ("T4", 320.0),
]


class BenchmarkError(RuntimeError):
    """A benchmark cannot give trustworthy numbers (wrong results, missing requirements)."""


def peak_gbps(name: str, override: float | None = None):
    """(GB/s, where the figure comes from) for a device name; (None, reason) when unknown."""
    if override:
        return override, "--peak-gbps"
    for key, value in PEAK_GBPS:
        if key.lower() in name.lower():
            return value, f"table entry {key!r}"
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    clock, width = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock and width:  # kHz, bits; double data rate
        return 2 * clock * 1e3 * width / 8 / 1e9, "memory clock x bus width"
    return None, f"unknown device {name!r}: pass --peak-gbps"


def _nvidia_smi() -> dict:
    fields = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return {"nvidia_smi": f"unavailable ({type(e).__name__})"}
    return dict(zip(fields.split(","), (v.strip() for v in out.split(","))))


def machine_info(peak_override: float | None = None) -> dict:
    """Device, software versions, clocks and the DRAM peak (CUDA only)."""
    import triton

    import metaformer

    props = torch.cuda.get_device_properties(0)
    peak, source = peak_gbps(props.name, peak_override)
    return {
        "device": props.name, "compute_capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "peak_gbps": peak, "peak_source": source,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "metaformer": metaformer.__version__, "python": sys.version.split()[0], **_nvidia_smi(),
    }


def header_lines(info: dict) -> list[str]:
    peak = f"{info['peak_gbps']:.0f} GB/s ({info['peak_source']})" if info["peak_gbps"] else info["peak_source"]
    return [
        f"device: {info['device']} (sm_{info['compute_capability'].replace('.', '')}, {info['sms']} SMs, "
        f"{info['memory_gib']} GiB, L2 {info['l2_mib']} MiB), DRAM peak {peak}",
        f"software: torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, metaformer "
        f"{info['metaformer']}, python {info['python']}, driver {info.get('driver_version', '?')}",
        f"clocks: SM {info.get('clocks.sm', '?')} (max {info.get('clocks.max.sm', '?')}), memory "
        f"{info.get('clocks.mem', '?')} (max {info.get('clocks.max.mem', '?')}), power limit "
        f"{info.get('power.limit', '?')}, {info.get('temperature.gpu', '?')} C",
    ]


def bench(fn, device: torch.device, warmup_ms: float, rep_ms: float, timer: str = "do_bench") -> dict:
    """Milliseconds per call of fn: median and 20/80 % quantiles.

    On CUDA, ``triton.testing.do_bench`` (the L2 cache is flushed before every call, one event pair
    per call around fn alone) or ``do_bench_cudagraph`` (replays of a captured graph: no launch
    overhead; no L2 flush). On CPU (smoke runs only), perf_counter over a few calls.
    """
    if device.type == "cuda":
        import triton.testing as tt

        if timer == "cudagraph":
            q = tt.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        else:
            q = tt.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=5)
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1]}


def policy_rounds(model, x: torch.Tensor, policies: dict, device: torch.device, rounds: int, warmup_ms: float,
                  rep_ms: float, label: str, tol: float = 1e-4) -> dict:
    """A model (channels_last, on ``device``) under interchangeable code paths, measured in interleaved rounds.

    ``policies`` maps a name to a context-manager factory that switches the library to that path; the first
    is the base the others are compared with. Each policy's fp32 logits (TF32 off) are checked against the
    base's (largest difference over largest magnitude within ``tol``, else :class:`BenchmarkError`), then each round
    times every policy in turn: inference (``inference_mode``) and a training step (SGD), both under bf16
    autocast, and on CUDA inference again as the replay of a captured CUDA graph (``inference_graph``: the
    GPU's time alone, without the host's launch work, which a busy host stretches by tens of percent).
    Returns the checks, every round, the median and best round per policy, and the base's time over each
    other policy's (above 1: faster than the base).
    """
    names = list(policies)
    base = names[0]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.eval()
    logits = {}
    # fp32 without TF32: with it every convolution rounds its inputs to 10 bits, and two policies' last-bit
    # differences grow to 1e-4 of the logits (poolformerv2_s12, H100)
    with no_tf32(), torch.inference_mode():
        for p in names:
            with policies[p]():
                logits[p] = model(x).float()
    checks = {p: rel_diff(logits[p], logits[base]) for p in names}
    if not max(checks.values()) <= tol:
        raise BenchmarkError(f"{label}: a policy's fp32 logits differ from {base!r}'s: {checks}")

    def infer():
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16):
            model(x)

    def train():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        opt.step()

    parts = ("inference", "train_step") + (("inference_graph",) if device.type == "cuda" else ())
    times = {p: {part: [] for part in parts} for p in names}
    for _ in range(rounds):
        for p in names:
            with policies[p]():
                model.eval()
                times[p]["inference"].append(bench(infer, device, warmup_ms, rep_ms)["median_ms"])
                if "inference_graph" in parts:
                    times[p]["inference_graph"].append(bench(infer, device, warmup_ms, rep_ms, "cudagraph")["median_ms"])
                model.train()
                times[p]["train_step"].append(bench(train, device, warmup_ms, rep_ms)["median_ms"])
    model.eval()
    summary = {p: {part: {"median_ms": statistics.median(v), "best_ms": min(v)} for part, v in d.items()}
               for p, d in times.items()}
    ratios = {p: {part: {stat: summary[base][part][stat] / summary[p][part][stat] for stat in ("median_ms", "best_ms")}
                  for part in parts} for p in names[1:]}
    return {f"checks_rel_diff_vs_{base}_fp32": checks, "rounds_ms": times, "summary": summary,
            f"speedup_vs_{base}": ratios}


def policy_args(doc: str, first: str, models: list, output: Path, argv=None) -> argparse.Namespace:
    """The command line of a policy benchmark (``bench_gpu_groupnorm.py``, ``bench_gpu_edge_norms.py``): its
    parts (its own ``first``, then ``models``), the models of the whole-model part, interleaved rounds, timing,
    and ``--smoke`` (tiny sizes, on CPU)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=[first, "models"], choices=[first, "models"])
    p.add_argument("--models", nargs="+", default=models, choices=models)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the policies per model")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=150.0, help=f"{first}: timed time per case")
    p.add_argument("--model-rep-ms", type=float, default=250.0, help="models: timed time per case and round")
    p.add_argument("--output", type=Path, default=output)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, any device: the plumbing only")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.rounds, args.warmup_ms, args.rep_ms, args.model_rep_ms = 2, 1, 1.0, 5.0, 5.0
    args.device = torch.device("cpu" if args.smoke else "cuda")
    return args


@contextmanager
def replaced(value, *targets):
    """Sets each ``(object, attribute)`` of ``targets`` to ``value`` inside the block (a policy benchmark's
    switch between code paths), and restores what was there after."""
    saved = [getattr(obj, attr) for obj, attr in targets]
    for obj, attr in targets:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for (obj, attr), old in zip(targets, saved):
            setattr(obj, attr, old)


def no_tf32():
    """fp32 convolutions and matrix products without TF32 inside the block (for comparisons at fp32 tolerances)."""
    return replaced(False, (torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32"))


def policy_models(args, results: dict, save, policies: dict) -> None:
    """The whole-model part of a policy benchmark: each of ``args.models`` (ours, channels_last) under
    ``policies`` (see :func:`policy_rounds`), its speed-ups printed and saved as it finishes."""
    import metaformer

    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    x = x.contiguous(memory_format=torch.channels_last)
    base = next(iter(policies))
    for name in args.models:
        torch.manual_seed(0)
        model = metaformer.create(name).to(args.device).to(memory_format=torch.channels_last)
        res = results["models"][name] = policy_rounds(model, x, policies, args.device, args.rounds, args.warmup_ms,
                                                      args.model_rep_ms, name)
        for p, ratios in res[f"speedup_vs_{base}"].items():
            print(f"  {name:18} {p:9} vs {base}: {policy_line(ratios)}", flush=True)
        save()
        del model
        if args.device.type == "cuda":
            torch.cuda.empty_cache()


def settings(args) -> dict:
    """A run's arguments for its JSON (paths and devices as strings)."""
    return {k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()}


def begin(args, kind: str, **entries) -> dict | None:
    """The start of a GPU benchmark run on ``args.device`` (CPU for ``--smoke``): None, with a message, when no
    CUDA device is there; else cuDNN's autotuner on, the machine's description printed, and the results
    dict (``kind``, the machine, bf16 autocast, the settings, then ``entries``)."""
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU speed (use --smoke for the plumbing on CPU)", file=sys.stderr)
        return None
    torch.backends.cudnn.benchmark = True
    info = machine_info() if args.device.type == "cuda" else {"device": "cpu (smoke)"}
    print("\n".join(header_lines(info)) if args.device.type == "cuda" else "smoke run on CPU", flush=True)
    return {"kind": kind, "machine": info, "autocast": "bfloat16",
            "settings": settings(args),
            **entries}


def policy_main(args, kind: str, first: tuple, policy, names: tuple) -> int:
    """Runs a policy benchmark: its own part ``first`` = (name, title, ``fn(args, results, save)``), then the
    whole models under the policies ``names`` (``policy(name)`` switches to one; :func:`policy_models`), each
    as ``args.parts`` asks; the JSON (``kind``, the machine, the settings, one entry per part) is written after
    each case."""
    name, title, fn = first
    policies = {p: functools.partial(policy, p) for p in names}
    parts = {name: (title, fn),
             "models": ("whole models, policies interleaved", lambda *a: policy_models(*a, policies))}
    results = begin(args, kind, **{part: {} for part in parts})
    if results is None:
        return 1

    def save():
        write_json(args.output, results)

    for part, (heading, run) in parts.items():
        if part in args.parts:
            print(f"\n{heading}", flush=True)
            run(args, results, save)
    save()
    print(f"\nwrote {args.output}")
    return 0


def time_cases(cases: dict, args) -> dict:
    """``{name}_ms``: the median milliseconds of each of ``cases`` (name -> a call), timed as ``args`` says."""
    return {f"{name}_ms": bench(fn, args.device, args.warmup_ms, args.rep_ms)["median_ms"] for name, fn in cases.items()}


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference of ``got`` from ``want`` over ``want``'s largest magnitude."""
    return ((got - want).abs().max() / want.abs().max()).item()


def checked_rel_diff(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 2e-2) -> float:
    """The largest difference of ``got`` from ``want`` over ``want``'s largest magnitude (in fp32);
    :class:`BenchmarkError` naming ``what`` above ``tol`` (NaN too)."""
    rel = rel_diff(got.float(), want.float())
    if not rel <= tol:
        raise BenchmarkError(f"{what} differs from the plain composition by {rel:.3g} of its largest value")
    return rel


def fwd_bwd_ms(module, fns: dict, x: torch.Tensor, args, grad: torch.Tensor | None = None) -> dict:
    """``{name}_fwd_bwd_ms``: the milliseconds of forward plus backward (bf16 autocast) of each of ``fns``
    (name -> ``fn(t)``) on a leaf copy of ``x``, with ``module`` in training mode (back in evaluation after); the
    backward takes ``grad``, or without it that of the mean square of the fp32 output."""
    xg = x.detach().clone().requires_grad_(True)

    def step(fn):
        def run():
            with torch.autocast(args.device.type, torch.bfloat16):
                out = fn(xg)
            if grad is None:
                out.float().square().mean().backward()
            else:
                out.backward(grad)
        return run

    module.train()
    try:
        return {f"{name}_fwd_bwd_ms": bench(step(fn), args.device, args.warmup_ms, args.rep_ms)["median_ms"]
                for name, fn in fns.items()}
    finally:
        module.eval()


def policy_line(ratios: dict) -> str:
    """One policy's speed-ups from :func:`policy_rounds`, in words: median (best round) per part."""
    return ", ".join(f"{part.replace('_', ' ')} {r['median_ms']:.2f}x (best round {r['best_ms']:.2f}x)"
                     for part, r in ratios.items())


def peak_memory_mib(fn, device: torch.device):
    """Peak CUDA memory allocated during one call of fn, above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def compare(name: str, got: dict, want: dict, tol: float) -> dict:
    """Largest error / largest magnitude per output; raises BenchmarkError above ``tol``."""
    errors, bad = {}, []
    for key, ref in want.items():
        if got.get(key) is None:
            continue
        err = (got[key].double() - ref.double()).abs().max().item()
        scale = ref.double().abs().max().item()
        errors[key] = err / max(scale, 1e-30)
        if not errors[key] <= tol:  # NaN fails too
            bad.append(f"{key}: max error {err:.3g} vs largest magnitude {scale:.3g} (relative {errors[key]:.3g} "
                       f"> {tol:g})")
    if bad:
        raise BenchmarkError(f"{name} gives wrong results: " + "; ".join(bad))
    return errors


def tree_problem(trees: list) -> str | None:
    """Why source ``trees`` (directories holding the ``metaformer`` package, compared in subprocesses by
    ``bench_gpu_host.py --trees`` and ``bench_host_dispatch.py --src``) cannot be compared, or None."""
    if len({str(Path(t).resolve()) for t in trees}) != len(trees):
        return f"a tree is named twice ({' '.join(map(str, trees))}); give each tree once"
    for tree in trees:
        if not (Path(tree) / "metaformer" / "__init__.py").is_file():
            return f"{tree} holds no metaformer package (expected {tree}/metaformer/__init__.py)"
    return None


def alternating(trees: list, rounds: int):
    """(round, tree) for every tree in every round, in turn forwards and backwards (neither tree always first)."""
    for r in range(rounds):
        for tree in trees if r % 2 == 0 else trees[::-1]:
            yield r, tree


def write_json(path: Path, results: dict) -> None:
    from metaformer.files import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results, indent=2, default=str) + "\n")
