"""The run folder of ``metaformer train`` as the command line sees it: refusing to clobber a run, the
lock, and reading, checking and repairing what ``--resume`` continues."""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Optional, Tuple

from ..training import Distributed, RunFolder, RunInfo, read_training_checkpoint, run_differences
from .options import CLIError, check_input_file, log, warn

# Files that make a folder hold a run: a finished or interrupted run always has some of them.
_RUN_MARKERS = ("last.pth", "best.pth", "metrics.csv", "metrics.png")


def _continues(args: argparse.Namespace, folder: RunFolder) -> bool:
    """Whether ``--resume`` continues the run that is in ``folder``."""
    if args.resume == "auto":
        return os.path.isfile(folder.last)
    if args.resume:
        return os.path.isfile(args.resume) and os.path.samefile(os.path.dirname(os.path.abspath(args.resume)),
                                                                folder.path)
    return False


def prepare_output(args: argparse.Namespace, output: str) -> RunFolder:
    """Locks the run folder (rank 0), removes the temporaries of killed writes, and refuses to start over
    a run that is there unless ``--resume`` continues it or ``--overwrite`` replaces it.

    Raises:
        CLIError: for a folder holding another run, or one another training is writing to.
    """
    from ..training import RunLockedError

    if os.path.exists(output) and not os.path.isdir(output):
        raise CLIError(f"--output {output} is a file, not a folder")
    folder = RunFolder(output)
    try:
        folder.lock()
    except RunLockedError as e:
        raise CLIError(str(e)) from None
    except OSError as e:
        raise CLIError(f"--output {output}: cannot create the run folder: {e.strerror or e}") from None
    removed = folder.remove_stale_temporaries()
    if removed:
        log(f"removed {len(removed)} temporary file(s) left by interrupted writes in {output}")
    existing = [name for name in folder.existing_files() if name in _RUN_MARKERS]
    if not existing or _continues(args, folder):
        return folder
    if args.overwrite:
        warn(f"--overwrite: removing the previous run's {', '.join(folder.clear())} from {output}")
    elif args.resume == "auto" and set(existing) <= {"best.pth"}:
        # best.pth is written before last.pth: a kill during the first save leaves it alone
        warn(f"--resume auto: {output} has a best.pth but no last.pth (interrupted during the first save); "
             f"starting the run again")
        folder.clear()
    else:
        folder.unlock()
        raise CLIError(f"--output {output} already holds a run ({', '.join(existing)}): continue it with the same "
                       f"command and --resume auto, write elsewhere with another --output, or pass --overwrite "
                       f"to replace it")
    return folder


def read_resume(args: argparse.Namespace, folder: RunFolder, dist: Distributed
                ) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """``(path, checkpoint)`` that ``--resume`` continues, or ``(None, None)`` for a new run."""
    path = args.resume
    if path == "auto":
        path = folder.last
        if not os.path.isfile(path):
            if dist.main:
                log(f"--resume auto: no {path} yet, starting a new run")
            return None, None
    if not path:
        return None, None
    check_input_file(path, "--resume")
    resume = read_training_checkpoint(path)
    if resume is None:
        raise CLIError(f"--resume {path}: not a checkpoint written by `metaformer train`")
    return path, resume


def check_resume(path: str, resume: Dict[str, Any], run: RunInfo) -> None:
    """Refuses to continue a checkpoint with another model, architecture or classes than the options'.

    Raises:
        CLIError: naming every difference.
    """
    differences = run_differences(resume, run)
    if differences:
        args_json = os.path.join(os.path.dirname(os.path.abspath(path)), "args.json")
        raise CLIError(f"--resume {path}: the run trained something else than these options ask for: "
                       f"{'; '.join(differences)}. Resume with the run's options (see {args_json}), or start a "
                       f"new run in another --output")


def reconcile_best(folder: RunFolder, resume: Dict[str, Any], args: argparse.Namespace, dist: Distributed) -> None:
    """Makes the resumed best epoch agree with the ``best.pth`` that exists (rank 0 repairs, all ranks agree)."""
    if dist.main:
        for note in folder.reconcile_best(resume, args.eval_metric):
            warn(f"--resume: {note}")
    resume["best_metric"], resume["best_epoch"] = dist.broadcast((resume.get("best_metric"),
                                                                 resume.get("best_epoch")))
