"""The folder of a training run: one writer at a time, files saved in an order a kill cannot break.

- A lock file (``.lock``, holding the writer's PID and host) keeps a second training out of a folder
  in use; the lock of a process that no longer runs on this host is taken over.
- Each epoch ``best.pth`` (on a new best) is replaced before ``last.pth``, so a kill between the two
  leaves a ``best.pth`` at least as new as the best ``last.pth`` records; :meth:`RunFolder.reconcile_best`
  makes a resumed run's record agree with the ``best.pth`` that exists.
- The temporary files of writes killed half-way are removed (:func:`metaformer.files.remove_stale_temporaries`).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Dict, List, Optional

from ..files import pid_alive, remove_stale_temporaries, save_torch

__all__ = ["RunFolder", "RunLockedError", "RUN_FILES"]

RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "metrics.png", "args.json")


class RunLockedError(RuntimeError):
    """Another process holds the lock of a run folder; the message names it."""


class RunFolder:
    """The files of one training run under ``path``.

    Args:
        path: The run folder (created by :meth:`lock`).
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.last = os.path.join(self.path, "last.pth")
        self.best = os.path.join(self.path, "best.pth")
        self.csv = os.path.join(self.path, "metrics.csv")
        self.lock_path = os.path.join(self.path, ".lock")
        self._locked = False

    # ------------------------------------------------------------------------------ lock
    def lock(self) -> None:
        """Creates the folder and takes its lock.

        Raises:
            RunLockedError: when a running process (on this host, or any process on another host)
                holds the lock.
        """
        os.makedirs(self.path, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # a dead process's lock (or an unreadable one): take it over
                    try:
                        os.unlink(self.lock_path)
                    except FileNotFoundError:
                        pass
                    continue
                pid, host = holder
                raise RunLockedError(f"another training (PID {pid} on {host}) is writing to {self.path}; wait "
                                     f"for it to end, or write elsewhere (if that process is gone, remove "
                                     f"{self.lock_path})") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self._locked = True
            return
        raise RunLockedError(f"could not take the lock {self.lock_path}: other processes keep taking it")

    def _holder(self):
        """``(pid, host)`` of a live holder of the lock, or None for a stale or unreadable lock."""
        try:
            with open(self.lock_path) as f:
                pid_text, _, host = f.read().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        if host and host != socket.gethostname():
            return pid, host  # cannot tell whether it runs: assume it does
        return (pid, host or "this host") if pid_alive(pid) and pid != os.getpid() else None

    def unlock(self) -> None:
        """Releases the lock (if this process holds it)."""
        if not self._locked:
            return
        self._locked = False
        try:
            with open(self.lock_path) as f:
                mine = f.read().split(" ")[0] == str(os.getpid())
            if mine:
                os.unlink(self.lock_path)
        except OSError:
            pass

    # ------------------------------------------------------------------------------ contents
    def existing_files(self) -> List[str]:
        """The run files (:data:`RUN_FILES`) already in the folder."""
        return [name for name in RUN_FILES if os.path.isfile(os.path.join(self.path, name))]

    def clear(self) -> List[str]:
        """Removes the run files of a previous run; returns their names."""
        removed = []
        for name in self.existing_files():
            try:
                os.unlink(os.path.join(self.path, name))
                removed.append(name)
            except FileNotFoundError:
                pass
        return removed

    def remove_stale_temporaries(self) -> List[str]:
        """Removes the temporary files that killed writes left behind; returns their paths."""
        return remove_stale_temporaries(self.path)

    # ------------------------------------------------------------------------------ checkpoints
    def save(self, checkpoint: Dict[str, Any], is_best: bool) -> None:
        """Writes ``best.pth`` (when ``is_best``) and then ``last.pth``, each all-or-nothing.

        Raises:
            metaformer.files.WriteError: when a file cannot be written (the previous one is unchanged).
        """
        if is_best:
            save_torch(checkpoint, self.best)
        save_torch(checkpoint, self.last)

    def reconcile_best(self, resume: Dict[str, Any], eval_metric: str) -> List[str]:
        """Makes the best epoch recorded by ``resume`` (a loaded ``last.pth``) agree with ``best.pth``.

        - ``resume`` is itself the best epoch but ``best.pth`` is missing or older (a kill between the two
          writes of an older version): ``best.pth`` is rewritten from ``resume``.
        - Otherwise ``best.pth``, when it exists, is the truth: its epoch and metric replace the record
          (after a kill between the writes, it can be one epoch newer than ``last.pth``).
        - Without ``best.pth``, the record is dropped: the next validated epoch becomes the best.

        ``resume``'s ``best_metric`` and ``best_epoch`` are updated in place.

        Returns:
            Notes on what was repaired, for the caller to report.
        """
        from ..weights import CheckpointError, load_torch_file

        recorded = resume.get("best_epoch")
        epoch = int(resume["epoch"])
        best = None
        if os.path.isfile(self.best):
            try:
                best = load_torch_file(self.best)
            except CheckpointError:
                best = None
            if not isinstance(best, dict) or best.get("model_name") != resume.get("model_name"):
                best = None
        if recorded == epoch and (best is None or int(best.get("epoch", -1)) != epoch):
            save_torch(resume, self.best)
            return [f"best.pth did not hold the best epoch {epoch}; rewrote it from last.pth"]
        if best is not None:
            b_epoch, b_metric = int(best["epoch"]), best.get("best_metric")
            if (b_epoch, b_metric) != (recorded, resume.get("best_metric")):
                resume["best_epoch"], resume["best_metric"] = b_epoch, b_metric
                return [f"the best epoch is {b_epoch} ({eval_metric} {_fmt(b_metric)}), that of best.pth "
                        f"(last.pth recorded {recorded})"]
            return []
        if recorded is not None:
            resume["best_epoch"], resume["best_metric"] = None, None
            return [f"best.pth (epoch {recorded}) is missing: the next validated epoch becomes the best"]
        return []


def _fmt(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:.4g}"


