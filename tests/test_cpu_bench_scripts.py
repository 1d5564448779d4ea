"""benchmarks/bench_cpu_chunks.py's plumbing (its timings are never asserted anywhere)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from metaformer.kernels import cpu_eval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_cpu_chunks  # noqa: E402


def test_chunks_benchmark_writes_both_variants_and_restores_the_threshold(tmp_path, capsys):
    before = cpu_eval._CHUNK_ABOVE
    out = tmp_path / "chunks.json"
    assert bench_cpu_chunks.main(["--models", "poolformer_s12", "--batch", "2", "--size", "64", "--rounds", "1",
                                  "--output", str(out)]) == 0
    assert cpu_eval._CHUNK_ABOVE == before
    data = json.loads(out.read_text())
    assert data["setup"]["batch"] == 2
    row = data["results"]["poolformer_s12"]
    assert set(row) == set(bench_cpu_chunks.VARIANTS)
    assert all(r["median_s"] > 0 and r["img_per_s"] > 0 for r in row.values())
    assert row["default"]["vs_default"] == 1.0
    assert "poolformer_s12" in capsys.readouterr().out


def test_chunks_benchmark_refuses_bad_arguments():
    with pytest.raises(SystemExit):
        bench_cpu_chunks.main(["--rounds", "0"])
