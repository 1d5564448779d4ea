"""The GPU benchmark scripts' plumbing, without a GPU (their timings are never asserted anywhere).

benchmarks/bench_pool_mixer_gpu.py and benchmarks/gpu_session.py must fail loudly where they
cannot measure, and their CPU smoke mode must run the same code path as a real run: correctness
comparisons, the table, the JSON file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_common  # noqa: E402
import gpu_session  # noqa: E402
from helpers import subprocess_env  # noqa: E402


def _run(script, *args, timeout=300):
    env = subprocess_env(drop=("TRITON_INTERPRET",))
    return subprocess.run([sys.executable, str(BENCH / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("script", ["bench_pool_mixer_gpu.py", "bench_gpu_groupnorm.py", "bench_gpu_edge_norms.py",
                                    "bench_gpu_host.py", "gpu_session.py"])
def test_without_cuda_exits_with_a_message(script, tmp_path):
    out = _run(script, "--output" if script.startswith("bench") else "--out-dir", str(tmp_path / "x"))
    assert out.returncode == 1
    assert "no CUDA device" in out.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_smoke_run_checks_times_and_writes_json(tmp_path):
    path = tmp_path / "gpu.json"
    out = _run("bench_pool_mixer_gpu.py", "--smoke", "--no-compile", "--dtypes", "fp32", "bf16", "--layouts", "nchw",
               "--model-variants", "timm", "ours", "--output", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(path.read_text())
    records = json.loads((tmp_path / "gpu_mixer.json").read_text())["records"]
    cases = [r for r in records if r["shape"] != "poolformer_s12 (blocks x stages)"]
    assert {(r["dtype"], r["shape"], r["pass"], r["variant"]) for r in cases} == {
        (d, s, p, v) for d in ("fp32", "bf16") for s in ("8x9x9", "16x5x5") for p in ("fwd", "fwd+bwd")
        for v in ("torch", "eager")}
    for r in cases:
        assert r["median_ms"] > 0 and r["gbps_ideal"] > 0
        if r["variant"] == "torch":  # checked against the fp32 (fp64) reference before timing
            assert r["max_rel_error"] <= (2e-5 if r["dtype"] == "fp32" else 2e-2)
    weighted = [r for r in records if r["shape"] == "poolformer_s12 (blocks x stages)"]
    assert len(weighted) == 8
    assert set(res["inference"]) == set(res["train_step"]) == {"timm", "ours"}
    assert res["train_step"]["timm"]["speedup_vs_timm"] == 1.0
    assert res["mixer_file"] == "gpu_mixer.json"


def test_families_smoke_run_checks_against_timm_and_writes_json(tmp_path):
    """The every-family benchmark compares ours (timm's weights) with timm before timing: the final maps for
    every family, the logits where the heads agree (timm's PoolFormer v1 pools before its head norm)."""
    path = tmp_path / "families.json"
    out = _run("bench_gpu_families.py", "--smoke", "--no-compile", "--no-kernels", "--models", "poolformer_s12",
               "caformer_s18", "--size", "32", "--variants", "timm_cl", "ours", "--output", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    models = json.loads(path.read_text())["models"]
    checks = {name: models[name]["checks"] for name in ("poolformer_s12", "caformer_s18")}
    assert set(checks["poolformer_s12"]) == {"rel_diff_vs_timm_features_fp32"}
    assert set(checks["caformer_s18"]) == {"rel_diff_vs_timm_features_fp32", "rel_diff_vs_timm_logits_fp32"}
    assert all(v <= 1e-3 for c in checks.values() for v in c.values())
    assert set(models["caformer_s18"]["variants"]) == {"timm_cl", "ours"}


def test_compare_stops_on_wrong_or_nan_results():
    want = {"y - x": torch.tensor([1.0, -2.0], dtype=torch.float64), "dx": torch.tensor([0.5, 0.5])}
    errors = gpu_common.compare("v", {"y - x": torch.tensor([1.0, -2.0 + 1e-6], dtype=torch.float64), "dx": want["dx"]},
                                want, 1e-5)
    assert errors["y - x"] == pytest.approx(0.5e-6, rel=1e-3) and errors["dx"] == 0
    with pytest.raises(gpu_common.BenchmarkError, match=r"v gives wrong results: y - x"):
        gpu_common.compare("v", {"y - x": torch.tensor([1.0, -2.1]), "dx": want["dx"]}, want, 1e-3)
    with pytest.raises(gpu_common.BenchmarkError, match="dx"):
        gpu_common.compare("v", {"y - x": want["y - x"], "dx": torch.tensor([float("nan"), 0.5])}, want, 1e-3)


@pytest.mark.parametrize(("name", "gbps"), [("NVIDIA H100 80GB HBM3", 3350), ("NVIDIA H100 PCIe", 2000),
                                            ("NVIDIA H100 NVL", 3900), ("NVIDIA H200", 4800),
                                            ("NVIDIA A100-SXM4-80GB", 2039)])
def test_peak_bandwidth_is_the_cards_own(name, gbps):
    assert gpu_common.peak_gbps(name)[0] == gbps
    assert gpu_common.peak_gbps(name, 1234.0) == (1234.0, "--peak-gbps")


def test_session_step_is_killed_at_its_time_limit(tmp_path):
    quick = gpu_session.run_step("quick", [sys.executable, "-c", "print('3 passed, 1 skipped in 0.1s')"], 60, tmp_path)
    assert quick["status"] == "passed" and gpu_session._pytest_counts(quick["tail"]) == {"passed": 3, "skipped": 1}
    slow = gpu_session.run_step("slow", [sys.executable, "-c", "import time; print('started', flush=True); "
                                         "time.sleep(60)"], 2, tmp_path)
    assert slow["status"] == "timed out" and "started" in (tmp_path / "slow.log").read_text()
    failed = gpu_session.run_step("failed", [sys.executable, "-c", "raise SystemExit(3)"], 60, tmp_path)
    assert failed["status"] == "failed (exit status 3)"


def test_session_keeps_time_only_for_the_steps_that_run():
    args = gpu_session.parse_args(["--skip", "sweep", "bench", "groupnorm", "edges", "pointwise", "--families-s", "120"])
    assert gpu_session.reserve_after(args, "tests") == 120  # the families step alone follows
    args = gpu_session.parse_args(["--families-s", "100", "--groupnorm-s", "80", "--edges-s", "70", "--pointwise-s", "50"])
    assert gpu_session.reserve_after(args, "tests") == 60 + 240 + 80 + 70 + 50 + 100
    assert gpu_session.reserve_after(args, "bench") == 80 + 70 + 50 + 100
    assert gpu_session.reserve_after(args, "groupnorm") == 70 + 50 + 100
    assert gpu_session.reserve_after(args, "edges") == 50 + 100
    assert gpu_session.reserve_after(args, "pointwise") == 100
    args = gpu_session.parse_args(["--skip", "groupnorm", "edges", "pointwise", "families"])
    assert gpu_session.reserve_after(args, "bench") == 0


def test_session_dry_run_lists_the_policy_steps(tmp_path):
    out = _run("gpu_session.py", "--dry-run", "--out-dir", str(tmp_path), "--skip", "sweep", "bench")
    assert out.returncode == 0, out.stdout + out.stderr
    steps = [line.split(":")[0] for line in out.stdout.splitlines()]
    assert steps == ["tests", "groupnorm", "edges", "pointwise", "families"], out.stdout
    for script in ("bench_gpu_groupnorm.py", "bench_gpu_edge_norms.py", "bench_gpu_pointwise.py"):
        assert f"{script} --output" in out.stdout, script
    out = _run("gpu_session.py", "--dry-run", "--out-dir", str(tmp_path), "--skip", "sweep", "bench", "families",
               "--policy-args", "--rounds 2 --models poolformerv2_s12")
    lines = {line.split(":")[0]: line for line in out.stdout.splitlines()}
    for step in ("groupnorm", "edges", "pointwise"):
        assert lines[step].endswith("--rounds 2 --models poolformerv2_s12"), lines[step]


def test_families_table_merges_runs_and_computes_ratios_from_medians(tmp_path):
    """``--table`` renders saved runs: a model's variants merged over files, ratios from the medians."""
    import bench_gpu_families

    def row(ms, mem=None):
        part = {"median_ms": ms, "img_per_s": 128 / (ms * 1e-3)}
        return {"inference": dict(part), "train_step": {**part, **({"peak_mem_mib": mem} if mem else {})}}

    first = {"kind": "gpu_families", "machine": {"device": "GPU A"}, "models": {"m": {"variants": {
        "timm_nchw": row(10.0, 400.0), "timm_cl": row(8.0, 500.0), "ours": row(4.0, 250.0),
        "timm_compiled": row(6.0)}}}}
    second = {"kind": "gpu_families", "machine": {"device": "GPU A"}, "models": {"m": {"variants": {
        "ours_compiled": row(5.0)}}}}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, data in zip(paths, (first, second)):
        path.write_text(json.dumps(data))
    text = bench_gpu_families.markdown_tables(paths)
    inference, train = [line for line in text.splitlines() if line.startswith("| m |")]
    # best eager is timm_cl (8 ms): ours 4 ms -> 2.00x; timm compiled 6 ms: ours 1.50x, ours compiled 1.20x
    assert inference.split(" | ")[-3:] == ["2.00x", "1.50x", "1.20x |"]
    assert train.endswith("| 2.00x | 1.50x | 1.20x | 0.50x |")  # peak memory 250 / timm_cl's 500
    assert "CUDA-graph" not in text  # no graph replays saved: no such table
    for name, ms in (("timm_nchw", 5.0), ("timm_cl", 6.0), ("ours", 2.0)):
        first["models"]["m"]["variants"][name]["inference_graph"] = {"median_ms": ms, "img_per_s": 128 / (ms * 1e-3)}
    paths[0].write_text(json.dumps(first))
    text = bench_gpu_families.markdown_tables(paths)
    graph = text.split("CUDA-graph replays")[1]
    # img/s at batch 128, best timm replay timm_nchw's 5 ms: ours 2 ms -> 2.50x
    assert "| m | 25600 | 21333 | 64000 | 2.50x |" in graph, graph
    assert bench_gpu_families.ratios(first["models"]["m"]["variants"])["ours_vs_timm_best_graph_inference"] == 2.5
    (tmp_path / "c.json").write_text(json.dumps({"kind": "pool_mixer_gpu"}))
    with pytest.raises(SystemExit, match="not a bench_gpu_families.py result"):
        bench_gpu_families.markdown_tables([tmp_path / "c.json"])


def test_families_profile_records_where_the_time_goes(tmp_path):
    """``--profile`` records, per eager variant and pass, the wall time and the operators by their own time
    (on a CPU run no kernels and no device share)."""
    path = tmp_path / "families.json"
    out = _run("bench_gpu_families.py", "--smoke", "--no-kernels", "--models", "poolformer_s12", "--size", "32",
               "--variants", "timm_cl", "ours", "--profile", "--output", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    profiles = json.loads(path.read_text())["models"]["poolformer_s12"]["profiles"]
    assert set(profiles) == {"timm_cl", "ours"}
    for prof in profiles.values():
        for part in ("inference", "train_step"):
            p = prof[part]
            assert p["wall_ms_per_step"] > 0 and p["device_busy_share"] is None and p["top_kernels"] == []
            names = [r["name"] for r in p["top_cpu_ops"]]
            assert any("convolution" in n for n in names), names  # 1x1 convs run in every model
            assert all(r["self_ms_per_step"] >= 0 and r["calls_per_step"] > 0 for r in p["top_cpu_ops"])


def test_edge_norms_smoke_run_checks_the_policies_and_writes_json(tmp_path):
    """bench_gpu_edge_norms.py: convformer_s18's stem and three downsamplings (plain, through the dispatch, the
    norm alone) and a whole model under both policies, checked against each other before timing."""
    res = _policy_smoke(tmp_path, "bench_gpu_edge_norms.py", "convformer_s18", ("aten", "kernel"))
    assert [k.split()[0] for k in res["modules"]] == ["stem", "downsample1", "downsample2", "downsample3"]
    for r in res["modules"].values():
        assert r["max_rel_diff"] <= 2e-2 and not r["kernel_applies"]  # CPU outside the interpreter: ATen's norm
        assert all(r[k] > 0 for k in ("plain_ms", "forward_ms", "aten_norm_ms", "plain_fwd_bwd_ms", "forward_fwd_bwd_ms"))


def test_host_smoke_run_records_host_and_wall_time_and_profiles_ours(tmp_path):
    """bench_gpu_host.py: per model and side, inference and a training step's host and wall time and launches;
    with --profile, cProfile's tables of ours only (on CPU no launches and no graph replay)."""
    path = tmp_path / "host.json"
    out = _run("bench_gpu_host.py", "--smoke", "--models", "poolformer_s12", "identityformer_s12", "--profile",
               "--output", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    models = json.loads(path.read_text())["models"]
    assert set(models) == {"poolformer_s12 ours", "poolformer_s12 timm", "identityformer_s12 ours"}  # timm: no such model
    for key, modes in models.items():
        for r in modes.values():
            assert 0 < r["host_min_ms"] <= r["host_ms"] <= r["wall_ms"] + 1e-6 and r["launches"] == 0
            assert "graph_ms" not in r
            assert ("profile_tottime" in r) == key.endswith("ours")
    assert "model.py" in models["poolformer_s12 ours"]["inference"]["profile_cumulative"]


def test_host_smoke_run_compares_source_trees_in_subprocesses(tmp_path):
    """bench_gpu_host.py --trees: ours from each tree in its own subprocess (each run records the package it
    imported: the tree's own), the medians per tree and mode; a directory without the package, or a tree named
    twice, is refused."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "src" / "metaformer", copy / "metaformer")
    path = tmp_path / "trees.json"
    src = str((ROOT / "src").resolve())
    out = _run("bench_gpu_host.py", "--smoke", "--models", "identityformer_s12", "--trees", src, str(copy),
               "--rounds", "1", "--output", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(path.read_text())
    assert res["trees"] == [src, str(copy.resolve())]
    for tree, runs in res["rounds"].items():
        assert [r["metaformer_path"] for r in runs] == [str(Path(tree) / "metaformer")]
        assert set(runs[0]["models"]) == {"identityformer_s12 ours"}  # ours only
        for mode in ("inference", "train"):
            row = res["summary"][tree]["identityformer_s12 ours"][mode]
            assert 0 < row["host_ms"] <= row["wall_ms"] + 1e-6
    assert _run("bench_gpu_host.py", "--smoke", "--trees", str(tmp_path), "--output", str(path)).returncode == 2
    assert _run("bench_gpu_host.py", "--smoke", "--trees", src, src, "--output", str(path)).returncode == 2


def test_groupnorm_smoke_run_checks_the_policies_and_writes_json(tmp_path):
    """bench_gpu_groupnorm.py: the MLP half per stage (plain, its operations, the layout-keeping half) and the
    whole model under the three GroupNorm policies, checked against each other before timing."""
    res = _policy_smoke(tmp_path, "bench_gpu_groupnorm.py", "poolformer_s12", ("aten", "inference", "always"))
    assert len(res["halves"]) == 8  # four stages, fp32 and bf16 inputs
    for r in res["halves"].values():
        assert r["layout_norm_channels_last_out"] and r["layout_half_max_rel_diff"] <= 2e-2
        assert all(r[k] > 0 for k in r if k.endswith("_ms"))


def test_pointwise_smoke_run_checks_the_policies_and_writes_json(tmp_path):
    """bench_gpu_pointwise.py: convformer_s18's fc1 per stage as the convolution and as the product (host and
    GPU time, forward plus backward) and a whole model under both policies, checked against each other first."""
    res = _policy_smoke(tmp_path, "bench_gpu_pointwise.py", "convformer_s18", ("conv", "linear"))
    assert [k.split()[0] for k in res["layers"]] == ["stage0", "stage1", "stage2", "stage3"]
    for r in res["layers"].values():
        assert r["max_rel_diff"] <= 2e-2
        assert all(r[f"{p}_{k}"] > 0 for p in ("conv", "linear") for k in ("host_us", "ms", "fwd_bwd_ms"))


def _policy_smoke(tmp_path, script: str, model: str, policies: tuple) -> dict:
    """A policy benchmark's smoke run on ``model`` (64x64): it succeeds, and its whole-model part has every
    policy's rounds, their fp32 logits within 1e-4 of the first's, and each other policy's ratio to it."""
    path = tmp_path / "policy.json"
    out = _run(script, "--smoke", "--models", model, "--size", "64", "--output", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(path.read_text())
    base, others = policies[0], set(policies[1:])
    entry = res["models"][model]
    assert set(entry["rounds_ms"]) == set(policies)
    assert max(entry[f"checks_rel_diff_vs_{base}_fp32"].values()) <= 1e-4
    assert set(entry[f"speedup_vs_{base}"]) == others
    return res
