"""``metaformer train`` runs against kills, races, full disks and changed options (issues 15.2, 15.3, 15.5,
15.9, 16.2, 16.3). See cli_utils for the data and the model."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from cli_utils import ARGS, copy_run, dead_pid, one_error_line, run_main
from test_cli import _env, cli, load, read_csv

pytestmark = pytest.mark.slow  # each test trains or resumes a run in a subprocess


def _sigint_default() -> None:
    """Ctrl-C reaches the child even when the suite runs in the background (which ignores SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def run2(data, tmp_path_factory):
    """A finished 2-epoch run (copied by the tests that change it)."""
    out = str(tmp_path_factory.mktemp("run2") / "run")
    cli("train", data, *ARGS, "--epochs", "2", "--output", out)
    return out


# ------------------------------------------------------------------------------------------- 15.2 best.pth
def test_resume_repairs_a_best_pth_older_than_the_best_epoch(run2, data, tmp_path):
    """A kill between replacing last.pth and best.pth (in that order, as before) left a last.pth whose best
    epoch is itself and an older best.pth; the resume rewrites best.pth so that the reported best exists."""
    out = copy_run(run2, tmp_path)
    last = load(os.path.join(out, "last.pth"))
    assert last["epoch"] == 2
    last["best_epoch"], last["best_metric"] = 2, last["metrics"]["top1"]  # epoch 2 was the best...
    torch.save(last, os.path.join(out, "last.pth"))
    first = dict(last, epoch=1, best_epoch=1, best_metric=last["history"][0]["top1"])
    torch.save(first, os.path.join(out, "best.pth"))  # ...but the kill came before best.pth was replaced

    proc = run_main("train", data, *ARGS, "--epochs", "2", "--output", out, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "rewrote it from last.pth" in proc.stderr
    best = load(os.path.join(out, "best.pth"))
    assert best["epoch"] == 2 == load(os.path.join(out, "last.pth"))["best_epoch"]
    assert "at epoch 2" in proc.stdout


def test_best_pth_is_written_before_last_pth(data, tmp_path):
    """When last.pth cannot be replaced (here it is a folder), the new best.pth is already written."""
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "last.pth", "x"))
    proc = run_main("train", data, *ARGS, "--epochs", "1", "--output", out)
    assert proc.returncode == 1 and "cannot write" in one_error_line(proc)
    assert load(os.path.join(out, "best.pth"))["epoch"] == 1
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# ------------------------------------------------------------------------------------------- 15.3 refusing
def test_train_refuses_a_folder_holding_a_run(run2, data, tmp_path):
    out = copy_run(run2, tmp_path)
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    proc = run_main("train", data, *ARGS, "--epochs", "1", "--output", out)
    line = one_error_line(proc)
    assert "already holds a run" in line and "--resume auto" in line and "--overwrite" in line
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before

    proc = run_main("train", data, *ARGS, "--epochs", "1", "--output", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "--overwrite: removing" in proc.stderr
    assert load(os.path.join(out, "last.pth"))["epoch"] == 1 and len(read_csv(os.path.join(out, "metrics.csv"))) == 1


def test_two_trainings_into_one_folder(data, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "metaformer", "train", data, *ARGS, "--epochs", "100", "--output", out]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                             preexec_fn=_sigint_default)
    try:
        deadline = time.time() + 300
        while not os.path.isfile(os.path.join(out, ".lock")) and time.time() < deadline:
            time.sleep(0.05)
        second = cli("train", data, *ARGS, "--epochs", "100", "--output", out, "--resume", "auto", check=False)
        line = one_error_line(second)
        assert f"another training (PID {first.pid}" in line, line
        assert first.poll() is None
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 130 and "interrupted" in stderr
    finally:
        if first.poll() is None:
            first.kill()
    assert not os.path.exists(os.path.join(out, ".lock"))  # released on the way out


def test_stale_lock_and_temporaries_of_a_killed_run_are_cleaned(run2, data, tmp_path):
    out = copy_run(run2, tmp_path)
    dead = dead_pid()
    with open(os.path.join(out, ".lock"), "w") as f:
        f.write(f"{dead} {socket.gethostname()}\n")
    stale = os.path.join(out, f".last.pth.pid{dead}.abc123.tmp")
    live = os.path.join(out, f".last.pth.pid{os.getpid()}.def456.tmp")  # a write in progress elsewhere
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"\0" * 1024)
    proc = run_main("train", data, *ARGS, "--epochs", "2", "--output", out, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "removed 1 temporary file(s)" in proc.stdout
    assert not os.path.exists(stale) and os.path.exists(live)
    assert not os.path.exists(os.path.join(out, ".lock"))


# ------------------------------------------------------------------------------------------- 15.5 write failures
def test_a_failing_checkpoint_write_is_one_line_and_keeps_the_previous_checkpoint(run2, data, tmp_path):
    """The kernel refuses writes past a file size (RLIMIT_FSIZE, with SIGXFSZ ignored): torch.save fails
    inside its C++ writer exactly as on a full disk. The error is one line naming the file, the exit
    status is 1, last.pth still holds epoch 2 and no temporary file is left."""
    out = copy_run(run2, tmp_path)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    cmd = [sys.executable, "-m", "metaformer", "train", data, *ARGS, "--epochs", "3", "--output", out,
           "--resume", "auto"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, preexec_fn=limit_file_size)
    line = one_error_line(proc)
    assert proc.returncode == 1
    assert line.startswith("metaformer: error: cannot write ") and "last.pth" in line and "--resume auto" in line
    assert load(os.path.join(out, "last.pth"))["epoch"] == 2
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# In the child, torch.save waits after writing: the checkpoint's temporary file (written, not yet synced and
# renamed) stays long enough for the poll below to see it. Without the wait a small model's checkpoint exists as
# a temporary file for a few milliseconds, which a busy machine's poll can miss at every epoch.
_SLOW_SAVE = """
import time
import torch
_save = torch.save
def _slow_save(*args, **kwargs):
    _save(*args, **kwargs)
    time.sleep(0.5)
torch.save = _slow_save
"""


def test_ctrl_c_during_a_checkpoint_write(run2, data, tmp_path):
    out = copy_run(run2, tmp_path)
    site = tmp_path / "slow_save"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_SAVE)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "metaformer", "train", data, *ARGS, "--epochs", "6", "--output", out,
           "--resume", "auto"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=_sigint_default)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:  # SIGINT as soon as a checkpoint is being written
            if any(f.startswith(".last.pth.") or f.startswith(".best.pth.") for f in os.listdir(out)):
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.001)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert re.search(r"metaformer: interrupted: .*last\.pth holds epoch \d: continue .*--resume auto", stderr), stderr
    epoch = load(os.path.join(out, "last.pth"))["epoch"]
    assert f"holds epoch {epoch}" in stderr and 2 <= epoch < 6
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")] and not os.path.exists(os.path.join(out, ".lock"))


# ------------------------------------------------------------------------------------------- 15.9 architecture
def test_resume_with_another_architecture_is_refused(run2, data, tmp_path):
    out = copy_run(run2, tmp_path)
    proc = run_main("train", data, *ARGS, "--epochs", "3", "--output", out, "--resume", "auto",
                    "--model-kwargs", "mlp_ratio=0.5", "token_mixer=identity")
    line = one_error_line(proc)
    assert "token_mixer: identity here, the variant's default in the checkpoint" in line
    assert load(os.path.join(out, "last.pth"))["epoch"] == 2


# ------------------------------------------------------------------------------------------- 16.2 / 16.3 schedule
def _timm_lrs(epochs: int, warmup: int, lr: float, at):
    from timm.scheduler import create_scheduler_v2

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=epochs, min_lr=1e-5, warmup_lr=1e-6,
                                   warmup_epochs=warmup, updates_per_epoch=2)
    out = []
    for epoch in at:
        sched.step(epoch)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_warm_up_as_long_as_the_run_is_warned_and_the_schedule_printed(data, tmp_path):
    args = [a for a in ARGS]
    i = args.index("--warmup-epochs")
    del args[i:i + 2]  # the default 5-epoch warm-up
    proc = run_main("train", data, *args, "--epochs", "2", "--output", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "the 5-epoch warm-up is as long as the 2-epoch run" in proc.stderr
    first, last = _timm_lrs(2, 5, 2e-3, [0, 1])
    assert f"cosine schedule over 2 epochs: lr {first:.3g} at epoch 1 -> {last:.3g} at epoch 2" in proc.stdout
    rows = read_csv(os.path.join(tmp_path, "run", "metrics.csv"))
    assert [float(r["lr"]) for r in rows] == pytest.approx([first, last], rel=1e-5)


def test_more_epochs_on_resume_rebuild_the_schedule(run2, data, tmp_path):
    out = copy_run(run2, tmp_path)
    proc = run_main("train", data, *ARGS, "--epochs", "4", "--output", out, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "schedule is rebuilt for 4 epochs" in proc.stdout
    assert re.search(r"resumed from .*: 2 epoch\(s\) done, best top1 \d+\.\d{3} at epoch \d", proc.stdout)
    rows = read_csv(os.path.join(out, "metrics.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    # epochs 1-2 ran on the 2-epoch schedule, 3-4 on timm's own schedule for 4 epochs
    assert [float(r["lr"]) for r in rows[:2]] == pytest.approx(_timm_lrs(2, 0, 2e-3, [0, 1]), rel=1e-5)
    assert [float(r["lr"]) for r in rows[2:]] == pytest.approx(_timm_lrs(4, 0, 2e-3, [2, 3]), rel=1e-5)
    assert float(rows[3]["lr"]) > 1e-5 * 10  # not stuck at the 2-epoch schedule's floor
