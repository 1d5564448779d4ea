"""One command for a GPU session: the CUDA kernel tests, a tile-size sweep, then the benchmarks.

    PYTHONPATH=src python benchmarks/gpu_session.py --out-dir benchmarks/results   # about 9 minutes
    PYTHONPATH=src python benchmarks/gpu_session.py --skip tests sweep bench   # the whole families table
    PYTHONPATH=src python benchmarks/gpu_session.py --dry-run     # the plan, on any machine

Steps, each a subprocess with its own log and a share of the time budget (``--budget-s``, default
560 s), killed if it overruns (recorded as such, never silently):

1. ``tests``: tests/test_kernels_cuda.py, test_kernels_selfcheck.py, test_kernels_cuda_ln.py and
   test_kernels_cuda_halves.py without the slow interpreter suites (CPU checks, run by CI), with
   pytest-xdist when installed. A skipped CUDA test on a machine with a GPU counts as a failure.
2. ``sweep``: the Triton tile sizes and warps (``TritonConfig``), one field at a time from the
   defaults, scored by the fwd+bwd time of the mixer half summed over poolformer_s12's stages
   (weighted by blocks per stage), bf16 channels_last, batch 128; every configuration is
   self-checked against the PyTorch path on first use (the backend is forced, so a wrong one
   raises and is recorded as failed). Writes ``sweep.json`` after each configuration.
3. ``bench``: bench_pool_mixer_gpu.py with the best configuration (compiled baselines for bf16),
   writing ``gpu.json`` after each part (mixer half, then each whole-model variant).
4. ``groupnorm``: bench_gpu_groupnorm.py (ATen's GroupNorm against the layout-keeping one: poolformer_s12's
   MLP half per stage, then the GroupNorm families under the three policies), at most ``--groupnorm-s``,
   writing ``gpu_groupnorm.json`` after each stage and model.
5. ``edges``: bench_gpu_edge_norms.py (the stem's and the downsamplings' LayerNorm, ATen's against the Triton
   kernel: convformer_s18's modules, then the LayerNorm families under both policies), at most ``--edges-s``,
   writing ``gpu_edge_norms.json`` after each module and model.
6. ``pointwise``: bench_gpu_pointwise.py (the block halves' 1x1 convolutions, cuDNN's against a matrix product of
   the channels_last view: convformer_s18's fc1 per stage, then five families under both policies), at most
   ``--pointwise-s``, writing ``gpu_pointwise.json`` after each layer and model.
7. ``families``: bench_gpu_families.py (the LayerNorm / StarReLU kernels, then every family against
   timm NCHW / channels_last eager and compiled, inference and training) with the time left
   (``--families-s`` of the budget is kept for it; run alone, the whole budget), writing ``gpu_families.json`` after each part;
   it stops starting work before its own time is up and records what it skipped.

Writes ``gpu_session.json`` (machine, each step's status and time, tests' counts, the sweep, the
benchmark's results and the issue's targets) and prints a summary. Exit status 0 only if every step
passed in time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from gpu_common import write_json  # noqa: E402

STEPS = ("tests", "sweep", "bench", "groupnorm", "edges", "pointwise", "families")
# The policy benchmarks: step -> (script, the JSON it writes).
AB_STEPS = {"groupnorm": ("bench_gpu_groupnorm.py", "gpu_groupnorm.json"),
            "edges": ("bench_gpu_edge_norms.py", "gpu_edge_norms.json"),
            "pointwise": ("bench_gpu_pointwise.py", "gpu_pointwise.json")}
TESTS = ["tests/test_kernels_cuda.py", "tests/test_kernels_selfcheck.py", "tests/test_kernels_cuda_ln.py",
         "tests/test_kernels_cuda_halves.py"]
SWEEP_AXES = [("tile", [512, 2048, 4096]), ("num_warps", [2, 8]), ("max_block_c", [32, 128]),
              ("bwd_iters", [2, 8]), ("stats_block", [2048, 8192]), ("stats_num_warps", [4, 16])]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--budget-s", type=float, default=560.0, help="whole session (default 560 s)")
    p.add_argument("--tests-s", type=float, default=150.0, help="most time for the tests step")
    p.add_argument("--sweep-s", type=float, default=90.0, help="most time for the sweep step")
    p.add_argument("--groupnorm-s", type=float, default=120.0, help="most time for the groupnorm step")
    p.add_argument("--edges-s", type=float, default=120.0, help="most time for the edges step")
    p.add_argument("--pointwise-s", type=float, default=120.0, help="most time for the pointwise step")
    p.add_argument("--families-s", type=float, default=120.0,
                   help="time kept for the families step when other steps run (alone it gets the whole budget)")
    p.add_argument("--families-args", default="",
                   help="more arguments for bench_gpu_families.py, e.g. \"--no-compile --models caformer_s18\"")
    p.add_argument("--policy-args", default="",
                   help="more arguments for the groupnorm, edges and pointwise steps' benchmarks, e.g. \"--rounds 2\"")
    p.add_argument("--skip", nargs="*", default=[], choices=list(STEPS))
    p.add_argument("--dry-run", action="store_true", help="print the steps' commands and exit (no GPU needed)")
    p.add_argument("--sweep", action="store_true", help=argparse.SUPPRESS)  # the sweep step itself
    return p.parse_args(argv)


def run_step(name: str, cmd: list, timeout: float, out_dir: Path) -> dict:
    """Runs cmd with its output in ``out_dir/NAME.log``; kills its process group after ``timeout``."""
    log = out_dir / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    env.pop("METAFORMER_BACKEND", None)
    print(f"\n=== {name}: {' '.join(map(str, cmd))} (at most {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    elapsed = time.perf_counter() - t0
    tail = log.read_text(errors="replace")[-3000:]
    print(tail[-1500:], flush=True)
    status = "timed out" if timed_out else ("passed" if rc == 0 else f"failed (exit status {rc})")
    print(f"=== {name}: {status} after {elapsed:.0f} s; log {log}", flush=True)
    return {"status": status, "returncode": rc, "seconds": round(elapsed, 1), "log": str(log), "tail": tail}


def _pytest_counts(text: str) -> dict:
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", text)}


# ------------------------------------------------------------------------------ the sweep step
def sweep(args) -> int:
    import torch
    import triton.testing as tt
    from bench_pool_mixer_gpu import STAGES, FusedMixerHalf, RefMixerHalf

    import metaformer.kernels as K
    from metaformer.kernels import triton_impl as ti

    t_end = time.perf_counter() + args.sweep_s
    K.set_backend("triton")  # forced: a configuration whose self-check fails raises
    cases = []
    for C, S, blocks in STAGES:
        ref = RefMixerHalf(C).cuda().to(torch.bfloat16)
        x = torch.randn(128, C, S, S, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        cases.append((f"{C}x{S}x{S}", blocks, FusedMixerHalf(ref), x, torch.randn_like(x),
                      [ref.norm.weight, ref.ls]))

    def measure(cfg):
        ti.set_config(cfg)
        per_stage, total = {}, 0.0
        for name, blocks, fn, x, dy, params in cases:
            xg = x.detach().requires_grad_(True)

            def step(fn=fn, xg=xg, dy=dy, params=params):
                torch.autograd.grad(fn(xg), [xg, *params], dy)

            per_stage[name] = tt.do_bench(step, warmup=10, rep=40, return_mode="median")
            total += blocks * per_stage[name]
        return {"config": vars(cfg), "weighted_fwd_bwd_ms": total, "per_stage_ms": per_stage}

    out = {"dtype": "bf16", "layout": "channels_last", "batch": 128, "score": "sum of blocks x fwd+bwd median ms",
           "configs": [], "best": None}
    best = ti.get_config()
    tried = set()
    for field, values in [(None, [None])] + SWEEP_AXES:
        for value in values:
            if time.perf_counter() > t_end:
                out["stopped"] = "time budget reached"
                break
            cfg = best if field is None else ti.TritonConfig(**{**vars(best), field: value})
            if cfg in tried:
                continue
            tried.add(cfg)
            try:
                row = measure(cfg)
            except Exception as e:  # a configuration that fails to compile, launch or self-check
                row = {"config": vars(cfg), "error": f"{type(e).__name__}: {e}"}
            out["configs"].append(row)
            print(json.dumps(row), flush=True)
            scored = [r for r in out["configs"] if "weighted_fwd_bwd_ms" in r]
            if scored:
                winner = min(scored, key=lambda r: r["weighted_fwd_bwd_ms"])
                best = ti.TritonConfig(**winner["config"])
                out["best"] = winner
            write_json(args.out_dir / "sweep.json", out)
    return 0 if out["best"] else 1


# ------------------------------------------------------------------------------ the session
def main(argv=None) -> int:
    args = parse_args(argv)
    args.out_dir = args.out_dir.resolve()
    if args.dry_run:
        for name in STEPS:
            if name not in args.skip:
                print(f"{name}: {' '.join(map(str, _command(name, args)))}")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        return sweep(args)
    import torch

    if not torch.cuda.is_available():
        print("gpu_session: no CUDA device; this script runs the GPU tests and benchmarks. Exiting.", file=sys.stderr)
        return 1
    t_end = time.perf_counter() + args.budget_s
    session = {"kind": "gpu_session", "device": torch.cuda.get_device_name(), "steps": {}}

    def left(reserve: float = 0.0) -> float:
        return t_end - time.perf_counter() - reserve

    if "tests" not in args.skip:
        step = run_step("tests", _command("tests", args), min(args.tests_s, left(reserve_after(args, "tests"))),
                        args.out_dir)
        step["counts"] = _pytest_counts(step["tail"])
        if step["counts"].get("skipped") and step["status"] == "passed":
            step["status"] = "failed (CUDA tests skipped on a machine with a GPU)"
        session["steps"]["tests"] = step
    config = ""
    if "sweep" not in args.skip:
        sweep_s = min(args.sweep_s, left(60 + reserve_after(args, "sweep")))
        step = run_step("sweep", _command("sweep", args, sweep_s=sweep_s), sweep_s + 60, args.out_dir)
        sweep_file = args.out_dir / "sweep.json"
        step["result"] = json.loads(sweep_file.read_text()) if sweep_file.exists() else None
        best = (step["result"] or {}).get("best")
        if best:
            config = ",".join(f"{k}={v}" for k, v in best["config"].items())
        session["steps"]["sweep"] = step
    if "bench" not in args.skip:
        out = args.out_dir / "gpu.json"
        step = run_step("bench", _command("bench", args, config=config), left(10 + reserve_after(args, "bench")),
                        args.out_dir)
        step["result"] = json.loads(out.read_text()) if out.exists() else None
        mixer = args.out_dir / "gpu_mixer.json"
        step["mixer"] = json.loads(mixer.read_text())["records"] if mixer.exists() else None
        session["steps"]["bench"] = step
    for name, (_, output) in AB_STEPS.items():
        if name not in args.skip:
            out = args.out_dir / output
            step = run_step(name, _command(name, args),
                            min(getattr(args, f"{name}_s"), left(reserve_after(args, name))), args.out_dir)
            step["result"] = json.loads(out.read_text()) if out.exists() else None
            session["steps"][name] = step
    if "families" not in args.skip:
        out = args.out_dir / "gpu_families.json"
        budget = left(30)  # the benchmark stops starting work at its budget; the step's timeout is the hard stop
        step = run_step("families", _command("families", args, budget_s=budget), budget + 25, args.out_dir)
        step["result"] = json.loads(out.read_text()) if out.exists() else None
        session["steps"]["families"] = step
    session["targets"] = _targets(session)
    write_json(args.out_dir / "gpu_session.json", session)
    _summary(session)
    return 0 if all(s["status"] == "passed" for s in session["steps"].values()) else 1


def reserve_after(args, step: str) -> float:
    """Seconds kept for the steps after ``step`` that run (skipped ones keep nothing): the sweep's 60 s of
    configurations' overhead, the benchmark's 240 s, ``--groupnorm-s``, ``--edges-s``, ``--pointwise-s`` and the
    families' ``--families-s``."""
    need = {"sweep": 60.0, "bench": 240.0, "groupnorm": args.groupnorm_s, "edges": args.edges_s,
            "pointwise": args.pointwise_s, "families": args.families_s}
    return sum(need[s] for s in STEPS[STEPS.index(step) + 1:] if s not in args.skip)


def _command(name: str, args, config: str = "", sweep_s: float | None = None, budget_s: float | None = None) -> list:
    """The command line of one step."""
    if name == "tests":
        # not the slow interpreter suites: they check the kernels on CPU (CI's job) and Triton's interpreter
        # differs between releases (3.6's cannot run a loop bounded by a runtime argument)
        return [sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider", "-rs", "-m", "not slow",
                *(["-n", "8"] if _has("xdist") else [])]
    if name == "sweep":
        return [sys.executable, str(HERE / "gpu_session.py"), "--sweep", "--out-dir", str(args.out_dir),
                "--sweep-s", f"{sweep_s if sweep_s is not None else args.sweep_s:.0f}"]
    if name == "bench":
        return [sys.executable, str(HERE / "bench_pool_mixer_gpu.py"), "--compile-dtypes", "bf16", "--output",
                str(args.out_dir / "gpu.json"), *(["--triton-config", config] if config else [])]
    if name in AB_STEPS:
        script, output = AB_STEPS[name]
        return [sys.executable, str(HERE / script), "--output", str(args.out_dir / output), *shlex.split(args.policy_args)]
    return [sys.executable, str(HERE / "bench_gpu_families.py"), "--output", str(args.out_dir / "gpu_families.json"),
            "--budget-s", f"{budget_s if budget_s is not None else args.families_s:.0f}", *shlex.split(args.families_args)]


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _targets(session: dict) -> dict:
    bench = (session["steps"].get("bench") or {}).get("result") or {}
    train = bench.get("train_step", {}).get("ours", {})
    families = (session["steps"].get("families") or {}).get("result") or {}
    ab = {name: (session["steps"].get(name) or {}).get("result") or {} for name in AB_STEPS}
    return {**{k: v for k, v in bench.items() if k.startswith(("mixer_", "target_"))},
            "train_step_ours_vs_timm_speed": train.get("speedup_vs_timm"),
            "train_step_ours_vs_timm_peak_memory": train.get("peak_mem_vs_timm"),
            "families": {name: m.get("ratios") for name, m in families.get("models", {}).items()},
            **{f"{step}_{key}": {name: m.get(key) for name, m in r.get("models", {}).items()}
               for step, r in ab.items() for key in _speedup_keys(r)}}


def _speedup_keys(result: dict) -> list:
    """A policy benchmark's ratio entries (``speedup_vs_`` its base policy: ``aten``, ``conv``)."""
    return sorted({k for m in result.get("models", {}).values() for k in m if k.startswith("speedup_vs_")})


def _summary(session: dict) -> None:
    print("\n=== summary", session["device"])
    for name, step in session["steps"].items():
        extra = f" {step['counts']}" if "counts" in step else ""
        print(f"  {name:6} {step['status']} in {step['seconds']:.0f} s{extra}")
    best = ((session["steps"].get("sweep") or {}).get("result") or {}).get("best")
    if best:
        print(f"  best tile sizes: {best['config']} ({best['weighted_fwd_bwd_ms']:.3f} ms weighted)")
    print(f"  targets: {json.dumps(session['targets'])}")


if __name__ == "__main__":
    sys.exit(main())
