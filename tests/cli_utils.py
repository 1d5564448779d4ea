"""Shared by the command-line tests of runs and inputs: a small data set, a run, and in-process calls.

The data: 64 training and 32 validation images of scikit-learn's digits (two steps of 32 per epoch); the
model: poolformer_s12 with a narrow MLP (mlp_ratio=0.5, for small checkpoints) at 32x32. What involves
kills, signals, locks or process limits runs as real processes; the rest calls ``metaformer.cli.main`` in
the test process, which is the same code without the interpreter start-up.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys

N_TRAIN, N_VAL = 64, 32
ARGS = ["--model", "poolformer_s12", "--model-kwargs", "mlp_ratio=0.5", "--img-size", "32", "-b", "32", "--lr",
        "2e-3", "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0",
        "--workers", "0", "--seed", "0", "--no-progress", "--no-plot"]


def make_data(root: str) -> str:
    """The small digits ImageFolder under ``root``."""
    from data_utils import make_digits_imagefolder

    return make_digits_imagefolder(root, N_TRAIN, N_VAL, size=32)


def copy_run(run_folder: str, tmp_path) -> str:
    """A copy of a run folder, for a test that changes it."""
    out = str(tmp_path / "run")
    shutil.copytree(run_folder, out)
    return out


def run_main(*args) -> subprocess.CompletedProcess:
    """``metaformer ARGS`` in this process: its exit status and what it printed."""
    from metaformer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def one_error_line(proc) -> str:
    """The one ``metaformer: error:`` line of a failed command (asserting there is one, and no traceback)."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip() and "warning" not in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def dead_pid() -> int:
    """The PID of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid

