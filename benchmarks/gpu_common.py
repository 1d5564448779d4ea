"""Shared pieces of the GPU benchmark scripts: the machine's description, its memory bandwidth,
timing without artefacts, correctness comparisons and the JSON writer."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
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


def write_json(path: Path, results: dict) -> None:
    from metaformer.files import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results, indent=2, default=str) + "\n")
